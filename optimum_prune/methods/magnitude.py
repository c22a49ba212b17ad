"""Magnitude pruning: remove the weights of smallest |W| (no calibration data)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..options import check_choice, option
from ..sparsity import SparsityTarget, select_mask
from .base import LayerPruner, register_method, zero_shares_per_row

COMPARISON_GROUPS = ("layer", "output")


@dataclass(frozen=True)
class MagnitudeOptions:
    comparison_group: str = option(
        "layer",
        "'layer': rank |W| across the whole matrix (the usual LLM baseline, as in the Wanda and "
        "SparseGPT papers); 'output': rank within each output row. (An N:M pattern ranks within its groups of M inputs.)",
        fractions_only=True,
    )

    def __post_init__(self) -> None:
        check_choice("comparison_group", self.comparison_group, COMPARISON_GROUPS)


@register_method("magnitude", options=MagnitudeOptions)
class MagnitudePruner(LayerPruner[MagnitudeOptions]):
    """Prune the smallest-magnitude weights (data-free baseline)."""

    @classmethod
    def needs_calibration(cls, options: MagnitudeOptions) -> bool:
        return False

    @classmethod
    def zero_shares(cls, options: MagnitudeOptions, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return zero_shares_per_row(zero) if options.comparison_group == "output" else super().zero_shares(options, zero)

    def prune(self, target: SparsityTarget) -> None:
        scores = self.linear.weight.detach().abs().float()
        self.apply_mask(select_mask(scores, target, per_row=self.options.comparison_group == "output"))
