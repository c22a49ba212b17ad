"""The shared shape of a pruning method: one ``LayerPruner`` per linear, with two hooks.

The calibration engine creates a pruner for every linear of a decoder layer, feeds it the
linear's inputs through ``add_batch`` while the layer runs on the calibration set, then calls
``prune`` once. Methods therefore differ only in the statistics they keep and how they turn
them into a mask (and, for SparseGPT, a weight update).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import torch
from torch import nn

from ..options import NoOptions
from ..registry import Registry
from ..sparsity import NMPattern, SparsityTarget

Options = TypeVar("Options")


class LayerPruner(ABC, Generic[Options]):
    def __init__(self, linear: nn.Linear, options: Options) -> None:
        self.linear = linear
        self.options = options

    @classmethod
    def check_target(cls, options: Options, target: SparsityTarget, in_features: int) -> None:
        """Raise ``ValueError`` if this method cannot reach ``target`` on a linear with ``in_features``.

        ``prune`` calls it for every linear before touching any weight, so a bad combination
        never leaves a half-pruned model.
        """
        if isinstance(target, NMPattern):
            target.check_columns(in_features)

    def add_batch(self, inputs: torch.Tensor) -> None:
        """Accumulate statistics from one batch of this linear's inputs (``[..., in_features]``)."""

    @abstractmethod
    def prune(self, target: SparsityTarget) -> None:
        """Zero (and possibly update) ``self.linear.weight`` in place to reach ``target``."""

    def apply_mask(self, mask: torch.Tensor) -> None:
        with torch.no_grad():
            self.linear.weight.masked_fill_(mask.to(self.linear.weight.device), 0)


@dataclass(frozen=True)
class MethodSpec:
    name: str
    pruner: type[LayerPruner]
    options: type
    requires_calibration: bool
    summary: str

    def create(self, linear: nn.Linear, options: Any) -> LayerPruner:
        return self.pruner(linear, options)


METHODS: Registry[MethodSpec] = Registry("pruning method", "PruningConfig.method")


def register_method(
    name: str, *, options: type = NoOptions, requires_calibration: bool = True
) -> Callable[[type[LayerPruner]], type[LayerPruner]]:
    """Class decorator: make a ``LayerPruner`` available as ``PruningConfig(method=name)``."""

    def decorator(pruner: type[LayerPruner]) -> type[LayerPruner]:
        summary = (pruner.__doc__ or "").strip().splitlines()[0] if pruner.__doc__ else ""
        METHODS.add(name, MethodSpec(name, pruner, options, requires_calibration, summary))
        return pruner

    return decorator
