"""Depth pruning: remove whole decoder layers.

Rankings: ShortGPT's Block Influence, 1 − cos(layer input, layer output) averaged over
calibration tokens (Men et al. 2024); the angular distance between the inputs of layer ℓ and
layer ℓ+n at the last token of each window, removing the n consecutive layers with the smallest
distance (Gromov et al. 2024); and Shortened LLaMA's calibration perplexity with the layer
skipped or first-order Taylor importance Σ|W·∂L/∂W| of the layer (Kim et al. 2024). With
``merge=True`` the removed layers' parameter differences are added into the kept layer before
them (LaCo, Yang et al. 2024) instead of being dropped; with ``reroute=True`` each run of removed
layers leaves an affine map of the stream in its place (``rerouting.py``).

LaCo's merge is the paper's formula θ_l + Σ_k (θ_k − θ_l): one merged layer simply replaces its
target by itself, and on SmolLM2 any merge collapses the model (quick protocol; 4 layers by Block Influence:
perplexity 6.7·10⁷ against 36.8 removed; LaCo's own choice of layers 25–27 into 24: 3.8·10⁸ against
74.8). Its released notebook subtracts the copy it is updating, so its target ends as the last merged
layer's linears (292.9 there). Kept as the paper states it, for comparison; prefer ``reroute``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..adapters import DecoderAdapter
from ..calibration import LayerInputs, run_layer, walk_layers
from ..calibration.engine import on_device
from ..calibration.gradients import calibration_gradients, calibration_perplexity, require_a_finite_score
from ..ignoring import holds_ignored
from ..options import check_choice, option
from ..report import PruningReport
from ..sparsity import nearest_count
from ..statistics import BlockInfluence, token_cosine
from ..structure.modules import rerouted_sublayers
from .base import StructuredMethod, register_structured_method
from .rerouting import REROUTE_HELP, fit_reroutes, reroute_runs

CRITERIA = ("block_influence", "angular", "perplexity", "taylor")


def block_influence(adapter: DecoderAdapter, windows: torch.Tensor, device: torch.device) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer: 1 − cos(input, output), averaged over tokens,
    read while the engine propagates the calibration windows (each layer runs once per batch)."""
    layers = adapter.decoder_layers()
    influences = [BlockInfluence() for _ in layers]

    def observe(influence: BlockInfluence):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            influence.add(args[0] if args else kwargs["hidden_states"], output[0] if isinstance(output, tuple) else output)

        return hook

    handles = [layer.register_forward_hook(observe(influence), with_kwargs=True) for layer, influence in zip(layers, influences)]
    try:
        walk_layers(adapter, windows, device, lambda *_: None, "Block influence")
    finally:
        for handle in handles:
            handle.remove()
    return [influence.value() for influence in influences]


def last_token_states(adapter: DecoderAdapter, windows: torch.Tensor, device: torch.device) -> list[torch.Tensor]:
    """The residual stream at each window's last token before every decoder layer and after the last one."""
    states: list[torch.Tensor] = []
    last = len(adapter.decoder_layers()) - 1

    def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        states.append(torch.cat([h[:, -1].float().cpu() for h in inputs.hidden_states]))
        if index == last:
            states.append(torch.cat([h[:, -1].float().cpu() for h in run_layer(adapter, layer, inputs)]))

    walk_layers(adapter, windows, device, visit, "Angular distance")
    return states


def angular_distances(states: list[torch.Tensor], span: int) -> list[float]:
    """Gromov et al.'s d(ℓ, ℓ+n) = arccos(cos(x_ℓ, x_ℓ+n)) / π, averaged over windows, for every start ℓ."""
    return [
        float(torch.arccos(token_cosine(states[s], states[s + span]).clamp(-1, 1)).mean() / math.pi)
        for s in range(len(states) - span)
    ]


@dataclass(frozen=True)
class LayerRemovalOptions:
    criterion: str = option(
        "block_influence",
        "'block_influence' (ShortGPT), 'angular' (n consecutive layers, Gromov et al.), 'perplexity' or "
        "'taylor' (Shortened LLaMA).",
    )
    num_layers: int = option(0, "Layers to remove; 0 derives it from sparsity (rounded to whole layers).")
    merge: bool = option(False, "LaCo: add the removed layers' parameter differences into the preceding kept layer.")
    reroute: bool = option(False, REROUTE_HELP + " A run of consecutive removed layers gets one map.")

    def __post_init__(self) -> None:
        check_choice("criterion", self.criterion, CRITERIA)
        if self.merge and self.reroute:
            raise ValueError("method_options.merge and reroute are alternatives: set one of them")
        if self.num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {self.num_layers}")


@register_structured_method("layers", options=LayerRemovalOptions)
class LayerRemoval(StructuredMethod[LayerRemovalOptions]):
    """Remove whole decoder layers ranked by Block Influence, angular distance, perplexity or Taylor."""

    changes_widths = False

    @property
    def changes_kept_weights(self) -> bool:
        return self.options.merge  # LaCo adds the removed layers' differences into the kept one

    def check(self) -> None:
        self.adapter.require("keep_layers")  # before scoring: a family that cannot drop layers refuses up front
        self.adapter.check_unsliced("remove layers before slicing")
        layers = self.adapter.decoder_layers()
        count = self.options.num_layers or len(layers) - nearest_count((1 - self.sparsity) * len(layers))  # a half keeps a layer
        if count == 0:
            raise ValueError(
                f"PruningConfig.sparsity {self.sparsity} rounds to 0 of {len(layers)} layers; raise it or set "
                "PruningConfig.method_options.num_layers"
            )
        if count >= len(layers):
            raise ValueError(
                f"cannot remove {count} decoder layers: the model has {len(layers)}; at least one must stay "
                "(lower PruningConfig.sparsity or PruningConfig.method_options.num_layers)"
            )
        self.count = count
        self.sparsity = count / len(layers)  # what the whole layers removed come to (num_layers, or the rounded sparsity)
        self.removable = [
            i for i, (name, layer) in enumerate(zip(self.adapter.layer_names(), layers)) if not holds_ignored(name, layer, self.ignore)
        ]
        if len(self.removable) < count:
            raise ValueError(f"PruningConfig.ignore {self.ignore!r} leaves {len(self.removable)} removable layers, fewer than {count}")
        if self.options.reroute:
            for name, layer in zip(self.adapter.layer_names(), layers):
                if self.adapter.attention(layer) is None or self.adapter.mlp(layer) is None:
                    raise ValueError(
                        f"PruningConfig.method_options.reroute leaves a run's first layer as a re-routed MLP, but {name} has already "
                        "lost a sublayer; re-route the layers first, or remove layers without reroute"
                    )
        if self.options.merge and len({(str(self.adapter.layer_shape(layer)), rerouted_sublayers(layer)) for layer in layers}) > 1:
            raise ValueError("PruningConfig.method_options.merge needs layers of identical shape; this model's layers differ")

    def always_records_layer_shapes(self) -> bool:
        return self.options.reroute  # a re-routed layer holds stand-ins where its sublayers were

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        criterion = self.options.criterion
        scorers = {
            "block_influence": self._block_influence_scores, "angular": self._angular_scores,
            "perplexity": self._perplexity_scores, "taylor": self._taylor_scores,
        }  # fmt: skip
        scores = scorers[criterion](windows)
        report.layer_scores[criterion] = scores
        if criterion == "angular":
            starts = [s for s in range(len(scores)) if all(i in self.removable for i in range(s, s + self.count))]
            if not starts:
                raise ValueError(f"no {self.count} consecutive layers are free of PruningConfig.ignore {self.ignore!r}")
            start = min(starts, key=lambda s: scores[s])
            removed = list(range(start, start + self.count))
        else:
            removed = sorted(sorted(self.removable, key=lambda i: scores[i])[: self.count])
        names = self.adapter.layer_names()
        report.removed += [names[i] for i in removed]
        kept = [i for i in range(len(names)) if i not in removed]
        if self.options.merge:
            self._merge(removed, kept, names)
        if self.options.reroute:
            fit_reroutes(self.adapter, windows, self.device, reroute_runs(self.adapter, removed))
        else:
            self.adapter.keep_layers(kept)

    def _block_influence_scores(self, windows: torch.Tensor) -> list[float]:
        return block_influence(self.adapter, windows, self.device)

    def _angular_scores(self, windows: torch.Tensor) -> list[float]:
        return angular_distances(last_token_states(self.adapter, windows, self.device), self.count)

    def _perplexity_scores(self, windows: torch.Tensor) -> list[float]:
        model, scores = self.adapter.model, []
        with on_device([model], self.device):  # whole-model losses run on the compute device
            for layer in tqdm(self.adapter.decoder_layers(), desc="Perplexity without each layer", leave=False):
                with self.adapter.bypassed(layer):
                    scores.append(calibration_perplexity(model, windows))
        require_a_finite_score(scores, "layers")
        return scores

    def _taylor_scores(self, windows: torch.Tensor) -> list[float]:
        with on_device([self.adapter.model], self.device):
            layers = self.adapter.decoder_layers()
            with calibration_gradients(self.adapter.model, windows, [p for layer in layers for p in layer.parameters()]):
                return [
                    sum(float((p.detach().float() * p.grad.float()).abs().sum()) for p in layer.parameters())
                    for layer in layers
                ]

    def _merge(self, removed: list[int], kept: list[int], names: list[str]) -> None:
        """LaCo's RDSC: θ_target ← θ_target + Σ_removed (θ_removed − θ_target), into the preceding kept layer (the
        first kept one for removed layers before it); a target that ``ignore`` keeps is refused before any change."""
        layers = self.adapter.decoder_layers()
        merges = {target: [r for r in removed if max([k for k in kept if k < r], default=kept[0]) == target] for target in kept}
        for target, merged in merges.items():
            if merged and holds_ignored(names[target], layers[target], self.ignore):
                raise ValueError(
                    f"PruningConfig.method_options.merge would add {', '.join(names[r] for r in merged)} into {names[target]}, which "
                    f"PruningConfig.ignore {self.ignore!r} keeps unchanged; narrow ignore, or set merge=False"
                )
        with torch.no_grad():
            for target, merged in merges.items():
                if not merged:
                    continue
                original = {name: p.detach().clone() for name, p in layers[target].named_parameters()}
                sources = [dict(layers[r].named_parameters()) for r in merged]
                for name, parameter in layers[target].named_parameters():
                    for source in sources:
                        parameter += source[name].to(parameter.device) - original[name]
