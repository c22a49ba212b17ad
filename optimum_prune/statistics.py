"""Calibration statistics shared by several methods."""

from __future__ import annotations

import torch


def mean_ranks(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank, 0 the smallest, equal values sharing their mean rank (float64): which of equal scores
    (dead units, unrouted experts) goes first must not follow their positions."""
    ordered, order = values.flatten().sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(ordered, return_inverse=True, return_counts=True)
    shared = (counts.cumsum(0) - counts).double() + (counts - 1).double() / 2
    ranks = torch.empty(values.numel(), dtype=torch.float64, device=values.device)
    ranks[order] = shared[inverse]
    return ranks


class ColumnNorms:
    """Running sum of squared input activations per input feature: ‖X_j‖₂² over all calibration tokens."""

    def __init__(self, features: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.squared = torch.zeros(features, dtype=dtype, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).to(self.squared.dtype)
        self.squared += flat.square().sum(dim=0)
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        return self.squared.sqrt().float()


def wanda_scores(weight: torch.Tensor, norms: ColumnNorms) -> torch.Tensor:
    """Wanda importance S_ij = |W_ij| · ‖X_j‖₂ (Sun et al. 2023, Eq. 1)."""
    return weight.detach().abs().float() * norms.norms().to(weight.device).unsqueeze(0)


class ColumnMoments(ColumnNorms):
    """Adds the running sum per input feature, for means and variances (FLAP's fluctuation)."""

    def __init__(self, features: int, device: torch.device) -> None:
        # float64: Σx² − (Σx)²/n cancels catastrophically in float32 for a feature whose mean dwarfs its spread
        super().__init__(features, device, torch.float64)
        self.total = torch.zeros(features, dtype=torch.float64, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        super().add(inputs)
        self.total += inputs.reshape(-1, inputs.shape[-1]).to(torch.float64).sum(dim=0)

    def mean(self) -> torch.Tensor:
        return (self.total / max(self.tokens, 1)).float()

    def variance(self) -> torch.Tensor:
        """Unbiased sample variance over calibration tokens (0 from a single token: nothing fluctuates)."""
        n = self.tokens
        if n < 2:  # n = max(tokens, 2) made one token's variance x²/2
            return torch.zeros_like(self.squared, dtype=torch.float32)
        return ((self.squared - self.total.square() / n) / (n - 1)).clamp_min(0).float()


def token_cosine(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two hidden-state tensors, one value per token (ShortGPT's Block Influence is 1 − its mean)."""
    return torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1).reshape(-1)


class BlockInfluence:
    """Running ShortGPT Block Influence of one block: 1 − the mean token cosine between what enters and
    what leaves it, summed batch by batch (on the batches' device: no sync) rather than kept per token."""

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.tokens = 0

    def add(self, entering: torch.Tensor, leaving: torch.Tensor) -> None:
        cosine = token_cosine(entering, leaving)
        self.total = self.total + cosine.double().sum()
        self.tokens += cosine.numel()

    def value(self) -> float:
        return 1 - float(self.total) / self.tokens
