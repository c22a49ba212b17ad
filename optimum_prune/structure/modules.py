"""Stand-ins for removed sublayers: the residual path stays, the block contributes nothing.

They follow the decoder-layer contract of transformers' Llama-style models (attention returns
``(output, weights)``, the MLP returns a tensor), so the stock decoder layer's forward runs
unchanged and the saved state dict simply has no weights for the removed block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class RemovedAttention(nn.Module):
    """An attention sublayer that was pruned away.

    It still appends an empty (zero-head) key/value entry to the cache: transformers reads the
    sequence length already seen from the cache, so skipping the update would shift the positions
    of every later token when generating with a cache.
    """

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any):
        if past_key_values is not None:
            batch, length = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
            past_key_values.update(empty, empty, self.layer_idx, {"cache_position": kwargs.get("cache_position")})
        return torch.zeros_like(hidden_states), None


class RemovedMLP(nn.Module):
    """An MLP sublayer that was pruned away."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(hidden_states)
