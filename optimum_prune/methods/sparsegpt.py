"""SparseGPT (Frantar & Alistarh, 2023, "SparseGPT: Massive Language Models Can Be Accurately
Pruned in One-Shot"): OBS reconstruction with lazy block updates and adaptive mask selection.

``saliency="isc"`` selects masks by the Improved Saliency Criterion of Shao et al. (2024, "One-Shot
Sensitivity-Aware Mixed Sparsity Pruning"), the sum of the OBD saliency w²·H_qq and the OBS
saliency w²/[H⁻¹]_qq (both without the common ½). Their code adds the OBS term with [H⁻¹]_qq taken
unsquared from the Cholesky factor; here it is the OBS quantity itself (the factor's diagonal
squared), as the paper's definition reads. Pair it with ``allocation="sensitivity"``.

An already pruned model pruned again: the OBS update of earlier columns makes some of its zeros non-zero
again, and the mask is then chosen among all weights, as in the paper. ``keep_zeros=True`` keeps them
pruned (llm-compressor's ``preserve_sparsity_mask``): they join each block's mask first, and the update
compensates for them like for any other pruned weight.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..calibration.sharing import InputStatistics
from ..distributed import all_reduce_sum
from ..options import check_choice, option
from ..sparsity import PRUNED_SHARE, NMPattern, SparsityTarget, prune_lowest, prune_lowest_nm
from .base import LayerPruner, register_method, require_finite_statistics


@dataclass(frozen=True)
class SparseGPTOptions:
    block_size: int = option(128, "Columns per lazy-update block B_s; masks are chosen per block (paper: 128).")
    dampening: float = option(
        0.01, "λ added to the Hessian diagonal as a fraction of its mean diagonal (paper: 1%)."
    )
    saliency: str = option("obs", "Mask selection: 'obs' (w²/[H⁻¹]_qq, SparseGPT) or 'isc' (OBD + OBS, Shao et al.).")
    keep_zeros: bool = option(
        False, "Keep weights that are already zero pruned (an already pruned model pruned again); without it the update revives some."
    )

    def __post_init__(self) -> None:
        if self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size}")
        if not 0 < self.dampening < 1:  # undamped, X^T X is singular whenever a linear sees fewer tokens than inputs
            raise ValueError(f"dampening must be in (0, 1), got {self.dampening}")
        check_choice("saliency", self.saliency, ("obs", "isc"))


@register_method("sparsegpt", options=SparseGPTOptions)
class SparseGPTPruner(LayerPruner[SparseGPTOptions]):
    """Prune with the OBS update of SparseGPT: remaining weights compensate for removed ones."""

    statistics: InputHessian

    def __init__(self, linear: torch.nn.Linear, options: SparseGPTOptions) -> None:
        super().__init__(linear, options)
        self.statistics = InputHessian(linear.in_features, linear.weight.device)

    @classmethod
    def check_options_target(cls, options: SparseGPTOptions, pattern: NMPattern) -> None:
        if options.block_size % pattern.m:  # a block's mask is chosen whole, so its N:M groups must not straddle two
            raise ValueError(
                f"PruningConfig.method_options.block_size {options.block_size}: SparseGPT's {pattern} pattern needs a "
                f"multiple of {pattern.m} (e.g. {max(pattern.m, options.block_size - options.block_size % pattern.m)})"
            )

    @classmethod
    def zero_shares(cls, options: SparseGPTOptions, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per column block: the mask is chosen within each (kept zeros first, with ``keep_zeros``)."""
        blocks = zero.split(options.block_size, dim=1)
        return (
            torch.stack([block.double().mean() for block in blocks]).cpu(),
            torch.tensor([float(block.numel()) for block in blocks], dtype=torch.float64),
        )

    def add_batch(self, inputs: torch.Tensor) -> None:
        self.statistics.add(inputs)

    def synchronize(self) -> None:
        self.statistics.synchronize()

    def prune(self, target: SparsityTarget) -> None:
        self.check_target(self.options, target, self.linear.in_features)
        weight = self.linear.weight
        W = weight.detach().float().clone()
        earlier = W == 0
        already_sparse = int(torch.count_nonzero(earlier)) >= PRUNED_SHARE * earlier.numel()
        if not (self.options.keep_zeros or already_sparse):
            earlier = None  # neither kept nor checked: not held through the reconstruction
        H = self.statistics.take()
        self.statistics = None
        require_finite_statistics(H, "Hessian (the float32 mean of x·xᵀ over the calibration tokens)")
        columns = W.shape[1]
        block = self.options.block_size

        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        H += self.options.dampening * torch.mean(torch.diag(H)) * torch.eye(columns, device=H.device, dtype=H.dtype)
        curvature = torch.diag(H).clone() if self.options.saliency == "isc" else None
        # Upper Cholesky factor of H⁻¹: its rows give the OBS updates for the remaining columns (Sec. 3.3).
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

        for start in range(0, columns, block):
            end = min(start + block, columns)
            W1 = W[:, start:end].clone()
            Hinv1 = Hinv[start:end, start:end]
            diag = torch.diag(Hinv1)
            errors = torch.zeros_like(W1)
            kept_zeros = earlier[:, start:end] if self.options.keep_zeros else torch.zeros_like(W1, dtype=torch.bool)
            if isinstance(target, NMPattern):
                mask = kept_zeros.clone()
            else:
                # Adaptive mask selection: the saliency over the whole block.
                saliency = _saliency(W1, diag, curvature, start).masked_fill(kept_zeros, -1.0)
                mask = prune_lowest(saliency, target, per_row=False) | kept_zeros
            for i in range(end - start):
                if isinstance(target, NMPattern) and i % target.m == 0:
                    group = _saliency(W1[:, i : i + target.m], diag[i : i + target.m], curvature, start + i)
                    if self.options.keep_zeros:
                        kept = kept_zeros[:, i : i + target.m]
                        mask[:, i : i + target.m] = prune_lowest_nm(group.masked_fill(kept, -1.0), target) | kept
                    else:  # nothing to keep: no fill and or of an all-False group, once per M columns
                        mask[:, i : i + target.m] = prune_lowest_nm(group, target)
                w = W1[:, i]
                q = w.masked_fill(mask[:, i], 0)
                error = (w - q) / Hinv1[i, i]
                W1[:, i:] -= error.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
                W1[:, i] = q
                errors[:, i] = error
            W[:, start:end] = W1
            W[:, end:] -= errors @ Hinv[start:end, end:]

        if not self.options.keep_zeros and already_sparse:
            self.revived_zeros = int((earlier & (W != 0)).sum())
        with torch.no_grad():
            weight.copy_(W.to(weight.dtype))


class InputHessian(InputStatistics):
    """H = 2/n Σ x xᵀ of a linear's inputs in float32, n the samples (the batch dimension's rows) seen so far."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.matrix = torch.zeros(features, features, dtype=torch.float32, device=device)
        self.samples = 0

    def add(self, inputs: torch.Tensor) -> None:
        # Kept as a running mean so that it never overflows (reference implementation).
        batch = inputs.shape[0] if inputs.dim() > 2 else 1
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self.matrix *= self.samples / (self.samples + batch)
        self.samples += batch
        flat = flat * (2 / self.samples) ** 0.5
        self.matrix += flat.T @ flat

    def synchronize(self) -> None:
        # The running mean becomes a sum over every process's samples, then a mean again.
        total = torch.tensor([float(self.samples)], device=self.matrix.device)
        self.matrix *= self.samples
        all_reduce_sum(self.matrix, total)
        self.samples = int(total.item())
        self.matrix /= max(self.samples, 1)

    def clone(self) -> InputHessian:
        twin = copy.copy(self)
        twin.matrix = self.matrix.clone()
        return twin

    def take(self) -> torch.Tensor:
        """The matrix for one user to edit in place: a copy while another linear still needs it; the last user gets
        the matrix itself, released here (the largest state of a layer: freed as soon as it is consumed)."""
        if not self.release():
            return self.matrix.clone()
        matrix, self.matrix = self.matrix, None
        return matrix


def _saliency(W: torch.Tensor, diag: torch.Tensor, curvature: torch.Tensor | None, first: int) -> torch.Tensor:
    """OBS saliency w² / [H⁻¹]_qq of columns ``first …`` (Eq. 3, Sec. 3.4); ISC adds OBD's w²·H_qq."""
    saliency = W.square() / diag.square().unsqueeze(0)
    if curvature is not None:
        saliency = saliency + W.square() * curvature[first : first + W.shape[1]].unsqueeze(0)
    return saliency
