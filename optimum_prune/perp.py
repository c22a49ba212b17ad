"""PERP: after one-shot pruning, retrain only a tiny, sparsity-preserving subset (Zimmer et al. 2024).

"PERP: Rethinking the Prune-Retrain Paradigm in the Era of LLMs" shows that retraining the
biases and normalisation scales (plus low-rank adapters that cannot fill pruned weights) recovers
most of what full retraining does, at a fraction of its memory. ``prepare_perp(model)`` freezes
the model, unfreezes those parameters and wraps the target linears; train with any Trainer; then
``merge_perp(model)`` folds the adapters into the weights, which keep their exact zeros:

- **MaskLoRA**: W_eff = W + (α/r)·(B·A ⊙ M), M = (W ≠ 0); merged as W ← W + (α/r)·(BA ⊙ M).
  A starts Kaiming-uniform and B at zero, so training starts from the pruned model.
- **ScaleLoRA**: W_eff = W ⊙ (B·A), a multiplicative update; A and B start at 1/√r so B·A is all
  ones; merged as W ← W ⊙ BA, zeros stay zeros whatever B·A learns.

Both materialise B·A (out × in) in every forward of a wrapped linear, as the reference code does:
the price of being exactly mask-preserving (plain LoRA's product would fill the zeros on merge).
By default the adapted linears are the ones pruning targets (the architecture adapter's decoder
linears, e.g. Mixtral's experts too); the LM head, which pruning leaves dense, gets no adapter.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .adapters import get_adapter
from .dispatch import refuse_offloaded
from .options import coerce_scalar_fields
from .structure.counting import count_parameters
from .structure.surgery import replace_submodule

NORM_CLASS_SUFFIXES = ("RMSNorm", "LayerNorm")


DEFAULT_ALPHA = 32.0


@dataclass(frozen=True)
class PERPConfig:
    """What PERP retrains on a pruned model while its weights stay frozen: ``biases``, ``norms`` and, per linear in
    ``target_modules`` (None: every one pruning targets), a ``lora`` adapter of ``rank``: ``"mask"`` (MaskLoRA, whose
    update is masked by the weight's zeros and scaled by ``alpha / rank``), ``"scale"`` (ScaleLoRA) or None."""

    biases: bool = True
    norms: bool = True
    lora: str | None = "mask"  # "mask" (MaskLoRA), "scale" (ScaleLoRA) or None (biases and norms only)
    rank: int = 16
    alpha: float = DEFAULT_ALPHA  # MaskLoRA's update is scaled by alpha / rank; ScaleLoRA takes none
    target_modules: tuple[str, ...] | list[str] | str | None = None  # linear names (last component); None: every linear pruning targets

    def __post_init__(self) -> None:
        coerce_scalar_fields(self)
        if self.lora not in ("mask", "scale", None):
            raise ValueError(f"PERPConfig.lora must be 'mask', 'scale' or None, got {self.lora!r}")
        if self.rank < 1:
            raise ValueError(f"PERPConfig.rank must be >= 1, got {self.rank}")
        if self.lora != "mask" and self.alpha != DEFAULT_ALPHA:
            raise ValueError(
                f"PERPConfig.alpha scales MaskLoRA's update (lora='mask'); with lora={self.lora!r} nothing uses it "
                "(ScaleLoRA multiplies the weights by B·A, which starts at all ones): leave alpha at its default"
            )
        if not (self.biases or self.norms or self.lora):
            raise ValueError("PERPConfig trains nothing: enable biases, norms or lora")
        if isinstance(self.target_modules, str):  # LLaMA-Factory's lora_target style: "q_proj,v_proj"
            object.__setattr__(self, "target_modules", tuple(name.strip() for name in self.target_modules.split(",") if name.strip()))
        elif self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))


class MaskLoRALinear(nn.Module):
    """A frozen linear plus a low-rank update restricted to its non-zero weights."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(base.weight.new_empty(rank, base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    @property
    def mask(self) -> torch.Tensor:
        """The base weight's non-zero pattern, read where it is used: a checkpoint loaded after ``prepare_perp``
        (``resume_from_checkpoint``) replaces the frozen base weight, and the mask must follow its zeros."""
        return self.base.weight != 0

    def get_base_layer(self) -> nn.Linear:
        """The wrapped linear (peft's name), so masks and sparsity counts see the pruned weight itself."""
        return self.base

    def effective_weight(self) -> torch.Tensor:
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A) * self.mask

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.effective_weight(), self.base.bias)


class ScaleLoRALinear(MaskLoRALinear):
    """A frozen linear whose weights are scaled elementwise by a low-rank factor B·A (zeros stay zero)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__(base, rank, alpha)
        with torch.no_grad():
            self.lora_A.fill_(rank**-0.5)
            self.lora_B.fill_(rank**-0.5)

    def effective_weight(self) -> torch.Tensor:
        return self.base.weight * (self.lora_B @ self.lora_A)


@dataclass
class PERPSummary:
    trainable: int
    total: int
    wrapped: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total

    def __str__(self) -> str:
        return f"PERP trains {self.trainable:,} of {self.total:,} parameters ({self.fraction:.3%}); {self.wrapped} linears adapted"


def _perp_targets(model: nn.Module, config: PERPConfig) -> list[tuple[str, nn.Linear]]:
    """The linears PERP adapts: those pruning targets, or those whose last name component is in
    ``target_modules`` (every entry must name some: a typo would leave its linears untrained)."""
    if config.target_modules is None:
        return [item for layer in get_adapter(model).qualified_prunable_linears() for item in layer.items()]
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    present = {name.rsplit(".", 1)[-1] for name, _ in linears}
    unmatched = [name for name in config.target_modules if name not in present]
    if unmatched:
        raise ValueError(
            f"PERPConfig.target_modules {', '.join(map(repr, unmatched))} match no linear of {type(model).__name__}, "
            f"whose linears are named {', '.join(sorted(present))}"
        )
    targets = [(name, module) for name, module in linears if name.rsplit(".", 1)[-1] in config.target_modules]
    shared = {id(p) for module in model.modules() if not isinstance(module, nn.Linear) for p in module.parameters(recurse=False)}
    tied = [name for name, module in targets if id(module.weight) in shared]
    if tied:  # merging writes the weight in place: the tied embeddings would change with it
        raise ValueError(
            f"PERPConfig.target_modules: {', '.join(tied)} shares its weight with the input embeddings "
            "(tie_word_embeddings); leave it out of target_modules"
        )
    return targets


# Each prepared model's requires_grad flags from before prepare_perp froze it, which merge_perp restores.
_TRAINABLE_BEFORE: weakref.WeakKeyDictionary[nn.Module, dict[str, bool]] = weakref.WeakKeyDictionary()


def prepare_perp(model: nn.Module, config: PERPConfig | None = None) -> PERPSummary:
    """Freeze ``model`` except biases / norm scales, and wrap the target linears with PERP adapters
    (``merge_perp`` folds them in and makes the model as trainable as it was)."""
    config = config or PERPConfig()
    refuse_offloaded(model, "PERP trains the weights' scales and adapters beside them in place")
    if any(isinstance(module, MaskLoRALinear) for module in model.modules()):
        raise ValueError("prepare_perp: the model already has PERP adapters; call merge_perp(model) before preparing it again")
    targets = _perp_targets(model, config) if config.lora else []  # checked before anything changes
    total = count_parameters(model)
    _TRAINABLE_BEFORE[model] = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    model.requires_grad_(False)
    if hasattr(model, "enable_input_require_grads"):
        # The embeddings are frozen: without this, (reentrant) gradient checkpointing would see decoder
        # layers whose inputs need no gradient and cut the graph there, training the final norm only.
        model.enable_input_require_grads()
    for module in model.modules():
        scale = getattr(module, "weight", None)
        if config.norms and type(module).__name__.endswith(NORM_CLASS_SUFFIXES) and isinstance(scale, nn.Parameter):
            scale.requires_grad_(True)  # a LayerNorm's bias trains only with biases=True
        bias = getattr(module, "bias", None)
        if config.biases and isinstance(bias, nn.Parameter):
            bias.requires_grad_(True)
    wrapped = 0
    if config.lora:
        adapter = MaskLoRALinear if config.lora == "mask" else ScaleLoRALinear
        for name, linear in targets:
            replace_submodule(model, name, adapter(linear, config.rank, config.alpha))
        wrapped = len(targets)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return PERPSummary(trainable, total, wrapped)


def merge_perp(model: nn.Module) -> int:
    """Fold every PERP adapter into its linear (zeros stay exact zeros), and make the parameters as trainable as
    before ``prepare_perp``; return how many adapters were merged."""
    merged = [(name, module) for name, module in model.named_modules() if isinstance(module, MaskLoRALinear)]
    for name, module in merged:
        with torch.no_grad():
            weight = module.effective_weight().masked_fill(~module.mask, 0)
            module.base.weight.copy_(weight)
        replace_submodule(model, name, module.base)
    if hasattr(model, "_require_grads_hook"):
        model.disable_input_require_grads()
    trainable = _TRAINABLE_BEFORE.pop(model, None)
    if trainable is not None:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable.get(name, True))
    return len(merged)
