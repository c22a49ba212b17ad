"""Hooks that training callbacks put on a model, and their bookkeeping across ``Trainer.train`` runs.

``PruningCallback``, ``ExpertDroppingCallback`` and expert skipping gather statistics from inside a model while it
trains or generates: ``RealTokens`` tells their hooks which positions are text (not padding); ``start_training_run`` /
``end_training_run`` remove the hooks a stopped run left; ``forget_compiled_graphs`` keeps ``torch.compile`` from
running stale ones.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

logger = logging.getLogger(__name__)


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
