"""Residual re-routing for depth pruning: a removed block's contribution becomes an affine map.

Removing a layer or sublayer drops its term from the residual stream x ← x + f(norm(x)). Re-routing
keeps the block's norm and replaces f by the affine map A·norm(x) + b that best reproduces the
removed contribution on calibration activations (ridge least squares, closed form):

    [A b]ᵀ = (ZᵀZ + λI)⁻¹ Zᵀ T,   Z = [norm(x), 1],  T = the removed contribution,

with λ = ``DAMPING`` × the mean diagonal of ZᵀZ (as SparseGPT damps its Hessian), which shrinks
the map towards plain removal. A whole run of removed layers ℓ..m is replaced by one map whose
target is x_{m+1} − x_ℓ: the run's first layer stays as a stub holding only its MLP norm and the
map. The fit is sequential: each map sees the stream of the model already pruned before it, and
its target is the original block evaluated on that stream, so errors do not compound unnoticed.

Cost: a map has hidden² + hidden parameters (SmolLM2: 332k against 884k for an attention block
and 2.65M for an MLP block), and the normal equations hold 2 × (hidden + 1)² float64 values while
one map is fitted (1 GiB at hidden 8192).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..adapters import DecoderAdapter
from ..calibration import CalibrationInputs, LayerInputs, feed_layer, run_layer, walk_layers
from ..calibration.engine import on_device

DAMPING = 0.01
REROUTE_HELP = (
    "Residual re-routing: replace each removed block by an affine map of its normalised input, fitted "
    "by least squares to the removed contribution on calibration activations (costs hidden² + hidden "
    "parameters per map)."
)


@dataclass
class Reroute:
    """One map to fit: the stand-in sublayer ``kind`` of a kept layer, and what it replaces.

    ``replaced`` is either the removed sublayer module (its output on the stand-in's input is the
    target) or, with ``whole_layers``, the removed decoder layers (the target is their combined
    contribution to the stream entering the kept stub layer).
    """

    kind: str
    replaced: list[nn.Module] = field(default_factory=list)
    whole_layers: bool = False


class NormalEquations:
    """Running ZᵀZ and ZᵀT of an affine least-squares fit (Z carries a column of ones for the bias)."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.gram = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(width + 1, width, dtype=torch.float64, device=device)

    def add(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        flat = inputs.reshape(-1, inputs.shape[-1]).to(self.gram)
        features = torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)
        self.gram += features.T @ features
        self.cross += features.T @ targets.reshape(-1, targets.shape[-1]).to(self.gram)

    def solve(self, damping: float = DAMPING) -> tuple[torch.Tensor, torch.Tensor]:
        """The ridge solution as an ``nn.Linear``'s (weight, bias); the bias is not damped."""
        gram = self.gram.clone()
        width = gram.shape[0] - 1
        diagonal = torch.arange(width, device=gram.device)
        gram[diagonal, diagonal] += damping * gram.diagonal()[:width].mean().clamp_min(1e-8)
        solution = torch.linalg.solve(gram, self.cross)
        return solution[:width].T, solution[width]


def fit_reroutes(
    adapter: DecoderAdapter, windows: CalibrationInputs, device: torch.device, reroutes: dict[int, list[Reroute]]
) -> None:
    """Fit the stand-in maps of decoder layers ``reroutes`` keys, walking the pruned model in order."""

    def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
        for reroute in reroutes.get(index, []):  # attention before MLP: the MLP's stream depends on it
            _fit(adapter, layer, reroute, inputs, device)

    walk_layers(adapter, windows, device, visit, "Residual re-routing")


def _fit(adapter: DecoderAdapter, layer: nn.Module, reroute: Reroute, inputs: LayerInputs, device: torch.device) -> None:
    stand_in = adapter.sublayer(layer, reroute.kind)
    width = stand_in.map.in_features
    equations = NormalEquations(width, device)
    with on_device(reroute.replaced, device):
        if reroute.whole_layers:
            targets = _run_contributions(adapter, reroute.replaced, inputs)
            scale = adapter.residual_scale(layer)  # the stub layer scales the stand-in's output before adding it

            def target(*_: Any) -> torch.Tensor:
                return next(targets) / scale
        else:
            (original,) = reroute.replaced

            def target(args: tuple, kwargs: dict) -> torch.Tensor:
                output = original(*args, **kwargs)
                return output[0] if isinstance(output, tuple) else output

        def record(_module: nn.Module, args: tuple, kwargs: dict, _output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            equations.add(hidden, target(args, kwargs))

        handle = stand_in.register_forward_hook(record, with_kwargs=True)
        try:
            feed_layer(adapter, layer, inputs)
        finally:
            handle.remove()
    weight, bias = equations.solve()
    with torch.no_grad():
        stand_in.map.weight.copy_(weight.to(stand_in.map.weight))
        stand_in.map.bias.copy_(bias.to(stand_in.map.bias))


def _run_contributions(adapter: DecoderAdapter, layers: list[nn.Module], inputs: LayerInputs) -> Iterator[torch.Tensor]:
    """x_out − x_in of the removed layers run in sequence, per calibration batch."""
    outputs = inputs
    for layer in layers:
        outputs = LayerInputs(run_layer(adapter, layer, outputs), inputs.layer_kwargs)
    return iter([after - before for before, after in zip(inputs.hidden_states, outputs.hidden_states)])


def reroute_runs(adapter: DecoderAdapter, removed: list[int]) -> dict[int, list[Reroute]]:
    """Remove layers ``removed``, leaving the first layer of every run of consecutive ones as a
    stub (attention removed, MLP re-routed); return the maps to fit, keyed by new layer index."""
    layers = adapter.decoder_layers()
    runs: list[list[int]] = []
    for index in sorted(removed):
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    reroutes = {}
    for run in runs:
        first = layers[run[0]]
        reroutes[run[0]] = Reroute("mlp", [copy.deepcopy(first), *(layers[i] for i in run[1:])], whole_layers=True)
        adapter.remove_sublayer(first, "attention")
        adapter.reroute_sublayer(first, "mlp")
    kept = [i for i in range(len(layers)) if i not in removed or i in reroutes]
    adapter.keep_layers(kept)
    return {kept.index(i): [reroute] for i, reroute in reroutes.items()}
