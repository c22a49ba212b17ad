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

On an already factorised linear (a second run) the product A·B is factorised again, one pair of
factors at rank ⌊(1 − s)·r⌋ (rounded down as above: ``sparsity`` removes that fraction of its
parameters): its truncated SVD comes from the QR decompositions of diag(√Î)·A and Bᵀ and the SVD
of the r × r product of their triangles, without forming the out × in product; Fisher weights
need the product's gradient, so with ``fisher`` each factorised target is first multiplied out
into a dense linear for the backward passes (the memory of the model before its first run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..calibration.engine import on_device
from ..calibration.gradients import fisher_rows
from ..ignoring import is_ignored
from ..options import check_choice, check_round_to, option
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
        check_round_to(self.round_to)


@register_structured_method("low_rank", options=LowRankOptions)
class LowRankFactorization(StructuredMethod[LowRankOptions]):
    """Replace each linear by two low-rank factors (truncated SVD, or Fisher-weighted as FWSVD)."""

    @classmethod
    def needs_calibration(cls, options: LowRankOptions) -> bool:
        return options.weighting == "fisher"

    def always_records_layer_shapes(self) -> bool:
        return True  # factorised linears: ranks recorded per layer

    def check(self) -> None:
        if self.sparsity == 0:  # the rank is a parameter budget: at 0 it is still below full rank, and lossy
            raise ValueError("PruningConfig.sparsity 0 factorises no parameter away (low_rank's ranks are a parameter budget); raise it")
        model = self.adapter.model
        targets: dict[str, nn.Linear | LowRankLinear] = {}
        for linears in self.adapter.qualified_prunable_linears():
            for name, linear in linears.items():
                owner = name.rpartition(".")[0]
                if isinstance(model.get_submodule(owner), LowRankLinear):  # a factor: its product is factorised again
                    name, linear = owner, model.get_submodule(owner)
                if is_ignored(name, self.ignore):
                    continue
                if type(linear) not in (nn.Linear, LowRankLinear):  # optimum-quanto's QLinear before freeze: quantized at each forward
                    raise ValueError(
                        f"{name} is a {type(linear).__name__} where low_rank factorises plain linears (its factors would "
                        "drop what that class does, e.g. quantization not yet frozen); factorise before quantizing"
                    )
                targets[name] = linear
        self.targets: list[tuple[str, nn.Linear | LowRankLinear, int]] = [
            (name, linear, self._rank(name, linear)) for name, linear in targets.items()
        ]
        if not self.targets:
            raise ValueError(f"PruningConfig.ignore {self.ignore!r} leaves no linear to factorise")

    def _rank(self, name: str, linear: nn.Linear | LowRankLinear) -> int:
        out_features, in_features = linear.out_features, linear.in_features
        parameters = _full_rank(linear) * (out_features + in_features) if isinstance(linear, LowRankLinear) else out_features * in_features
        budget = (1 - self.sparsity) * parameters / (out_features + in_features)
        rank = whole_count(budget) // self.options.round_to * self.options.round_to
        if rank < 1 and isinstance(linear, LowRankLinear) and linear.rank <= self.options.round_to:  # any sparsity > 0 does
            raise ValueError(
                f"{name} is factorised at rank {linear.rank} already, which no sparsity leaves a rank of "
                f"PruningConfig.method_options.round_to={self.options.round_to}: "
                + ("" if self.options.round_to == 1 else "lower round_to, or ") + f"add {name!r} to PruningConfig.ignore"
            )
        if rank < 1:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} leaves {name} ({out_features}×{in_features}) less than one "
                f"rank of {self.options.round_to}; lower it or PruningConfig.method_options.round_to"
            )
        return rank

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        weights = [None] * len(self.targets)
        ranks_now = {name: _full_rank(linear) for name, linear, _ in self.targets}
        if self.options.weighting == "fisher":
            for index, (name, linear, rank) in enumerate(self.targets):
                if isinstance(linear, LowRankLinear):  # its rows' Fisher information is the product's gradient's
                    linear = _multiplied_out(linear)
                    replace_submodule(self.adapter.model, name, linear)
                    self.targets[index] = (name, linear, rank)
            linears = [linear for _, linear, _ in self.targets]
            with on_device([self.adapter.model], self.device):  # whole-model gradients run on the compute device
                weights = fisher_rows(self.adapter.model, windows, linears)
        for (name, linear, rank), rows in tqdm(list(zip(self.targets, weights)), desc="Factorising linears", leave=False):
            replace_submodule(self.adapter.model, name, factorize(linear, rank, rows))
            report.removed.append(f"{name}: factorised, kept rank {rank} of {ranks_now[name]}")


def factorize(linear: nn.Linear | LowRankLinear, rank: int, row_weights: torch.Tensor | None = None) -> LowRankLinear:
    """The rank-``rank`` factors minimising Σ_i w_i ‖W_i − (AB)_i‖² (all w_i = 1 without ``row_weights``); of an
    already factorised linear, those of its product (one pair of factors, not factors of factors)."""
    reference = linear.out_factor.weight if isinstance(linear, LowRankLinear) else linear.weight
    scale = torch.ones(linear.out_features, dtype=torch.float64, device=reference.device)
    if row_weights is not None and row_weights.max() > 0:
        weights = row_weights.to(reference.device, torch.float64)
        scale = weights.clamp_min(weights.max() * 1e-12).sqrt()  # rows no sample reaches keep a tiny weight
    if isinstance(linear, LowRankLinear):
        left, values, right = _product_svd(scale.unsqueeze(1) * linear.out_factor.weight.detach().double(), linear.in_factor.weight.detach().double())
    else:
        left, values, right = torch.linalg.svd(scale.unsqueeze(1) * linear.weight.detach().double(), full_matrices=False)
    root = values[:rank].sqrt()
    factors = LowRankLinear(linear.in_features, linear.out_features, rank, linear.bias is not None, reference.device, reference.dtype)
    with torch.no_grad():
        factors.out_factor.weight.copy_(left[:, :rank] * root / scale.unsqueeze(1))
        factors.in_factor.weight.copy_(root.unsqueeze(1) * right[:rank])
        if linear.bias is not None:
            factors.out_factor.bias.copy_(linear.bias)
    return factors


def _product_svd(left_factor: torch.Tensor, right_factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of ``left_factor @ right_factor`` (out × r times r × in): A = Q_a·R_a and Bᵀ = Q_b·R_b give
    AB = Q_a·(R_a·R_bᵀ)·Q_bᵀ, so the SVD of the r × r middle is all that is decomposed."""
    left_q, left_r = torch.linalg.qr(left_factor)
    right_q, right_r = torch.linalg.qr(right_factor.T)
    left, values, right = torch.linalg.svd(left_r @ right_r.T)
    return left_q @ left, values, right @ right_q.T


def _full_rank(linear: nn.Linear | LowRankLinear) -> int:
    """The rank a linear has now: its factors' for a factorised one."""
    return linear.rank if isinstance(linear, LowRankLinear) else min(linear.out_features, linear.in_features)


def _multiplied_out(factors: LowRankLinear) -> nn.Linear:
    """The dense linear a factorised one computes."""
    weight = factors.out_factor.weight
    linear = nn.Linear(factors.in_features, factors.out_features, factors.bias is not None, weight.device, weight.dtype)
    with torch.no_grad():
        linear.weight.copy_((factors.out_factor.weight.double() @ factors.in_factor.weight.double()).to(weight.dtype))
        if factors.bias is not None:
            linear.bias.copy_(factors.bias)
    return linear
