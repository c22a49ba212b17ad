"""Architecture adapters: the only place that knows how a model family is laid out.

The calibration engine and the methods ask an adapter for the decoder layers, the modules that
run before the first layer, the prunable linears of a layer and how to run a layer on captured
inputs. Structured methods also ask it which slices are coupled (heads and their GQA groups, MLP
channels), to perform the surgery that needs architecture knowledge, and to rewrite the config
afterwards. Adapters are looked up by model class (walking the MRO, so subclasses inherit).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
from torch import nn

from ..quantized import is_linear
from ..wrappers import transformers_model
from ..registry import Registry
from ..structure.modules import factorize_named
from ..structure.mpo import build_mpo_experts
from ..structure.shapes import LayerShape
from ..structure.surgery import resize_embedding, resize_norm, resized_linear


class UnsupportedArchitecture(ValueError):
    """A request the model's architecture can never meet, whatever was pruned before (structured pruning of
    fused projections, experts of a dense model): ``compress`` checks every step for these up front."""


@dataclass
class AttentionLayout:
    """The projections of one attention block and how their rows split into heads.

    Query head ``h`` is rows ``h*head_dim:(h+1)*head_dim`` of ``query`` and the same columns of
    ``output``; it reads key/value head ``h // heads_per_group`` (grouped-query attention).
    """

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    output: nn.Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class MLPLayout:
    """An MLP block and the linear whose output rows are its hidden channels.

    The other coupled slices (up rows, down columns, biases) are found by Torch-Pruning's
    dependency graph, so adapters never list them.
    """

    block: nn.Module
    channel_linear: nn.Linear


@dataclass
class ResidualBranch:
    """One pre-norm sublayer of a decoder layer: ``x ↦ shortcut(x) + writer(f(readers(norm(x))))``.

    These are the modules that touch the residual stream, so rotating the stream (SliceGPT)
    rewrites exactly them: the readers' input columns, the writer's output rows and the
    shortcut (``None`` while the layer adds its input back unchanged).
    """

    norm: nn.Module
    readers: list[nn.Linear]
    writer: nn.Linear
    shortcut: nn.Linear | None


class TokenRouting:
    """How much each token a linear receives counts in its calibration statistics.

    Dense linears see every token at weight 1; MoE adapters override ``scale`` so an expert's
    tokens count by their routing weights (see ``adapters/moe.py``).
    """

    def scale(self, linear: nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
        return inputs

    def positions(self, linear: nn.Linear) -> torch.Tensor | None:
        """The batch·seq positions of the rows ``linear`` just received when it gets a subset of them (an
        expert); None when it gets them as laid out."""
        return None


STRUCTURE_RECORDING_HOOKS = ("layer_shape", "stock_shape", "write_uniform_config")
"""What ``record_structure`` asks of an adapter after any structured method; reloading a non-uniform result also needs
``reshape_layer`` (``StructuredMethod.always_records_layer_shapes``)."""
RECORDING_HOOKS = frozenset({*STRUCTURE_RECORDING_HOOKS, "reshape_layer"})

ATTENTION_MASKS = "optimum_prune_attention_masks"
"""Key of captured layer arguments holding each attention kind's mask (see ``DecoderAdapter.layer_arguments``)."""


class DecoderAdapter(ABC):
    """Layout of a decoder-only transformer; subclasses say where its parts live.

    ``model`` is what calibration runs (its forward reaches the decoder layers); ``decoder`` is the
    module holding the layers, embeddings and final norm (the model's ``base_model`` unless the
    decoder is a tower inside a larger model) and ``config`` the configuration describing it.
    A multimodal model's adapter is its language tower's, with the modules that run before the
    tower in ``runs_before`` and the other separately prunable stacks in ``upstream_parts``.
    """

    def __init__(self, model: nn.Module, decoder: nn.Module | None = None, config: Any = None) -> None:
        self.model = model
        self.decoder = decoder if decoder is not None else model.base_model
        self.config = config if config is not None else model.config
        self.runs_before: list[nn.Module] = []
        self.upstream_parts: dict[str, DecoderAdapter] = {}

    # Whether a decoder layer returns a tuple (Granite's) rather than the hidden states (Llama's): a layer SliceGPT's
    # shortcuts replace returns the same.
    layer_returns_tuple = False

    # Model inputs without which the forward never reaches these layers (a vision tower needs
    # ``pixel_values``): calibration skips batches that lack them instead of running them in vain.
    required_inputs: tuple[str, ...] = ()

    def parts(self) -> dict[str, "DecoderAdapter"]:
        """The separately prunable stacks of layers, in execution order; a text model has only ``language``."""
        return {**self.upstream_parts, "language": self}

    def capture_modules(self) -> list[nn.Module]:
        """Everything the model runs before decoder layer 0 (moved to the compute device for capture)."""
        return [*self.runs_before, *self.input_modules()]

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, in execution order."""

    @abstractmethod
    def input_modules(self) -> list[nn.Module]:
        """The decoder's own modules that run before layer 0 (embeddings, rotary embedding)."""

    def prunable_linears(self, layer: nn.Module, include_routers: bool = False) -> dict[str, nn.Linear]:
        """Linears of one decoder layer, keyed by their name inside the layer (MoE routers only
        when ``include_routers``); quantized ones too (GPTQ's are not ``nn.Linear``), which only
        ``sparsify`` takes: ``prune`` refuses quantized models."""
        return {name: module for name, module in layer.named_modules() if is_linear(module)}

    def qualified_prunable_linears(self, include_routers: bool = False) -> list[dict[str, nn.Linear]]:
        """Per decoder layer, its prunable linears keyed by their qualified name in the model."""
        return [
            {f"{prefix}.{name}": linear for name, linear in self.prunable_linears(layer, include_routers).items()}
            for prefix, layer in zip(self.layer_names(), self.decoder_layers())
        ]

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's sparse mixture-of-experts block, or None for a dense MLP. Methods reach its
        parts through ``router``, ``block_experts`` and ``experts_per_token``, never by attribute."""
        return None

    def routers(self, layer: nn.Module) -> list[nn.Linear]:
        """The layer's routing linears (a MoE router, a shared-expert gate), which stay dense unless asked."""
        return []

    def router(self, block: nn.Module) -> nn.Linear:
        """The MoE block's router: token → one logit per expert."""
        raise self._no_experts()

    def block_experts(self, block: nn.Module) -> nn.ModuleList:
        """The MoE block's experts, in router-row order."""
        raise self._no_experts()

    def experts_per_token(self, block: nn.Module) -> int:
        """How many experts the block's router picks for each token (its top-k)."""
        raise self._no_experts()

    def experts(self, layer: nn.Module) -> list[nn.Module]:
        """The layer's MoE experts (empty for dense layers)."""
        block = self.moe_block(layer)
        return list(self.block_experts(block)) if block is not None else []

    @contextmanager
    def routed_tokens(self, layer: nn.Module) -> Iterator[TokenRouting]:
        """While active, the yielded ``TokenRouting`` weighs the tokens of each linear's input."""
        yield TokenRouting()

    def run_layer(self, layer: nn.Module, hidden_states: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        output = layer(hidden_states, **self.layer_arguments(layer, layer_kwargs))
        return output[0] if isinstance(output, tuple) else output

    def layer_arguments(self, layer: nn.Module, layer_kwargs: dict[str, Any]) -> dict[str, Any]:
        """The arguments captured at layer 0, with the attention mask of ``layer``'s kind when kinds differ."""
        masks = layer_kwargs.get(ATTENTION_MASKS)
        if masks is None:
            return layer_kwargs
        arguments = {name: value for name, value in layer_kwargs.items() if name != ATTENTION_MASKS}
        return {**arguments, "attention_mask": masks[self.attention_kind(layer)]}

    def attention_kind(self, layer: nn.Module) -> str | None:
        """Which of the model's attention masks ``layer`` takes (Qwen2 / Qwen3 build one for full and one for
        sliding-window layers); None where every layer takes the same one."""
        return None

    def attending_as(self, layer: nn.Module, kind: str) -> ContextManager[None]:
        """While active, the model gives ``layer`` the attention mask of ``kind`` (how the calibration engine
        captures each kind's mask without running the layers in between)."""
        raise NotImplementedError(f"{type(self).__name__} gives every layer one attention mask")

    # --- structured pruning -------------------------------------------------------------
    # Families that support structured pruning override these; the defaults say so clearly.

    def attention(self, layer: nn.Module) -> AttentionLayout | None:
        """The layer's attention projections, or ``None`` if its attention sublayer was removed."""
        raise self._no_structure("attention")

    def mlp(self, layer: nn.Module) -> MLPLayout | None:
        """The layer's MLP block, or ``None`` if its MLP sublayer was removed."""
        raise self._no_structure("mlp")

    def sublayer(self, layer: nn.Module, kind: str) -> nn.Module:
        """The ``"attention"`` or ``"mlp"`` module of a decoder layer."""
        raise self._no_structure("sublayer")

    def sublayer_contribution(self, layer: nn.Module, kind: str) -> nn.Module:
        """A module mapping the sublayer's normalised input to the term it adds to the residual stream before the
        layer's ``residual_scale`` (what residual re-routing fits its stand-in to, which the layer scales in turn): the
        sublayer itself unless its output is normalised."""
        return self.sublayer(layer, kind)

    @contextmanager
    def observing_residuals(self, layer: nn.Module, sink: Callable[[str, torch.Tensor, torch.Tensor], None]) -> Iterator[None]:
        """While active, each run of ``layer`` calls ``sink(kind, before, after)`` with the residual
        stream before and after its attention and its MLP sublayer."""
        raise self._no_structure("observing_residuals")
        yield

    @contextmanager
    def bypassed(self, layer: nn.Module, sublayer: str | None = None) -> Iterator[None]:
        """While active, ``layer`` (or its ``sublayer``) adds nothing to the residual stream, as if removed."""

        def skip_layer(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        def zero_sublayer(_module: nn.Module, _args: tuple, _kwargs: dict, output: Any) -> Any:
            return (torch.zeros_like(output[0]), *output[1:]) if isinstance(output, tuple) else torch.zeros_like(output)

        module = layer if sublayer is None else self.sublayer(layer, sublayer)
        handle = module.register_forward_hook(skip_layer if sublayer is None else zero_sublayer, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def keep_heads(self, layer: nn.Module, heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
        """Keep only query heads ``heads`` and key/value heads ``kv_heads`` (a valid GQA layout)."""
        raise self._no_structure("keep_heads")

    def check_head_removal(self) -> None:
        """Raise ``UnsupportedArchitecture`` where removing heads would change what the kept heads compute (OLMo 2
        normalises queries and keys over all heads at once): methods ask before scoring heads."""

    def remove_sublayer(self, layer: nn.Module, sublayer: str) -> None:
        """Replace the ``"attention"`` or ``"mlp"`` sublayer by a no-op; the residual path stays."""
        raise self._no_structure("remove_sublayer")

    def sublayer_norms(self, layer: nn.Module, sublayer: str, reroute: bool = False) -> list[str]:
        """The names, in ``layer``, of the norms that removing (or re-routing) the sublayer replaces with it, which
        ``ignore`` must then leave too."""
        return []

    def reroute_sublayer(self, layer: nn.Module, sublayer: str) -> nn.Module:
        """Replace the ``"attention"`` or ``"mlp"`` sublayer by a zero affine map of its normalised
        input (``.map``, fitted by ``methods.rerouting``); the norm stays. Return the stand-in."""
        raise self._no_structure("reroute_sublayer")

    def keep_layers(self, indices: list[int]) -> None:
        """Keep only decoder layers ``indices`` (in order) and renumber them."""
        raise self._no_structure("keep_layers")

    def residual_branches(self, layer: nn.Module) -> list[ResidualBranch]:
        """The layer's sublayers in execution order, as seen from the residual stream."""
        raise self._no_structure("residual_branches")

    def add_shortcuts(self, index: int) -> nn.Module:
        """Replace decoder layer ``index`` by one whose residual path runs through identity shortcut
        linears (hidden × hidden) that can then be rotated and sliced; return it."""
        raise self._no_structure("add_shortcuts")

    def final_norm(self) -> nn.Module:
        """The norm between the last decoder layer and the output embedding."""
        raise self._no_structure("final_norm")

    def residual_scale(self, layer: nn.Module) -> float:
        """The factor ``layer`` multiplies each sublayer's output by before adding it to the residual stream (1 but for
        Granite's ``residual_multiplier``): a stand-in fitted to a change of the stream produces that change over it."""
        return 1.0

    def output_target(self, layer: nn.Module, kind: str, term: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """What the ``kind`` sublayer's output projection should produce for the residual stream to gain ``term``,
        where it now produces ``output``: ``term`` over ``residual_scale`` unless the sublayer's output is normalised
        before the add."""
        return term / self.residual_scale(layer)

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits the model computes from a last decoder layer's output (an early exit reads a middle one)."""
        return self.model.get_output_embeddings()(self.final_norm()(hidden))

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        """The per-channel scale γ a scale-only norm (RMSNorm) multiplies by, which SliceGPT fuses into its readers."""
        return norm.weight

    def set_norm_scale(self, norm: nn.Module, scale: torch.Tensor) -> None:
        """Make the norm multiply by ``scale`` (of any width)."""
        norm.weight = nn.Parameter(scale.to(norm.weight))

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        raise self._no_structure("layer_shape")

    def check_unsliced(self, fix: str) -> None:
        """SliceGPT gives the residual stream its own basis between every two sublayers: removing layers or
        sublayers afterwards would join streams written in different bases, and reading the stream after a
        middle layer with the final norm and head (an early exit) would read it in the wrong one."""
        for name, layer in zip(self.layer_names(), self.decoder_layers()):
            if self.layer_shape(layer).residual_widths is not None:
                raise ValueError(f"{name} was sliced by SliceGPT, which gives every layer's stream its own basis; {fix}")

    def stock_shape(self, config: Any, index: int = 0) -> LayerShape:
        """The shape layer ``index`` of a stock model built from ``config`` has."""
        raise self._no_structure("stock_shape")

    def reshape_layer(self, layer: nn.Module, shape: LayerShape) -> None:
        """Give a freshly built (possibly meta) layer the modules of ``shape``, before weights load."""
        raise UnsupportedArchitecture(  # a pruned checkpoint is loading: no method to advise on
            f"{self._lacking(('reshape_layer',))} ({type(self.model).__name__}), which builds the per-layer shapes "
            "the checkpoint's config.json records (quantization_config.layers) before its weights load; load it where "
            "an adapter that implements reshape_layer is registered for this model class"
        )

    def reshape(self, shapes: list[LayerShape]) -> None:
        """Give a freshly built (possibly meta) model the recorded per-layer ``shapes``, before weights load.

        Where the residual stream was sliced at the model's ends, the input embedding, the final
        norm and the output embedding take the sliced widths too.
        """
        hidden = self.model.get_input_embeddings().embedding_dim
        for index, shape in enumerate(shapes):
            if shape.residual_widths and max(shape.residual_widths) > hidden:
                raise ValueError(
                    f"quantization_config.layers[{index}].residual_widths {list(shape.residual_widths)} exceed the hidden size "
                    f"{hidden}; the checkpoint's config.json is corrupt"
                )
            stock = {name: tensor.shape for name, tensor in self.decoder_layers()[index].state_dict().items()}
            layer = self.add_shortcuts(index) if shape.residual_widths else self.decoder_layers()[index]
            self.reshape_layer(layer, replace(shape, low_rank=(), mpo=()))
            _check_no_larger(layer, stock, index)  # before the factors: pruning only ever makes a layer's tensors smaller
            factorize_named(layer, shape.low_rank)  # after the widths: the factors take them
            if shape.mpo:
                build_mpo_experts(self.moe_block(layer), self.experts(layer), shape.mpo)
        if shapes[0].residual_widths and shapes[0].residual_widths[0] != hidden:
            resize_embedding(self.model.get_input_embeddings(), shapes[0].residual_widths[0])
        if shapes[-1].residual_widths and shapes[-1].residual_widths[2] != hidden:
            width = shapes[-1].residual_widths[2]
            resize_norm(self.final_norm(), width)
            if self.model.get_output_embeddings() is not None:  # a bare decoder (AutoModel) has no head
                self.model.set_output_embeddings(resized_linear(self.model.get_output_embeddings(), in_features=width))

    def write_uniform_config(self, config: Any, shape: LayerShape) -> None:
        """Write the widths of ``shape`` into ``config`` (the head size stays explicit)."""
        raise self._no_structure("write_uniform_config")

    def configure_biases(self) -> None:
        """Before the structure is recorded: make biases a structured method added (FLAP's) ones the config
        describes, where the family's config can (see the Llama adapter); by default it cannot."""

    def require(self, *hooks: str) -> None:
        """Raise ``UnsupportedArchitecture`` unless this family implements the structured ``hooks`` (e.g.
        ``"keep_layers"``): a method asks in ``check``, before a calibration pass it would run in vain."""
        missing = self.missing_hooks(*hooks)
        if not missing:
            return
        if set(missing) <= RECORDING_HOOKS:  # a family's own reason (fused projections, experts) is about cutting layers
            raise DecoderAdapter._no_structure(self, *missing)
        raise self._no_structure(*missing)

    def missing_hooks(self, *hooks: str) -> list[str]:
        """Those of the structured ``hooks`` this family leaves as ``DecoderAdapter`` has them (not implemented)."""
        return [hook for hook in hooks if getattr(type(self), hook) is getattr(DecoderAdapter, hook)]

    # Asking a model for what its architecture lacks is a bad request (ValueError), not a bug.
    def _no_experts(self) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(f"{type(self).__name__} ({type(self.model).__name__}) has no mixture-of-experts blocks")

    def _no_structure(self, *hooks: str) -> UnsupportedArchitecture:
        """The refusal of a structured method that needs ``hooks``, which this family does not implement (families
        with a reason of their own, fused projections or experts, say it instead)."""
        return UnsupportedArchitecture(
            f"{self._lacking(hooks)} ({type(self.model).__name__}), the structured-pruning hook(s) this method needs: "
            "implement them in the adapter, or use a method it supports (an unstructured one such as wanda or "
            "sparsegpt takes every family)"
        )

    def _lacking(self, hooks: tuple[str, ...]) -> str:
        return f"{type(self).__name__} lacks {', '.join(hooks)}"

    def layer_names(self) -> list[str]:
        """Qualified names of the decoder layers, for reports and ``ignore`` patterns."""
        layers = self.decoder_layers()
        prefix = qualified_name(self.model, layers)
        return [f"{prefix}.{index}" for index in range(len(layers))]


class DecoderStackAdapter(DecoderAdapter):
    """The layout most transformers decoders share: ``decoder.{embed_tokens, rotary_emb, layers, norm}``."""

    def decoder_layers(self) -> nn.ModuleList:
        return self.decoder.layers

    def input_modules(self) -> list[nn.Module]:
        return [self.decoder.embed_tokens, self.decoder.rotary_emb]

    def final_norm(self) -> nn.Module:
        return self.decoder.norm


AdapterFactory = Callable[..., DecoderAdapter]
"""An adapter class, or a function building the adapter of a composite (multimodal) model."""

ADAPTERS: Registry[AdapterFactory] = Registry("architecture adapter", "model class")


Factory = TypeVar("Factory", bound=AdapterFactory)
"""What ``register_adapter`` gives back: the class (or function) itself (a user's type checker keeps seeing it)."""


def register_adapter(*model_classes: type | str) -> Callable[[Factory], Factory]:
    """Class decorator: ``adapter`` builds the adapter of ``model_classes`` (and their subclasses), each a transformers
    model class or its name, e.g. ``@register_adapter(LlamaForCausalLM)`` or ``@register_adapter("MyForCausalLM")`` for
    a class only remote code defines."""
    usage = "@register_adapter(LlamaForCausalLM, ...) (or the classes' names)"
    if not model_classes:
        raise TypeError(f"register_adapter takes the model classes the adapter serves: {usage}")
    for model_class in model_classes:
        if not isinstance(model_class, (type, str)) or (isinstance(model_class, type) and issubclass(model_class, DecoderAdapter)):
            raise TypeError(f"register_adapter takes the model classes the adapter serves: {usage}; got {model_class!r}")
    names = [model_class if isinstance(model_class, str) else model_class.__name__ for model_class in model_classes]

    def decorator(adapter: Factory) -> Factory:
        for name in names:
            ADAPTERS.add(name, adapter, adapter)
        return adapter

    return decorator


def adapter_factory(model: nn.Module) -> AdapterFactory:
    """The registered adapter of ``model``'s class or its nearest registered base class."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS.get(cls.__name__)
    raise UnsupportedArchitecture(
        f"model class {type(model).__name__} is not supported; supported model classes: {', '.join(ADAPTERS.names())} "
        "(an adapter another module registers must be imported first; a model inside another wrapper: pass the "
        "transformers model it holds)"
    )


def get_adapter(model: nn.Module) -> DecoderAdapter:
    """The adapter of ``model``: a transformers model, or a peft / optimum-quanto wrapper around one."""
    base = transformers_model(model)
    return adapter_factory(base)(base)


def qualified_name(model: nn.Module, module: nn.Module) -> str:
    """``module``'s name inside ``model``, for reports and ``ignore`` patterns."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise RuntimeError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _check_no_larger(layer: nn.Module, stock: dict[str, torch.Size], index: int) -> None:
    """A recorded layer shape whose tensors outgrow the stock layer's describes no pruned model (heads, channels or
    experts beyond the config's): refused before any weight is allocated or loaded."""
    for name, tensor in layer.state_dict().items():
        if name in stock and tensor.numel() > math.prod(stock[name]):
            raise ValueError(
                f"quantization_config.layers[{index}] makes {name} {list(tensor.shape)}, larger than the config's "
                f"{list(stock[name])}; the checkpoint's config.json is corrupt"
            )
