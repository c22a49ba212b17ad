"""Llama family: Llama (incl. GQA Llama-3 / SmolLM2), Mistral and Qwen2 share one layout."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from ..structure.modules import RemovedAttention, RemovedMLP
from ..structure.shapes import LayerShape
from ..structure.surgery import keep_input_features, keep_output_features
from .base import AttentionLayout, DecoderAdapter, MLPLayout, register_adapter


@register_adapter(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
class LlamaAdapter(DecoderAdapter):
    """``model.model.{embed_tokens, rotary_emb, layers, norm}``; each layer holds q/k/v/o and gate/up/down."""

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def input_modules(self) -> list[nn.Module]:
        return [self.model.model.embed_tokens, self.model.model.rotary_emb]

    # Heads are handled here rather than by Torch-Pruning's graph: the q/k/v outputs are reshaped
    # into heads, rotated by RoPE per head and keys/values are repeated per GQA group
    # (``repeat_kv``), and the traced graph loses the channel-to-head correspondence at those
    # reshapes, so it can neither keep heads whole nor keep the groups even.
    def attention(self, layer: nn.Module) -> AttentionLayout | None:
        attention = layer.self_attn
        if isinstance(attention, RemovedAttention):
            return None
        head_dim = attention.head_dim
        return AttentionLayout(
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
            attention.q_proj.out_features // head_dim,
            attention.k_proj.out_features // head_dim,
            head_dim,
        )

    def mlp(self, layer: nn.Module) -> MLPLayout | None:
        return None if isinstance(layer.mlp, RemovedMLP) else MLPLayout(layer.mlp, layer.mlp.gate_proj)

    def sublayer(self, layer: nn.Module, kind: str) -> nn.Module:
        if kind not in ("attention", "mlp"):
            raise ValueError(f"sublayer must be 'attention' or 'mlp', got {kind!r}")
        return layer.self_attn if kind == "attention" else layer.mlp

    @contextmanager
    def observing_residuals(self, layer: nn.Module, sink: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        # Pre-norm residual blocks: h1 = x + attention(norm(x)), h2 = h1 + mlp(norm(h1)).
        stream: dict[str, torch.Tensor] = {}

        def layer_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            stream["x"] = args[0] if args else kwargs["hidden_states"]

        def attention_output(_module: nn.Module, _args: tuple, output: Any) -> None:
            stream["h1"] = stream["x"] + output[0]
            sink("attention", stream["x"], stream["h1"])

        def mlp_output(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            sink("mlp", stream["h1"], stream["h1"] + output)

        handles = [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            layer.self_attn.register_forward_hook(attention_output),
            layer.mlp.register_forward_hook(mlp_output),
        ]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def keep_heads(self, layer: nn.Module, heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
        layout = self.attention(layer)
        if len(heads) % len(kv_heads):
            raise ValueError(
                f"keeping {len(heads)} query heads with {len(kv_heads)} key/value heads breaks grouped-query attention"
            )
        rows = _head_rows(heads, layout.head_dim)
        kv_rows = _head_rows(kv_heads, layout.head_dim)
        keep_output_features(layout.query, rows)
        keep_output_features(layout.key, kv_rows)
        keep_output_features(layout.value, kv_rows)
        keep_input_features(layout.output, rows)
        layer.self_attn.num_key_value_groups = len(heads) // len(kv_heads)

    def remove_sublayer(self, layer: nn.Module, sublayer: str) -> None:
        if sublayer == "attention":
            layer.self_attn = RemovedAttention(layer.self_attn.layer_idx, layer.self_attn.head_dim)
            layer.input_layernorm = nn.Identity()
        elif sublayer == "mlp":
            layer.mlp = RemovedMLP()
            layer.post_attention_layernorm = nn.Identity()
        else:
            raise ValueError(f"sublayer must be 'attention' or 'mlp', got {sublayer!r}")

    def keep_layers(self, indices: list[int]) -> None:
        layers = self.decoder_layers()
        self.model.model.layers = nn.ModuleList(layers[i] for i in indices)
        for new_index, layer in enumerate(self.model.model.layers):
            layer.self_attn.layer_idx = new_index
        config = self.model.config
        # Qwen2 (sliding-window variants) keeps one attention type per layer; it follows its layer.
        if getattr(config, "layer_types", None) is not None:
            config.layer_types = [config.layer_types[i] for i in indices]
        config.num_hidden_layers = len(indices)

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        attention, mlp = self.attention(layer), self.mlp(layer)
        return LayerShape(
            num_attention_heads=attention.num_heads if attention else 0,
            num_key_value_heads=attention.num_kv_heads if attention else 0,
            intermediate_size=mlp.channel_linear.out_features if mlp else 0,
            attention_output_bias=attention is not None and attention.output.bias is not None,
            mlp_output_bias=mlp is not None and layer.mlp.down_proj.bias is not None,
        )

    def stock_shape(self, config: Any) -> LayerShape:
        return LayerShape(
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            intermediate_size=config.intermediate_size,
            attention_output_bias=bool(getattr(config, "attention_bias", False)),
            mlp_output_bias=bool(getattr(config, "mlp_bias", False)),
        )

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        attention = layer.self_attn
        if not shape.has_attention:
            self.remove_sublayer(layer, "attention")
        else:
            head_dim = attention.head_dim
            attention.q_proj = _resized(attention.q_proj, out_features=shape.num_attention_heads * head_dim)
            attention.k_proj = _resized(attention.k_proj, out_features=shape.num_key_value_heads * head_dim)
            attention.v_proj = _resized(attention.v_proj, out_features=shape.num_key_value_heads * head_dim)
            attention.o_proj = _resized(
                attention.o_proj, in_features=shape.num_attention_heads * head_dim, bias=shape.attention_output_bias
            )
            attention.num_key_value_groups = shape.num_attention_heads // shape.num_key_value_heads
        if not shape.has_mlp:
            self.remove_sublayer(layer, "mlp")
        else:
            mlp = layer.mlp
            mlp.gate_proj = _resized(mlp.gate_proj, out_features=shape.intermediate_size)
            mlp.up_proj = _resized(mlp.up_proj, out_features=shape.intermediate_size)
            mlp.down_proj = _resized(mlp.down_proj, in_features=shape.intermediate_size, bias=shape.mlp_output_bias)
            mlp.intermediate_size = shape.intermediate_size

    def write_uniform_config(self, config: Any, shape: LayerShape) -> None:
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if shape.has_attention:
            config.num_attention_heads = shape.num_attention_heads
            config.num_key_value_heads = shape.num_key_value_heads
        if shape.has_mlp:
            config.intermediate_size = shape.intermediate_size


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = heads.to(torch.long).reshape(-1, 1)
    return (heads * head_dim + torch.arange(head_dim)).reshape(-1)


def _resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None, bias: bool | None = None) -> nn.Linear:
    """A new, uninitialised linear like ``linear`` with other sizes (its weights are loaded next)."""
    return nn.Linear(
        in_features or linear.in_features,
        out_features or linear.out_features,
        bias=(linear.bias is not None) if bias is None else bias,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
