"""Expert merging (MC-SMoE, Li et al. 2024): merge the n experts of each MoE layer into r.

Per layer, on the calibration tokens routed by the already-merged earlier layers:
1. the r most frequently routed experts are the dominant ones;
2. every other expert joins the dominant expert whose router logits (its column of logits over
   the calibration tokens) are most similar by cosine;
3. each group becomes one expert, the routing-frequency-weighted average of its members' weights
   — with ``align=True`` each member's intermediate neurons are first permuted to match the
   dominant expert's (weight matching by linear assignment), since averaging unaligned neurons
   blurs them;
4. the merged expert takes the dominant expert's router row: members were grouped by the
   similarity of their router logits to it, so tokens that went to a member now go to the merged
   expert. (A row fitted to the group's total log-probability would need the constant part
   that a bias-free router cannot represent.) MC-SMoE's code keeps all n rows, each member's
   pointing at its merged expert; with r rows the router's softmax runs over the dominant ones, so
   a router that does not renormalise its top-k (Qwen2-MoE's default, OLMoE) would give each token's
   experts 1 / (the probability the dominant rows had) times their weight: every kept expert's
   output is scaled by that probability's mean over the calibration tokens (exact when it is the
   same for every token, e.g. members that copy their dominant expert; Mixtral renormalises).

A router that chooses experts in groups (``expert_groups``) keeps as many dominant experts in each, and
members join a dominant expert of their own group. The merged model has r experts per layer and saves
with a stock config, like expert pruning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import LayerInputs, feed_layer, walk_layers
from ..dependencies import MissingDependency
from ..options import option
from ..report import PruningReport
from .base import StructuredMethod, register_structured_method
from .experts import best_in_groups, dense_layers, experts_to_keep, removed_expert_share, router_logits


@dataclass(frozen=True)
class ExpertMergingOptions:
    num_experts: int = option(0, "Experts to keep per layer; 0 derives it from sparsity (fraction of experts merged away).")
    align: bool = option(False, "Permute each member's intermediate neurons onto the dominant expert's before averaging.")

    def __post_init__(self) -> None:
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")


@register_structured_method("merge_experts", options=ExpertMergingOptions)
class ExpertMerging(StructuredMethod[ExpertMergingOptions]):
    """Merge MoE experts into r per layer by router-logit similarity and frequency-weighted averaging (MC-SMoE)."""

    def check(self) -> None:
        self.keep = experts_to_keep(self.adapter, self.sparsity, self.options.num_experts)
        self.sparsity = removed_expert_share(self.adapter, self.keep)  # num_experts, or the rounded sparsity
        self.kept_layers = self.kept_moe_layers() | dense_layers(self.adapter)
        for name, layer in zip(self.adapter.layer_names(), self.adapter.decoder_layers()):
            block = self.adapter.moe_block(layer)
            if block is None:
                continue
            inputs, output = self.adapter.expert_projections(self.adapter.block_experts(block)[0])
            factorised = sorted({type(linear).__name__ for linear in (*inputs, output) if not isinstance(linear, nn.Linear)})
            if factorised:  # e.g. MPOE's experts, whose weight is rebuilt at each read: averaging it changed nothing
                raise ValueError(
                    f"{name}: merge_experts averages the experts' weight matrices, which {', '.join(factorised)} does not "
                    "store; merge experts before factorising them (mpoe)"
                )

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        names = self.adapter.layer_names()

        def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            if index in self.kept_layers:
                return
            block = self.adapter.moe_block(layer)
            groups = self.merge(layer, router_logits(self.adapter, block, lambda: feed_layer(self.adapter, layer, inputs)))
            report.removed.append(f"{names[index]}: merged experts {groups}")

        walk_layers(self.adapter, windows, self.device, visit, "Merging experts")

    @torch.no_grad()
    def merge(self, layer: nn.Module, logits: torch.Tensor) -> list[list[int]]:
        """Merge the layer's experts in place, by the router's ``logits`` for the calibration tokens; return the
        groups (dominant expert first)."""
        block = self.adapter.moe_block(layer)
        total = len(self.adapter.block_experts(block))
        _, selected = self.adapter.route(block, logits)
        frequency = torch.bincount(selected.flatten().cpu(), minlength=total).double()
        router_groups = self.adapter.expert_groups(block)  # a router choosing in groups: as many kept in each
        dominant = best_in_groups(frequency, router_groups, self.keep)
        similarity = nn.functional.normalize(logits.T, dim=1) @ nn.functional.normalize(logits.T, dim=1).T
        groups = {d: [d] for d in dominant}
        for router_group in router_groups:
            candidates = [d for d in dominant if d in router_group]
            for expert in router_group:
                if expert not in groups:
                    groups[max(candidates, key=lambda d: float(similarity[expert, d]))].append(expert)
        merged = [self._merged_expert(block, members, frequency) for members in groups.values()]
        if self.adapter.weights_depend_on_other_rows(block):  # step 4: the weights the softmax over r rows inflates, scaled back
            kept_mass = float(torch.softmax(logits.double(), dim=-1)[:, dominant].sum(-1).mean())
            for expert in merged:
                _scale_output(self.adapter.expert_projections(expert)[1], kept_mass)
        self.adapter.keep_experts(layer, dominant, merged)
        return list(groups.values())

    def _merged_expert(self, block: nn.Module, members: list[int], frequency: torch.Tensor) -> nn.Module:
        dominant = self.adapter.block_experts(block)[members[0]]
        if len(members) == 1:
            return dominant
        weights = frequency[members]
        weights = weights / weights.sum() if weights.sum() > 0 else torch.full_like(weights, 1 / len(members))
        parts = [_ExpertLinears(*self.adapter.expert_projections(self.adapter.block_experts(block)[m])) for m in members]
        if self.options.align:
            for part in parts[1:]:
                part.permute(part.alignment_to(parts[0]))
        for position, linear in enumerate(parts[0].linears):
            stacked = torch.stack([part.weights[position].double() for part in parts])
            with torch.no_grad():  # in place, as a run that stops is told from its weights' version counters
                linear.weight.copy_((weights.to(stacked.device).view(-1, 1, 1) * stacked).sum(0))
        return dominant


def _scale_output(linear: nn.Linear, factor: float) -> None:
    with torch.no_grad():
        linear.weight.mul_(factor)
        if linear.bias is not None:
            linear.bias.mul_(factor)


class _ExpertLinears:
    """An expert MLP's weights: input projections (neurons are rows), then the output projection
    (neurons are columns). A copy, so aligning a member never changes the model until merged."""

    def __init__(self, inputs: list[nn.Linear], output: nn.Linear) -> None:
        self.linears = [*inputs, output]
        self.weights = [linear.weight.detach().clone() for linear in self.linears]

    def neuron_features(self) -> torch.Tensor:
        """One row per intermediate neuron: its input-projection rows and output-projection column."""
        return torch.cat([w.float() for w in self.weights[:-1]] + [self.weights[-1].T.float()], dim=1)

    def alignment_to(self, reference: "_ExpertLinears") -> torch.Tensor:
        """The permutation of this expert's neurons that best matches ``reference``'s (max total inner product)."""
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            raise MissingDependency("PruningConfig.method_options.align needs scipy (linear assignment): pip install scipy") from None

        similarity = reference.neuron_features() @ self.neuron_features().T
        _, order = linear_sum_assignment(similarity.cpu().numpy(), maximize=True)
        return torch.as_tensor(order, device=similarity.device)

    def permute(self, order: torch.Tensor) -> None:
        last = len(self.weights) - 1
        self.weights = [w.index_select(1 if i == last else 0, order.to(w.device)) for i, w in enumerate(self.weights)]
