"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., 2024).

Layers with more outlier features (Wanda scores above M × their layer mean) keep more weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import option
from ..statistics import ColumnNorms, wanda_scores
from .base import Allocation, centred, register_allocation


@dataclass(frozen=True)
class OWLOptions:
    outlier_threshold: float = option(5.0, "M: a weight is an outlier when its Wanda score exceeds M × the layer mean (paper: 5 for LLaMA).")
    max_deviation: float = option(
        0.08,
        "λ: outlier ratios are rescaled to a spread of 2λ around the target (paper: 0.08; as in its code, a layer far "
        "from the others may move up to about 2λ from the target).",
    )

    def __post_init__(self) -> None:
        if self.outlier_threshold <= 0:
            raise ValueError(f"outlier_threshold must be positive, got {self.outlier_threshold}")
        if not 0 <= self.max_deviation < 0.5:
            raise ValueError(f"max_deviation must be in [0, 0.5), got {self.max_deviation}")


@register_allocation("owl", options=OWLOptions)
class OWLAllocation(Allocation[OWLOptions]):
    """Allocate per-layer sparsity from each layer's outlier ratio (LOD)."""

    requires_calibration = True

    def __init__(self, options: OWLOptions) -> None:
        super().__init__(options)
        self.outlier_ratios: dict[int, float] = {}

    def observe(self, layer_index: int, weights: dict[str, torch.Tensor], norms: dict[str, ColumnNorms]) -> None:
        scores = torch.cat([wanda_scores(weights[name], norms[name]).flatten() for name in weights])
        threshold = scores.mean() * self.options.outlier_threshold
        self.outlier_ratios[layer_index] = float((scores > threshold).float().mean())

    def allocate(self, target: float, sizes: list[int]) -> list[float]:
        num_layers = len(sizes)
        missing = sorted(set(range(num_layers)) - set(self.outlier_ratios))
        if missing:
            raise RuntimeError(f"OWL saw no statistics for layers {missing}")
        ratios = torch.tensor([self.outlier_ratios[i] for i in range(num_layers)], dtype=torch.float64)
        spread = ratios.max() - ratios.min()
        if spread == 0:
            return [target] * num_layers
        # Outlier ratios rescaled to [0, 2λ] and centred on the target density 1 − S (OWL, Sec. 4 /
        # reference implementation): density_l = D_l − mean(D) + (1 − S), sparsity_l = 1 − density_l;
        # the mean weighted by layer size, so the model's sparsity is S (the paper's layers are all alike).
        scaled = (ratios - ratios.min()) / spread * (2 * self.options.max_deviation)
        density = centred(scaled, sizes) + (1 - target)
        sparsities = (1 - density).tolist()
        if min(sparsities) < 0 or max(sparsities) >= 1:
            raise ValueError(
                f"OWL with target {target} and max_deviation {self.options.max_deviation} gives layer "
                f"sparsities outside [0, 1); lower PruningConfig.allocation_options.max_deviation"
            )
        return sparsities
