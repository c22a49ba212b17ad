"""Granite (IBM Granite 3.x dense): Llama's modules and layout, with scalar multipliers in its arithmetic.

- Each sublayer's output is multiplied by ``residual_multiplier`` before the residual add
  (``x + s·f(norm(x))``): what a sublayer adds to the stream, and what a stand-in fitted to a change of
  the stream must produce, are scaled by it (``residual_scale``).
- The logits are divided by ``logits_scaling``: logits computed from a hidden state outside the model's
  forward (an early exit, K-prune's loss) are divided too (not by a host with its own head around a
  ``GraniteModel``: Granite Vision's LLaVA-NeXT does not divide).
- The embeddings are multiplied by ``embedding_multiplier`` before layer 0, and attention scores by
  ``attention_multiplier`` instead of 1/√head_dim: both happen inside modules the methods run as they
  are (the captured layer-0 inputs already carry the first), and a scalar commutes with SliceGPT's rotations.

A structured result with uniform widths records ``head_dim`` in the config, which Granite's attention reads.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GraniteForCausalLM, GraniteModel

from .base import register_adapter
from .llama import LlamaAdapter


@register_adapter(GraniteForCausalLM, GraniteModel)
class GraniteAdapter(LlamaAdapter):
    """Granite: Llama's layer with its sublayers' terms scaled by ``residual_multiplier`` and scaled logits."""

    layer_returns_tuple = True

    def residual_scale(self, layer: nn.Module) -> float:
        return layer.residual_multiplier

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().output_logits(hidden)
        # GraniteForCausalLM divides by logits_scaling; a host around a GraniteModel (Granite Vision's LLaVA-NeXT) does not
        return logits / self.config.logits_scaling if isinstance(self.model, GraniteForCausalLM) else logits
