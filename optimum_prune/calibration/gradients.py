"""Calibration-loss gradients and losses, one window at a time.

First-order Taylor criteria (LLM-Pruner, Shortened LLaMA) need ∂L/∂W of the language-model loss
on the calibration set, and perplexity criteria need the loss itself. Both run the full model
on one window per forward, so full-vocabulary logits exist for a single window at a time, never
for the whole calibration set.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm


def accumulate_gradients(model: nn.Module, windows: torch.Tensor, description: str = "Calibration gradients") -> None:
    """Leave the mean calibration-loss gradient in ``.grad`` of every parameter (requires_grad restored after)."""
    device = next(model.parameters()).device
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for parameter in model.parameters():
        parameter.requires_grad_(True)
        parameter.grad = None
    try:
        with torch.enable_grad():
            for window in tqdm(windows, desc=description, leave=False):
                ids = window.unsqueeze(0).to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss / len(windows)
                loss.backward()
    finally:
        for parameter in frozen:
            parameter.requires_grad_(False)


def fisher_rows(model: nn.Module, windows: torch.Tensor, linears: list[nn.Linear], description: str = "Fisher information") -> list[torch.Tensor]:
    """Empirical Fisher information of each output row of ``linears``: Σ_windows Σ_j (∂L_w/∂W_ij)².

    Each window is one sample, so its gradient is squared before summing (the mean gradient of
    ``accumulate_gradients`` would cancel out). Only the given weights require grad meanwhile.
    """
    device = next(model.parameters()).device
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    weights = [linear.weight for linear in linears]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    for weight in weights:
        weight.requires_grad_(True)
    rows = [torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) for weight in weights]
    try:
        with torch.enable_grad():
            for window in tqdm(windows, desc=description, leave=False):
                ids = window.unsqueeze(0).to(device)
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                for total, gradient in zip(rows, torch.autograd.grad(loss, weights)):
                    total += gradient.double().square().sum(dim=1)
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
    return rows


def calibration_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token loss) of ``model`` over the calibration windows."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for window in windows:
            ids = window.unsqueeze(0).to(device)
            total += float(model(input_ids=ids, labels=ids, use_cache=False).loss)
    return math.exp(total / len(windows))
