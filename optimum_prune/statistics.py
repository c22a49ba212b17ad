"""Calibration statistics shared by several methods."""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


def mean_ranks(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank, 0 the smallest, equal values sharing their mean rank (float64): which of equal scores
    (dead units, unrouted experts) goes first must not follow their positions."""
    ordered, order = values.flatten().sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    shared = (counts.cumsum(0) - counts).double() + (counts - 1).double() / 2
    ranks = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    ranks[order] = shared[inverse]
    return ranks


class ColumnNorms:
    """Running sum of squared input activations per input feature: ‖X_j‖₂² over all calibration tokens."""

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.squared = torch.zeros(features, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).to(self.squared.dtype)
        self.squared += flat.square().sum(dim=0)
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        return self.squared.sqrt().float()


def wanda_scores(weight: torch.Tensor, norms: ColumnNorms) -> torch.Tensor:
    """Wanda importance S_ij = |W_ij| · ‖X_j‖₂ (Sun et al. 2023, Eq. 1)."""
    return weight.detach().abs().float() * norms.norms().to(weight.device).unsqueeze(0)


class ColumnMoments(ColumnNorms):
    """Adds the running sum per input feature, for means and variances (FLAP's fluctuation)."""

    def __init__(self, features: int, device: torch.device) -> None:
        # float64: Σx² − (Σx)²/n cancels catastrophically in float32 for a feature whose mean dwarfs its spread
        super().__init__(features, device, torch.float64)
        self.total = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        super().add(inputs)
        self.total += inputs.reshape(-1, inputs.shape[-1]).to(torch.float64).sum(dim=0)

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).float()

    def variance(self) -> torch.Tensor:
        """Unbiased sample variance over calibration tokens (0 from a single token: nothing fluctuates)."""
        n = self.tokens
        if n < 2:  # n = max(tokens, 2) made one token's variance x²/2
            return torch.zeros_like(self.squared, dtype=torch.float32)
        return ((self.squared - self.total.square() / n) / (n - 1)).clamp_min(0).float()


def forget_compiled_graphs(args: object, model: nn.Module | None) -> None:
    """Drop every graph ``torch.compile`` traced in this process, when training compiles
    (``TrainingArguments.torch_compile``) or ``model`` was compiled (``model.compile()``, ``torch.compile(model)``):
    Dynamo does not recheck module hooks, so a graph traced before a callback's statistics hooks were added would
    skip them, and one traced with them would run them after they were removed. Other compiled code recompiles."""
    compiled = getattr(args, "torch_compile", False) or (
        model is not None and any(getattr(m, "_compiled_call_impl", None) is not None or type(m).__name__ == "OptimizedModule" for m in model.modules())
    )
    if compiled:
        torch._dynamo.reset()


@dataclass
class _TrainingRun:
    state: weakref.ref  # the run's TrainerState (one per train() call)
    release: weakref.WeakMethod  # the callback's own removal of its hooks, while the callback lives
    hooks: list[torch.utils.hooks.RemovableHandle]  # what to remove once the callback is gone (handles hold no model)


# Weak references only: a model (and its callbacks) a stopped run left must still be freed when the caller drops it.
_UNFINISHED_RUNS: weakref.WeakKeyDictionary[nn.Module, dict[int, _TrainingRun]] = weakref.WeakKeyDictionary()


def start_training_run(
    model: nn.Module, callback: Any, state: Any, release: Callable[[], None], hooks: list[torch.utils.hooks.RemovableHandle]
) -> None:
    """Note that training ``callback`` puts ``hooks`` on ``model`` for the run of ``state`` until it ends
    (``end_training_run``); ``release`` removes them (and what else the callback holds). A run stopped by an exception
    or Ctrl-C never reaches ``on_train_end``: its hooks are removed here, when the next run on the model starts (the
    same callback's or a new one's), or they would go on masking gradients, counting activations or routing around
    dropped experts beside the new ones. Callbacks of the same run (two in one Trainer) keep theirs."""
    runs = _UNFINISHED_RUNS.setdefault(model, {})
    for key, run in list(runs.items()):
        if run.state() is not state:
            del runs[key]
            logger.warning("removing the hooks an earlier training run of this model left (it stopped before its end)")
            release_left = run.release()
            if release_left is not None:
                release_left()
            for hook in run.hooks:
                hook.remove()
    runs[id(callback)] = _TrainingRun(weakref.ref(state), weakref.WeakMethod(release), hooks)


def end_training_run(model: nn.Module, callback: Any) -> None:
    _UNFINISHED_RUNS.get(model, {}).pop(id(callback), None)


class RealTokens:
    """The real (unpadded) positions of the batch ``model`` is running, read from its ``attention_mask``,
    for hooks inside it that gather statistics: padding would count like text otherwise."""

    def __init__(self, model: nn.Module) -> None:
        self.mask: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self._remember, with_kwargs=True)

    def _remember(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        real = _real_positions(mask) if isinstance(mask, torch.Tensor) else None
        if real is not None:  # a cached step's 2-D mask spans the cache too: its last positions are the tokens run
            given = (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1])
            tokens = next((t for t in given if isinstance(t, torch.Tensor)), None)
            if tokens is not None and tokens.dim() >= 2:
                real = real[:, -tokens.shape[1] :]
        self.mask = None if real is None or bool(real.all()) else real

    def of(self, values: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """``values`` at the real positions only: laid out per position (``[batch, seq, ...]`` or flattened to
        ``[batch·seq, ...]``, as most MoE blocks flatten the batch before routing), or one row per entry of
        ``positions`` (an expert's tokens, as batch·seq indices)."""
        if self.mask is None:
            return values
        flat = self.mask.reshape(-1).to(values.device)
        if positions is not None:
            return values.reshape(-1, values.shape[-1])[flat[positions.to(values.device)]]
        if values.shape[:2] == self.mask.shape:
            return values[self.mask.to(values.device)]
        return values[flat] if values.shape[0] == flat.numel() else values


def _real_positions(mask: torch.Tensor) -> torch.Tensor | None:
    """``[batch, seq]``, True at real tokens, of a 2-D padding mask or a prepared 4-D one (``[batch, heads, seq, seq]``,
    e.g. LLaMA-Factory's packed sequences): a position is real when it attends to itself, True in a boolean mask,
    not (near) the dtype's minimum in an additive one. None for a 4-D mask of a cached decode step (queries ≠ keys)."""
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() != 4 or mask.shape[-1] != mask.shape[-2]:
        return None
    itself = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    return itself if itself.dtype == torch.bool else itself > torch.finfo(itself.dtype).min / 2


def token_cosine(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two hidden-state tensors, one value per token (ShortGPT's Block Influence is 1 − its mean)."""
    return torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1).reshape(-1)


class BlockInfluence:
    """Running ShortGPT Block Influence of one block: 1 − the mean token cosine between what enters and
    what leaves it, summed batch by batch (on the batches' device: no sync) rather than kept per token."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.tokens = 0

    def add(self, entering: torch.Tensor, leaving: torch.Tensor) -> None:
        cosine = token_cosine(entering, leaving)
        self.total = self.total + cosine.double().sum()
        self.tokens += cosine.numel()

    def value(self) -> float:
        return 1 - float(self.total) / self.tokens
