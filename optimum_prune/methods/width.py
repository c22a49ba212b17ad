"""Structured width pruning: attention heads (GQA-aware) and MLP channels.

Criteria: weight magnitude (L1 / L2), first-order Taylor on the calibration loss (LLM-Pruner,
Ma et al. 2023), Wanda-sp and FLAP's fluctuation metric with bias compensation (An et al. 2024),
and random units as the control LLM-Pruner reports (on LLaMA it beats weight magnitude).
Units are removed whole: a query head (the same number from every GQA group, so the layout stays
valid), a key/value group with all its query heads, or one MLP channel. ``ranking="layer"`` takes
the same fraction from every layer (LLM-Pruner); ``"global"`` ranks units across layers after
standardising scores per layer and structure over their channels (FLAP; a head scores its channels'
mean), which yields per-layer widths.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapters import AttentionLayout, MLPLayout, UnsupportedArchitecture
from ..calibration import feed_layer, feeding_inputs, walk_layers
from ..calibration.engine import on_device
from ..calibration.gradients import accumulate_gradients
from ..ignoring import holds_ignored, is_ignored
from ..options import check_choice, option
from ..statistics import ColumnMoments
from ..structure.modules import LowRankLinear
from ..structure.surgery import add_output_bias, coupled_linears, remove_block_channels
from .base import StructuredMethod, register_structured_method

CRITERIA = ("magnitude_l1", "magnitude_l2", "taylor", "wanda_sp", "flap", "random")
ACTIVATION_CRITERIA = ("wanda_sp", "flap")
WEIGHT_ONLY_CRITERIA = ("magnitude_l1", "magnitude_l2", "random")


@dataclass(frozen=True)
class WidthOptions:
    criterion: str = option(
        "flap",
        "Importance: 'magnitude_l1', 'magnitude_l2' (weights only), 'taylor' (|W·∂L/∂W|, LLM-Pruner), "
        "'wanda_sp' (|W|·‖X‖ per input column) or 'flap' (input variance × ‖W_col‖², with the removed "
        "columns' mean output added as a bias of the output projection), or 'random' (a control: "
        "units drawn at random, reproducibly).",
    )
    components: str = option("all", "What to prune: 'all' (attention heads and MLP channels), 'attention' or 'mlp'.")
    head_mode: str = option(
        "query",
        "'query': remove query heads, the same number from every GQA group; 'kv_group': remove whole "
        "key/value groups together with their query heads (shrinks the KV cache). Without GQA (one query head "
        "per key/value head) a head is its own group, so 'query' removes heads as 'kv_group' does.",
        applies_when={"components": ("all", "attention")},
    )
    ranking: str = option(
        "layer",
        "'layer': every layer loses the same fraction (uniform widths, LLM-Pruner); 'global': units are "
        "ranked across layers after standardising scores per layer and structure (FLAP), giving per-layer "
        "widths (on SmolLM2 at 20 %: perplexity 42 against 73 for 'layer'; reloads with `import optimum_prune`).",
    )

    def __post_init__(self) -> None:
        check_choice("criterion", self.criterion, CRITERIA)
        check_choice("components", self.components, ("all", "attention", "mlp"))
        check_choice("head_mode", self.head_mode, ("query", "kv_group"))
        check_choice("ranking", self.ranking, ("layer", "global"))


@dataclass
class Component:
    """The removable units of one layer's attention or MLP, with one score per unit."""

    layer: int
    kind: str
    unit_parameters: int
    removable: int
    producers: list[nn.Linear]  # linears whose rows are the units' channels
    consumers: list[nn.Linear]  # linears whose columns are (cut in place, so these stay valid)
    scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    head_scores: torch.Tensor | None = None  # per query head, to pick each group's k-th least important
    removed: int = 0


@register_structured_method("width", options=WidthOptions)
class WidthPruning(StructuredMethod[WidthOptions]):
    """Remove attention heads / GQA groups and MLP channels ranked by magnitude, Taylor, Wanda-sp or FLAP."""

    @classmethod
    def needs_calibration(cls, options: WidthOptions) -> bool:
        return options.criterion not in WEIGHT_ONLY_CRITERIA

    def check(self) -> None:
        self.components = self.find_components()
        self.plan_counts()  # raises for impossible requests

    def prune(self, windows: torch.Tensor | None, report: Any) -> None:
        statistics = self._activation_statistics(windows) if self.options.criterion in ACTIVATION_CRITERIA else {}
        if self.options.criterion == "taylor":
            with on_device([self.adapter.model], self.device):  # the gradients move back with the model
                layers = self.adapter.decoder_layers()
                accumulate_gradients(self.adapter.model, windows, [p for layer in layers for p in layer.parameters()])
        self._random_scores = torch.Generator().manual_seed(self.seed)  # components are scored in a fixed order: reproducible
        try:
            for component in self.components:
                component.scores = self._scores(component, statistics)
        finally:
            if self.options.criterion == "taylor":
                self.adapter.model.zero_grad(set_to_none=True)
        self.plan_counts()
        layers = self.adapter.decoder_layers()
        names = self.adapter.layer_names()
        for component in self.components:
            if component.removed:
                removed = self.cut(layers[component.layer], component, statistics)
                report.removed.append(f"{names[component.layer]} {component.kind}: {removed}")

    # --- units ---------------------------------------------------------------------------

    def find_components(self) -> list[Component]:
        wanted = ("attention", "mlp") if self.options.components == "all" else (self.options.components,)
        components = []
        for index, (prefix, layer) in enumerate(zip(self.adapter.layer_names(), self.adapter.decoder_layers())):
            names = {module: f"{prefix}.{name}" for name, module in layer.named_modules()}
            factorised = next((name for module, name in names.items() if isinstance(module, LowRankLinear)), None)
            if factorised is not None:
                raise ValueError(
                    f"{factorised} was factorised by low_rank: heads and channels are rows and columns of whole weight "
                    "matrices, which a factorised linear no longer has; prune widths first, then low_rank"
                )
            attention, mlp = self.adapter.attention(layer), self.adapter.mlp(layer)
            kept = attention is not None and self._ignored(names, attention.query, attention.key, attention.value, attention.output)
            if "attention" in wanted and attention is not None and not kept:
                components.append(self._attention_component(index, attention))
            if "mlp" in wanted and mlp is not None and not holds_ignored(names[mlp.block], mlp.block, self.ignore):
                components.append(self._mlp_component(index, mlp))
        if not components:
            raise ValueError(
                f"PruningConfig.ignore {self.ignore!r} with components={self.options.components!r} leaves nothing to prune"
            )
        return components

    def _ignored(self, names: dict[nn.Module, str], *modules: nn.Module) -> bool:
        return any(is_ignored(names[m], self.ignore) for m in modules)

    def _query_units(self, layout: AttentionLayout) -> bool:
        """Whether attention units are query heads within groups (else whole key/value groups)."""
        return self.options.head_mode == "query" and layout.heads_per_group > 1

    def _attention_component(self, index: int, layout: AttentionLayout) -> Component:
        head = _rows_parameters(layout.query, layout.head_dim) + layout.output.out_features * layout.head_dim
        if self._query_units(layout):
            # Unit k removes the k-th least important query head of every group.
            return Component(index, "attention", head * layout.num_kv_heads, layout.heads_per_group - 1, [layout.query], [layout.output])
        kv = _rows_parameters(layout.key, layout.head_dim) + _rows_parameters(layout.value, layout.head_dim)
        return Component(
            index, "attention", head * layout.heads_per_group + kv, layout.num_kv_heads - 1, [layout.query], [layout.output]
        )

    def _mlp_component(self, index: int, layout: MLPLayout) -> Component:
        producers, consumers = coupled_linears(layout.block, layout.channel_linear)
        parameters = sum(_rows_parameters(p, 1) for p in producers) + sum(c.out_features for c in consumers)
        return Component(index, "mlp", parameters, layout.channel_linear.out_features - 1, producers, consumers)

    # --- how many units each component loses ------------------------------------------------

    def plan_counts(self) -> None:
        """Set each component's ``removed`` count for the budget (per layer or global ranking), or raise."""
        total = sum(layer_parameters(self.adapter, layer) for layer in self.adapter.decoder_layers())
        budget = self.sparsity * total
        scored = all(c.scores.numel() for c in self.components)
        if self.options.ranking == "global" and scored:
            self._global_counts(budget)
            return
        reachable = sum(c.removable * c.unit_parameters for c in self.components)
        if budget > reachable:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} asks for {budget:,.0f} parameters but components="
                f"{self.options.components!r} (head_mode={self.options.head_mode!r}) can remove at most "
                f"{reachable:,} ({reachable / total:.1%}) while keeping one head per group and one channel per layer; "
                "lower the sparsity or prune more components"
            )
        if self.options.ranking == "layer":
            self.layer_counts()

    def layer_counts(self, option: str = "ranking") -> None:
        """Each layer loses ``sparsity`` of its linear parameters: attention first (coarse), MLP makes up the rest.
        ``option`` names the caller's option whose value 'global' frees the per-layer counts (for the error)."""
        by_layer: dict[int, list[Component]] = {}
        for component in self.components:
            by_layer.setdefault(component.layer, []).append(component)
        layers = self.adapter.decoder_layers()
        names = self.adapter.layer_names()
        for index, components in by_layer.items():
            layer_budget = self.sparsity * layer_parameters(self.adapter, layers[index])
            remaining = layer_budget
            for position, component in enumerate(sorted(components, key=lambda c: c.kind != "attention")):
                last = position == len(components) - 1
                share = remaining if last else self.sparsity * component.unit_parameters * (component.removable + 1)
                count = round(share / component.unit_parameters)
                if count > component.removable:
                    what = "every head of a group" if component.kind == "attention" else "every MLP channel"
                    raise ValueError(
                        f"PruningConfig.sparsity {self.sparsity} with {option}='layer' would remove {what} of "
                        f"{names[index]}; lower the sparsity, use {option}='global' or prune more components"
                    )
                component.removed = count
                remaining -= count * component.unit_parameters

    def _global_counts(self, budget: float) -> None:
        """FLAP: remove the lowest (per layer and structure standardised) units across layers until the budget is met."""
        for component in self.components:
            component.removed = 0
        candidates = []
        for c in self.components:
            ordered = c.scores.float().sort(stable=True).values.tolist()
            candidates += [(score, rank, c) for rank, score in enumerate(ordered)]
        removed = 0.0
        for _score, rank, component in sorted(candidates, key=lambda item: item[0]):
            if removed >= budget:
                break
            if rank == component.removed and component.removed < component.removable:
                component.removed += 1
                removed += component.unit_parameters

    # --- scores --------------------------------------------------------------------------

    def _activation_statistics(self, windows: torch.Tensor) -> dict[nn.Linear, ColumnMoments]:
        """Input moments of every output projection (o_proj, down_proj) on the dense model."""
        statistics: dict[nn.Linear, ColumnMoments] = {}

        def visit(index: int, layer: nn.Module, inputs) -> None:
            consumers = {}
            for component in self.components:
                if component.layer == index:
                    for linear in component.consumers:
                        consumers[str(id(linear))] = linear
                        statistics[linear] = ColumnMoments(linear.in_features, linear.weight.device)
            sinks = {key: statistics[linear] for key, linear in consumers.items()}
            with feeding_inputs(consumers, lambda key, x: sinks[key].add(x)):
                feed_layer(self.adapter, layer, inputs)

        walk_layers(self.adapter, windows, self.device, visit, f"Width statistics ({self.options.criterion})")
        return statistics

    def _scores(self, component: Component, statistics: dict[nn.Linear, ColumnMoments]) -> torch.Tensor:
        layer = self.adapter.decoder_layers()[component.layer]
        channels = self._channel_scores(component.producers, component.consumers, statistics)
        layout = self.adapter.attention(layer) if component.kind == "attention" else None
        kv = None  # a key/value group's own channels, scored with its query heads by the weight criteria
        if layout is not None and not self._query_units(layout) and self.options.criterion not in ACTIVATION_CRITERIA:
            kv = self._channel_scores([layout.key, layout.value], [], statistics)
        if self.options.ranking == "global":
            # FLAP (An et al. 2024, and its code): standardise each layer's scores per structure over its
            # channels (a group's key / value channels with them), so layers and structures compare on one
            # scale; a head is its channels' mean.
            every = channels if kv is None else torch.cat([channels, kv])
            mean, spread = every.mean(), every.std().clamp_min(1e-12)
            channels, kv = (channels - mean) / spread, None if kv is None else (kv - mean) / spread
        if layout is None:
            return channels
        heads = channels.reshape(-1, layout.head_dim).mean(1)
        if self._query_units(layout):
            component.head_scores = heads
            per_group = heads.reshape(layout.num_kv_heads, layout.heads_per_group).sort(dim=1).values
            return per_group.mean(dim=0)[: component.removable]
        groups = heads.reshape(layout.num_kv_heads, layout.heads_per_group).mean(1)
        if kv is not None:
            kv = kv.reshape(layout.num_kv_heads, -1)
            query_channels = layout.heads_per_group * layout.head_dim
            groups = (groups * query_channels + kv.sum(1)) / (query_channels + kv.shape[1])  # per-channel mean
        return groups

    def _channel_scores(
        self, producers: list[nn.Linear], consumers: list[nn.Linear], statistics: dict[nn.Linear, ColumnMoments]
    ) -> torch.Tensor:
        """One score per channel: producer rows and consumer columns with the same index."""
        criterion = self.options.criterion
        if criterion == "random":
            return torch.rand(producers[0].out_features, generator=self._random_scores)
        if criterion in ACTIVATION_CRITERIA:
            scores = 0
            for consumer in consumers:
                weight = consumer.weight.detach().float()
                moments = statistics[consumer]
                if criterion == "wanda_sp":
                    scores = scores + (weight.abs() * moments.norms().to(weight.device)).sum(0)
                else:
                    scores = scores + moments.variance().to(weight.device) * weight.square().sum(0)
            return scores.cpu()
        scores = 0
        for linear in producers:
            scores = scores + _element_importance(linear.weight, criterion).sum(1)
        for linear in consumers:
            scores = scores + _element_importance(linear.weight, criterion).sum(0)
        return scores.cpu()

    # --- surgery -------------------------------------------------------------------------

    def cut(self, layer: nn.Module, component: Component, statistics: dict[nn.Linear, ColumnMoments]) -> str:
        """Remove the component's ``removed`` lowest-scored units from ``layer``; return what was removed, in words."""
        compensate = self.options.criterion == "flap"
        if component.kind == "attention":
            layout = self.adapter.attention(layer)
            heads, kv_heads = self._kept_heads(layout, component)
            removed_heads = sorted(set(range(layout.num_heads)) - set(heads.tolist()))
            if compensate:
                _compensate(layout.output, _head_columns(removed_heads, layout.head_dim), statistics[layout.output])
            self.adapter.keep_heads(layer, heads, kv_heads)
            return f"query heads {removed_heads}" + (
                f" (key/value groups {sorted(set(range(layout.num_kv_heads)) - set(kv_heads.tolist()))})"
                if not self._query_units(layout)
                else ""
            )
        layout = self.adapter.mlp(layer)
        channels = torch.argsort(component.scores, stable=True)[: component.removed].sort().values.tolist()
        if compensate:
            for consumer in component.consumers:
                _compensate(consumer, torch.tensor(channels), statistics[consumer])
        remove_block_channels(layout.block, layout.channel_linear, channels)
        return f"{len(channels)} channels"

    def _kept_heads(self, layout: AttentionLayout, component: Component) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key/value heads to keep, ordered so every group's heads stay contiguous."""
        if not self._query_units(layout):
            groups = torch.argsort(component.scores, stable=True)[component.removed :].sort().values
            heads = (groups.unsqueeze(1) * layout.heads_per_group + torch.arange(layout.heads_per_group)).reshape(-1)
            return heads, groups
        order = component.head_scores.reshape(layout.num_kv_heads, layout.heads_per_group).argsort(dim=1, stable=True)
        keep = order[:, component.removed :] + torch.arange(layout.num_kv_heads).unsqueeze(1) * layout.heads_per_group
        return keep.sort(dim=1).values.reshape(-1), torch.arange(layout.num_kv_heads)


def group_units(method: StructuredMethod, components: str) -> WidthPruning:
    """Width pruning's units — key/value groups with their query heads, MLP channels — and surgery, for
    methods that score and count the units themselves (any per-layer group count keeps a valid GQA layout).
    Its ``components`` are built; their ``removed`` counts and ``scores`` are the caller's to set."""
    options = WidthOptions(criterion="magnitude_l2", components=components, head_mode="kv_group", ranking="global")
    width = WidthPruning(method.adapter, method.sparsity, method.ignore, options, method.device)
    width.components = width.find_components()
    for component in width.components:
        output_projection(method.adapter, method.adapter.decoder_layers()[component.layer], component)  # one per MLP
    return width


def output_projection(adapter: Any, layer: nn.Module, component: Component) -> nn.Linear:
    """The linear whose input columns are the component's units: o_proj, or the MLP's down projection."""
    if component.kind == "attention":
        return adapter.attention(layer).output
    if len(component.consumers) != 1:
        raise UnsupportedArchitecture(
            f"this method needs one output projection per MLP, this model's has {len(component.consumers)}: "
            "set method_options.components='attention' to prune attention heads only"
        )
    return component.consumers[0]


def group_columns(adapter: Any, layer: nn.Module, component: Component) -> int:
    """Output-projection input columns per unit of ``group_units``: a key/value group's query heads, or one channel."""
    if component.kind == "mlp":
        return 1
    layout = adapter.attention(layer)
    return layout.heads_per_group * layout.head_dim


def _element_importance(weight: torch.Tensor, criterion: str) -> torch.Tensor:
    value = weight.detach().float()
    if criterion == "magnitude_l1":
        return value.abs()
    if criterion == "magnitude_l2":
        return value.square()
    if weight.grad is None:
        raise RuntimeError("taylor importance needs calibration gradients, but a weight has no .grad")
    return (value * weight.grad.float()).abs()


def _compensate(consumer: nn.Linear, columns: torch.Tensor, moments: ColumnMoments) -> None:
    """FLAP bias compensation: the removed columns' mean contribution W[:, J] · E[x_J] becomes a bias."""
    if columns.numel() == 0:
        return
    columns = columns.to(consumer.weight.device)
    mean = moments.mean().to(consumer.weight.device)[columns]
    add_output_bias(consumer, consumer.weight.detach().float()[:, columns] @ mean)


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads, dtype=torch.long).reshape(-1, 1) * head_dim + torch.arange(head_dim)).reshape(-1)


def _rows_parameters(linear: nn.Linear, rows: int) -> int:
    return rows * (linear.in_features + (1 if linear.bias is not None else 0))


def layer_parameters(adapter, layer: nn.Module) -> int:
    """The weights of a decoder layer's prunable linears (the denominator of a structured ``sparsity``)."""
    return sum(linear.weight.numel() for linear in adapter.prunable_linears(layer).values())
