"""Seeing through the wrappers around a transformers model: peft's model and tuner layers (LoRA, ...), which wrap
its linears, and the model optimum-quanto reloads a quantized checkpoint as."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Iterator, Union

from torch import nn

if TYPE_CHECKING:  # optimum-quanto is optional, and slow to import
    from optimum.quanto import QuantizedTransformersModel

ModelLike = Union[nn.Module, "QuantizedTransformersModel"]
"""A transformers model, or the ``QuantizedModelForCausalLM`` optimum-quanto reloads one as (not a module)."""


def transformers_model(model: Any) -> nn.Module:
    """The transformers model inside a wrapper: ``torch.compile``'s, peft's (LoRA recovery) or the
    ``QuantizedModelForCausalLM`` optimum-quanto reloads a quantized checkpoint as (not a module: it forwards to the
    model it holds)."""
    compiled = getattr(model, "_orig_mod", None)  # torch.compile(model)'s OptimizedModule
    if isinstance(compiled, nn.Module):
        return transformers_model(compiled)
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    quanto = sys.modules.get("optimum.quanto")  # such a wrapper exists only once optimum-quanto is imported
    if quanto is not None and isinstance(model, quanto.QuantizedTransformersModel):
        return model._wrapped
    return model


def base_layer(module: nn.Module) -> nn.Module:
    """The layer a peft tuner layer wraps, or ``module`` itself."""
    get_base_layer = getattr(module, "get_base_layer", None)
    return get_base_layer() if callable(get_base_layer) else module


def unwrapped_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``root.named_modules()`` with each tuner layer replaced by its base layer, under the tuner layer's name (the
    name the model has without peft), and the tuner's own modules (its small adapter linears) left out."""
    inside_tuner: set[int] = set()
    for name, module in root.named_modules():
        if id(module) in inside_tuner:
            continue
        base = base_layer(module)
        if base is not module:
            inside_tuner.update(id(child) for child in module.modules())
            module = base
        yield name, module


def is_peft_model(model: Any) -> bool:
    """Whether ``model`` is a peft wrapper (``get_peft_model``'s), with tuner layers (LoRA) or without (prompt
    tuning, prefix tuning: their own parameters sit beside the model's, as wide as its hidden states)."""
    return hasattr(model, "get_base_model") and hasattr(model, "peft_config")


def tuner_layers(model: nn.Module) -> list[str]:
    """The names of ``model``'s peft tuner layers."""
    return [name for name, module in model.named_modules() if base_layer(module) is not module]
