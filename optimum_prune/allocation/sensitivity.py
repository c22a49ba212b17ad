"""Sensitivity-aware mixed sparsity (Shao et al., 2024, "One-Shot Sensitivity-Aware Mixed Sparsity
Pruning for Large Language Models").

A layer's sensitivity is the trace of the calibration loss's Hessian over its linear weights,
estimated with Hutchinson's method (E[vᵀHv], v Rademacher; double backprop through the whole
model). Layers are ranked by it and their densities spread linearly over the ranks, centred on
the target: density_ℓ = (1 − S) + λ·(2·rank_ℓ / (L − 1) − 1), so the mean sparsity is S and the
most sensitive layer keeps the most weights. This is the layer-level allocation of the reference
code (``get_uniform_sparsity``), written for any target (that code's arithmetic only balances
at S = 0.5). Use it with ``method="sparsegpt"`` and ``saliency="isc"``, as the paper does.

Memory: the Hutchinson pass holds one window's activations with their double-backward graph
for the whole model on its device (see ``calibration.gradients.hessian_traces``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.gradients import hessian_traces
from ..distributed import all_reduce_sum, shard_positions
from ..options import option
from ..statistics import mean_ranks
from .base import Allocation, centred, register_allocation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SensitivityOptions:
    max_deviation: float = option(
        0.1,
        "λ: densities run from 1 − S − λ (least sensitive layer) to 1 − S + λ (reference code: 0.1 at 50 %), then shift "
        "together so that the size-weighted mean sparsity stays S: with layers of unequal size one may move up to about 2λ.",
    )
    windows: int = option(8, "Calibration windows of the Hutchinson estimate (reference code: one 2,048-token sequence).")
    probes: int = option(1, "Rademacher probes per window.")

    def __post_init__(self) -> None:
        if not 0 <= self.max_deviation < 0.5:
            raise ValueError(f"max_deviation must be in [0, 0.5), got {self.max_deviation}")
        if self.windows < 1 or self.probes < 1:
            raise ValueError(f"windows and probes must be >= 1, got {self.windows} and {self.probes}")


@register_allocation("sensitivity", options=SensitivityOptions)
class SensitivityAllocation(Allocation[SensitivityOptions]):
    """Per-layer sparsity from the Hessian trace of each layer's weights (Hutchinson)."""

    requires_calibration = True
    observes_model = True

    def __init__(self, options: SensitivityOptions) -> None:
        super().__init__(options)
        self.sensitivities: list[float] = []

    def observe_model(self, model: nn.Module, windows: torch.Tensor, layers: list[dict[str, nn.Linear]]) -> None:
        """The traces over the first ``windows`` windows of the whole calibration set; with several processes,
        each estimates on its share of those (``windows`` is then its ``shard``) and the sums are all-reduced,
        so every process ranks the layers as a single process would."""
        if not isinstance(windows, torch.Tensor):
            raise ValueError("allocation 'sensitivity' needs token windows as calibration (the Hessian is of the language-model loss)")
        groups = [[linear.weight for linear in linears.values()] for linears in layers]
        positions = [position for position in shard_positions(len(windows)) if position < self.options.windows]
        totals = torch.zeros(len(groups), dtype=torch.float64)
        if positions:
            means = hessian_traces(model, windows[: len(positions)], groups, self.options.probes, self.seed, window_indices=positions)
            totals += torch.tensor(means, dtype=torch.float64) * len(positions)
        used = torch.tensor([float(len(positions))], dtype=torch.float64)
        all_reduce_sum(totals, used)
        if used.item() < self.options.windows:
            logger.warning(
                "PruningConfig.allocation_options.windows is %d but the calibration holds %d windows: the Hessian traces "
                "use those",
                self.options.windows, int(used.item()),
            )  # fmt: skip
        self.sensitivities = (totals / used).tolist()

    def allocate(self, target: float, sizes: list[int]) -> list[float]:
        num_layers = len(sizes)
        if len(self.sensitivities) != num_layers:
            raise RuntimeError(f"sensitivity allocation saw {len(self.sensitivities)} layers, expected {num_layers}")
        if num_layers == 1:
            return [target]
        ranks = mean_ranks(torch.tensor(self.sensitivities, dtype=torch.float64))  # equal layers, equal sparsity
        deviation = self.options.max_deviation
        offsets = -deviation * (2 * ranks / (num_layers - 1) - 1)
        sparsities = (target + centred(offsets, sizes)).tolist()
        if min(sparsities) < 0 or max(sparsities) >= 1:
            raise ValueError(
                f"sensitivity allocation with target {target} and max_deviation {deviation} gives layer sparsities "
                "outside [0, 1); lower PruningConfig.allocation_options.max_deviation"
            )
        return sparsities
