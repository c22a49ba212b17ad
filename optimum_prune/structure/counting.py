"""Compute cost of a model, measured with Torch-Pruning's operation counter."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

_PROBE_TOKENS = 8


def count_macs_per_token(model: nn.Module) -> int:
    """Multiply-accumulates per token of the model's layers (linears, embeddings, norms; not the
    attention score products, which depend on context length) from one short forward pass."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, _PROBE_TOKENS, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(model, ids)
    finally:
        model.train(was_training)
    return int(macs) // _PROBE_TOKENS
