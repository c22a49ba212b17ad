"""Recording structured results in the config, and reloading non-uniform ones with ``from_pretrained``.

A uniformly pruned model (every layer the same width, fewer layers) is described by an ordinary
config and reloads with stock transformers. When layers differ (per-layer widths, removed
sublayers, compensation biases) the per-layer shapes are stored as the config's
``quantization_config`` with ``quant_method: "optimum_prune_structure"``. transformers'
documented extension point for that field (``register_quantization_config`` /
``register_quantizer``) lets ``import optimum_prune`` give the freshly built, still empty model
the recorded shapes before the weights load — no modeling file is patched. After loading, the
quantizer detaches itself: the result is an ordinary (smaller) model that trains, casts and saves
like any other, and saving it writes the shapes again.
"""

from __future__ import annotations

import copy
import re
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Iterator

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..adapters import DecoderAdapter, get_adapter
from .modules import low_rank_ranks
from .mpo import mpo_layout
from .shapes import LayerShape

QUANT_METHOD = "optimum_prune_structure"
FORMAT_VERSION = 1


def records_layer_shapes(quantization_config: Any) -> bool:
    """Whether a config's ``quantization_config`` (a dict, as ``config.json`` and ``AutoConfig`` hold it, or a
    config object) holds a non-uniform structured result's per-layer shapes."""
    if isinstance(quantization_config, dict):
        return quantization_config.get("quant_method") == QUANT_METHOD
    return getattr(quantization_config, "quant_method", None) == QUANT_METHOD


@register_quantization_config(QUANT_METHOD)
class StructureConfig(QuantizationConfigMixin):
    """Per-decoder-layer shapes of a non-uniformly pruned model (stored in ``config.json``)."""

    def __init__(self, layers: list[dict[str, Any]], format_version: int = FORMAT_VERSION, **_: Any) -> None:
        if format_version != FORMAT_VERSION:
            raise ValueError(
                f"quantization_config.format_version {format_version} is not supported by this optimum-prune "
                f"(reads {FORMAT_VERSION}); upgrade optimum-prune"
            )
        if not isinstance(layers, list) or not layers:
            raise ValueError("quantization_config.layers must be a non-empty list of layer shapes; config.json is corrupt")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.layers = [LayerShape.from_dict(layer, f"quantization_config.layers[{i}]").to_dict() for i, layer in enumerate(layers)]

    @property
    def shapes(self) -> list[LayerShape]:
        return [LayerShape.from_dict(layer, f"quantization_config.layers[{i}]") for i, layer in enumerate(self.layers)]

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "layers": copy.deepcopy(self.layers)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


@contextmanager
def saving_stand_ins(model: PreTrainedModel) -> Iterator[None]:
    """While active, ``model.state_dict()`` (what ``save_pretrained`` writes, unless it gathers offloaded modules'
    weights itself, which stand-ins have none of) also holds a one-element tensor under the name of each parameter a stock model built from the non-uniform
    result's config has and the pruned layers do not (a removed sublayer's projections and norm, a factorised
    linear's weight).

    Saved with the checkpoint (by ``save_pruned``: a plain ``save_pretrained`` writes none), they make
    transformers stop at a size mismatch when it is loaded without ``import optimum_prune``, where it would
    otherwise fill those parameters with random weights and only warn; ``StructureLoader`` skips them."""
    config = copy.deepcopy(model.config)
    del config.quantization_config
    with torch.device("meta"):
        stock = type(model)(config)
    present = set(model.state_dict())
    stand_ins = {name: torch.zeros(1, dtype=model.dtype) for name in stock.state_dict() if name not in present}

    def add(_module: nn.Module, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
        state_dict.update({prefix + name: tensor for name, tensor in stand_ins.items()})

    handle = model.register_state_dict_post_hook(add)
    try:
        yield
    finally:
        handle.remove()


@register_quantizer(QUANT_METHOD)
class StructureLoader(HfQuantizer):
    """Gives each decoder layer its recorded shape before the checkpoint's weights are loaded."""

    requires_calibration = False
    requires_parameters_quantization = False

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        adapter = get_adapter(model)
        shapes = self.quantization_config.shapes
        if len(shapes) != len(adapter.decoder_layers()):
            raise ValueError(
                f"quantization_config.layers describes {len(shapes)} decoder layers but num_hidden_layers is "
                f"{len(adapter.decoder_layers())}; the checkpoint's config.json is corrupt"
            )
        stock = set(model.state_dict())
        adapter.reshape(shapes)
        stand_ins = sorted(stock - set(model.state_dict()))  # what stand_in_tensors saved: not loaded, and not warned of
        if stand_ins:
            model._keys_to_ignore_on_load_unexpected = [
                *(type(model)._keys_to_ignore_on_load_unexpected or []), *(f"^{re.escape(name)}$" for name in stand_ins)
            ]

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        # Nothing is quantized: detach so transformers treats the model as an ordinary one
        # (trainable, castable with .half()), while config.quantization_config keeps the shapes.
        del model.hf_quantizer
        del model.quantization_method
        model.__dict__.pop("_keys_to_ignore_on_load_unexpected", None)  # the class's own patterns again
        model.is_quantized = False
        if hasattr(model.config, "_pre_quantization_dtype"):
            del model.config._pre_quantization_dtype

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def record_structure(adapter: DecoderAdapter) -> list[LayerShape]:
    """Rewrite the decoder's config to describe the pruned layers; return their shapes.

    Uniform shapes go into the ordinary config fields; otherwise the config keeps its original
    (upper-bound) widths and the shapes go into the model config's ``quantization_config``
    (for a multimodal model the widths live in its ``text_config``).
    """
    config = adapter.config
    model_config = adapter.model.config

    def measured() -> list[LayerShape]:
        return [
            replace(adapter.layer_shape(layer), low_rank=low_rank_ranks(layer), mpo=mpo_layout(adapter.moe_block(layer), adapter.experts(layer)))
            for layer in adapter.decoder_layers()
        ]

    shapes = measured()
    if len({replace(shape, attention_output_bias=False, mlp_output_bias=False) for shape in shapes}) == 1:
        adapter.configure_biases()  # uniform widths: biases the config can describe keep the checkpoint a stock one
        shapes = measured()
    adapter.write_uniform_config(config, adapter.stock_shape(config))  # makes head_dim explicit
    uniform = copy.deepcopy(config)
    for shape in shapes:  # equal shapes write the same values (a dense layer of a MoE model writes no expert count)
        adapter.write_uniform_config(uniform, shape)
    existing = getattr(model_config, "quantization_config", None)
    if all(shape == adapter.stock_shape(uniform, index) for index, shape in enumerate(shapes)):
        for shape in shapes:
            adapter.write_uniform_config(config, shape)
        if isinstance(existing, StructureConfig):
            del model_config.quantization_config
        return shapes
    if existing is not None and not isinstance(existing, StructureConfig):
        raise ValueError(
            f"the model already carries a {type(existing).__name__} quantization config; prune before quantizing "
            "(non-uniform structured shapes are stored in quantization_config)"
        )
    model_config.quantization_config = StructureConfig([s.to_dict() for s in shapes])
    return shapes
