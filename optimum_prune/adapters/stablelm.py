"""StableLM (StableLM 2, StableLM-3B-4E1T): Llama's module names in a layer with four differences.

- The norms are ``nn.LayerNorm``s: they subtract each token's mean and add a bias. Rotating the residual stream
  commutes with neither unless every writer of the stream is first made mean-free and each bias moved into the
  linears that read it (what SliceGPT's paper does for OPT), which SliceGPT here does not do: it is refused.
- ``use_parallel_residual``: ``x + attention(norm(x)) + mlp(norm(x))``, both sublayers reading the one
  ``input_layernorm`` (``post_attention_layernorm`` is None). Removing or re-routing either sublayer keeps that
  norm for the other; the residual hooks observe the stream after attention, then after the MLP's term, whose
  differences are each sublayer's term as in Llama's layer.
- ``qk_layernorm``: one LayerNorm per head over its queries (keys), in ``self_attn.q_layernorm.norms``
  (``k_layernorm.norms``, one per key/value head). Each reads only its own head, so removing heads is exact once
  the removed heads' norms go with them.
- The attention derives ``head_dim`` from ``hidden_size // num_attention_heads`` and reads its head counts and
  output width off itself: the config cannot describe fewer heads (a head-pruned model records its layer shapes
  as ``quantization_config`` and reloads with ``import optimum_prune``), and cutting heads sets those attributes.

``use_qkv_bias`` gives q/k/v biases, cut with their rows; ``partial_rotary_factor`` rotates part of each head,
which keeps its size. ``o_proj`` and the MLP never have biases, so FLAP's compensation biases are recorded
per layer too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import StableLmForCausalLM, StableLmModel

from ..structure.shapes import LayerShape
from .base import ResidualBranch, UnsupportedArchitecture, register_adapter
from .llama import LlamaAdapter


@register_adapter(StableLmForCausalLM, StableLmModel)
class StableLmAdapter(LlamaAdapter):
    """StableLM: LayerNorms, optionally parallel sublayers and per-head q/k LayerNorms."""

    # use_qkv_bias covers q/k/v only, never o_proj or the MLP: no config flag describes FLAP's output biases.
    bias_flags: dict[str, str] = {}

    def __init__(self, model: nn.Module, decoder: nn.Module | None = None, config: Any = None) -> None:
        super().__init__(model, decoder, config)
        self.parallel = bool(self.config.use_parallel_residual)
        if self.parallel:  # what a re-routed MLP's stand-in reads
            self.pre_norms = {"attention": "input_layernorm", "mlp": "input_layernorm"}

    def sublayer_norms(self, layer: nn.Module, sublayer: str, reroute: bool = False) -> list[str]:
        # A parallel layer's one norm feeds the other sublayer too; with both removed it stays, unused (exact either way).
        return [] if self.parallel else super().sublayer_norms(layer, sublayer, reroute)

    def keep_heads(self, layer: nn.Module, heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
        super().keep_heads(layer, heads, kv_heads)
        attention = layer.self_attn
        if attention.qk_layernorm:
            _keep_head_norms(attention.q_layernorm, heads.tolist())
            _keep_head_norms(attention.k_layernorm, kv_heads.tolist())
        _set_head_counts(attention, len(heads), len(kv_heads))

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        super().reshape_layer(layer, shape)
        attention = layer.self_attn
        if not shape.has_attention:
            return
        if attention.qk_layernorm:  # the first norms take the kept heads' weights as they load
            _keep_head_norms(attention.q_layernorm, list(range(shape.num_attention_heads)))
            _keep_head_norms(attention.k_layernorm, list(range(shape.num_key_value_heads)))
        _set_head_counts(attention, shape.num_attention_heads, shape.num_key_value_heads)

    def write_uniform_config(self, config: Any, shape: LayerShape) -> None:
        """Only the MLP width: the head counts also set ``head_dim`` (``hidden_size // num_attention_heads``), so
        fewer heads are recorded per layer instead."""
        if shape.has_mlp:
            config.intermediate_size = shape.intermediate_size

    def residual_branches(self, layer: nn.Module) -> list[ResidualBranch]:
        raise self._not_rotation_invariant()

    def add_shortcuts(self, index: int) -> nn.Module:
        raise self._not_rotation_invariant()

    def _not_rotation_invariant(self) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(
            f"{type(self.model).__name__} normalises with LayerNorm, which subtracts each token's mean and adds a bias: "
            "rotating the residual stream would change its output "
            "unless the stream were first made mean-free and the biases moved into the linears reading it, which is not "
            "implemented; SliceGPT does not apply: use width, layers or sublayers for structured pruning"
        )


def _keep_head_norms(norms: nn.Module, heads: list[int]) -> None:
    """Keep the per-head LayerNorms of ``heads`` (a ``StableLmLayerNormPerHead``), in that order."""
    norms.norms = nn.ModuleList(norms.norms[head] for head in heads)
    norms.num_heads = len(heads)


def _set_head_counts(attention: nn.Module, heads: int, kv_heads: int) -> None:
    """The sizes StableLM's attention reshapes by: its head counts and the width of its heads' concatenated output."""
    attention.num_heads = heads
    attention.num_key_value_heads = kv_heads
    attention.hidden_size = heads * attention.head_dim
