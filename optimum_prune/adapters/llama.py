"""Llama family: Llama (incl. GQA Llama-3 / SmolLM2), Mistral and Qwen2 share one layout."""

from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

from .base import DecoderAdapter, register_adapter


@register_adapter(LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
class LlamaAdapter(DecoderAdapter):
    """``model.model.{embed_tokens, rotary_emb, layers, norm}``; each layer holds q/k/v/o and gate/up/down."""

    def decoder_layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def input_modules(self) -> list[nn.Module]:
        return [self.model.model.embed_tokens, self.model.model.rotary_emb]
