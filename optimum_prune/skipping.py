"""Dynamic expert skipping (Lu et al. 2024, "Not All Experts are Equal", Sec. 4.2).

At inference, a token skips each of its lower-ranked experts whose routing weight is below
``beta`` times its top expert's weight: that expert is not run for the token and its term is
dropped from the mixture (the other weights are not renormalised, as in the paper). ``beta=0``
reproduces the unmodified model. The handle counts expert calls and skips, so the saving can be
read off as ``skip_rate`` next to the quality it costs.

    skipping = skip_experts(model, beta=0.3)
    ...generate / evaluate...
    print(skipping.skip_rate); skipping.remove()
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from .adapters import get_adapter
from .adapters.moe import expert_tokens


class PatchedMoEBlocks:
    """Replaces the forward of every MoE block of a model by one whose routed experts' output comes
    from ``_experts_output`` (inference-time variants of the mixture; the router and a shared expert
    run as before); ``remove()`` restores the blocks' own forward."""

    def __init__(self, model: nn.Module, purpose: str) -> None:
        self.adapter = get_adapter(model)
        self._blocks = [block for layer in self.adapter.decoder_layers() if (block := self.adapter.moe_block(layer)) is not None]
        if not self._blocks:
            raise ValueError(f"{type(model).__name__} has no mixture-of-experts layers to {purpose}")
        patched = next((vars(block)["forward"] for block in self._blocks if "forward" in vars(block)), None)
        if patched is not None:
            variant = getattr(patched, "handle", None)
            raise ValueError(
                f"the model's MoE blocks already run {type(variant).__name__ if variant else 'a patched forward'}: one "
                "variant of the mixture at a time; remove() it first"
            )
        for block in self._blocks:
            block.forward = types.MethodType(self._patched_forward(), block)

    def _patched_forward(self) -> Any:
        handle = self

        def forward(block: nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            batch, length, width = hidden_states.shape
            tokens = hidden_states.reshape(-1, width)
            logits = handle.adapter.router(block)(tokens)
            output = handle._experts_output(block, tokens, logits, batch)
            shared = handle.adapter.shared_expert_output(block, tokens)
            if shared is not None:
                output = output + shared
            return output.reshape(batch, length, width), logits

        forward.handle = handle  # which variant a block runs, for the error a second patch gets
        return forward

    def _experts_output(self, block: nn.Module, tokens: torch.Tensor, logits: torch.Tensor, batch: int) -> torch.Tensor:
        """The routed experts' contribution for ``tokens`` (``batch`` sequences of equal length, flattened)."""
        raise NotImplementedError

    def remove(self) -> None:
        for block in self._blocks:
            if getattr(vars(block).get("forward"), "handle", None) is self:  # its own patch only
                del block.forward  # back to the class's forward
        self._blocks = []


class ExpertSkipping(PatchedMoEBlocks):
    """Installed on every MoE block of a model by ``skip_experts``; ``remove()`` restores them."""

    def __init__(self, model: nn.Module, beta: float) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1] (fraction of the top expert's routing weight), got {beta}")
        self.beta = beta
        self.expert_calls = 0
        self.skipped_calls = 0
        super().__init__(model, "skip experts in")

    @property
    def skip_rate(self) -> float:
        """Fraction of (token, selected expert) calls skipped so far."""
        return self.skipped_calls / self.expert_calls if self.expert_calls else 0.0

    def _experts_output(self, block: nn.Module, tokens: torch.Tensor, logits: torch.Tensor, batch: int) -> torch.Tensor:
        weights, selected = self.adapter.route(block, logits)
        kept = weights >= self.beta * weights[:, :1]  # top-k is sorted: column 0 is the top expert
        self.expert_calls += kept.numel()
        self.skipped_calls += int((~kept).sum())
        return routed_mixture(self.adapter.block_experts(block), tokens, weights, selected, kept)


def routed_mixture(
    experts: nn.ModuleList, tokens: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor, kept: torch.Tensor | None = None
) -> torch.Tensor:
    """Σ_k g_k·E_k(x): each token's selected (and ``kept``) experts, weighted by routing weight."""
    output = torch.zeros_like(tokens)
    for expert in torch.unique(selected if kept is None else selected[kept]).tolist():
        rank, token = expert_tokens(selected, expert, kept)
        output.index_add_(0, token, experts[expert](tokens[token]) * weights[token, rank, None].to(tokens.dtype))
    return output


def skip_experts(model: nn.Module, beta: float) -> ExpertSkipping:
    """Turn on dynamic expert skipping with threshold ``beta`` on every MoE block of ``model``."""
    return ExpertSkipping(model, beta)
