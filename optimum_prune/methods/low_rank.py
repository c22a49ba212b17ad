"""Low-rank factorisation of linears, plain or Fisher-weighted (FWSVD, Hsu et al. 2022).

A linear W (out × in) becomes two factors of rank r, W ≈ A·B (A: out × r, B: r × in), which
stores and multiplies r·(out + in) instead of out·in values. Truncated SVD minimises ‖W − AB‖_F,
treating every output row alike. FWSVD weights each row i by its Fisher information
Î_i = Σ_samples Σ_j (∂L/∂W_ij)² (Eq. 4) and minimises Σ_i Î_i ‖W_i − (AB)_i‖² (Eq. 5), solved
exactly by the SVD of diag(√Î)·W = U S Vᵀ: A = diag(√Î)⁻¹ U_r √S_r, B = √S_r V_rᵀ (Eq. 6; the
√S split keeps both factors in range for half precision). The paper factorises a BERT encoder's
linears; here it applies to every linear of a decoder layer that ``PruningConfig.ignore`` leaves.

``sparsity`` is the fraction of those linears' parameters removed: each keeps rank
r = ⌊(1 − s)·out·in / (out + in)⌋ rounded down to ``round_to``. The result saves per-layer ranks
and reloads with ``from_pretrained`` after ``import optimum_prune``. Fisher weights need one
backward pass per calibration window with the whole model on the calibration device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..calibration.engine import on_device
from ..calibration.gradients import fisher_rows
from ..ignoring import is_ignored
from ..options import check_choice, option
from ..report import PruningReport
from ..sparsity import whole_count
from ..structure.modules import LowRankLinear
from ..structure.surgery import replace_submodule
from .base import StructuredMethod, register_structured_method


@dataclass(frozen=True)
class LowRankOptions:
    weighting: str = option(
        "fisher",
        "'fisher': FWSVD, output rows weighted by their Fisher information from calibration gradients; "
        "'none': plain truncated SVD (no calibration).",
    )
    round_to: int = option(8, "Ranks are rounded down to a multiple of this.")

    def __post_init__(self) -> None:
        check_choice("weighting", self.weighting, ("fisher", "none"))
        if self.round_to < 1:
            raise ValueError(f"round_to must be >= 1, got {self.round_to}")


@register_structured_method("low_rank", options=LowRankOptions)
class LowRankFactorization(StructuredMethod[LowRankOptions]):
    """Replace each linear by two low-rank factors (truncated SVD, or Fisher-weighted as FWSVD)."""

    @classmethod
    def needs_calibration(cls, options: LowRankOptions) -> bool:
        return options.weighting == "fisher"

    def check(self) -> None:
        if self.sparsity == 0:  # the rank is a parameter budget: at 0 it is still below full rank, and lossy
            raise ValueError("PruningConfig.sparsity 0 factorises no parameter away (low_rank's ranks are a parameter budget); raise it")
        self.targets: list[tuple[str, nn.Linear, int]] = [
            (name, linear, self._rank(name, linear))
            for linears in self.adapter.qualified_prunable_linears()
            for name, linear in linears.items()
            if not is_ignored(name, self.ignore)
        ]
        if not self.targets:
            raise ValueError(f"PruningConfig.ignore {self.ignore!r} leaves no linear to factorise")

    def _rank(self, name: str, linear: nn.Linear) -> int:
        out_features, in_features = linear.weight.shape
        budget = (1 - self.sparsity) * out_features * in_features / (out_features + in_features)
        rank = whole_count(budget) // self.options.round_to * self.options.round_to
        if rank < 1:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} leaves {name} ({out_features}×{in_features}) less than one "
                f"rank of {self.options.round_to}; lower the sparsity or method_options.round_to"
            )
        return rank

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        linears = [linear for _, linear, _ in self.targets]
        weights = [None] * len(linears)
        if self.options.weighting == "fisher":
            with on_device([self.adapter.model], self.device):  # whole-model gradients run on the compute device
                weights = fisher_rows(self.adapter.model, windows, linears)
        for (name, linear, rank), rows in tqdm(list(zip(self.targets, weights)), desc="Factorising linears", leave=False):
            replace_submodule(self.adapter.model, name, factorize(linear, rank, rows))
            report.removed.append(f"{name}: factorised, kept rank {rank} of {min(linear.weight.shape)}")


def factorize(linear: nn.Linear, rank: int, row_weights: torch.Tensor | None = None) -> LowRankLinear:
    """The rank-``rank`` factors minimising Σ_i w_i ‖W_i − (AB)_i‖² (all w_i = 1 without ``row_weights``)."""
    weight = linear.weight.detach().to(torch.float64)
    scale = torch.ones(weight.shape[0], dtype=torch.float64, device=weight.device)
    if row_weights is not None and row_weights.max() > 0:
        weights = row_weights.to(weight.device, torch.float64)
        scale = weights.clamp_min(weights.max() * 1e-12).sqrt()  # rows no sample reaches keep a tiny weight
    left, values, right = torch.linalg.svd(scale.unsqueeze(1) * weight, full_matrices=False)
    root = values[:rank].sqrt()
    factors = LowRankLinear(
        linear.in_features, linear.out_features, rank, linear.bias is not None, linear.weight.device, linear.weight.dtype
    )
    with torch.no_grad():
        factors.out_factor.weight.copy_(left[:, :rank] * root / scale.unsqueeze(1))
        factors.in_factor.weight.copy_(root.unsqueeze(1) * right[:rank])
        if linear.bias is not None:
            factors.out_factor.bias.copy_(linear.bias)
    return factors
