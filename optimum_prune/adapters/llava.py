"""LLaVA-style vision-language models: a vision encoder, a projector and a language tower.

Covered: ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``, ``VipLlavaForConditionalGeneration`` and
``Gemma3ForConditionalGeneration`` — each keeps ``model.model.{vision_tower, multi_modal_projector,
language_model}`` with a CLIP- or SigLIP-style encoder (``vision_model.encoder.layers``: attention +
MLP) and a projector (LLaVA's is an MLP; Gemma 3's a pooled, normalised weight matrix, no linear). The language tower
is handled by the adapter of its own class (Llama, Mistral, Qwen2, Mixtral ...), so every method
that works on the text model works on the tower, structured ones included. Not covered:
Mistral3 / Pixtral (its vision encoder is laid out as ``transformer.layers``).

The model's adapter is its language tower's adapter; the vision encoder and the projector are
``upstream_parts`` that ``PruningConfig.parts`` selects (default: the language tower only).
Calibration runs the whole model, so each part sees the inputs the model really gives it:
language-layer statistics include the image-token positions when the calibration has images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma3ForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    VipLlavaForConditionalGeneration,
)

from .base import DecoderAdapter, UnsupportedArchitecture, adapter_factory, qualified_name, register_adapter


class VisionEncoderAdapter(DecoderAdapter):
    """A CLIP / SigLIP vision transformer's encoder layers that the model reads: with LLaVA's default
    ``vision_feature_layer=-2`` the last layer's output is computed but never used, so it is neither
    calibrated nor pruned (nor counted in the part's sparsity or OWL's allocation)."""

    required_inputs = ("pixel_values",)
    layers_read: int = 0  # set by llava_adapter from the config's feature layers

    def decoder_layers(self) -> nn.ModuleList:
        return nn.ModuleList(list(self.decoder.encoder.layers)[: self.layers_read])

    def layer_names(self) -> list[str]:
        prefix = qualified_name(self.model, self.decoder.encoder.layers)
        return [f"{prefix}.{index}" for index in range(self.layers_read)]

    def input_modules(self) -> list[nn.Module]:
        pre_norm = getattr(self.decoder, "pre_layrnorm", None)  # CLIP only
        return [self.decoder.embeddings, *([pre_norm] if pre_norm is not None else [])]


class ProjectorAdapter(DecoderAdapter):
    """The multimodal projector, as a stack of one layer that maps vision features to text embeddings."""

    required_inputs = ("pixel_values",)

    def decoder_layers(self) -> nn.ModuleList:
        return nn.ModuleList([self.decoder])

    def input_modules(self) -> list[nn.Module]:
        return []

    def run_layer(self, layer: nn.Module, hidden_states: torch.Tensor, layer_kwargs: dict[str, Any]) -> torch.Tensor:
        return layer(hidden_states)

    def layer_names(self) -> list[str]:
        return [qualified_name(self.model, self.decoder)]


@register_adapter(
    Gemma3ForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    VipLlavaForConditionalGeneration,
)
def llava_adapter(model: nn.Module) -> DecoderAdapter:
    """The language tower's adapter, with the vision encoder and the projector as upstream parts."""
    inner = model.model
    vision_model = getattr(inner.vision_tower, "vision_model", None)
    if vision_model is None or not hasattr(vision_model, "encoder"):
        raise UnsupportedArchitecture(
            f"{type(model).__name__}'s vision tower {type(inner.vision_tower).__name__} is not a CLIP/SigLIP-style "
            "encoder (vision_model.encoder.layers); only such towers are supported"
        )
    language_factory = adapter_factory(inner.language_model)
    adapter = language_factory(model, decoder=inner.language_model, config=model.config.text_config)
    text_embeddings = inner.language_model.get_input_embeddings()
    vision = VisionEncoderAdapter(model, decoder=vision_model, config=model.config.vision_config)
    vision.layers_read = _layers_read(model.config, len(vision_model.encoder.layers))
    vision.runs_before = [text_embeddings]
    projector = ProjectorAdapter(model, decoder=inner.multi_modal_projector, config=model.config)
    projector.runs_before = [text_embeddings, inner.vision_tower]
    adapter.runs_before = [inner.vision_tower, inner.multi_modal_projector]
    adapter.upstream_parts = {"vision": vision, "projector": projector}
    return adapter


def _layers_read(config: Any, num_layers: int) -> int:
    """How many vision encoder layers feed the image features: the deepest hidden state the model takes
    (``vision_feature_layer``, or VipLLaVA's ``vision_feature_layers``; hidden state 0 is the embeddings,
    hidden state i layer i's output)."""
    chosen = getattr(config, "vision_feature_layer", None)
    chosen = getattr(config, "vision_feature_layers", -1) if chosen is None else chosen
    return max(index % (num_layers + 1) for index in ([chosen] if isinstance(chosen, int) else chosen))
