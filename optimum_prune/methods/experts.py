"""Expert pruning: keep r of the n experts of every MoE layer, with their router rows.

Criteria:
- ``reconstruction`` (Lu et al. 2024, "Not All Experts are Equal"): the subset whose layer output,
  re-routed among the kept experts, is closest to the full layer's on the calibration tokens —
  every C(n, r) subset while that is at most ``max_subsets``, else greedy removal of one expert
  at a time;
- ``frequency``: how often the router picks each expert;
- ``reap`` (router-weighted expert activation): the mean over an expert's routed tokens of its
  routing weight times the norm of its output.

Layers are visited in order on the already-pruned model's activations; dense layers among them stay
as they are. ``sparsity`` is the fraction of experts removed per MoE layer (``num_experts`` overrides
it). A router that chooses experts in groups (``expert_groups``) keeps as many in each group, so the
kept experts' routing stays what it was with the removed ones left out. With ``ranking="layer"``
every layer keeps the same count and saves as a stock config (``num_local_experts`` /
``num_experts``); ``ranking="global"`` lets counts differ per layer, recorded as per-layer shapes.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapters import UnsupportedArchitecture
from ..adapters.moe import expert_tokens
from ..calibration import LayerInputs, feed_layer, feeding_inputs, walk_layers
from ..options import check_choice, option
from ..report import PruningReport
from ..sparsity import nearest_count
from .base import StructuredMethod, register_structured_method

CRITERIA = ("reconstruction", "frequency", "reap")
RANKINGS = ("layer", "global")
TOKEN_CHUNK = 1024  # tokens per expert evaluation: bounds memory at n × chunk × hidden


@dataclass(frozen=True)
class ExpertPruningOptions:
    criterion: str = option("reconstruction", "'reconstruction' (Lu et al. 2024), 'frequency' or 'reap'.")
    num_experts: int = option(0, "Experts to keep per layer; 0 derives it from sparsity (fraction of experts removed).")
    max_subsets: int = option(
        10000, "reconstruction: search every subset up to this many, else remove experts greedily.",
        applies_when={"criterion": ("reconstruction",)},
    )  # fmt: skip
    ranking: str = option(
        "layer",
        "'layer': every layer keeps the same number of experts; 'global' (frequency, reap): experts of all layers "
        "compete by their share of their layer's score, so layers keep different counts (at least top-k each); "
        "scored on the unpruned model. Non-uniform counts reload with `import optimum_prune`; transformers' router "
        "load-balancing loss (output_router_logits=True, e.g. LLaMA-Factory's moe_aux_loss_coef) stacks every "
        "layer's router logits, so it cannot train such a model.",
    )

    def __post_init__(self) -> None:
        check_choice("criterion", self.criterion, CRITERIA)
        check_choice("ranking", self.ranking, RANKINGS)
        if self.ranking == "global" and self.criterion == "reconstruction":
            raise ValueError("ranking='global' needs criterion 'frequency' or 'reap' (reconstruction losses of different layers do not compare)")
        if self.num_experts < 0 or self.max_subsets < 1:
            raise ValueError(f"num_experts must be >= 0 and max_subsets >= 1, got {self.num_experts}, {self.max_subsets}")


@register_structured_method("experts", options=ExpertPruningOptions)
class ExpertPruning(StructuredMethod[ExpertPruningOptions]):
    """Drop whole experts of MoE layers by output reconstruction, routing frequency or REAP."""

    def check(self) -> None:
        requested = self.sparsity
        self.keep = experts_to_keep(self.adapter, self.sparsity, self.options.num_experts)
        self.sparsity = removed_expert_share(self.adapter, self.keep)  # num_experts, or the rounded sparsity
        self.kept_layers = self.kept_moe_layers() | dense_layers(self.adapter)
        if self.options.ranking == "global":
            if len(self.adapter.expert_groups(first_moe_block(self.adapter))) > 1:
                raise ValueError(
                    "PruningConfig.method_options.ranking='global' gives layers different expert counts, which a router choosing experts "
                    "in groups cannot take evenly; use ranking='layer'"
                )
            self._plan_global_count(requested)

    def _plan_global_count(self, requested: float) -> None:
        """The experts kept over all ranked layers: ``num_experts`` per layer, or the nearest count to the sparsity over
        the whole model (layers keep different counts, so rounding per layer would miss it: 0.3 of 3 × 8 experts keeps
        17, not 3 × 6), each layer keeping what its router needs."""
        ranked = sum(1 for index in range(len(self.adapter.decoder_layers())) if index not in self.kept_layers)
        per_layer = len(self.adapter.block_experts(first_moe_block(self.adapter)))
        fewest = self.adapter.fewest_experts(first_moe_block(self.adapter))
        nearest = nearest_count(per_layer * ranked * (1 - requested))
        self.global_keep = self.keep * ranked if self.options.num_experts else min(max(nearest, fewest * ranked), per_layer * ranked - 1)
        self.sparsity = 1 - self.global_keep / (per_layer * ranked)

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        if self.options.ranking == "global":
            self._prune_globally(windows, report)
            return

        def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            if index in self.kept_layers:
                return
            block = self.adapter.moe_block(layer)
            if self.options.criterion == "reconstruction":
                run = partial(feed_layer, self.adapter, layer, inputs)
                kept = self._reconstruction(block, run, len(self.adapter.block_experts(block)))
            else:
                kept = best_in_groups(self._expert_scores(block, layer, inputs), self.adapter.expert_groups(block), self.keep)
            self._cut(index, layer, kept, report)

        walk_layers(self.adapter, windows, self.device, visit, f"Pruning experts ({self.options.criterion})")

    def _prune_globally(self, windows: torch.Tensor, report: PruningReport) -> None:
        shares: dict[int, torch.Tensor] = {}

        def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            block = self.adapter.moe_block(layer)
            if block is not None:
                scores = self._expert_scores(block, layer, inputs)
                shares[index] = scores / scores.sum().clamp_min(1e-12)

        walk_layers(self.adapter, windows, self.device, visit, f"Scoring experts ({self.options.criterion})")
        fewest = self.adapter.fewest_experts(first_moe_block(self.adapter))  # every layer starts from what its router needs
        kept = {layer: set(torch.argsort(share, descending=True, stable=True)[:fewest].tolist()) for layer, share in shares.items()}
        ranked = [layer for layer in shares if layer not in self.kept_layers]
        candidates = sorted(
            ((float(shares[layer][e]), layer, e) for layer in ranked for e in range(len(shares[layer])) if e not in kept[layer]),
            reverse=True,
        )
        budget = self.global_keep - sum(len(kept[layer]) for layer in ranked)
        for _, layer, expert in candidates[:budget]:
            kept[layer].add(expert)
        for index, layer in enumerate(self.adapter.decoder_layers()):
            if index in ranked:
                self._cut(index, layer, sorted(kept[index]), report)

    def _cut(self, index: int, layer: nn.Module, kept: list[int], report: PruningReport) -> None:
        removed = sorted(set(range(len(self.adapter.experts(layer)))) - set(kept))
        self.adapter.keep_experts(layer, kept)
        if removed:  # global ranking may keep a layer whole
            report.removed.append(f"{self.adapter.layer_names()[index]}: experts {removed}")

    @torch.no_grad()
    def _expert_scores(self, block: nn.Module, layer: nn.Module, inputs: LayerInputs) -> torch.Tensor:
        """Routing frequency (from the router's logits alone) or REAP score of each expert over the calibration tokens."""
        run = partial(feed_layer, self.adapter, layer, inputs)
        total = len(self.adapter.block_experts(block))
        if self.options.criterion == "frequency":
            _, selected = self.adapter.route(block, router_logits(self.adapter, block, run))
            return torch.bincount(selected.flatten().cpu(), minlength=total).double()
        return reap_scores(self.adapter, block, run)

    @torch.no_grad()
    def _reconstruction(self, block: nn.Module, run: Any, total: int) -> list[int]:
        """The subset of ``self.keep`` experts to keep, from the block's inputs while ``run()`` runs the
        layer: the exhaustive search scores every subset as the tokens arrive (one pass, nothing kept);
        the greedy one keeps the inputs for its rounds."""
        groups = self.adapter.expert_groups(block)
        per_group = self.keep // len(groups)
        if math.comb(total // len(groups), per_group) ** len(groups) <= self.options.max_subsets:
            candidates = [sorted(itertools.chain(*s)) for s in itertools.product(*(itertools.combinations(g, per_group) for g in groups))]
            losses = torch.zeros(len(candidates), dtype=torch.float64)
            each_block_chunk(block, run, lambda chunk: losses.add_(self._chunk_losses(block, chunk, candidates)))
            return candidates[int(torch.argmin(losses))]
        hidden = block_inputs(block, run)
        kept = list(range(total))
        while len(kept) > self.keep:  # greedy: drop the expert whose absence changes the output least
            # from the groups holding the most experts, so that every group ends with as many
            left = [len(set(group) & set(kept)) for group in groups]
            droppable = {e for group, count in zip(groups, left) if count == max(left) for e in group}
            candidates = [[e for e in kept if e != drop] for drop in kept if drop in droppable]
            kept = candidates[int(torch.argmin(self._subset_losses(block, hidden, candidates)))]
        return kept

    def _subset_losses(self, block: nn.Module, hidden: torch.Tensor, subsets: list[list[int]]) -> torch.Tensor:
        """Σ over tokens of ‖F(x) − F_S(x)‖² for each subset S, the router restricted to S's rows."""
        return sum(self._chunk_losses(block, chunk, subsets) for chunk in token_chunks(hidden))

    def _chunk_losses(self, block: nn.Module, chunk: torch.Tensor, subsets: list[list[int]]) -> torch.Tensor:
        losses = torch.zeros(len(subsets), dtype=torch.float64)
        experts = self.adapter.block_experts(block)
        logits = self.adapter.router_logits(block, chunk).float()
        outputs = torch.stack([expert(chunk).float() for expert in experts])  # [n, tokens, hidden]
        full = self._mixture(block, logits, outputs, list(range(len(experts))))
        for position, subset in enumerate(subsets):
            losses[position] = float((full - self._mixture(block, logits, outputs, subset)).square().sum())
        return losses

    def _mixture(self, block: nn.Module, logits: torch.Tensor, outputs: torch.Tensor, subset: list[int]) -> torch.Tensor:
        index = torch.tensor(subset, device=logits.device)
        weights, selected = self.adapter.route(block, logits.index_select(1, index), subset)
        tokens = torch.arange(logits.shape[0], device=logits.device)
        # each token's top-k rows read straight from all outputs: no copy of |S| experts' outputs per subset scored
        return sum(weights[:, k, None] * outputs[index[selected[:, k]], tokens] for k in range(selected.shape[1]))


def experts_to_keep(adapter: Any, sparsity: float, requested: int) -> int:
    """Experts per MoE layer left by ``sparsity`` (fraction removed) or ``requested``, or a clear error: the nearest
    count, an exact half keeping the larger (``sparsity.nearest_count``). Dense layers stay as they are."""
    counts = {len(adapter.experts(layer)) for layer in adapter.decoder_layers()} - {0}
    if len(counts) != 1:
        error = UnsupportedArchitecture if not counts else ValueError  # the counts may differ after an earlier step
        raise error(
            f"expert pruning and merging need mixture-of-experts layers with the same expert count; "
            f"{type(adapter.model).__name__} has "
            + ("no mixture-of-experts layers" if not counts else f"per-layer expert counts {sorted(counts)}")
        )
    total = counts.pop()
    keep = requested or nearest_count(total * (1 - sparsity))
    block = first_moe_block(adapter)
    top_k = adapter.experts_per_token(block)
    if top_k >= total:
        raise ValueError(f"the router picks top-{top_k} of {total} experts per layer: none can be removed")
    if not top_k <= keep < total:
        raise ValueError(
            f"keeping {keep} of {total} experts per layer is not possible: the router picks top-{top_k}, so keep "
            f"between {top_k} and {total - 1} (set PruningConfig.sparsity or PruningConfig.method_options.num_experts)"
        )
    adapter.check_expert_count(block, keep)
    return keep


def removed_expert_share(adapter: Any, keep: int) -> float:
    """The ``sparsity`` that keeps ``keep`` experts per MoE layer (every one has as many, ``experts_to_keep``)."""
    return 1 - keep / len(adapter.block_experts(first_moe_block(adapter)))


def first_moe_block(adapter: Any) -> nn.Module:
    """The first layer's MoE block (expert methods check that every MoE layer has as many experts)."""
    return next(block for layer in adapter.decoder_layers() if (block := adapter.moe_block(layer)) is not None)


def dense_layers(adapter: Any) -> set[int]:
    """The layers with a dense MLP instead of a MoE block, which expert methods leave as they are."""
    return {index for index, layer in enumerate(adapter.decoder_layers()) if adapter.moe_block(layer) is None}


def best_in_groups(scores: torch.Tensor, groups: list[list[int]], keep: int) -> list[int]:
    """The ``keep`` best-scoring experts, as many from each router group (ties: the lower index), in index order."""
    per_group = keep // len(groups)
    return sorted(
        group[position]
        for group in groups
        for position in torch.argsort(scores[group], descending=True, stable=True)[:per_group].tolist()
    )


def each_block_chunk(block: nn.Module, run: Any, consume: Callable[[torch.Tensor], Any]) -> None:
    """Run the layer once (``run()``), passing the MoE block's input tokens to ``consume`` as they
    arrive, at most ``TOKEN_CHUNK`` at a time ([tokens, hidden])."""

    def split(_name: str, hidden: torch.Tensor) -> None:
        for chunk in token_chunks(hidden.reshape(-1, hidden.shape[-1])):
            consume(chunk)

    with feeding_inputs({"block": block}, split):
        run()


def block_inputs(block: nn.Module, run: Any) -> torch.Tensor:
    """The MoE block's input tokens ([tokens, hidden]) while ``run()`` runs the layer once."""
    seen: list[torch.Tensor] = []
    each_block_chunk(block, run, seen.append)
    return torch.cat(seen)


def reap_scores(adapter: Any, block: nn.Module, run: Any) -> torch.Tensor:
    """REAP: each expert's mean routing-weighted output norm over the tokens routed to it, while ``run()``
    runs the layer once; the block's inputs are scored as they arrive, not kept."""
    experts = adapter.block_experts(block)
    scores = torch.zeros(len(experts), dtype=torch.float64)
    counts = torch.zeros(len(experts), dtype=torch.float64)

    def score(chunk: torch.Tensor) -> None:
        weights, selected = adapter.route(block, adapter.router_logits(block, chunk))
        for expert in selected.unique().tolist():
            rank, token = expert_tokens(selected, expert)
            output = experts[expert](chunk[token])
            scores[expert] += float((weights[token, rank] * output.float().norm(dim=-1)).sum())
            counts[expert] += token.numel()

    each_block_chunk(block, run, score)
    return scores / counts.clamp_min(1)


def router_logits(adapter: Any, block: nn.Module, run: Any) -> torch.Tensor:
    """The router's logits ([tokens, experts], fp32) for every token the MoE block sees while ``run()`` runs
    the layer once: what routing criteria need, without keeping the tokens' hidden states."""
    seen: list[torch.Tensor] = []
    handle = block.register_forward_pre_hook(  # the block's input: a router need not return its logits
        lambda _m, args: seen.append(adapter.router_logits(block, args[0]).detach().float().reshape(-1, len(adapter.block_experts(block))))
    )
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(seen)


def token_chunks(hidden: torch.Tensor) -> Iterator[torch.Tensor]:
    for start in range(0, hidden.shape[0], TOKEN_CHUNK):
        yield hidden[start : start + TOKEN_CHUNK]
