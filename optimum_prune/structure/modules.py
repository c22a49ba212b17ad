"""Stand-ins for removed sublayers: the residual path stays, the block contributes nothing
(or, re-routed, a linear map of its normalised input).

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


class ReroutedAttention(RemovedAttention):
    """A removed attention block whose contribution to the residual stream is replaced by an affine
    map of its normalised input, fitted by least squares on calibration activations (residual
    re-routing, see ``optimum_prune.methods.rerouting``). It keeps the cache bookkeeping of
    ``RemovedAttention``."""

    def __init__(self, layer_idx: int, head_dim: int, width: int, like: torch.Tensor) -> None:
        super().__init__(layer_idx, head_dim)
        self.map = nn.Linear(width, width, device=like.device, dtype=like.dtype)

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any):
        super().forward(hidden_states, *args, past_key_values=past_key_values, **kwargs)
        return self.map(hidden_states), None


class ReroutedMLP(RemovedMLP):
    """A removed MLP block replaced by an affine map of its normalised input (residual re-routing)."""

    def __init__(self, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.map = nn.Linear(width, width, device=like.device, dtype=like.dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.map(hidden_states)
