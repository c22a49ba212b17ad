"""Stand-ins for removed sublayers: the residual path stays, the block contributes nothing
(or, re-routed, a linear map of its normalised input); and factorised linears.

They follow the decoder-layer contract of transformers' Llama-style models (attention returns
``(output, weights)``, the MLP returns a tensor), so the stock decoder layer's forward runs
unchanged and the saved state dict simply has no weights for the removed block.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils import skip_init

from .surgery import mixed_class, replace_submodule


class RemovedAttention(nn.Module):
    """An attention sublayer that was pruned away.

    It still appends a one-head key/value entry of ones to the cache (B × L × head_dim values):
    transformers reads the sequence length already seen from the cache (from layer 0, and a dynamic
    cache counts nothing in an empty tensor, a static one nothing in zeros), so without it the
    positions and masks of every later token would be wrong when generating with a cache. It is
    ``head_dim`` wide, as a real head's entry, because a quantized cache splits entries into groups of
    channels. Under eager attention (the one whose layers return their maps) its map has no heads,
    ``[batch, 0, length, keys]``: ``output_attentions`` keeps one entry per layer (transformers skips a
    ``None``); ``standing_in_for`` makes it an instance of the attention class it replaces, whose outputs
    transformers records, and gives it that attention's config, which says the implementation.
    """

    def __init__(self, layer_idx: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = head_dim

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any):
        batch, length = hidden_states.shape[:2]
        keys = length
        if past_key_values is not None:
            placeholder = hidden_states.new_ones(batch, 1, length, self.head_dim)
            cached, _ = past_key_values.update(placeholder, placeholder, self.layer_idx, {"cache_position": kwargs.get("cache_position")})
            keys = cached.shape[-2]
        eager = getattr(getattr(self, "config", None), "_attn_implementation", "eager") in ("eager", "eager_paged")
        return torch.zeros_like(hidden_states), hidden_states.new_zeros(batch, 0, length, keys) if eager else None


def standing_in_for(attention: nn.Module, stand_in: RemovedAttention) -> RemovedAttention:
    """``stand_in``, in place, as an instance of ``attention``'s stock class too: transformers collects
    ``output_attentions`` by hooking that class (``_can_record_outputs``), so a stand-in of another class
    would drop its layer's entry and shift every later layer's to the wrong index (it records ``None``
    instead). Also keeps the attention's config (whose implementation says whether layers return their maps) and
    the flag Gemma 3's layer reads off its attention to pick a rotary embedding."""
    stock = next(cls for cls in type(attention).__mro__ if not issubclass(cls, RemovedAttention))
    if stock is not nn.Module:
        stand_in.__class__ = mixed_class(type(stand_in), stock)
    if hasattr(attention, "config"):
        stand_in.config = attention.config
    if hasattr(attention, "is_sliding"):
        stand_in.is_sliding = attention.is_sliding
    return stand_in


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
        self.map = skip_init(nn.Linear, width, width, device=like.device, dtype=like.dtype)  # fitted next

    def forward(self, hidden_states: torch.Tensor, *args: Any, past_key_values: Any = None, **kwargs: Any):
        _, weights = super().forward(hidden_states, *args, past_key_values=past_key_values, **kwargs)
        return self.map(hidden_states), weights


class ReroutedMLP(RemovedMLP):
    """A removed MLP block replaced by an affine map of its normalised input (residual re-routing)."""

    def __init__(self, width: int, like: torch.Tensor) -> None:
        super().__init__()
        self.map = skip_init(nn.Linear, width, width, device=like.device, dtype=like.dtype)  # fitted next

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.map(hidden_states)


class LowRankLinear(nn.Module):
    """An ``nn.Linear`` stored as two factors, x ↦ out_factor(in_factor(x)), of a chosen rank.

    It keeps ``in_features``, ``out_features`` and ``bias`` of the linear it replaces, so the
    adapters read the layer's widths from it as from the original.
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, bias: bool, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        device = torch.get_default_device() if device is None else device  # skip_init would leave None on meta
        self.in_factor = skip_init(nn.Linear, in_features, rank, bias=False, device=device, dtype=dtype)  # factors set next
        self.out_factor = skip_init(nn.Linear, rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.out_factor.bias

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out_factor(self.in_factor(inputs))


def rerouted_sublayers(layer: nn.Module) -> tuple[str, ...]:
    """The sublayers of ``layer`` a re-routing stand-in replaces, for its recorded shape: read from the stand-ins
    themselves, so an adapter's ``layer_shape`` need not report them."""
    stand_ins = {"attention": ReroutedAttention, "mlp": ReroutedMLP}
    return tuple(kind for kind, stand_in in stand_ins.items() if any(isinstance(module, stand_in) for module in layer.modules()))


def low_rank_ranks(layer: nn.Module) -> tuple[tuple[str, int], ...]:
    """(name inside ``layer``, rank) of every factorised linear, for the layer's recorded shape."""
    return tuple((name, module.rank) for name, module in layer.named_modules() if isinstance(module, LowRankLinear))


def factorize_named(layer: nn.Module, ranks: tuple[tuple[str, int], ...]) -> None:
    """Replace the named linears of a freshly built (possibly meta) layer by empty factors of the recorded ranks."""
    for name, rank in ranks:
        try:
            linear = layer.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"low_rank names {name!r}, which is not a linear of this layer; the checkpoint's config.json is corrupt")
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(
                f"low_rank gives {name} ({linear.out_features}×{linear.in_features}) rank {rank}, above its full rank; the "
                "checkpoint's config.json is corrupt"
            )
        factors = LowRankLinear(
            linear.in_features, linear.out_features, rank, linear.bias is not None, linear.weight.device, linear.weight.dtype
        )
        replace_submodule(layer, name, factors)
