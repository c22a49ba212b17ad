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
