"""Wanda (Sun et al., 2023, "A Simple and Effective Pruning Approach for Large Language Models")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..distributed import all_reduce_sum
from ..options import check_choice, option
from ..sparsity import SparsityTarget, select_mask
from ..statistics import ColumnNorms, wanda_scores
from .base import LayerPruner, register_method, zero_shares_per_row, require_finite_statistics
from .magnitude import COMPARISON_GROUPS


@dataclass(frozen=True)
class WandaOptions:
    comparison_group: str = option(
        "output",
        "'output': compare weights within each output row (the paper's choice, Sec. 3); "
        "'layer': across the whole matrix. (An N:M pattern ranks within its groups of M inputs.)",
        fractions_only=True,
    )

    def __post_init__(self) -> None:
        check_choice("comparison_group", self.comparison_group, COMPARISON_GROUPS)


@register_method("wanda", options=WandaOptions)
class WandaPruner(LayerPruner[WandaOptions]):
    """Prune by |W| · ‖X‖₂, the weight magnitude times the input feature's activation norm."""

    def __init__(self, linear: torch.nn.Linear, options: WandaOptions) -> None:
        super().__init__(linear, options)
        self.norms = ColumnNorms(linear.in_features, linear.weight.device)

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.norms.add(inputs)

    def synchronize(self) -> None:
        all_reduce_sum(self.norms.squared)

    def scores(self) -> torch.Tensor:
        return wanda_scores(self.linear.weight, self.norms)

    @classmethod
    def zero_shares(cls, options: WandaOptions, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return zero_shares_per_row(zero) if options.comparison_group == "output" else super().zero_shares(options, zero)

    def prune(self, target: SparsityTarget) -> None:
        require_finite_statistics(self.norms.squared, "inputs' squared norms (float32 sums over the calibration tokens)")
        self.apply_mask(select_mask(self.scores(), target, per_row=self.options.comparison_group == "output"))
