"""MPOE (Gao et al., "Parameter-Efficient Mixture-of-Experts Architecture for Pre-trained Language
Models", COLING 2022): every expert linear of a MoE layer becomes a matrix product operator whose
central tensor — most of the parameters — is shared by the layer's experts; each expert keeps only
its four small auxiliary tensors (``optimum_prune.structure.mpo``).

MPOE builds its experts by decomposing a pre-trained dense FFN, copying it into every expert and
training. A trained MoE's experts already differ, so here the shared central tensor and the
per-expert auxiliary tensors are fitted to them, post-training: with the expert weights unfolded as
X_e [left, centre, right] index groups (left = i1j1·i2j2, right = i4j4·i5j5),

    min Σ_e ‖X_e − L_e ×₁ C ×₃ R_e‖²,   L_eᵀL_e = I, R_e R_eᵀ = I,

by alternating exact steps (each lowers the error): L_e and R_e are orthogonal Procrustes solutions
(the polar factor of X_e's unfolding times the rest), and with orthonormal factors the shared
centre's least-squares optimum is the mean of L_eᵀ X_e R_eᵀ over the experts. L_e then splits
exactly into the cores T_1, T_2 and R_e into T_4, T_5 (one SVD each); C is T_3. As in MPOE the
central tensor starts as one FFN's: the first expert's leading singular subspaces.

``sparsity`` is the fraction of the decoder layers' linear parameters to remove: the central bond
dimensions shrink (both the same, ``bond_dimension`` overrides) until it is met; untruncated bonds
already remove most of the expert parameters (n experts keep |W|·(1 + ~6% · n) instead of n·|W|),
and a lower target keeps them untruncated (the report says what was removed). No calibration data:
a decomposition of the weights. The experts' forward contracts the cores into the weight (as MPOE
does): parameters shrink, compute does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..adapters import UnsupportedArchitecture
from ..options import option
from ..report import PruningReport
from ..structure.mpo import (
    CENTRAL,
    ExpertMPO,
    MPOLinear,
    core_shapes,
    factorize,
    full_central_bonds,
    split_left,
    split_right,
    unfold,
)
from .base import StructuredMethod, register_structured_method


@dataclass(frozen=True)
class MPOEOptions:
    bond_dimension: int = option(0, "Cap on the two central bond dimensions (overrides sparsity); 0: the largest that meets sparsity.")
    sweeps: int = option(10, "Alternating least-squares sweeps fitting the shared central tensor and the experts' auxiliary tensors.")

    def __post_init__(self) -> None:
        if self.bond_dimension < 0:
            raise ValueError(f"method_options.bond_dimension must be >= 0 (0: from sparsity), got {self.bond_dimension}")
        if self.sweeps < 0:
            raise ValueError(f"method_options.sweeps must be >= 0, got {self.sweeps}")


@dataclass
class _Group:
    """The same linear (``name``) of every expert of one MoE layer."""

    layer: int
    name: str
    rows: tuple[int, ...]
    columns: tuple[int, ...]
    experts: int


@register_structured_method("mpoe", options=MPOEOptions)
class MPOE(StructuredMethod[MPOEOptions]):
    """MPOE: expert linears as matrix product operators sharing one central tensor per layer, fitted post-training."""

    @classmethod
    def needs_calibration(cls, options: MPOEOptions) -> bool:
        return False

    def check(self) -> None:
        self.groups = []
        kept_layers = self.kept_moe_layers()
        for index, layer in enumerate(self.adapter.decoder_layers()):
            experts = self.adapter.experts(layer)
            if len(experts) < 2 or index in kept_layers:
                continue
            for name, linear in experts[0].named_children():
                if isinstance(linear, nn.Linear):
                    if linear.bias is not None:
                        raise ValueError(f"mpoe decomposes bias-free expert linears; {name} of layer {index} has a bias")
                    self.groups.append(_Group(index, name, factorize(linear.out_features), factorize(linear.in_features), len(experts)))
        if not self.groups:
            experts = [expert for layer in self.adapter.decoder_layers() for expert in self.adapter.experts(layer)]
            if any(isinstance(module, MPOLinear) for expert in experts for module in expert.children()):
                raise ValueError("mpoe has already decomposed this model's experts into shared matrix product operators")
            raise (ValueError if experts else UnsupportedArchitecture)(
                f"mpoe shares tensors across the experts of mixture-of-experts layers; {type(self.adapter.model).__name__} has "
                "none with two or more experts (use a Mixtral-style model)"
            )
        self.bond = self.options.bond_dimension or self._bond_for_sparsity()

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        layers, names = self.adapter.decoder_layers(), self.adapter.layer_names()
        errors: dict[int, list[float]] = {}
        for group in tqdm(self.groups, desc="MPOE fitting"):
            block = self.adapter.moe_block(layers[group.layer])
            error = self._decompose(block, group)
            errors.setdefault(group.layer, []).append(error)
            report.removed.append(f"{names[group.layer]} experts' {group.name}: MPO, central bonds {self._central(group)}, relative error {error:.3g}")
        report.layer_scores["relative expert weight error (mean over linears)"] = [
            sum(errors.get(i, [0.0])) / len(errors.get(i, [0.0])) for i in range(len(layers))
        ]
        report.notes.append(f"MPOE: central bond dimensions capped at {self.bond} (each group's above), {self.options.sweeps} fitting sweeps")

    def _central(self, group: _Group) -> tuple[int, int]:
        full = full_central_bonds(group.rows, group.columns)
        return min(full[0], self.bond), min(full[1], self.bond)

    def _parameters(self, group: _Group, bond: int) -> int:
        shapes = core_shapes(group.rows, group.columns, tuple(min(b, bond) for b in full_central_bonds(group.rows, group.columns)))
        auxiliary = sum(math.prod(shape) for k, shape in enumerate(shapes) if k != CENTRAL)
        return math.prod(shapes[CENTRAL]) + group.experts * auxiliary

    def _bond_for_sparsity(self) -> int:
        """The largest central bond dimension that removes ``sparsity`` of the decoder layers' linear parameters."""
        total = sum(linear.weight.numel() for layer in self.adapter.decoder_layers() for linear in self.adapter.prunable_linears(layer).values())
        dense = sum(math.prod(g.rows) * math.prod(g.columns) * g.experts for g in self.groups)
        allowed = dense - self.sparsity * total  # what the decomposed expert linears may keep
        largest = max(max(full_central_bonds(g.rows, g.columns)) for g in self.groups)
        if sum(self._parameters(g, 1) for g in self.groups) > allowed:
            reachable = dense - sum(self._parameters(g, 1) for g in self.groups)
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} asks for {self.sparsity * total:,.0f} parameters but mpoe can remove at most "
                f"{reachable:,} ({reachable / total:.1%}) from the expert linears; lower the sparsity"
            )
        low, high = 1, largest  # the parameter count grows with the bond: bisect for the largest that fits
        while low < high:
            middle = (low + high + 1) // 2
            if sum(self._parameters(g, middle) for g in self.groups) <= allowed:
                low = middle
            else:
                high = middle - 1
        return low

    def _decompose(self, block: nn.Module, group: _Group) -> float:
        """Fit and install the MPO experts of one linear name; return the relative error Σ‖W_e − Ŵ_e‖² / Σ‖W_e‖²."""
        experts = self.adapter.block_experts(block)
        linears = [getattr(expert, group.name) for expert in experts]
        reference = linears[0].weight
        targets = [unfold(linear.weight.detach().double(), group.rows, group.columns) for linear in linears]
        d2, d3 = self._central(group)
        left, right, central = fit_shared_central(targets, d2, d3, self.options.sweeps)
        shared = block.expert_mpo if isinstance(getattr(block, "expert_mpo", None), ExpertMPO) else ExpertMPO()
        shared.central[group.name] = nn.Parameter(
            central.reshape(d2, group.rows[CENTRAL], group.columns[CENTRAL], d3).to(reference.device, reference.dtype)
        )
        block.expert_mpo = shared
        squared_error = sum(float((x - torch.einsum("lp,pmq,qr->lmr", l, central, r)).square().sum()) for x, l, r in zip(targets, left, right))
        for expert, l, r in zip(experts, left, right):
            module = MPOLinear(group.name, shared, group.rows, group.columns, (d2, d3), reference.device, reference.dtype)
            cores = [*split_left(l, group.rows, group.columns), *split_right(r, group.rows, group.columns)]
            with torch.no_grad():
                for parameter, core in zip(module.auxiliary, cores):
                    parameter.copy_(core.to(parameter.dtype))
            setattr(expert, group.name, module)
        return squared_error / max(sum(float(x.square().sum()) for x in targets), 1e-30)


def fit_shared_central(
    targets: list[torch.Tensor], d2: int, d3: int, sweeps: int
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(L_e, R_e, C) minimising Σ_e ‖X_e − L_e ×₁ C ×₃ R_e‖² with orthonormal L_e [left, d2] and R_e [d3, right]
    (module docstring); ``targets`` are the X_e [left, centre, right]."""
    left_size, middle, right_size = targets[0].shape
    first = targets[0]  # MPOE's central tensor starts as one FFN's (the first expert's leading singular subspaces)
    lefts = [torch.linalg.svd(first.reshape(left_size, -1), full_matrices=False).U[:, :d2]]
    rights = [torch.linalg.svd(first.reshape(-1, right_size), full_matrices=False).Vh[:d3]]
    central = torch.einsum("lp,lmr,qr->pmq", lefts[0], first, rights[0])
    for x in targets[1:]:
        left, right = _procrustes(x, central, rights[0])
        lefts.append(left)
        rights.append(right)
    central = _shared_centre(targets, lefts, rights)
    for _ in range(sweeps):
        for e, x in enumerate(targets):
            lefts[e], rights[e] = _procrustes(x, central, rights[e])
        central = _shared_centre(targets, lefts, rights)
    return lefts, rights, central


def _procrustes(target: torch.Tensor, central: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's optimal orthonormal L given (C, R), then R given (L, C)."""
    left_size, _, right_size = target.shape
    d2, _, d3 = central.shape
    rest = torch.einsum("pmq,qr->pmr", central, right).reshape(d2, -1)
    left = _polar(target.reshape(left_size, -1) @ rest.T)
    rest = torch.einsum("lp,pmq->lmq", left, central).reshape(-1, d3)
    return left, _polar(rest.T @ target.reshape(-1, right_size))


def _shared_centre(targets: list[torch.Tensor], lefts: list[torch.Tensor], rights: list[torch.Tensor]) -> torch.Tensor:
    """The least-squares central tensor for orthonormal factors: the mean of L_eᵀ X_e R_eᵀ."""
    return sum(torch.einsum("lp,lmr,qr->pmq", l, x, r) for x, l, r in zip(targets, lefts, rights)) / len(targets)


def _polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthonormal factor U Vᴴ of ``matrix``: the Q with orthonormal columns (or rows) maximising tr(Qᵀ matrix)."""
    u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vh
