"""Dynamic expert skipping (Lu et al. 2024, "Not All Experts are Equal", Sec. 4.2).

At inference, a token skips each of its lower-ranked experts whose routing weight is below
``beta`` times its top expert's weight: that expert is not run for the token and its term is
dropped from the mixture. A router that rescales its top-k weights to sum to one (Mixtral,
``norm_topk_prob``) rescales the kept ones, as the paper's code does, so a token that skips its
second expert of Mixtral's two is routed as top-1 routing would route it; the other routers' weights
stay as they are. ``beta=0`` reproduces the unmodified model.

The paper sets each layer's ``beta`` to the median, over calibration tokens, of the second-ranked
expert's routing weight over the top one's (``skipping_thresholds``; what ``skip_experts`` does when
no ``beta`` is given), so every layer skips about half of its second experts. The handle counts
the expert calls of real (unpadded) tokens and their skips: ``skip_rate`` is the saving, to read
next to the quality it costs.

    skipping = skip_experts(model, calibration=texts, tokenizer=tokenizer)  # or beta=0.3 for every layer
    ...generate / evaluate...
    print(skipping.betas, skipping.skip_rate); skipping.remove()
"""

from __future__ import annotations

import types
import weakref
from typing import Any, Sequence

import torch
from torch import nn

from .adapters import DecoderAdapter, UnsupportedArchitecture, get_adapter
from .adapters.moe import expert_tokens
from .calibration import CalibrationSource, calibration_windows
from .calibration.engine import evaluating, walk_layers
from .dispatch import refuse_layer_walks
from .training_hooks import RealTokens


def moe_blocks(adapter: DecoderAdapter, purpose: str) -> list[nn.Module]:
    """The model's mixture-of-experts blocks, in layer order; an error naming ``purpose`` when it has none (an
    ``UnsupportedArchitecture``, as ``prune`` raises for experts of a dense model)."""
    blocks = [block for layer in adapter.decoder_layers() if (block := adapter.moe_block(layer)) is not None]
    if not blocks:
        raise UnsupportedArchitecture(f"{type(adapter.model).__name__} has no mixture-of-experts layers to {purpose}")
    return blocks


class PatchedMoEBlocks:
    """Replaces the forward of every MoE block of a model by one whose routed experts' output comes
    from ``_experts_output`` (inference-time variants of the mixture; the router and a shared expert
    run as before); ``remove()`` restores the blocks' own forward."""

    def __init__(self, model: nn.Module, purpose: str) -> None:
        self.adapter = get_adapter(model)
        self._blocks = moe_blocks(self.adapter, purpose)
        self.adapter.require_softmax_router(type(self).__name__)
        for block in self._blocks:
            _check_unpatched(block)
        self._check_blocks(self._blocks)
        for block in self._blocks:
            setattr(block, _forward_slot(block), _PatchedForward(self, block))

    def _check_blocks(self, blocks: list[nn.Module]) -> None:
        """Refuse settings that do not fit these blocks, before any is patched."""

    def block_forward(self, block: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A patched block's forward (``_PatchedForward``)."""
        batch, length, width = hidden_states.shape
        tokens = hidden_states.reshape(-1, width)
        logits = self.adapter.router(block)(tokens)
        output = self._experts_output(block, tokens, logits, batch)
        shared = self.adapter.shared_expert_output(block, tokens)
        if shared is not None:
            output = output + shared
        return output.reshape(batch, length, width), logits

    def _experts_output(self, block: nn.Module, tokens: torch.Tensor, logits: torch.Tensor, batch: int) -> torch.Tensor:
        """The routed experts' contribution for ``tokens`` (``batch`` sequences of equal length, flattened)."""
        raise NotImplementedError

    def remove(self) -> None:
        for block in self._blocks:
            if moe_variant(block) is not self:  # its own patch only
                continue
            if _forward_slot(block) == "forward":
                del block.forward  # back to the class's forward
            else:
                block._old_forward = _own_forward(block)
        self._blocks = []
        self.adapter = None  # the model: a handle kept for its counters (skip_rate, relative_error) kept it alive


class _PatchedForward:
    """What a patched block's ``forward`` is: its handle's (``handle`` names the variant, for the error a second patch
    gets). A copy or pickle of the model gets the block's own forward back, bound as transformers leaves it (which
    the next patch drops): the handle that runs, counts and removes the patch belongs to the original model (a copy
    ran it and failed, and could not be unpatched). The block is held weakly: it holds this."""

    def __init__(self, handle: PatchedMoEBlocks, block: nn.Module) -> None:
        self.handle, self._block = handle, weakref.ref(block)

    def __call__(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.handle.block_forward(self._block(), hidden_states)

    def __reduce__(self) -> tuple[Any, tuple[nn.Module]]:
        return _own_forward, (self._block(),)


def _own_forward(block: nn.Module) -> Any:
    return types.MethodType(type(block).forward, block)


def _forward_slot(block: nn.Module) -> str:
    """The attribute a variant patches: ``forward``, or under accelerate's hook (``dispatch_model``, a ``device_map``)
    the ``_old_forward`` it calls once it has loaded the block's offloaded weights and moved its inputs."""
    return "_old_forward" if hasattr(block, "_hf_hook") and "_old_forward" in vars(block) else "forward"


def moe_variant(block: nn.Module) -> PatchedMoEBlocks | None:
    """The variant of the mixture (``skip_experts``, ``fold_experts``) ``block`` runs, if any."""
    return getattr(vars(block).get(_forward_slot(block)), "handle", None)


def _check_unpatched(block: nn.Module) -> None:
    """Refuse a block whose forward another variant (or anything else) replaced. transformers leaves the
    class's own forward behind as an instance attribute after recording ``output_router_logits``
    (it wraps the forward and puts back what it found): that one is no patch, and is dropped."""
    slot = _forward_slot(block)
    patched = vars(block).get(slot)
    if patched is None:
        return
    if getattr(patched, "__func__", None) is type(block).forward and getattr(patched, "__self__", None) is block:
        if slot == "forward":
            del block.forward
        return
    variant = getattr(patched, "handle", None)
    raise ValueError(
        f"the model's MoE blocks already run {type(variant).__name__ if variant else 'a patched forward'}: one "
        "variant of the mixture at a time; remove() it first"
    )


class ExpertSkipping(PatchedMoEBlocks):
    """Installed on every MoE block of a model by ``skip_experts``; ``remove()`` restores them."""

    def __init__(self, model: nn.Module, beta: float | Sequence[float]) -> None:
        given = [beta] if isinstance(beta, (int, float)) else list(beta)
        for value in given:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"beta must be in [0, 1] (fraction of the top expert's routing weight), got {value!r}")
        self._given = [float(value) for value in given]
        self.betas: list[float] = []
        self.expert_calls = 0
        self.skipped_calls = 0
        super().__init__(model, "skip experts in")
        self._beta_of = {id(block): beta for block, beta in zip(self._blocks, self.betas)}
        self._real_tokens = RealTokens(model)

    def _check_blocks(self, blocks: list[nn.Module]) -> None:
        if len(self._given) not in (1, len(blocks)):
            raise ValueError(f"beta: {len(self._given)} values for {len(blocks)} mixture-of-experts layers; give one, or one per layer")
        self.betas = self._given * len(blocks) if len(self._given) == 1 else self._given

    @property
    def skip_rate(self) -> float:
        """Fraction of the real tokens' (token, selected expert) calls skipped so far."""
        return self.skipped_calls / self.expert_calls if self.expert_calls else 0.0

    def _experts_output(self, block: nn.Module, tokens: torch.Tensor, logits: torch.Tensor, batch: int) -> torch.Tensor:
        weights, selected = self.adapter.route(block, logits)
        kept = weights >= self._beta_of[id(block)] * weights[:, :1]  # top-k is sorted: column 0 is the top expert
        counted = self._real_tokens.of(kept)
        self.expert_calls += counted.numel()
        self.skipped_calls += int((~counted).sum())
        if self.adapter.renormalises(block):  # over the kept experts, for tokens that skip one (others as routed, bit for bit)
            renormalised = weights * kept
            weights = torch.where(kept.all(dim=-1, keepdim=True), weights, renormalised / renormalised.sum(dim=-1, keepdim=True))
        return routed_mixture(self.adapter.block_experts(block), tokens, weights, selected, kept)

    def remove(self) -> None:
        super().remove()
        self._real_tokens.handle.remove()


def routed_mixture(
    experts: nn.ModuleList, tokens: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_k g_k·E_k(x): each token's selected (and ``kept``) experts, weighted by routing weight."""
    output = torch.zeros_like(tokens)
    for expert in torch.unique(selected if kept is None else selected[kept]).tolist():
        rank, token = expert_tokens(selected, expert, kept)
        output.index_add_(0, token, experts[expert](tokens[token]) * weights[token, rank, None].to(tokens.dtype))
    return output


def skip_experts(
    model: nn.Module,
    beta: float | Sequence[float] | None = None,
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    num_samples: int = 8,
    seq_len: int = 512,
    seed: int = 0,
) -> ExpertSkipping:
    """Turn on dynamic expert skipping on every MoE block of ``model``: with threshold ``beta`` (one for
    every layer, or one per MoE layer), or by default with Lu et al.'s per-layer thresholds measured on
    ``calibration`` (``skipping_thresholds``)."""
    if beta is None:
        beta = skipping_thresholds(model, calibration, tokenizer, num_samples, seq_len, seed)
    return ExpertSkipping(model, beta)


def skipping_thresholds(
    model: nn.Module,
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    num_samples: int = 8,
    seq_len: int = 512,
    seed: int = 0,
) -> list[float]:
    """Each MoE layer's median, over the calibration tokens, of the second-ranked expert's routing weight
    over the top expert's (Lu et al.'s β): a token skips its second expert about half of the time."""
    adapter = get_adapter(model)
    blocks = moe_blocks(adapter, "skip experts in")
    adapter.require_softmax_router("skipping_thresholds")
    refuse_layer_walks(model, "skipping_thresholds", " (or pass skip_experts a beta)")
    if any(adapter.experts_per_token(block) < 2 for block in blocks):
        raise ValueError("expert skipping needs routers that pick two experts or more per token; this model's pick one")
    ratios: list[list[torch.Tensor]] = [[] for _ in blocks]

    def observe(found: list[torch.Tensor]):
        def hook(_module: nn.Module, _args: tuple, logits: torch.Tensor) -> None:
            top = torch.softmax(logits.reshape(-1, logits.shape[-1]).float(), dim=-1).topk(2, dim=-1).values
            found.append((top[:, 1] / top[:, 0]).cpu())

        return hook

    windows = calibration_windows(calibration, tokenizer, num_samples, seq_len, seed, model, "skipping_thresholds")
    handles = [adapter.router(block).register_forward_hook(observe(found)) for block, found in zip(blocks, ratios)]
    try:  # evaluating: a model straight from training would add its router jitter noise and dropout
        with evaluating(model), torch.no_grad():
            walk_layers(adapter, windows, next(model.parameters()).device, lambda *_: None, "Expert skipping thresholds")
    finally:
        for handle in handles:
            handle.remove()
    return [_median(torch.cat(found)) for found in ratios]


def _median(values: torch.Tensor) -> float:
    """The middle value, or the mean of the two middle ones (as numpy's median)."""
    ordered = values.double().sort().values
    return float(ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
