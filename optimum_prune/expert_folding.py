"""MEO: merge a token's (or a sequence's) selected experts into one expert at inference (He et al.
2023, "Merging Experts into One: Improving Computational Efficiency of Mixture of Experts").

The exact mixture runs every selected expert and sums their outputs, Σ_k g_k·E_k(x). MEO first
merges the selected experts' weights by the routing weights and runs that single expert. Routers
that do not renormalise their top-k (Qwen2-MoE's default, OLMoE) give weights summing to s < 1:
the merge then takes the convex weights ĝ_k = g_k / s, W = Σ_k ĝ_k·W_k, and scales the merged
expert's output by s — exact for one selected expert (and for identical experts) under every
router, where merging by g_k would scale an expert's input and output both. The paper's experts
are one linear and an activation, where merging changes nothing but the cost. Gated FFN experts (Mixtral, Qwen-MoE: down(act(gate·x) ⊙ up·x)) are not linear in their
weights, so here the merge is an approximation; ``FoldedExperts.relative_error`` measures it
against the exact mixture on the same inputs when ``measure_error=True``.

- ``level="token"``: each token merges its own top-k experts with its routing weights. Because the
  merged gate and up projections are linear, their outputs are Σ_k g_k·(W_k·x), computed from the
  experts' own linears on the routed tokens (no per-token weight matrices are built).
- ``level="sequence"``: each sequence averages its tokens' routing weights, keeps the top-k experts
  of that average (renormalised) and merges them once for all its tokens — the saving MEO targets.
  With a KV cache, each decoding step is its own "sequence". The block sees no attention mask, so the
  average includes padded positions: use it on unpadded batches (or batch size 1).

    folding = fold_experts(model, level="sequence", measure_error=True)
    ...evaluate...
    print(folding.relative_error); folding.remove()
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters.moe import expert_tokens
from .skipping import PatchedMoEBlocks, routed_mixture

LEVELS = ("token", "sequence")


class FoldedExperts(PatchedMoEBlocks):
    """Installed on every MoE block by ``fold_experts``; ``remove()`` restores the exact mixture."""

    def __init__(self, model: nn.Module, level: str, measure_error: bool = False) -> None:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.level = level
        self.measure_error = measure_error
        self.squared_error = 0.0
        self.squared_norm = 0.0
        super().__init__(model, "merge experts in")

    @property
    def relative_error(self) -> float:
        """‖merged − exact‖ / ‖exact‖ of the routed-expert outputs seen so far (``measure_error=True``)."""
        return (self.squared_error / self.squared_norm) ** 0.5 if self.squared_norm else 0.0

    def _experts_output(self, block: nn.Module, tokens: torch.Tensor, logits: torch.Tensor, batch: int) -> torch.Tensor:
        weights, selected = self.adapter.route(block, logits)
        if self.level == "sequence":
            experts = len(self.adapter.block_experts(block))
            merged_weights, merged_selected = _sequence_routing(weights, selected, experts, batch, self.adapter.renormalises(block))
        else:
            merged_weights, merged_selected = weights, selected
        output = self._merged(block, tokens, merged_weights, merged_selected)
        if self.measure_error:
            exact = routed_mixture(self.adapter.block_experts(block), tokens, weights, selected).detach()
            self.squared_error += float((output.detach() - exact).float().square().sum())
            self.squared_norm += float(exact.float().square().sum())
        return output

    def _merged(self, block: nn.Module, tokens: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
        """s · down_merged(act(gate_merged·x) ⊙ up_merged·x), every merged matrix Σ_k ĝ_k·W_k with
        ĝ_k = g_k / s and s the token's total routing weight."""
        experts = self.adapter.block_experts(block)
        total = weights.sum(dim=-1, keepdim=True)
        convex = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)
        gate_in = up_in = None
        terms: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for expert in torch.unique(selected).tolist():
            rank, token = expert_tokens(selected, expert)
            g = convex[token, rank, None].to(tokens.dtype)
            (gate, up), _ = self.adapter.expert_projections(experts[expert])
            gate_in = tokens.new_zeros(tokens.shape[0], gate.out_features) if gate_in is None else gate_in
            up_in = tokens.new_zeros(tokens.shape[0], up.out_features) if up_in is None else up_in
            gate_in.index_add_(0, token, g * gate(tokens[token]))
            up_in.index_add_(0, token, g * up(tokens[token]))
            terms.append((expert, token, g))
        output = torch.zeros_like(tokens)
        if not terms:
            return output
        hidden = self.adapter.expert_activation(experts[terms[0][0]])(gate_in) * up_in
        for expert, token, g in terms:
            _, down = self.adapter.expert_projections(experts[expert])
            output.index_add_(0, token, g * down(hidden[token]))
        return output * total.to(tokens.dtype)


def _sequence_routing(
    weights: torch.Tensor, selected: torch.Tensor, experts: int, batch: int, normalise: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's mean routing weight per expert and its top-k (renormalised where the router
    renormalises), given to all its tokens."""
    top_k, length = selected.shape[1], weights.shape[0] // batch
    dense = torch.zeros(weights.shape[0], experts, dtype=weights.dtype, device=weights.device)
    dense.scatter_(1, selected, weights)
    mean = dense.reshape(batch, length, experts).mean(dim=1)
    sequence_weights, sequence_selected = mean.topk(top_k, dim=-1)
    if normalise:
        sequence_weights = sequence_weights / sequence_weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)

    def per_token(values: torch.Tensor) -> torch.Tensor:
        return values.unsqueeze(1).expand(batch, length, top_k).reshape(-1, top_k)

    return per_token(sequence_weights), per_token(sequence_selected)


def fold_experts(model: nn.Module, level: str = "token", measure_error: bool = False) -> FoldedExperts:
    """Turn on MEO expert merging (``level`` "token" or "sequence") on every MoE block of ``model``."""
    return FoldedExperts(model, level, measure_error)
