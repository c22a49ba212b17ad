"""Matrix product operators (MPO) for expert weights, with one central tensor shared by a layer's experts
(MPOE, Gao et al., COLING 2022; the decomposition of Gao et al., Phys. Rev. Research 2020).

A weight W (out × in) with out = ∏ i_k and in = ∏ j_k (five factors each) is the contraction of five
cores T_k[d_{k−1}, i_k, j_k, d_k] (d_0 = d_5 = 1) over the index order (i1, j1, i2, j2, …, i5, j5),
i1 the slowest row digit. The central core T_3 holds most of the parameters; MPOE shares it across
the experts of a layer and keeps the four small auxiliary cores per expert.

``ExpertMPO`` holds the shared central cores of one MoE block (one per expert linear name) and is
saved once with the block; each expert's ``MPOLinear`` holds its auxiliary cores and reads the
central one from it, so the checkpoint stores no tensor twice.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from accelerate.utils import align_module_device
from torch import nn
from torch.nn import functional as F

CORES = 5
CENTRAL = 2


def factorize(dimension: int) -> tuple[int, ...]:
    """``dimension`` as five factors: primes dealt to the smallest slot, the largest slot in the middle,
    the next ones beside it (MPOE's factorisations have this shape: 3072 = 4·4·8·6·4)."""
    primes, rest, factor = [], dimension, 2
    while factor * factor <= rest:
        while rest % factor == 0:
            primes.append(factor)
            rest //= factor
        factor += 1
    if rest > 1:
        primes.append(rest)
    slots = [1] * CORES
    for prime in sorted(primes, reverse=True):
        slots[slots.index(min(slots))] *= prime
    ordered = sorted(slots, reverse=True)  # largest → middle, then its neighbours, then the ends
    return (ordered[3], ordered[1], ordered[0], ordered[2], ordered[4])


def bond_dimensions(rows: tuple[int, ...], columns: tuple[int, ...], central: tuple[int, int]) -> tuple[int, ...]:
    """d_0 … d_5 for the central bonds (d_2, d_3); d_1 and d_4 are what the exact splits of the auxiliary cores give."""
    sizes = [i * j for i, j in zip(rows, columns)]
    d2, d3 = central
    d1 = min(sizes[0], sizes[1] * d2)
    d4 = min(d3 * sizes[3], sizes[4])
    return (1, d1, d2, d3, d4, 1)


def full_central_bonds(rows: tuple[int, ...], columns: tuple[int, ...]) -> tuple[int, int]:
    """The central bonds of an untruncated MPO: the ranks its unfoldings can have."""
    sizes = [i * j for i, j in zip(rows, columns)]
    left, middle, right = sizes[0] * sizes[1], sizes[2], sizes[3] * sizes[4]
    return min(left, middle * right), min(left * middle, right)


def core_shapes(rows: tuple[int, ...], columns: tuple[int, ...], central: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    bonds = bond_dimensions(rows, columns, central)
    return [(bonds[k], rows[k], columns[k], bonds[k + 1]) for k in range(CORES)]


def unfold(weight: torch.Tensor, rows: tuple[int, ...], columns: tuple[int, ...]) -> torch.Tensor:
    """W (out × in) as [i1j1·i2j2, i3j3, i4j4·i5j5]: the left, central and right index groups."""
    order = [axis for k in range(CORES) for axis in (k, CORES + k)]
    tensor = weight.reshape(*rows, *columns).permute(*order)
    sizes = [i * j for i, j in zip(rows, columns)]
    return tensor.reshape(sizes[0] * sizes[1], sizes[2], sizes[3] * sizes[4])


def contract(cores: list[torch.Tensor], rows: tuple[int, ...], columns: tuple[int, ...]) -> torch.Tensor:
    """The (out × in) matrix the five cores represent."""
    matrix = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        matrix = (matrix @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    interleaved = matrix.reshape(*(size for k in range(CORES) for size in (rows[k], columns[k])))
    order = [2 * k for k in range(CORES)] + [2 * k + 1 for k in range(CORES)]
    return interleaved.permute(*order).reshape(math.prod(rows), math.prod(columns))


def split_left(left: torch.Tensor, rows: tuple[int, ...], columns: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cores T_1, T_2 from the left factor [i1j1·i2j2, d2] (exact: one SVD)."""
    d2 = left.shape[1]
    u, s, vh = torch.linalg.svd(left.reshape(rows[0] * columns[0], rows[1] * columns[1] * d2), full_matrices=False)
    return u.reshape(1, rows[0], columns[0], -1), (s[:, None] * vh).reshape(-1, rows[1], columns[1], d2)


def split_right(right: torch.Tensor, rows: tuple[int, ...], columns: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cores T_4, T_5 from the right factor [d3, i4j4·i5j5] (exact: one SVD)."""
    d3 = right.shape[0]
    u, s, vh = torch.linalg.svd(right.reshape(d3 * rows[3] * columns[3], rows[4] * columns[4]), full_matrices=False)
    return (u * s).reshape(d3, rows[3], columns[3], -1), vh.reshape(-1, rows[4], columns[4], 1)


class ExpertMPO(nn.Module):
    """The shared central cores of one MoE block's experts, one per expert linear name (``w1``, ``down_proj``, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.central = nn.ParameterDict()


class MPOLinear(nn.Module):
    """An expert linear stored as MPO cores: four auxiliary cores of its own and its block's shared central core.

    The weight is contracted at every forward (MPOE does the same): the MPO saves parameters, not compute.
    """

    def __init__(
        self, name: str, shared: ExpertMPO, rows: tuple[int, ...], columns: tuple[int, ...], central: tuple[int, int],
        device: Any = None, dtype: Any = None,
    ) -> None:
        super().__init__()
        self.name, self.rows, self.columns, self.central_bonds = name, tuple(rows), tuple(columns), tuple(central)
        self.out_features, self.in_features = math.prod(rows), math.prod(columns)
        shapes = core_shapes(self.rows, self.columns, self.central_bonds)
        self.auxiliary = nn.ParameterList(
            [nn.Parameter(torch.empty(shapes[k], device=device, dtype=dtype)) for k in range(CORES) if k != CENTRAL]
        )
        object.__setattr__(self, "shared", shared)  # not a submodule: the central core is saved once, with the block

    bias = None

    @property
    def weight(self) -> torch.Tensor:
        """Contracted from the cores, read through accelerate's hooks where it offloaded them: the hooks sit on
        the parameter containers, which have no forward to load them."""
        with align_module_device(self.auxiliary), align_module_device(self.shared.central):
            cores = list(self.auxiliary)
            cores.insert(CENTRAL, self.shared.central[self.name])
            return contract(cores, self.rows, self.columns)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return F.linear(inputs, self.weight.to(inputs.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rows={self.rows}, columns={self.columns}, central_bonds={self.central_bonds}"


def mpo_layout(block: nn.Module | None, experts: list[nn.Module]) -> tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, int]], ...]:
    """(expert linear name, row factors, column factors, central bonds) of a block whose ``experts`` are MPOs."""
    if block is None or not isinstance(getattr(block, "expert_mpo", None), ExpertMPO):
        return ()
    expert = experts[0]
    return tuple(
        (name, module.rows, module.columns, module.central_bonds)
        for name, module in expert.named_children()
        if isinstance(module, MPOLinear)
    )


def build_mpo_experts(
    block: nn.Module, experts: list[nn.Module], layout: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, int]], ...]
) -> None:
    """Give a freshly built (possibly meta) block empty MPO ``experts`` of ``layout``, before weights load."""
    if not layout:
        return
    if block is None or not experts:
        raise ValueError(f"mpo names expert linears {[name for name, *_ in layout]} in a layer without experts; the checkpoint's config.json is corrupt")
    reference = next(experts[0].parameters())
    shared = ExpertMPO()
    for name, rows, columns, central in layout:
        linear = getattr(experts[0], name, None)
        if not isinstance(linear, nn.Linear) or (linear.out_features, linear.in_features) != (math.prod(rows), math.prod(columns)):
            raise ValueError(f"mpo names {name!r} with {rows}×{columns}, which no expert linear matches; the checkpoint's config.json is corrupt")
        full = full_central_bonds(tuple(rows), tuple(columns))
        if any(bond > limit for bond, limit in zip(central, full)):  # they size the shared central core, allocated next
            raise ValueError(
                f"mpo gives {name!r} central bonds {list(central)}, past the full ones {list(full)} of its {rows}×{columns} "
                "factors (MPOE only truncates them); the checkpoint's config.json is corrupt"
            )
        shape = core_shapes(tuple(rows), tuple(columns), tuple(central))[CENTRAL]
        shared.central[name] = nn.Parameter(torch.empty(shape, device=reference.device, dtype=reference.dtype))
        for expert in experts:
            setattr(expert, name, MPOLinear(name, shared, rows, columns, central, reference.device, reference.dtype))
    block.expert_mpo = shared
