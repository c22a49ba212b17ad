"""Recording structured results in the config, and reloading non-uniform ones with ``from_pretrained``.

A uniformly pruned model (every layer the same width, fewer layers) is described by an ordinary
config and reloads with stock transformers. When layers differ (per-layer widths, removed
sublayers, compensation biases) the per-layer shapes are stored as the config's
``quantization_config`` with ``quant_method: "optimum_prune_structure"``. transformers'
documented extension point for that field (``register_quantization_config`` /
``register_quantizer``) lets ``import optimum_prune`` give the freshly built, still empty model
the recorded shapes before the weights load — no modeling file is patched. After loading, the
quantizer detaches itself: the result is an ordinary (smaller) model that trains, casts and saves
like any other, and saving it writes the shapes again, with one-element stand-ins under the stock
weight names its layers lack (``keep_stand_ins``): without the import, transformers stops at a size
mismatch instead of filling those weights at random.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import math
import re
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from accelerate import init_empty_weights
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import no_init_weights
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..adapters import DecoderAdapter, UnsupportedArchitecture, get_adapter
from .modules import low_rank_ranks, rerouted_sublayers
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


def offloaded(model: PreTrainedModel) -> bool:
    """Whether ``save_pretrained`` gathers this model's weights from offloaded modules (its own test): it then
    onloads each saved key from its module, which a stand-in tensor has none of."""
    placements = set(getattr(model, "hf_device_map", {}).values())
    return len(placements) > 1 and bool(placements & {"cpu", "disk"})


class _AddStandIns:
    """``state_dict`` post-hook: a one-element tensor under each name in ``names`` (a plain class: torch marks
    the hook with an attribute)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, model: PreTrainedModel, state_dict: dict[str, Any], prefix: str, _metadata: Any) -> None:
        if offloaded(model):
            return
        for name in self.names:
            state_dict.setdefault(prefix + name, torch.zeros(1, dtype=model.dtype))


class _SkipStandIns:
    """``load_state_dict`` pre-hook: drops the stand-ins a saved checkpoint holds, so it loads back (a Trainer
    resuming from its checkpoint, a strict ``load_state_dict`` of the saved tensors)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, _model: nn.Module, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
        for name in self.names:
            tensor = state_dict.get(prefix + name)
            if isinstance(tensor, torch.Tensor) and tensor.numel() == 1:
                del state_dict[prefix + name]


# The model's attribute naming the stand-ins its saves write (``keep_stand_ins``).
_STAND_INS_ATTRIBUTE = "_optimum_prune_stand_ins"


class _SavingWithStandIns:
    """``save_pretrained`` of a model class one of whose models records stand-ins (set on the class by
    ``keep_stand_ins``): such a model's saves write them, into its own state dict or into the one it is given (the
    Trainer's under DeepSpeed or FSDP, gathered by accelerate); any other model saves as the class does.

    Only while saving: torch's distributed checkpointing (FSDP2, accelerate's ``get_state_dict``) maps every
    ``state_dict()`` key back to a module attribute, which a stand-in has none of. On the class, bound at each
    access like any method: a callable kept on the model and holding it made a cycle, which kept each dropped model
    (a notebook's reloads, a study's points) in memory until a full garbage collection."""

    def __init__(self, stock: Any) -> None:
        self.stock = stock

    def __get__(self, model: PreTrainedModel | None, owner: type | None = None) -> Any:
        save = self.stock.__get__(model, owner)
        names = None if model is None else vars(model).get(_STAND_INS_ATTRIBUTE)
        return functools.partial(_save_with_stand_ins, save, model, names) if names else save


def _save_with_stand_ins(save: Any, model: PreTrainedModel, names: list[str], *args: Any, **kwargs: Any) -> Any:
    adding = _AddStandIns(names)
    if kwargs.get("state_dict") is not None:
        kwargs["state_dict"] = dict(kwargs["state_dict"])
        adding(model, kwargs["state_dict"], "", None)
        return save(*args, **kwargs)
    handle = model.register_state_dict_post_hook(adding)
    try:
        return save(*args, **kwargs)
    finally:
        handle.remove()


def keep_stand_ins(model: PreTrainedModel) -> None:
    """Make ``model.save_pretrained`` (its class's, see ``_SavingWithStandIns``) of a non-uniform result write a
    one-element tensor under the name of each
    parameter a stock model built from its config has and the pruned layers lack (a removed sublayer's
    projections and norm, a factorised linear's weight, a dropped expert's), and ``load_state_dict`` skip them.

    ``save_pruned``, the Trainer's checkpoints and LLaMA-Factory's export all call ``save_pretrained``, so a
    checkpoint loaded without ``import optimum_prune`` stops at transformers' size mismatch where it would
    otherwise fill those parameters with random weights and only warn; ``StructureLoader`` skips them.
    Called whenever the structure is recorded or loaded: it replaces what an earlier recording set, and
    removes it once the model is uniform again. An offloaded model's save gets none (``offloaded``), nor does
    a state dict written without ``save_pretrained`` (``model.state_dict()``, accelerate's ``save_model``)."""
    hooks = model._load_state_dict_pre_hooks  # torch has no public way to list them
    for key in [key for key, hook in hooks.items() if isinstance(getattr(hook, "hook", hook), _SkipStandIns)]:
        del hooks[key]
    vars(model).pop(_STAND_INS_ATTRIBUTE, None)
    if not records_layer_shapes(getattr(model.config, "quantization_config", None)):
        return
    config = copy.deepcopy(model.config)
    del config.quantization_config
    stock = built_without_weights(lambda: type(model)(config))
    present = {name.replace(".base_layer.", ".") for name in model.state_dict()}  # a peft LoRA layer wraps the linear
    names = [name for name in stock.state_dict() if name not in present]
    if names:
        save_pretrained = inspect.getattr_static(type(model), "save_pretrained")
        if not isinstance(save_pretrained, _SavingWithStandIns):  # once per class
            type(model).save_pretrained = _SavingWithStandIns(save_pretrained)
        vars(model)[_STAND_INS_ATTRIBUTE] = names
        model.register_load_state_dict_pre_hook(_SkipStandIns(names))


_BUILDING = threading.Lock()


def built_without_weights(build: Callable[[], nn.Module], buffers: bool = True) -> nn.Module:
    """``build()`` with its parameters (and ``buffers``) on the meta device, holding no memory. Its weights are
    initialised there as its class does, at no cost; a class whose ``_init_weights`` fails on modules it builds itself
    (StableLM's per-head q/k LayerNorms, which have no bias: transformers 4.57) is built again uninitialised, under
    transformers' ``no_init_weights``. ``buffers=False`` keeps buffers real (rotary frequencies are in no checkpoint)
    with Accelerate's ``init_empty_weights``. Those two switch process-wide state while they build (another thread's
    modules built meanwhile see it), and overlapping uses could leave it switched: builds here take turns."""
    with _BUILDING, torch.device("meta") if buffers else init_empty_weights():
        try:
            return build()
        except AttributeError:
            with no_init_weights():
                return build()


def _check_stored_as_stand_ins(config: Any, recorded: dict[str, Any], names: list[str]) -> None:
    """The parameters the recorded shapes remove must be stored as ``keep_stand_ins``' one-element stand-ins: a full
    tensor there means ``quantization_config`` does not describe these weights (an edited ``config.json``, or one
    from another checkpoint), and loading would silently drop real weights. Read from the shards' headers where the
    checkpoint is a local folder or a Hub repository (at the loaded revision) in the local cache, and only where
    the ``config.json`` beside them records these shapes (a ``subfolder=`` load finds another model's weights there)."""
    source, revision = str(getattr(config, "_name_or_path", "")), getattr(config, "_commit_hash", None)
    beside = _stored_file(source, "config.json", revision)
    try:
        stored_config = json.loads(beside.read_text(encoding="utf-8")) if beside else {}
    except (ValueError, OSError):
        return
    stored = stored_config.get("quantization_config") if isinstance(stored_config, dict) else None
    if not isinstance(stored, dict) or stored.get("layers") != recorded.get("layers"):
        return
    index = _stored_file(source, "model.safetensors.index.json", revision)
    try:
        files = json.loads(index.read_text(encoding="utf-8"))["weight_map"] if index else None
    except (ValueError, KeyError, TypeError):
        return  # transformers names a damaged index itself
    single = None if index else _stored_file(source, "model.safetensors", revision)
    by_file: dict[Path, list[str]] = {}
    for name in names:
        file = (index.parent / files[name]) if files and name in files else single
        if file is not None and file.is_file():
            by_file.setdefault(file, []).append(name)
    for file, file_names in by_file.items():
        try:
            handle = safe_open(file, framework="pt")
        except SafetensorError:
            return  # transformers names a damaged shard itself
        with handle:
            present = set(handle.keys())
            for name in file_names:
                shape = handle.get_slice(name).get_shape() if name in present else [1]
                if math.prod(shape) != 1:
                    raise ValueError(
                        f"{source}: config.json's quantization_config gives the layers shapes without {name}, but {file.name} "
                        f"stores it in full ({list(shape)}): the config does not describe these weights (edited, or from "
                        "another checkpoint), and loading would drop them"
                    )


def _stored_file(source: str, filename: str, revision: str | None) -> Path | None:
    """``filename`` of the checkpoint ``source``: in its folder, or in the Hub cache at ``revision`` without contacting
    the Hub."""
    local = Path(source) / filename
    if local.is_file():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, filename, revision=revision)
    except ValueError:  # not a repository id (huggingface_hub's validation errors are ValueErrors)
        return None
    return Path(cached) if isinstance(cached, str) else None


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
        stand_ins = sorted(stock - set(model.state_dict()))  # what keep_stand_ins saved: not loaded, and not warned of
        config = kwargs.get("config")
        if stand_ins and config is not None:
            _check_stored_as_stand_ins(config, self.quantization_config.to_dict(), stand_ins)
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
        keep_stand_ins(model)  # saved again (by any save), the checkpoint keeps them

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def check_shape_hooks(adapter: DecoderAdapter) -> None:
    """Call the hooks ``record_structure`` calls on the model as it is, before a structured method cuts it: a hook
    inherited from a family that names its modules otherwise (Llama's ``layer_shape`` reads ``mlp.down_proj``) fails
    here with the hook and the layer named, not with a raw error after the weights changed."""

    @contextmanager
    def calling(hook: str, where: str) -> Iterator[None]:
        try:
            yield
        except UnsupportedArchitecture:
            raise
        except Exception as error:
            raise UnsupportedArchitecture(
                f"{type(adapter).__name__}.{hook} fails on {where} ({type(error).__name__}: {error}), so a structured "
                "result could not be recorded; nothing was changed. An adapter for a family whose modules are named "
                f"otherwise than its base class's overrides {hook} (README: Extending)"
            ) from error

    config = copy.deepcopy(adapter.config)  # write_uniform_config rewrites it
    for index, (name, layer) in enumerate(zip(adapter.layer_names(), adapter.decoder_layers())):
        with calling("layer_shape", name):
            adapter.layer_shape(layer)
        with calling("stock_shape", f"layer {index} of the config"):
            shape = adapter.stock_shape(config, index)
    with calling("write_uniform_config", "the config"):
        adapter.write_uniform_config(config, shape)


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
            replace(
                adapter.layer_shape(layer), rerouted=rerouted_sublayers(layer), low_rank=low_rank_ranks(layer),
                mpo=mpo_layout(adapter.moe_block(layer), adapter.experts(layer)),
            )
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
        keep_stand_ins(adapter.model)
        return shapes
    if adapter.missing_hooks("reshape_layer"):  # asked up front of methods whose results always are
        raise UnsupportedArchitecture(
            f"{type(adapter).__name__} lacks reshape_layer, which reloading this result needs: its layers were left in "
            "shapes of their own, recorded per layer; implement reshape_layer in the adapter, or choose options that "
            "leave every layer one shape (the model in memory is pruned; the checkpoint would not reload)"
        )
    if existing is not None and not isinstance(existing, StructureConfig):
        raise ValueError(
            f"the model already carries a {type(existing).__name__} quantization config; prune before quantizing "
            "(non-uniform structured shapes are stored in quantization_config)"
        )
    model_config.quantization_config = StructureConfig([s.to_dict() for s in shapes])
    keep_stand_ins(adapter.model)
    return shapes
