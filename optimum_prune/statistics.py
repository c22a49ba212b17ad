"""Calibration statistics shared by several methods."""

from __future__ import annotations

import torch


class ColumnNorms:
    """Running sum of squared input activations per input feature: ‖X_j‖₂² over all calibration tokens."""

    def __init__(self, features: int, device: torch.device) -> None:
        self.squared = torch.zeros(features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, inputs: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).float()
        self.squared += flat.square().sum(dim=0)
        self.tokens += flat.shape[0]

    def norms(self) -> torch.Tensor:
        return self.squared.sqrt()


def wanda_scores(weight: torch.Tensor, norms: ColumnNorms) -> torch.Tensor:
    """Wanda importance S_ij = |W_ij| · ‖X_j‖₂ (Sun et al. 2023, Eq. 1)."""
    return weight.detach().abs().float() * norms.norms().to(weight.device).unsqueeze(0)


class ColumnMoments(ColumnNorms):
    """Adds the running sum per input feature, for means and variances (FLAP's fluctuation)."""

    def __init__(self, features: int, device: torch.device) -> None:
        super().__init__(features, device)
        self.total = torch.zeros(features, dtype=torch.float32, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        super().add(inputs)
        self.total += inputs.reshape(-1, inputs.shape[-1]).float().sum(dim=0)

    def mean(self) -> torch.Tensor:
        return self.total / max(self.tokens, 1)

    def variance(self) -> torch.Tensor:
        """Unbiased sample variance over calibration tokens."""
        n = max(self.tokens, 2)
        return ((self.squared - self.total.square() / n) / (n - 1)).clamp_min(0)


def token_cosine(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of two hidden-state tensors, one value per token (ShortGPT's Block Influence is 1 − its mean)."""
    return torch.nn.functional.cosine_similarity(before.float(), after.float(), dim=-1).reshape(-1)
