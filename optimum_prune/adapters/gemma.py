"""Gemma family: Gemma, Gemma 2 and Gemma 3 (text). Llama's module names, three differences.

- Every RMSNorm multiplies by ``1 + weight`` (a zero weight is the identity scale), so what SliceGPT
  fuses into the linears reading a norm is ``1 + weight``, and a reset norm stores ``scale - 1``.
- Gemma 2 and 3 wrap each sublayer in two norms: ``x + post_norm(f(pre_norm(x)))``. What a
  sublayer adds to the residual stream is therefore its post-norm's output. The post-norm is not
  invariant to rotating the stream (it normalises the sublayer's output, not the stream), so
  SliceGPT is refused there; every other method applies.
- Gemma 2 soft-caps its logits (``final_logit_softcapping``): logits computed from a hidden state
  outside the model's forward (an early exit, K-prune's loss) apply it too.

Gemma 3 adds q/k norms like Qwen3 and a second rotary embedding for its sliding-window layers; the
calibration engine captures both position embeddings with the rest of layer 0's arguments.
With images, ``Gemma3ForConditionalGeneration`` is a LLaVA-style model (``llava.py``) whose language tower
this adapter prunes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import (
    Gemma2ForCausalLM,
    Gemma2Model,
    Gemma3ForCausalLM,
    Gemma3TextModel,
    GemmaForCausalLM,
    GemmaModel,
)

from .base import register_adapter
from .llama import LlamaAdapter


@register_adapter(GemmaForCausalLM, GemmaModel)
class GemmaAdapter(LlamaAdapter):
    """Gemma: Llama's layout (head size set apart from the width) with ``1 + weight`` norm scales."""

    def norm_scale(self, norm: nn.Module) -> torch.Tensor:
        return 1 + norm.weight.float()  # in float32, as Gemma's norm computes it: 1 + w in bfloat16 would round

    def set_norm_scale(self, norm: nn.Module, scale: torch.Tensor) -> None:
        norm.weight = nn.Parameter((scale - 1).to(norm.weight))


@register_adapter(Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma2Model, Gemma3TextModel)
class SandwichNormAdapter(GemmaAdapter):
    """Gemma 2 / Gemma 3: each sublayer between a pre-norm and a post-norm, soft-capped logits (Gemma 2)."""

    pre_norms = {"attention": "input_layernorm", "mlp": "pre_feedforward_layernorm"}
    post_norms = {"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}

    def __init__(self, model: nn.Module, decoder: nn.Module | None = None, config: Any = None) -> None:
        if decoder is None and isinstance(model, Gemma3ForCausalLM):  # its base_model_prefix names no attribute
            decoder = model.model
        super().__init__(model, decoder, config)

    def input_modules(self) -> list[nn.Module]:
        local = getattr(self.decoder, "rotary_emb_local", None)  # Gemma 3: sliding-window layers' RoPE
        return [*super().input_modules(), *([local] if local is not None else [])]

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().output_logits(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def keep_layers(self, indices: list[int]) -> None:
        super().keep_layers(indices)
        _follow_sliding_window_pattern(self.config)


def _follow_sliding_window_pattern(config: Any) -> None:
    """Gemma 3's config.json still holds ``sliding_window_pattern`` p (layer i attends globally iff (i + 1) % p == 0),
    the older spelling of ``layer_types`` that some serving stacks read: after layers go, it is the period of the kept
    layers, or None where none describes them (transformers reads ``layer_types`` first either way)."""
    names = [name for name in ("sliding_window_pattern", "_sliding_window_pattern") if getattr(config, name, None) is not None]
    if not names or getattr(config, "layer_types", None) is None:
        return
    kinds = list(config.layer_types)
    periods = (
        period
        for period in range(1, len(kinds) + 2)
        if kinds == ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(len(kinds))]
    )
    period = next(periods, None)
    for name in names:
        setattr(config, name, period)
