"""Architecture adapters: the only place that knows how a model family is laid out.

The calibration engine and the methods ask an adapter for the decoder layers, the modules that
run before the first layer, the prunable linears of a layer and how to run a layer on captured
inputs. Adapters are looked up by model class (walking the MRO, so subclasses inherit).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable

import torch
from torch import nn

from ..registry import Registry


class DecoderAdapter(ABC):
    """Layout of a decoder-only transformer; subclasses say where its parts live."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The decoder layers, in execution order."""

    @abstractmethod
    def input_modules(self) -> list[nn.Module]:
        """Modules the model runs before decoder layer 0 (moved to the compute device for capture)."""

    def prunable_linears(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """Linears of one decoder layer, keyed by their name inside the layer."""
        return {name: module for name, module in layer.named_modules() if isinstance(module, nn.Linear)}

    def run_layer(self, layer: nn.Module, hidden_states: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        output = layer(hidden_states, **layer_kwargs)
        return output[0] if isinstance(output, tuple) else output

    def layer_names(self) -> list[str]:
        """Qualified names of the decoder layers, for reports and ``ignore`` patterns."""
        layers = self.decoder_layers()
        for name, module in self.model.named_modules():
            if module is layers:
                return [f"{name}.{index}" for index in range(len(layers))]
        raise RuntimeError("decoder layers are not a submodule of the model")


ADAPTERS: Registry[type[DecoderAdapter]] = Registry("architecture adapter", "model class")


def register_adapter(*model_classes: type) -> Callable[[type[DecoderAdapter]], type[DecoderAdapter]]:
    def decorator(adapter: type[DecoderAdapter]) -> type[DecoderAdapter]:
        for model_class in model_classes:
            ADAPTERS.add(model_class.__name__, adapter)
        return adapter

    return decorator


def get_adapter(model: nn.Module) -> DecoderAdapter:
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS.get(cls.__name__)(model)
    raise ValueError(
        f"model class {type(model).__name__} is not supported; supported model classes: {', '.join(ADAPTERS.names())}"
    )
