"""Llama family: Llama (incl. GQA Llama-3 / SmolLM2), Mistral, Qwen2 and Qwen3 share one layout.

Qwen3 adds an RMSNorm over ``head_dim`` to queries and keys (``q_norm`` / ``k_norm``); its weight is
shared by every head and lies after the projections, so removing heads or rotating the residual
stream leaves it as it is."""

from __future__ import annotations

import logging
import types
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.nn.utils import skip_init
from transformers import (
    LlamaForCausalLM,
    LlamaModel,
    MistralForCausalLM,
    MistralModel,
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen3ForCausalLM,
    Qwen3Model,
)
from transformers.modeling_layers import GradientCheckpointingLayer

from ..structure.modules import RemovedAttention, RemovedMLP, ReroutedAttention, ReroutedMLP, standing_in_for
from ..structure.shapes import LayerShape
from ..structure.surgery import add_output_bias, keep_input_features, keep_output_features, mixed_class, resize_norm, resized_linear
from .base import (
    AttentionLayout,
    DecoderAdapter,
    DecoderStackAdapter,
    MLPLayout,
    ResidualBranch,
    UnsupportedArchitecture,
    register_adapter,
)

logger = logging.getLogger(__name__)


class ShortcutDecoderLayer(GradientCheckpointingLayer):
    """A Llama-style pre-norm decoder layer whose residual path runs through linear shortcuts.

    SliceGPT gives every point of the residual stream its own (sliced) basis; the shortcuts carry
    the stream from the layer input's basis to the one after attention and on to the layer
    output's. The stock layer's forward adds its input back unchanged, so it cannot express this.
    The submodules keep their stock names: the state dict only gains the two shortcut weights.
    A stock layer becomes one with ``with_shortcuts``, which also keeps it an instance of its own class.
    """

    attention_shortcut: nn.Linear
    mlp_shortcut: nn.Linear
    term_scale: float = 1.0  # what the stock layer multiplies each sublayer's output by (the adapter's residual_scale)
    returns_tuple: bool = False  # as the stock layer does (Granite's: ``(hidden_states,)``; Llama's: the tensor)

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        attention, weights = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = self.attention_shortcut(hidden_states) + attention * self.term_scale
        hidden_states = self.mlp_shortcut(hidden_states) + self.mlp(self.post_attention_layernorm(hidden_states)) * self.term_scale
        if not self.returns_tuple:
            return hidden_states
        return (hidden_states, weights) if kwargs.get("output_attentions") else (hidden_states,)  # as Granite's layer


def with_shortcuts(layer: nn.Module, term_scale: float = 1.0, returns_tuple: bool = False) -> ShortcutDecoderLayer:
    """``layer``, in place, as a ``ShortcutDecoderLayer`` that is also an instance of its own class:
    transformers collects ``output_hidden_states`` by hooking the stock decoder-layer class
    (``_can_record_outputs``), so a layer of another class would silently drop them. In place, the layer keeps
    what it holds besides its parts: gradient checkpointing, hooks, accelerate's placement, a caller's attributes."""
    weight = layer.input_layernorm.weight
    layer.__class__ = mixed_class(ShortcutDecoderLayer, type(layer))
    if term_scale != 1.0:
        layer.term_scale = term_scale
    if returns_tuple:
        layer.returns_tuple = True
    if "_old_forward" in vars(layer):  # accelerate's hook calls the forward it found, bound to the stock class
        layer._old_forward = types.MethodType(ShortcutDecoderLayer.forward, layer)
    layer.attention_shortcut = _identity_linear(weight.shape[0], weight)
    layer.mlp_shortcut = _identity_linear(weight.shape[0], weight)
    return layer


class PostNormed(nn.Module):
    """A sublayer as the residual stream sees it when its output is normalised before the add (Gemma 2 / 3)."""

    def __init__(self, sublayer: nn.Module, post_norm: nn.Module) -> None:
        super().__init__()
        self.sublayer, self.post_norm = sublayer, post_norm

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        output = self.sublayer(*args, **kwargs)
        if isinstance(output, tuple):  # attention: (output, weights)
            return (self.post_norm(output[0]), *output[1:])
        return self.post_norm(output)


def _identity_linear(width: int, like: torch.Tensor) -> nn.Linear:
    linear = skip_init(nn.Linear, width, width, bias=False, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.eye(width, device=like.device, dtype=like.dtype))
    return linear


# The bare ``*Model`` classes are the language towers of multimodal models (see ``llava.py``).
@register_adapter(
    LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaModel, MistralModel, Qwen2Model, Qwen3Model
)
class LlamaAdapter(DecoderStackAdapter):
    """Each layer holds q/k/v/o and gate/up/down."""

    # The norm in front of each sublayer, and (Gemma 2 / 3) the one normalising its output before the
    # residual add: a removed sublayer takes both with it, a re-routed one keeps the first.
    pre_norms = {"attention": "input_layernorm", "mlp": "post_attention_layernorm"}
    post_norms: dict[str, str] = {}
    # Config flags that give every projection of a sublayer a bias (Llama has both; Qwen3 and Gemma the first).
    bias_flags = {"attention": "attention_bias", "mlp": "mlp_bias"}

    def attention_kind(self, layer: nn.Module) -> str | None:
        return getattr(layer, "attention_type", None)  # Qwen2 / Qwen3: the model picks each layer's mask by it

    @contextmanager
    def attending_as(self, layer: nn.Module, kind: str) -> Iterator[None]:
        original = layer.attention_type
        layer.attention_type = kind
        try:
            yield
        finally:
            layer.attention_type = original

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

    def _post_norm(self, layer: nn.Module, kind: str) -> nn.Module | None:
        """The norm applied to the ``kind`` sublayer's output before the residual add (Gemma 2 / 3), if any."""
        return getattr(layer, self.post_norms[kind]) if kind in self.post_norms else None

    def sublayer_contribution(self, layer: nn.Module, kind: str) -> nn.Module:
        sublayer, norm = self.sublayer(layer, kind), self._post_norm(layer, kind)
        return sublayer if norm is None else PostNormed(sublayer, norm)

    def output_target(self, layer: nn.Module, kind: str, term: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        norm = self._post_norm(layer, kind)
        if norm is None:
            return super().output_target(layer, kind, term, output)
        # post_norm(z) = γ ⊙ z / rms(z), so near the current output z a change δ moves the term by about γ ⊙ δ / rms(z):
        # δ = rms(z) · r ⊙ γ / (γ² + λ) for the missing part r (ridge: a channel the norm nearly zeroes moves little).
        gamma = self.norm_scale(norm).to(term)
        missing = term - norm(output).to(term)
        damping = OUTPUT_TARGET_DAMPING * gamma.square().mean()
        return output.to(term) + _rms(output.to(term)) * missing * gamma / (gamma.square() + damping)

    @contextmanager
    def observing_residuals(self, layer: nn.Module, sink: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        # Pre-norm residual blocks: h1 = x + s·attention(norm(x)), h2 = h1 + s·mlp(norm(h1)) (s: residual_scale); with
        # post-norms each term is normalised first, so the hooks sit on the module whose output is added.
        stream: dict[str, torch.Tensor] = {}
        scale = self.residual_scale(layer)

        def layer_input(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            stream["x"] = args[0] if args else kwargs["hidden_states"]

        def attention_output(_module: nn.Module, _args: tuple, output: Any) -> None:
            stream["h1"] = stream["x"] + (output[0] if isinstance(output, tuple) else output) * scale
            sink("attention", stream["x"], stream["h1"])

        def mlp_output(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            sink("mlp", stream["h1"], stream["h1"] + output * scale)

        def added(kind: str) -> nn.Module:
            norm = self._post_norm(layer, kind)
            return self.sublayer(layer, kind) if norm is None else norm

        handles = [
            layer.register_forward_pre_hook(layer_input, with_kwargs=True),
            added("attention").register_forward_hook(attention_output),
            added("mlp").register_forward_hook(mlp_output),
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
            attention = layer.self_attn
            layer.self_attn = standing_in_for(attention, RemovedAttention(attention.layer_idx, attention.head_dim))
        elif sublayer == "mlp":
            layer.mlp = RemovedMLP()
        else:
            raise ValueError(f"sublayer must be 'attention' or 'mlp', got {sublayer!r}")
        for norm in self.sublayer_norms(layer, sublayer):
            setattr(layer, norm, nn.Identity())

    def sublayer_norms(self, layer: nn.Module, sublayer: str, reroute: bool = False) -> list[str]:
        # Re-routing keeps the pre-norm: the stand-in maps the normalised input.
        return [norms[sublayer] for norms in ((self.post_norms,) if reroute else (self.pre_norms, self.post_norms)) if sublayer in norms]

    def reroute_sublayer(self, layer: nn.Module, sublayer: str) -> nn.Module:
        if sublayer not in ("attention", "mlp"):
            raise ValueError(f"sublayer must be 'attention' or 'mlp', got {sublayer!r}")
        # the stand-in reads what the sublayer reads: its pre-norm's output, or (OLMo 2) the stream, as wide as its post-norm
        like = getattr(layer, self.pre_norms.get(sublayer) or self.post_norms[sublayer]).weight
        if sublayer == "attention":
            attention = layer.self_attn
            layer.self_attn = standing_in_for(attention, ReroutedAttention(attention.layer_idx, attention.head_dim, like.shape[0], like))
        else:
            layer.mlp = ReroutedMLP(like.shape[0], like)
        for norm in self.sublayer_norms(layer, sublayer, reroute=True):  # the map is fitted to the normalised term, so it writes the stream directly
            setattr(layer, norm, nn.Identity())
        stand_in = self.sublayer(layer, sublayer)
        with torch.no_grad():
            stand_in.map.weight.zero_()
            stand_in.map.bias.zero_()
        return stand_in

    def keep_layers(self, indices: list[int]) -> None:
        keep_decoder_layers(self, indices)

    def residual_branches(self, layer: nn.Module) -> list[ResidualBranch]:
        if self.post_norms:
            raise self._not_rotation_invariant()
        if isinstance(layer.self_attn, RemovedAttention) or isinstance(layer.mlp, RemovedMLP):
            raise ValueError("residual branches of a layer with a removed sublayer are not supported")
        attention, mlp = layer.self_attn, layer.mlp
        shortcuts = (layer.attention_shortcut, layer.mlp_shortcut) if isinstance(layer, ShortcutDecoderLayer) else (None, None)
        return [
            ResidualBranch(layer.input_layernorm, [attention.q_proj, attention.k_proj, attention.v_proj], attention.o_proj, shortcuts[0]),
            ResidualBranch(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], mlp.down_proj, shortcuts[1]),
        ]

    def add_shortcuts(self, index: int) -> nn.Module:
        if self.post_norms:
            raise self._not_rotation_invariant()
        layers = self.decoder_layers()
        if not isinstance(layers[index], ShortcutDecoderLayer):
            layers[index] = with_shortcuts(layers[index], self.residual_scale(layers[index]), self.layer_returns_tuple)
        return layers[index]

    def _not_rotation_invariant(self) -> UnsupportedArchitecture:
        """SliceGPT rotates the residual stream; a norm on a sublayer's output, before it joins the stream, scales
        each channel of it (and divides by its RMS), which no rotation of the stream commutes with."""
        return UnsupportedArchitecture(
            f"{type(self.model).__name__} normalises each sublayer's output before adding it to the residual stream "
            f"({', '.join(self.post_norms.values())}), which rotating the stream would change; SliceGPT does not apply: "
            "use width, layers or sublayers for structured pruning"
        )

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        attention, mlp = self.attention(layer), self.mlp(layer)
        widths = None
        if isinstance(layer, ShortcutDecoderLayer):
            widths = (layer.attention_shortcut.in_features, layer.attention_shortcut.out_features, layer.mlp_shortcut.out_features)
        return LayerShape(
            num_attention_heads=attention.num_heads if attention else 0,
            num_key_value_heads=attention.num_kv_heads if attention else 0,
            intermediate_size=mlp.channel_linear.out_features if mlp else 0,
            attention_output_bias=attention is not None and attention.output.bias is not None,
            mlp_output_bias=mlp is not None and layer.mlp.down_proj.bias is not None,
            residual_widths=widths,
        )

    def stock_shape(self, config: Any, index: int = 0) -> LayerShape:
        return LayerShape(
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            intermediate_size=config.intermediate_size,
            attention_output_bias=bool(getattr(config, "attention_bias", False)),
            mlp_output_bias=bool(getattr(config, "mlp_bias", False)),
        )

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        widths = shape.residual_widths or (None, None, None)
        attention = layer.self_attn
        if not shape.has_attention:
            (self.reroute_sublayer if "attention" in shape.rerouted else self.remove_sublayer)(layer, "attention")
        else:
            query, kv = shape.num_attention_heads * attention.head_dim, shape.num_key_value_heads * attention.head_dim
            attention.q_proj = resized_linear(attention.q_proj, in_features=widths[0], out_features=query)
            attention.k_proj = resized_linear(attention.k_proj, in_features=widths[0], out_features=kv)
            attention.v_proj = resized_linear(attention.v_proj, in_features=widths[0], out_features=kv)
            attention.o_proj = resized_linear(
                attention.o_proj, in_features=query, out_features=widths[1], bias=shape.attention_output_bias
            )
            attention.num_key_value_groups = shape.num_attention_heads // shape.num_key_value_heads
        if not shape.has_mlp:
            (self.reroute_sublayer if "mlp" in shape.rerouted else self.remove_sublayer)(layer, "mlp")
        else:
            mlp = layer.mlp
            mlp.gate_proj = resized_linear(mlp.gate_proj, in_features=widths[1], out_features=shape.intermediate_size)
            mlp.up_proj = resized_linear(mlp.up_proj, in_features=widths[1], out_features=shape.intermediate_size)
            mlp.down_proj = resized_linear(
                mlp.down_proj, in_features=shape.intermediate_size, out_features=widths[2], bias=shape.mlp_output_bias
            )
            mlp.intermediate_size = shape.intermediate_size
        if shape.residual_widths:
            resize_norm(layer.input_layernorm, widths[0])
            resize_norm(layer.post_attention_layernorm, widths[1])
            layer.attention_shortcut = resized_linear(layer.attention_shortcut, widths[0], widths[1])
            layer.mlp_shortcut = resized_linear(layer.mlp_shortcut, widths[1], widths[2])

    def configure_biases(self) -> None:
        """Where FLAP gave output projections a bias and the config has the flag for their sublayer (set to False),
        give each projection that flag covers a bias (zero where it had none) and set it: a layer whose widths are
        uniform then stays one stock transformers builds from the config (Llama: ``attention_bias``, ``mlp_bias``)."""
        for kind, flag in self.bias_flags.items():
            if getattr(self.config, flag, None) is not False:  # the family has no such flag, or every projection has a bias
                continue
            sublayers = [self.attention(layer) if kind == "attention" else self.mlp(layer) for layer in self.decoder_layers()]
            projections = [
                [layout.query, layout.key, layout.value, layout.output] if kind == "attention"
                else [layout.block.gate_proj, layout.block.up_proj, layout.block.down_proj]
                for layout in sublayers if layout is not None
            ]  # fmt: skip
            linears = [linear for each in projections for linear in each]
            if not any(linear.bias is not None for linear in linears) or not all(type(linear) is nn.Linear for linear in linears):
                continue  # nothing added, or factorised projections, which the config cannot describe anyway
            for linears in projections:
                for linear in linears:
                    if linear.bias is None:
                        add_output_bias(linear, torch.zeros(linear.out_features, dtype=linear.weight.dtype))
            setattr(self.config, flag, True)

    def write_uniform_config(self, config: Any, shape: LayerShape) -> None:
        config.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        if shape.has_attention:
            config.num_attention_heads = shape.num_attention_heads
            config.num_key_value_heads = shape.num_key_value_heads
        if shape.has_mlp:
            config.intermediate_size = shape.intermediate_size


def keep_decoder_layers(adapter: DecoderAdapter, indices: list[int]) -> None:
    """Keep layers ``indices`` of a ``decoder.layers`` stack whose attention caches by ``self_attn.layer_idx``,
    renumbered, and the config's per-layer fields with them."""
    adapter.decoder.layers = nn.ModuleList(adapter.decoder_layers()[i] for i in indices)
    for new_index, layer in enumerate(adapter.decoder.layers):
        layer.self_attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):  # Gemma 3 keeps it on the layer too
            layer.layer_idx = new_index
    config = adapter.config
    # Qwen2 / Qwen3 (sliding-window variants) keep one attention type per layer; it follows its layer.
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [config.layer_types[i] for i in indices]
        if getattr(config, "use_sliding_window", False) and hasattr(config, "max_window_layers"):
            # Qwen2's older spelling of the same (layers from this index on slide), which vLLM reads
            full = [kind == "full_attention" for kind in config.layer_types]
            config.max_window_layers = full.index(False) if False in full else len(full)
    config.num_hidden_layers = len(indices)
    _follow_early_exit(config, indices)


def _follow_early_exit(config: Any, indices: list[int]) -> None:
    """``config.early_exit`` (``optimum_prune.early_exit``) drafts with the first ``exit_layer`` layers: it keeps
    reading after the same layers, now fewer; dropped where no layer is left before it or none after."""
    recorded = getattr(config, "early_exit", None)
    if not recorded:
        return
    exit_layer = sum(index < recorded["exit_layer"] for index in indices)
    if 1 <= exit_layer < len(indices):
        config.early_exit = {**recorded, "exit_layer": exit_layer}
        return
    config.early_exit = None
    logger.warning(
        "config.early_exit drafted with the first %d decoder layers; the layers kept leave %s, so it is dropped: "
        "choose an exit for the pruned model (choose_early_exit, enable_early_exit)",
        recorded["exit_layer"], "none before it" if exit_layer == 0 else "none after it",
    )  # fmt: skip


OUTPUT_TARGET_DAMPING = 0.01  # λ relative to the mean γ², as SparseGPT damps its Hessian


def _rms(tokens: torch.Tensor) -> torch.Tensor:
    return tokens.square().mean(-1, keepdim=True).sqrt()


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    heads = heads.to(torch.long).reshape(-1, 1)
    return (heads * head_dim + torch.arange(head_dim)).reshape(-1)

