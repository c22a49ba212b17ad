"""OLMo 2: Llama's module names in another layer arithmetic.

- No pre-norms: attention and MLP read the raw residual stream, and each sublayer's output is normalised
  before the add, ``x + post_norm(f(x))`` (``post_attention_layernorm``, ``post_feedforward_layernorm``).
  What a sublayer adds to the stream is its post-norm's output: the residual hooks observe it, a removed
  sublayer takes its post-norm with it, and a re-routed one is an affine map of the raw stream written
  straight into it. Llama's adapter would read ``post_attention_layernorm`` as the MLP's input norm.
- ``q_norm`` / ``k_norm`` are RMSNorms over all heads' queries (keys) at once, not per head as Qwen3's:
  a kept head's queries are divided by the root mean square over every head, so removing heads changes
  the kept heads' attention by a per-token factor no weight can absorb (removing one query head per group
  of a tiny random model: the kept heads' RMS is 0.72–1.22 times the full one, token by token). Head
  removal is refused; MLP channels (``components='mlp'``) are removed exactly.
- SliceGPT is refused: rotating the stream would have to pass through the post-norms, which normalise
  the sublayers' outputs with per-channel scales that do not commute with a rotation.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Olmo2ForCausalLM, Olmo2Model

from .base import UnsupportedArchitecture, register_adapter
from .llama import LlamaAdapter


@register_adapter(Olmo2ForCausalLM, Olmo2Model)
class Olmo2Adapter(LlamaAdapter):
    """OLMo 2: each sublayer reads the stream and adds its post-normalised output; q/k norms span all heads."""

    pre_norms: dict[str, str] = {}
    post_norms = {"attention": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}

    def check_head_removal(self) -> None:
        raise self._heads_not_removable()

    def keep_heads(self, layer: nn.Module, heads: torch.Tensor, kv_heads: torch.Tensor) -> None:
        raise self._heads_not_removable()

    def _heads_not_removable(self) -> UnsupportedArchitecture:
        return UnsupportedArchitecture(
            f"{type(self.model).__name__} normalises queries and keys over all heads at once (self_attn.q_norm, "
            "self_attn.k_norm), so removing heads would change the kept heads' attention; prune MLP channels only "
            "(PruningConfig.method_options.components='mlp'), or whole layers or sublayers"
        )
