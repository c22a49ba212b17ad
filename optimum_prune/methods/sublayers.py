"""Sublayer pruning: remove attention or MLP blocks separately; the residual path stays.

Each attention and each MLP block is a unit, scored by Block Influence on the residual stream
around it (1 − cos(before, after), as ShortGPT does for whole layers) or by the calibration
perplexity with that block skipped. Units are removed from the least important up while they
fit in the parameter budget, so attention (cheap, often redundant) and MLP blocks compete. With
``reroute=True`` every removed block leaves an affine map of its normalised input in its place
(``rerouting.py``), and the budget counts the maps' parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ContextManager

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..calibration import observe_layers
from ..calibration.engine import on_device
from ..calibration.gradients import calibration_perplexity, require_a_finite_score
from ..ignoring import holds_ignored, is_ignored
from ..options import check_choice, option
from ..report import PruningReport
from ..statistics import BlockInfluence
from .base import StructuredMethod, register_structured_method
from .rerouting import REROUTE_HELP, Reroute, fit_reroutes

KINDS = ("attention", "mlp")


@dataclass(frozen=True)
class SublayerRemovalOptions:
    criterion: str = option("block_influence", "'block_influence' (1 − cos around the block) or 'perplexity' (block skipped).")
    sublayers: str = option("all", "Which blocks may go: 'all', 'attention' or 'mlp'.")
    reroute: bool = option(False, REROUTE_HELP)

    def __post_init__(self) -> None:
        check_choice("criterion", self.criterion, ("block_influence", "perplexity"))
        check_choice("sublayers", self.sublayers, ("all",) + KINDS)


@register_structured_method("sublayers", options=SublayerRemovalOptions)
class SublayerRemoval(StructuredMethod[SublayerRemovalOptions]):
    """Remove attention and/or MLP blocks by Block Influence or perplexity, within a parameter budget."""

    changes_widths = False

    @property
    def changes_kept_weights(self) -> bool:
        return False  # re-routing adds a map beside the removed block; the kept blocks stay as they are

    def always_records_layer_shapes(self) -> bool:
        return True  # layers without one of their sublayers

    def check(self) -> None:
        self.adapter.check_unsliced("SliceGPT needs whole layers, so it and sublayer removal cannot be combined")
        kinds = KINDS if self.options.sublayers == "all" else (self.options.sublayers,)
        layers, names = self.adapter.decoder_layers(), self.adapter.layer_names()
        self.units: dict[tuple[int, str], int] = {}
        hidden = self.adapter.config.hidden_size
        map_parameters = hidden * hidden + hidden if self.options.reroute else 0
        for index, (name, layer) in enumerate(zip(names, layers)):
            for kind in kinds:
                qualified = f"{name}.{self._child_name(layer, kind)}"
                norms = [f"{name}.{norm}" for norm in self.adapter.sublayer_norms(layer, kind, self.options.reroute)]
                kept = holds_ignored(qualified, self.adapter.sublayer(layer, kind), self.ignore) or any(is_ignored(n, self.ignore) for n in norms)
                if self._present(layer, kind) and not kept:
                    self.units[(index, kind)] = sum(
                        m.weight.numel() for m in self.adapter.sublayer(layer, kind).modules() if isinstance(m, nn.Linear)
                    ) - map_parameters
        total = sum(l.weight.numel() for layer in layers for l in self.adapter.prunable_linears(layer).values())
        self.budget = self.sparsity * total
        if not self.units:
            raise ValueError(
                f"nothing to remove: PruningConfig.ignore {self.ignore!r} and PruningConfig.method_options.sublayers "
                f"{self.options.sublayers!r} leave no {' or '.join(kinds)} block; narrow ignore or choose other sublayers"
            )
        smallest = min(self.units.values())
        if smallest <= 0:
            raise ValueError(
                f"PruningConfig.method_options.reroute: a {hidden}×{hidden} map is as large as a block of this model, so "
                "re-routing saves nothing; set reroute=False"
            )
        if smallest > self.budget:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} ({self.budget:,.0f} parameters) is smaller than the smallest "
                f"removable block ({smallest:,} parameters); raise the sparsity"
            )

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        scores = self._scores(windows)
        for kind in KINDS:
            if any(k == kind for _, k in scores):
                report.layer_scores[f"{self.options.criterion} ({kind})"] = [
                    scores.get((i, kind), float("nan")) for i in range(len(self.adapter.decoder_layers()))
                ]
        removed, spent = [], 0
        for unit in sorted(scores, key=lambda unit: (scores[unit], -self.units[unit])):  # of equal scores, the larger first
            if spent + self.units[unit] <= self.budget:
                removed.append(unit)
                spent += self.units[unit]
        layers, names = self.adapter.decoder_layers(), self.adapter.layer_names()
        reroutes: dict[int, list[Reroute]] = {}
        for index, kind in sorted(removed):  # attention before MLP within a layer, as the fit needs
            if self.options.reroute:
                original = self.adapter.sublayer_contribution(layers[index], kind)
                self.adapter.reroute_sublayer(layers[index], kind)
                reroutes.setdefault(index, []).append(Reroute(kind, [original]))
            else:
                self.adapter.remove_sublayer(layers[index], kind)
            report.removed.append(f"{names[index]} {kind}")
        if reroutes:
            fit_reroutes(self.adapter, windows, self.device, reroutes)

    def _scores(self, windows: torch.Tensor) -> dict[tuple[int, str], float]:
        if self.options.criterion == "perplexity":
            layers = self.adapter.decoder_layers()
            scores = {}
            with on_device([self.adapter.model], self.device):  # whole-model losses run on the compute device
                for index, kind in tqdm(self.units, desc="Perplexity without each sublayer", leave=False):
                    with self.adapter.bypassed(layers[index], kind):
                        scores[(index, kind)] = calibration_perplexity(self.adapter.model, windows)
            require_a_finite_score(scores.values(), "sublayers")
            return scores
        influences: dict[tuple[int, str], BlockInfluence] = {}

        def observe(index: int, layer: nn.Module) -> ContextManager[None]:
            def sink(kind: str, before: torch.Tensor, after: torch.Tensor) -> None:
                influences.setdefault((index, kind), BlockInfluence()).add(before, after)

            return self.adapter.observing_residuals(layer, sink)

        observe_layers(self.adapter, windows, self.device, observe, "Sublayer block influence")
        return {unit: influences[unit].value() for unit in self.units}

    def _present(self, layer: nn.Module, kind: str) -> bool:
        return (self.adapter.attention(layer) if kind == "attention" else self.adapter.mlp(layer)) is not None

    def _child_name(self, layer: nn.Module, kind: str) -> str:
        module = self.adapter.sublayer(layer, kind)
        return next(name for name, child in layer.named_children() if child is module)
