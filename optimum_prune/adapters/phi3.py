"""Phi-3 (and Phi-4-mini, which shares its class): Llama's layer with fused projections.

``self_attn.qkv_proj`` holds the query, key and value rows in one linear and ``mlp.gate_up_proj``
the gate and up rows; unstructured and N:M pruning treat them as the linears they are (a weight
row is still one output's weights, pruned along its inputs), whole layers can go (``layers``) and
linears can be factorised (``low_rank``). The other structured methods are refused: a head or an
MLP channel is a set of rows spread over both parts of a fused weight, which their layouts (one
linear per projection) do not describe.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import Phi3ForCausalLM, Phi3Model

from ..structure.shapes import LayerShape
from .base import DecoderStackAdapter, UnsupportedArchitecture, register_adapter
from .llama import keep_decoder_layers


@register_adapter(Phi3ForCausalLM, Phi3Model)
class Phi3Adapter(DecoderStackAdapter):
    """Each layer holds qkv_proj / o_proj and gate_up_proj / down_proj."""

    def keep_layers(self, indices: list[int]) -> None:
        keep_decoder_layers(self, indices)

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        attention = layer.self_attn
        query = attention.o_proj.in_features
        return LayerShape(
            num_attention_heads=query // attention.head_dim,
            num_key_value_heads=(attention.qkv_proj.out_features - query) // (2 * attention.head_dim),
            intermediate_size=layer.mlp.down_proj.in_features,
        )

    def stock_shape(self, config: Any, index: int = 0) -> LayerShape:
        return LayerShape(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)

    def write_uniform_config(self, config: Any, shape: LayerShape) -> None:
        """Removing whole layers leaves every kept layer's widths as the config gives them."""

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        """Nothing to reshape: the structured pruning Phi-3 takes keeps the widths (low-rank factors are built after this)."""
        if shape != self.stock_shape(self.config):
            raise ValueError(f"the checkpoint records a layer of {shape}, which this Phi-3 adapter does not build")

    def _no_structure(self, *hooks: str) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(
            f"{type(self.model).__name__} fuses its projections (self_attn.qkv_proj, mlp.gate_up_proj): heads, MLP channels, "
            "sublayers and the residual stream cannot be pruned structurally; remove whole layers (method 'layers', without reroute), "
            "factorise linears (low_rank) or use an unstructured or N:M method such as wanda or sparsegpt "
            f"({self._lacking(hooks)})"
        )
