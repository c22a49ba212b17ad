"""Heads and MLP channels as removable units, for every method that removes them (width, KCM, K-prune,
mask search, structured LLM Surgeon, ZipLM); how the units are scored is each method's own.

A layer's attention or MLP is one ``Component`` of units: a key/value group with its query heads (or,
with ``head_mode='query'``, the k-th least important query head of every group, so the GQA layout stays
valid) or one MLP channel. ``UnitPlan`` finds the components, sets how many units each loses for a
parameter budget (the same fraction per layer, or across layers by score) and cuts them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..adapters import AttentionLayout, DecoderAdapter, MLPLayout, UnsupportedArchitecture
from ..ignoring import holds_ignored, is_ignored
from ..options import option
from ..structure.modules import LowRankLinear
from ..structure.surgery import coupled_linears, remove_block_channels
from .base import StructuredMethod


COMPONENTS = ("all", "attention", "mlp")


def components_option(heads: str = "attention heads") -> Any:
    """The ``components`` option every method that removes units through ``UnitPlan`` takes (``heads``: what it
    removes of the attention)."""
    return option("all", f"What to prune: 'all' ({heads} and MLP channels), 'attention' or 'mlp'.")


def round_to_option() -> Any:
    """The ``round_to`` option of the methods that choose MLP widths through ``UnitPlan`` (1, no rounding, keeps what
    recipes written before it produce)."""
    return option(
        1,
        "Every MLP that loses channels keeps a multiple of this many (the nearest to its planned width, at least one "
        "multiple): set it to the M of an N:M step to follow (or a multiple of M), whose groups must tile the down "
        "projection's inputs; 1: no rounding. Heads go whole, so attention widths are multiples of head_dim already.",
        applies_when={"components": ("all", "mlp")},
    )


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


class UnitPlan:
    """The units of a model's decoder layers (``components``: 'all', 'attention' or 'mlp'), how many each
    component loses (``plan_counts``, by ``ranking`` 'layer' or 'global') and the cut."""

    def __init__(
        self, adapter: DecoderAdapter, sparsity: float, ignore: list[str], components: str, head_mode: str, ranking: str,
        round_to: int = 1,
    ) -> None:
        self.adapter = adapter
        self.sparsity = sparsity
        self.ignore = ignore
        self.kinds = components
        self.head_mode = head_mode
        self.ranking = ranking
        self.round_to = round_to
        self.components = self._find_components()
        narrowest = min((c.removable + 1 for c in self.components if c.kind == "mlp"), default=None)
        if narrowest is not None and round_to > narrowest:
            raise ValueError(
                f"PruningConfig.method_options.round_to ({round_to}) is above the narrowest MLP's {narrowest} channels, which cannot keep "
                "a multiple of it; lower round_to"
            )

    def _find_components(self) -> list[Component]:
        wanted = ("attention", "mlp") if self.kinds == "all" else (self.kinds,)
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
            raise ValueError(f"PruningConfig.ignore {self.ignore!r} with components={self.kinds!r} leaves nothing to prune")
        if any(component.kind == "attention" for component in components):  # heads to score: can this family lose any?
            self.adapter.check_head_removal()
        return components

    def _ignored(self, names: dict[nn.Module, str], *modules: nn.Module) -> bool:
        return any(is_ignored(names[m], self.ignore) for m in modules)

    def query_units(self, layout: AttentionLayout) -> bool:
        """Whether attention units are query heads within groups (else whole key/value groups)."""
        return self.head_mode == "query" and layout.heads_per_group > 1

    def _attention_component(self, index: int, layout: AttentionLayout) -> Component:
        head = rows_parameters(layout.query, layout.head_dim) + layout.output.out_features * layout.head_dim
        if self.query_units(layout):
            # Unit k removes the k-th least important query head of every group.
            return Component(index, "attention", head * layout.num_kv_heads, layout.heads_per_group - 1, [layout.query], [layout.output])
        kv = rows_parameters(layout.key, layout.head_dim) + rows_parameters(layout.value, layout.head_dim)
        return Component(
            index, "attention", head * layout.heads_per_group + kv, layout.num_kv_heads - 1, [layout.query], [layout.output]
        )

    def _mlp_component(self, index: int, layout: MLPLayout) -> Component:
        producers, consumers = coupled_linears(layout.block, layout.channel_linear)
        parameters = sum(rows_parameters(p, 1) for p in producers) + sum(c.out_features for c in consumers)
        return Component(index, "mlp", parameters, layout.channel_linear.out_features - 1, producers, consumers)

    # --- how many units each component loses ------------------------------------------------

    def plan_counts(self) -> None:
        """Set each component's ``removed`` count for the budget (per layer or global ranking), or raise."""
        total = sum(layer_parameters(self.adapter, layer) for layer in self.adapter.decoder_layers())
        budget = self.sparsity * total
        scored = all(c.scores.numel() for c in self.components)
        if self.ranking == "global" and scored:
            self._global_counts(budget)
            return
        reachable = sum(c.removable * c.unit_parameters for c in self.components)
        if budget > reachable:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} asks for {budget:,.0f} parameters but components="
                f"{self.kinds!r}, removing {'query heads' if self.head_mode == 'query' else 'whole key/value groups'}, can "
                f"remove at most {reachable:,} ({reachable / total:.1%}) while keeping "
                f"{'one head per group' if self.head_mode == 'query' else 'one key/value group per layer'} and one channel per layer; "
                "lower the sparsity or prune more components"
            )
        if self.ranking == "layer":
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
                component.removed = self.rounded(component, count)
                remaining -= component.removed * component.unit_parameters
        self._check_removes_a_unit()

    def _global_counts(self, budget: float) -> None:
        """FLAP: remove the lowest (per layer and structure standardised) units across layers, stopping where the
        removed parameters come closest to the budget (FLAP's argmin): a last unit as large as a key/value group
        goes only if that lands nearer the budget than keeping it."""
        for component in self.components:
            component.removed = 0
        candidates = []
        for c in self.components:
            ordered = c.scores.float().sort(stable=True).values.tolist()
            candidates += [(score, rank, c) for rank, score in enumerate(ordered)]
        removed = 0.0
        for _score, rank, component in sorted(candidates, key=lambda item: item[0]):
            if rank != component.removed or component.removed >= component.removable:
                continue
            if removed + component.unit_parameters >= budget:
                if removed + component.unit_parameters - budget <= budget - removed:
                    component.removed += 1
                break
            component.removed += 1
            removed += component.unit_parameters
        for component in self.components:
            component.removed = self.rounded(component, component.removed)
        self._check_removes_a_unit()

    def _check_removes_a_unit(self) -> None:
        """A budget smaller than half the smallest unit (a key/value group of a wide head_dim) rounds to none: the
        run would record a step that changed nothing."""
        if self.sparsity == 0 or any(component.removed for component in self.components):
            return

        def step(component: Component) -> int:  # an MLP loses channels round_to at a time
            return component.unit_parameters * (self.round_to if component.kind == "mlp" else 1)

        smallest = min(self.components, key=step)
        layer = self.adapter.decoder_layers()[smallest.layer]
        if smallest.kind == "mlp":
            unit = "one MLP channel" if self.round_to == 1 else f"{self.round_to} MLP channels (PruningConfig.method_options.round_to)"
        else:
            unit = "one query head of each group" if self.query_units(self.adapter.attention(layer)) else "one key/value group"
        lower = ", lower PruningConfig.method_options.round_to" if smallest.kind == "mlp" and self.round_to > 1 else ""
        raise ValueError(
            f"PruningConfig.sparsity {self.sparsity} rounds to no unit to remove: the smallest step, {unit}, holds "
            f"{step(smallest) / layer_parameters(self.adapter, layer):.1%} of its decoder layer's parameters; raise the "
            f"sparsity{lower} or prune more components"
        )

    def rounded(self, component: Component, count: int) -> int:
        """``count`` units removed from ``component`` as it is now, changed so that an MLP that loses channels keeps a
        multiple of ``round_to`` (the nearest, at least one, never more than it has): an N:M step after this one needs
        its down projection's inputs to be a multiple of M. Attention units are whole heads: left as they are."""
        step, width = self.round_to, component.removable + 1
        if component.kind != "mlp" or step == 1 or count == 0:
            return count
        kept = max(step, (width - count + step // 2) // step * step)
        if kept > width:  # ``width`` itself is no multiple: round down instead
            kept -= step
        return width - kept

    # --- surgery -------------------------------------------------------------------------

    def cut(
        self, layer: nn.Module, component: Component, before: Callable[[nn.Linear, torch.Tensor], None] | None = None
    ) -> str:
        """Remove the component's ``removed`` lowest-scored units from ``layer``; return what was removed, in words.
        ``before(consumer, columns)`` first sees each output projection's input columns that go (FLAP's compensation)."""
        if component.kind == "attention":
            layout = self.adapter.attention(layer)
            heads, kv_heads = self._kept_heads(layout, component)
            removed_heads = sorted(set(range(layout.num_heads)) - set(heads.tolist()))
            if before is not None:
                before(layout.output, _head_columns(removed_heads, layout.head_dim))
            self.adapter.keep_heads(layer, heads, kv_heads)
            return f"query heads {removed_heads}" + (
                f" (key/value groups {sorted(set(range(layout.num_kv_heads)) - set(kv_heads.tolist()))})"
                if not self.query_units(layout)
                else ""
            )
        layout = self.adapter.mlp(layer)
        channels = torch.argsort(component.scores, stable=True)[: component.removed].sort().values.tolist()
        if before is not None:
            for consumer in component.consumers:
                before(consumer, torch.tensor(channels))
        remove_block_channels(layout.block, layout.channel_linear, channels)
        return f"{len(channels)} channels"

    def _kept_heads(self, layout: AttentionLayout, component: Component) -> tuple[torch.Tensor, torch.Tensor]:
        """Query and key/value heads to keep, ordered so every group's heads stay contiguous."""
        if not self.query_units(layout):
            groups = torch.argsort(component.scores, stable=True)[component.removed :].sort().values
            heads = (groups.unsqueeze(1) * layout.heads_per_group + torch.arange(layout.heads_per_group)).reshape(-1)
            return heads, groups
        order = component.head_scores.reshape(layout.num_kv_heads, layout.heads_per_group).argsort(dim=1, stable=True)
        keep = order[:, component.removed :] + torch.arange(layout.num_kv_heads).unsqueeze(1) * layout.heads_per_group
        return keep.sort(dim=1).values.reshape(-1), torch.arange(layout.num_kv_heads)


def group_units(method: StructuredMethod, components: str, round_to: int = 1) -> UnitPlan:
    """The units of the methods that score and count them themselves: whole key/value groups with their query
    heads and MLP channels (any per-layer group count keeps a valid GQA layout); their ``removed`` counts and
    ``scores`` are the caller's to set (through ``UnitPlan.rounded`` for ``round_to``)."""
    adapter = method.adapter
    units = UnitPlan(adapter, method.sparsity, method.ignore, components, head_mode="kv_group", ranking="global", round_to=round_to)
    for component in units.components:
        output_projection(adapter, adapter.decoder_layers()[component.layer], component)  # one per MLP
    return units


def output_projection(adapter: Any, layer: nn.Module, component: Component) -> nn.Linear:
    """The linear whose input columns are the component's units: o_proj, or the MLP's down projection."""
    if component.kind == "attention":
        return adapter.attention(layer).output
    if len(component.consumers) != 1:
        raise UnsupportedArchitecture(
            f"this method needs one output projection per MLP, this model's has {len(component.consumers)}: "
            "set PruningConfig.method_options.components='attention' to prune attention heads only"
        )
    return component.consumers[0]


def group_columns(adapter: Any, layer: nn.Module, component: Component) -> int:
    """Output-projection input columns per unit of ``group_units``: a key/value group's query heads, or one channel."""
    if component.kind == "mlp":
        return 1
    layout = adapter.attention(layer)
    return layout.heads_per_group * layout.head_dim


def rows_parameters(linear: nn.Linear, rows: int) -> int:
    return rows * (linear.in_features + (1 if linear.bias is not None else 0))


def layer_parameters(adapter: Any, layer: nn.Module) -> int:
    """The weights of a decoder layer's prunable linears (the denominator of a structured ``sparsity``)."""
    return sum(linear.weight.numel() for linear in adapter.prunable_linears(layer).values())


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    return (torch.tensor(heads, dtype=torch.long).reshape(-1, 1) * head_dim + torch.arange(head_dim)).reshape(-1)
