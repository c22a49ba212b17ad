"""Layer-wise sparsity allocation: how a global target is spread over decoder layers.

An allocation may observe each layer of the dense model on the calibration set (weights and
the squared input norms of each linear), or the whole model with the calibration windows
(``observes_model``, for criteria that need the full loss), before anything is pruned, then
returns one sparsity per decoder layer whose mean, weighted by the layer's prunable weights,
equals the target (layers differ in size after structured pruning, partial ``ignore`` or in
MoE models with dense layers; an unweighted mean would miss the target there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

import torch
from torch import nn

from ..options import NoOptions, option_types
from ..registry import Registry, registered_name
from ..statistics import ColumnNorms

Options = TypeVar("Options")


def centred(offsets: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """``offsets`` shifted so that their mean weighted by ``sizes`` is zero."""
    weights = torch.tensor(sizes, dtype=offsets.dtype)
    return offsets - (weights * offsets).sum() / weights.sum()


def shifted_for_existing_zeros(
    allocated: list[float], groups: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int], target: float
) -> list[float]:
    """``allocated`` lowered by one common shift so that what the layers end at has the mean weighted by ``sizes``
    ``target``, on a pruned model pruned again: a method takes each of its comparison groups (a linear, or an output
    row) to max(the zeros it holds, the layer's target), reviving none, so a group past its share keeps it and the
    rest take less. ``groups``: per layer, each comparison group's zero fraction and size. A dense model (no group
    past its target) keeps ``allocated``; where the existing zeros alone pass ``target``, every target is 0."""

    def result(layer: int, sparsity: float) -> float:
        fractions, counts = groups[layer]
        return float((fractions.clamp(min=sparsity) * counts).sum() / counts.sum())

    def excess(shift: float) -> float:
        ended = sum(result(i, max(a - shift, 0.0)) * n for i, (a, n) in enumerate(zip(allocated, sizes)))
        return ended - target * sum(sizes)

    if excess(0.0) <= 1e-12 * sum(sizes):
        return list(allocated)
    low, high = 0.0, max(allocated)  # excess falls as the shift grows: bisect it to 0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if excess(middle) > 0 else (low, middle)
    return [max(a - high, 0.0) for a in allocated]


class Allocation(ABC, Generic[Options]):
    requires_calibration: bool = False
    observes_model: bool = False  # observe_model instead of observe (layer by layer)
    seed: int = 0  # PruningConfig.seed, for what an allocation draws at random (set by AllocationSpec.create)
    # False where every layer gets the target: what needs one sparsity for all layers (N:M patterns, structured and
    # whole-model methods, router hints' room for ±λ) takes only such an allocation.
    varies_per_layer: bool = True

    def __init__(self, options: Options) -> None:
        self.options = options

    def observe(self, layer_index: int, weights: dict[str, torch.Tensor], norms: dict[str, ColumnNorms]) -> None:
        """See one dense layer's linear weights and input norms (only if ``requires_calibration``)."""

    def observe_model(self, model: nn.Module, windows: torch.Tensor, layers: list[dict[str, nn.Linear]]) -> None:
        """See the dense model and the calibration windows; ``layers`` holds each decoder layer's target linears."""

    @abstractmethod
    def allocate(self, target: float, sizes: list[int]) -> list[float]:
        """Per-layer sparsities whose mean weighted by ``sizes`` (each layer's prunable weights) is ``target``."""


@dataclass(frozen=True)
class AllocationSpec:
    name: str
    allocation: type[Allocation]
    options: type

    def __post_init__(self) -> None:
        option_types(self.options)  # a registration with options PruningConfig cannot store fails here

    def create(self, options: Any, seed: int = 0) -> Allocation:
        allocation = self.allocation(options)
        allocation.seed = seed
        return allocation


ALLOCATIONS: Registry[AllocationSpec] = Registry("sparsity allocation", "PruningConfig.allocation")


def per_layer_allocations() -> str:
    """The registered allocations that read one layer at a time (not the whole model's gradients), for messages."""
    return ", ".join(repr(name) for name in ALLOCATIONS.names() if not ALLOCATIONS.get(name).allocation.observes_model)


AllocationClass = TypeVar("AllocationClass", bound=type[Allocation])
"""What ``register_allocation`` gives back: the class itself (a user's type checker keeps seeing it)."""


def register_allocation(name: str, *, options: type = NoOptions) -> Callable[[AllocationClass], AllocationClass]:
    """Class decorator: make an ``Allocation`` (its per-layer sparsities from ``allocate``, after ``observe`` or
    ``observe_model`` where it reads the model) available as ``PruningConfig(allocation=name)``, its options the
    dataclass ``options``."""
    name = registered_name(name, "register_allocation")

    def decorator(allocation: AllocationClass) -> AllocationClass:
        ALLOCATIONS.add(name, AllocationSpec(name, allocation, options), allocation)
        return allocation

    return decorator


@register_allocation("uniform")
class UniformAllocation(Allocation[NoOptions]):
    """Every layer gets the target sparsity."""

    varies_per_layer = False

    def allocate(self, target: float, sizes: list[int]) -> list[float]:
        return [target] * len(sizes)
