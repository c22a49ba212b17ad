"""DeepSeek-V3 and GLM-4.5 (``Glm4Moe``): sigmoid, group-limited routers, always-on shared experts, dense first layers.

Both transformers families run the same MoE block (their router and block code are identical):

- the router holds a weight *parameter* (not a linear) and returns (selected experts, weights), not logits. Its
  sigmoid scores plus ``e_score_correction_bias`` (a per-expert bias used only to *choose*) are viewed as
  ``[n_group, experts / n_group]``; each group scores the sum of its top-2, the best ``topk_group`` groups stay,
  and the top-k experts among them are chosen. Their weights are the *unbiased* sigmoid scores, renormalised
  when ``norm_topk_prob``, times ``routed_scaling_factor``;
- ``shared_experts`` run on every token, ungated, so their statistics weigh every token alike;
- the first ``first_k_dense_replace`` layers have a dense MLP.

Calibration reads each token's weights from the router's own output, so an expert's statistics carry exactly the
weight the block multiplies its output by. The block hands an expert its tokens in token order (``torch.where`` over
[tokens, top_k]), where Mixtral's hands them rank by rank.

Removing experts keeps the same number in every group, so the pruned router still views equal groups, and slices
the router's rows and its correction bias with them: each token then goes to the kept experts, with the weights,
that the unpruned router would choose with the removed experts left out (``route`` with ``experts``), but for one
case: the router fills the groups it did not choose with 0, so a token whose chosen groups hold fewer than top-k
positive biased scores takes one of those zeros by index, and removal changes which zeros there are. Merging
experts keeps dominant ones the same way. Skipping, folding and dropping experts, written for routers that return
softmax logits, are refused; so is ``moe_options.prune_router`` (the router is no linear). DeepSeek's multi-head
latent attention has no key / value projections to cut, and every structured method written for dense layers is
refused, as for the other MoE families.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import DeepseekV3ForCausalLM, DeepseekV3Model, Glm4MoeForCausalLM, Glm4MoeModel

from ..structure.shapes import LayerShape
from .base import UnsupportedArchitecture, register_adapter
from .moe import ExpertRouting, MoEAdapter


def grouped_sigmoid_routing(
    router: nn.Module, logits: torch.Tensor, experts: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, selected columns), each [tokens, top_k], as ``router`` (a DeepSeek-V3 / GLM-4.5 top-k router)
    routes tokens with these logits; with ``experts`` (the router rows the columns are) as it would route them were
    the other experts left out: they take no part in their group's score nor in the top-k."""
    total = router.e_score_correction_bias.shape[0]
    columns = torch.arange(total, device=logits.device) if experts is None else torch.tensor(experts, device=logits.device)
    logits = logits.reshape(-1, logits.shape[-1]).float()
    scores = logits.new_full((logits.shape[0], total), float("-inf"))
    scores[:, columns] = logits.sigmoid() + router.e_score_correction_bias.float().to(logits.device)[columns]
    groups = scores.view(-1, router.n_group, total // router.n_group)
    group_scores = groups.topk(2, dim=-1)[0].sum(dim=-1)
    chosen_groups = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    in_chosen = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen_groups, True)
    # The router fills the other groups with 0 (not -inf); the left-out experts stay out
    scores = scores.masked_fill(~in_chosen.repeat_interleave(total // router.n_group, dim=1), 0.0)
    left_out = torch.ones(total, dtype=torch.bool, device=logits.device).index_fill_(0, columns, False)
    scores = scores.masked_fill(left_out, float("-inf"))
    selected = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)[1]
    position = torch.full((total,), -1, dtype=torch.long, device=logits.device).index_copy_(
        0, columns, torch.arange(len(columns), device=logits.device)
    )
    selected = position[selected]
    weights = logits.sigmoid().gather(1, selected)
    if router.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * router.routed_scaling_factor, selected


class _TokenOrderRouting(ExpertRouting):
    """Routing weights as the block hands tokens over: token by token (``torch.where`` over [tokens, top_k])."""

    def handover(self, selected: torch.Tensor, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        token, rank = torch.where(selected == expert)
        return rank, token


@register_adapter(
    DeepseekV3ForCausalLM, Glm4MoeForCausalLM,
    DeepseekV3Model, Glm4MoeModel,  # as language towers of multimodal models
)  # fmt: skip
class DeepseekV3Adapter(MoEAdapter):
    """Each layer: attention (DeepSeek's multi-head latent attention, GLM's grouped-query one) and a dense MLP
    (the first ``first_k_dense_replace`` layers) or a MoE block with a grouped sigmoid router and shared experts."""

    routing_class = _TokenOrderRouting

    def routers(self, layer: nn.Module) -> list[nn.Linear]:
        return []  # the router's weight is a parameter of its own module, never among the linears

    def experts_per_token(self, block: nn.Module) -> int:
        return block.gate.top_k

    def renormalises(self, block: nn.Module) -> bool:
        return block.gate.norm_topk_prob

    def weights_depend_on_other_rows(self, block: nn.Module) -> bool:
        return False  # each weight is the expert's own sigmoid score, renormalised (if at all) over the chosen only

    def router_logits(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        return F.linear(tokens.reshape(-1, tokens.shape[-1]).float(), block.gate.weight.float())  # as the router does

    def route(self, block: nn.Module, logits: torch.Tensor, experts: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return grouped_sigmoid_routing(block.gate, logits, experts)

    def shared_expert_output(self, block: nn.Module, tokens: torch.Tensor) -> torch.Tensor | None:
        return block.shared_experts(tokens)

    def require_softmax_router(self, purpose: str) -> None:
        raise UnsupportedArchitecture(
            f"{purpose} is written for softmax top-k routers whose module returns logits (Mixtral, Qwen-MoE, OLMoE); "
            f"{type(self.model).__name__}'s router chooses by grouped sigmoid scores with a correction bias and returns "
            "(experts, weights). Remove experts with method='experts' instead"
        )

    def expert_groups(self, block: nn.Module) -> list[list[int]]:
        size = len(block.experts) // block.gate.n_group
        return [list(range(group * size, (group + 1) * size)) for group in range(block.gate.n_group)]

    def fewest_experts(self, block: nn.Module) -> int:
        """As many per group as ``check_expert_count`` asks: two (a group scores its best two), and enough that the
        chosen groups hold the top-k."""
        router = block.gate
        return router.n_group * max(2, math.ceil(router.top_k / router.topk_group))

    def check_expert_count(self, block: nn.Module, count: int) -> None:
        groups = block.gate.n_group
        if count % groups or count // groups < 2:
            raise ValueError(
                f"cannot keep {count} experts per layer: the router chooses among {groups} groups of "
                f"{len(block.experts) // groups} and scores each by its best two, so keep a multiple of {groups} "
                f"with at least 2 per group (e.g. {groups * max(2, count // groups)})"
            )
        if count // groups * block.gate.topk_group < block.gate.top_k:
            raise ValueError(
                f"cannot keep {count} experts per layer: each token's {block.gate.topk_group} chosen groups would hold "
                f"{count // groups * block.gate.topk_group} experts, fewer than the router's top-{block.gate.top_k} "
                "(it would fill them from groups it did not choose); keep more"
            )

    def placeholder_experts(self, block: nn.Module, count: int) -> list[int]:
        return [group[i] for group in self.expert_groups(block) for i in range(count // block.gate.n_group)]

    def keep_experts(self, layer: nn.Module, indices: list[int], experts: list[nn.Module] | None = None) -> None:
        """Keep only experts ``indices`` with their router rows and correction biases: the same number from every
        group, listed group by group, so that the pruned router's groups are the kept experts of the original ones."""
        block = self.moe_block(layer)
        router, groups = block.gate, self.expert_groups(block)
        self.check_expert_count(block, len(indices))
        per_group = len(indices) // len(groups)
        group_of = {expert: number for number, group in enumerate(groups) for expert in group}
        if [group_of.get(expert) for expert in indices] != [number for number in range(len(groups)) for _ in range(per_group)]:
            raise ValueError(
                f"experts {indices} do not keep {per_group} of each router group {groups}, group by group: the "
                "kept experts' routing would change"
            )
        block.experts = nn.ModuleList(experts if experts is not None else [block.experts[i] for i in indices])
        with torch.no_grad():
            weight, bias = router.weight, router.e_score_correction_bias  # on a layer built to load into: meta or not, each
            router.weight = nn.Parameter(weight[indices], requires_grad=weight.requires_grad)
            router.e_score_correction_bias = bias[indices]
        router.n_routed_experts = len(indices)

    def routing_decision(self, block: nn.Module, router_output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        selected, weights = router_output  # what the block applies
        return weights.detach(), selected.detach()

    # --- shapes (expert removal changes the expert count; widths stay stock) ---------------
    def layer_shape(self, layer: nn.Module) -> LayerShape:
        attention, block = layer.self_attn, self.moe_block(layer)
        if hasattr(attention, "k_proj"):  # GLM-4.5's grouped-query attention
            heads, kv_heads = attention.q_proj.out_features // attention.head_dim, attention.k_proj.out_features // attention.head_dim
        else:  # multi-head latent attention: every head reads the shared latent; the config's count stays
            heads, kv_heads = attention.o_proj.in_features // attention.v_head_dim, self.config.num_key_value_heads
        mlp = block.experts[0] if block is not None else layer.mlp
        return LayerShape(
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=mlp.gate_proj.out_features,
            attention_output_bias=attention.o_proj.bias is not None,
            num_experts=len(block.experts) if block is not None else None,
        )

    def stock_shape(self, config: Any, index: int = 0) -> LayerShape:
        moe = index >= config.first_k_dense_replace
        return LayerShape(
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=config.num_key_value_heads,
            intermediate_size=config.moe_intermediate_size if moe else config.intermediate_size,
            # DeepSeek's o_proj takes attention_bias; GLM-4.5's never has a bias (a DeepSeek-like config names another model_type)
            attention_output_bias=bool(config.attention_bias) and hasattr(config, "kv_lora_rank"),  # MLA: DeepSeek's
            num_experts=config.n_routed_experts if moe else None,
        )

    def write_uniform_config(self, config: Any, shape: LayerShape) -> None:
        if shape.num_experts:
            config.n_routed_experts = shape.num_experts
