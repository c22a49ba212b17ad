"""ZipLM (Kurtić, Frantar & Alistarh, "ZipLM: Inference-Aware Structured Pruning of Language Models",
NeurIPS 2023): structured OBS removal of heads and MLP channels, one structure at a time, with each
layer's width chosen against a measured latency table so that the target is a speed-up.

Per output projection W (o_proj, down_proj) with H = 2XXᵀ/n of its calibration inputs, a structure
S is a block of input columns: a key/value group's query heads, or one MLP channel. Greedily:

    ρ_S = Σ_rows w_Sᵀ ((H⁻¹)_SS)⁻¹ w_S                      (the output error removing S adds)
    W  ← W − W_:S ((H⁻¹)_SS)⁻¹ (H⁻¹)_S:                      (the remaining columns compensate)
    H⁻¹ ← H⁻¹ − (H⁻¹)_:S ((H⁻¹)_SS)⁻¹ (H⁻¹)_S:               (S leaves the problem)

and the least-ρ structure goes, one at a time, so that every later choice sees the compensated
weights. Because the compensated solution after each step is the least-squares optimum on the
columns left, the errors add: the layer's output error at level k is the running sum of the ρ's,
reported relative to ‖W X‖² (ZipLM measures the same relative error on data).

Inference awareness: a latency table times one decoder layer's attention with 1…G key/value groups
and its MLP at each width of the level grid (widths 0.9ᵏ·C rounded to ``round_to``, ZipLM's
geometric grid), on the calibration device at ``latency_tokens`` tokens of prefill; a removed
sublayer costs nothing. A dynamic program over all sublayers (a knapsack on the discretised times)
picks the level of each that minimises the summed relative errors within the budget — the time
of the decoder layers times (1 − ``sparsity``), i.e. a decoder speed-up of 1/(1 − ``sparsity``) on
that device (``target="parameters"`` budgets parameters instead, to compare with other methods).

SPDY search (Frantar & Alistarh 2022, as ZipLM's ``StructuredSPDY`` runs it): the program sees
c_ℓ · error_ℓ with one weight c_ℓ ∈ [0, 1] per sublayer, and the weights are searched — first
``search_restarts`` random draws, then ``search_steps`` local moves that redraw each weight with
probability 0.1 — keeping the weights whose chosen levels give the stitched model the lowest
calibration loss. Stitching needs no stored weights: after the greedy removal of a set S the
compensated weights are the least-squares optimum on the columns left, W'_K = W H_:K (H_KK)⁻¹
(H damped as in the greedy pass), so each level is rebuilt from the removal order and H. The plain
program (ZipLM's ``dpsolve``, all weights 1) is scored first, so the search never returns a worse
calibration loss; ``search_restarts=0, search_steps=0`` keeps just that.

Adaptations and limits:
- The levels are chosen from errors on the dense model's inputs (as ZipLM builds its database);
  the chosen removal is then applied layer by layer on the pruned model's inputs (the sequential
  calibration of SparseGPT), so each update also compensates the error of the layers below.
- Grouped-query attention: a head structure is a key/value group with its query heads, so any
  count keeps a valid layout; its key/value rows go with it.
- Memory: one layer's output-projection Hessians at a time (down_proj: intermediate² float64 values);
  the greedy pass costs intermediate² operations per removed channel. The SPDY search keeps every
  output projection's Hessian in host memory as float32 (Σ in_features² × 4 bytes: 0.3 GB for
  SmolLM2-135M, 18 GB for Llama-2-7B) and scores each candidate with a forward pass of the whole
  model over the calibration windows (one window's logits at a time).
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from transformers.utils.logging import tqdm

from ..calibration import LayerInputs, capture_first_layer_inputs, feed_layer, observe_layers, walk_layers
from ..calibration.engine import on_device
from ..calibration.gradients import calibration_perplexity
from ..options import check_choice, option
from ..report import PruningReport
from .base import StructuredMethod, register_structured_method
from .units import COMPONENTS, Component, components_option, group_columns, group_units, output_projection

DP_BUCKETS = 10_000  # ZipLM's discretisation of the time budget
SPDY_MUTATION = 0.1  # probability that a local move redraws a sublayer's weight (ZipLM's ``muteprob``)


@dataclass(frozen=True)
class ZipLMOptions:
    target: str = option(
        "latency",
        "'latency': sparsity is the fraction of the decoder layers' measured time to remove (speed-up 1/(1 − sparsity)); the "
        "widths then follow the timings, which vary from run to run (a busy machine more), so the same seed may choose "
        "others; 'parameters': the fraction of their linear parameters, as for the other structured methods (reproducible).",
    )
    components: str = components_option()
    remove_sublayers: bool = option(True, "Allow a sublayer's last structure to go too (the whole attention or MLP block is removed).")
    round_to: int = option(
        32, "MLP widths of the level grid are multiples of this (ZipLM's Llama code: 32).", applies_when={"components": ("all", "mlp")}
    )
    dampening: float = option(0.01, "λ added to the Hessian diagonal as a fraction of its mean diagonal (ZipLM: 1%).")
    latency_tokens: int = option(512, "Prefill length at which the latency table is measured.", applies_when={"target": ("latency",)})
    latency_repeats: int = option(
        10, "Timed forward passes per table entry (the median is kept, after 3 warm-up passes).", applies_when={"target": ("latency",)}
    )
    search_restarts: int = option(10, "SPDY: random per-sublayer weightings of the program's errors scored by the stitched model's calibration loss.")
    search_steps: int = option(10, "SPDY: local moves from the best weighting (each redraws a weight with probability 0.1).")

    def __post_init__(self) -> None:
        check_choice("target", self.target, ("latency", "parameters"))
        check_choice("components", self.components, COMPONENTS)
        for name in ("round_to", "latency_tokens", "latency_repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"method_options.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("search_restarts", "search_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"method_options.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.dampening < 1:  # undamped, the Hessian is singular whenever a linear sees fewer tokens than inputs
            raise ValueError(f"method_options.dampening must be in (0, 1), got {self.dampening}")


@dataclass
class _Levels:
    """A component's candidate levels: structures removed (the unit count: the whole sublayer), and each level's cost."""

    removed: list[int]
    costs: list[float]
    errors: list[float] | None = None
    order: torch.Tensor | None = None  # the greedy removal order of all removable units (for the SPDY search)
    hessian: torch.Tensor | None = None  # H of the output projection's dense inputs, float32 on the CPU (likewise)


@register_structured_method("ziplm", options=ZipLMOptions)
class ZipLM(StructuredMethod[ZipLMOptions]):
    """ZipLM: greedy structured OBS removal of heads and MLP channels, widths chosen against a measured latency table."""

    def check(self) -> None:
        self.units = group_units(self, self.options.components)  # the units; their counts are the level program's
        narrow = min((c.removable + 1 for c in self.units.components if c.kind == "mlp"), default=None)
        if narrow is not None and self.options.round_to > narrow:  # the grid would hold no width but the whole MLP
            raise ValueError(
                f"PruningConfig.method_options.round_to ({self.options.round_to}) is above the narrowest MLP's {narrow} channels: its levels "
                "would be all or nothing; lower round_to"
            )
        if self.options.target == "parameters":
            levels = self._levels(self.units.components)
            smallest, budget = sum(min(level.costs) for level in levels), self._budget(levels)
            if smallest > budget:
                blocks = "" if self.options.remove_sublayers else " (remove_sublayers=True would allow whole blocks to go)"
                raise ValueError(
                    f"PruningConfig.sparsity {self.sparsity} cannot be met: with components={self.options.components!r} the "
                    f"decoder layers keep at least {smallest:,.0f} parameters against a budget of {budget:,.0f}{blocks}; "
                    "lower the sparsity or prune more components"
                )

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        components = self.units.components
        levels = self._levels(components)
        searching = self.options.search_restarts + self.options.search_steps > 0
        self._measure_errors(components, levels, windows, keep_database=searching)
        chosen = self._search(components, levels, windows, report) if searching else choose_levels(levels, self._budget(levels))
        layers, names = self.adapter.decoder_layers(), self.adapter.layer_names()
        dense_cost = sum(level.costs[0] for level in levels)
        kept_cost = sum(level.costs[choice] for level, choice in zip(levels, chosen))
        if self.options.target == "latency":
            whole = (kept_cost + self.head_seconds) / (dense_cost + self.head_seconds)
            speed_up = f"predicted speed-up {dense_cost / kept_cost:.2f}x" if kept_cost > 0 else "every block removed"
            note = (f"ZipLM: the decoder layers keep {kept_cost / dense_cost:.1%} of their measured time on {self.device} at "
                    f"{self.options.latency_tokens} tokens ({speed_up}); with the output "
                    f"head ({self.head_seconds * 1e3:.2f} ms, not pruned) the whole forward keeps {whole:.1%}")  # fmt: skip
        else:
            note = f"ZipLM: the decoder layers keep {kept_cost / dense_cost:.1%} of their linear parameters"
        report.notes += [*getattr(self, "latency_notes", []), note]
        for kind in ("attention", "mlp"):
            report.layer_scores[f"relative output error ({kind})"] = [
                sum(level.errors[choice] for c, level, choice in zip(components, levels, chosen) if c.layer == i and c.kind == kind)
                for i in range(len(layers))
            ]

        def visit(index: int, layer: nn.Module, inputs: LayerInputs) -> None:
            for component, level, choice in zip(components, levels, chosen):
                if component.layer != index or level.removed[choice] == 0:
                    continue
                count = level.removed[choice]
                if count > component.removable:
                    self.adapter.remove_sublayer(layer, component.kind)
                    report.removed.append(f"{names[index]} {component.kind}: the whole block")
                    continue
                projection = output_projection(self.adapter, layer, component)
                hessian = _input_hessian(self.adapter, layer, projection, inputs)
                weight, order = greedy_obs(projection.weight.detach(), hessian, group_columns(self.adapter, layer, component), self.options.dampening, count)
                component.removed = count
                component.scores = torch.ones(component.removable + 1)
                component.scores[order] = 0  # the cut removes the lowest-scored units
                kept = component.scores.bool().repeat_interleave(group_columns(self.adapter, layer, component))
                self.units.cut(layer, component)
                with torch.no_grad():
                    output_projection(self.adapter, layer, component).weight.copy_(weight[:, kept.to(weight.device)])
                report.removed.append(f"{names[index]} {component.kind}: {count} of {component.removable + 1} units")

        walk_layers(self.adapter, windows, self.device, visit, "ZipLM (sequential OBS)")

    # --- levels, their costs and errors ------------------------------------------------------

    def _levels(self, components: list[Component]) -> list[_Levels]:
        layers = self.adapter.decoder_layers()
        timings = self._latency_table(components) if self.options.target == "latency" else None
        result = []
        for component in components:
            units = component.removable + 1
            removed = self._grid(component) + ([units] if self.options.remove_sublayers else [])
            if timings is None:
                costs = [float((units - r) * component.unit_parameters) for r in removed]
            else:
                table = timings[(component.kind, _shape_key(self.adapter, layers[component.layer], component))]
                costs = [table[units - r] for r in removed]
            result.append(_Levels(removed, costs))
        return result

    def _budget(self, levels: list[_Levels]) -> float:
        dense = sum(level.costs[0] for level in levels)
        if self.options.target == "latency":
            return (1 - self.sparsity) * dense
        total = sum(l.weight.numel() for layer in self.adapter.decoder_layers() for l in self.adapter.prunable_linears(layer).values())
        return dense - self.sparsity * total

    def _measure_errors(self, components: list[Component], levels: list[_Levels], windows: torch.Tensor, keep_database: bool) -> None:
        """Relative output error of every level of every component, on the dense model's inputs (with
        ``keep_database``, also the removal order and H that rebuild each level for the search)."""

        @contextmanager
        def observe(index: int, layer: nn.Module) -> Iterator[None]:
            here = [(component, level) for component, level in zip(components, levels) if component.layer == index]
            hessians = _InputHessians([output_projection(self.adapter, layer, component) for component, _ in here])
            with hessians.recording():
                yield
            for (component, level), (projection, hessian) in zip(here, hessians.items()):
                _, order, losses = greedy_obs(projection.weight.detach(), hessian, group_columns(self.adapter, layer, component),
                                              self.options.dampening, component.removable, with_losses=True)  # fmt: skip
                if keep_database:
                    level.order, level.hessian = order, hessian.float().cpu()
                dense_energy = float(torch.einsum("ij,jk,ik->", *(projection.weight.detach().double(), hessian, projection.weight.detach().double())))
                cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), losses.cumsum(0)]) / max(dense_energy, 1e-30)
                level.errors = [1.0 if r > component.removable else float(cumulative[r]) for r in level.removed]

        observe_layers(self.adapter, windows, self.device, observe, "ZipLM error database")  # nothing is cut: dense inputs

    # --- SPDY search -----------------------------------------------------------------------

    def _search(self, components: list[Component], levels: list[_Levels], windows: torch.Tensor, report: PruningReport) -> list[int]:
        """The levels of the per-sublayer error weights whose stitched model has the lowest calibration loss."""
        layers, budget = self.adapter.decoder_layers(), self._budget(levels)
        projections = [output_projection(self.adapter, layers[c.layer], c) for c in components]
        widths = [group_columns(self.adapter, layers[c.layer], c) for c in components]
        originals = [(p.weight.detach().clone(), None if p.bias is None else p.bias.detach().clone()) for p in projections]
        scored: dict[tuple[int, ...], float] = {}

        def perplexity(weights: list[float]) -> float:
            chosen = tuple(choose_levels(levels, budget, coefficients=weights))
            if chosen not in scored:  # many weightings give the same levels
                with torch.no_grad():
                    for projection, (weight, bias), level, width, choice in zip(projections, originals, levels, widths, chosen):
                        projection.weight.copy_(stitched_weight(weight, level, choice, width, self.options.dampening))
                        if bias is not None:
                            projection.bias.copy_(bias if level.removed[choice] <= len(level.order) else torch.zeros_like(bias))
                scored[chosen] = calibration_perplexity(self.adapter.model, windows)
            return scored[chosen]

        generator = torch.Generator().manual_seed(self.seed)
        count = len(levels)
        with on_device([self.adapter.model], self.device):  # the stitched model's losses run on the compute device
            try:
                best_weights = [1.0] * count
                plain = best = perplexity(best_weights)
                candidates = [torch.rand(count, generator=generator, dtype=torch.float32) for _ in range(self.options.search_restarts)]
                for step in tqdm(range(self.options.search_restarts + self.options.search_steps), desc="ZipLM SPDY search"):
                    if step < self.options.search_restarts:
                        weights = candidates[step].tolist()
                    else:
                        redraw = torch.rand(count, generator=generator, dtype=torch.float32) < SPDY_MUTATION
                        weights = torch.where(redraw, torch.rand(count, generator=generator, dtype=torch.float32), torch.tensor(best_weights, dtype=torch.float32)).tolist()
                    value = perplexity(weights)
                    if value < best:
                        best, best_weights = value, weights
            finally:
                with torch.no_grad():
                    for projection, (weight, bias) in zip(projections, originals):
                        projection.weight.copy_(weight)
                        if bias is not None:
                            projection.bias.copy_(bias)
        report.notes.append(
            f"ZipLM SPDY search: calibration perplexity of the stitched model {plain:.3f} with the plain program, {best:.3f} "
            f"with the best of {self.options.search_restarts + self.options.search_steps} weightings ({len(scored)} distinct level choices)"
        )
        for level in levels:
            level.order = level.hessian = None
        return choose_levels(levels, budget, coefficients=best_weights)

    # --- latency table ----------------------------------------------------------------------

    def _latency_table(self, components: list[Component]) -> dict[tuple[str, tuple], dict[int, float]]:
        """Seconds of one attention / MLP sublayer per kept unit count (0 → removed), measured once per distinct shape."""
        adapter, layers = self.adapter, self.adapter.decoder_layers()
        vocabulary = adapter.model.get_input_embeddings().num_embeddings
        ids = torch.randint(vocabulary, (1, self.options.latency_tokens), generator=torch.Generator().manual_seed(0))
        inputs = capture_first_layer_inputs(adapter, ids, self.device)
        hidden, kwargs = inputs.hidden_states[0], inputs.layer_kwargs[0]
        tables: dict[tuple[str, tuple], dict[int, float]] = {}
        self.latency_notes: list[str] = []
        for component in components:
            layer = layers[component.layer]
            key = (component.kind, _shape_key(adapter, layer, component))
            if key in tables:
                continue
            units = component.removable + 1
            other = "mlp" if component.kind == "attention" else "attention"
            table = {0: 0.0}
            for kept in (units - r for r in self._grid(component)):
                probe = copy.deepcopy(layer).to(self.device)
                adapter.remove_sublayer(probe, other)  # time this sublayer alone (with its norm)
                probe_component = copy.copy(component)
                probe_component.removed = units - kept
                probe_component.scores = torch.arange(units, dtype=torch.float)  # any units: only the shape matters
                if kept < units:
                    self.units.cut(probe, probe_component)
                table[kept] = _median_seconds(lambda: adapter.run_layer(probe, hidden, kwargs), self.options.latency_repeats, self.device)
            tables[key] = _monotone(table)
            self.latency_notes.append(
                f"ZipLM latency table ({component.kind}, units kept: ms): "
                + ", ".join(f"{k}: {v * 1e3:.2f}" for k, v in sorted(tables[key].items()))
            )
        # The final norm and output embedding stay whole: timed to predict the whole forward's ratio too
        # (on the compute device for the timing only: the model stays where it is).
        norm, head = adapter.final_norm(), adapter.model.get_output_embeddings()
        with on_device([norm, head], self.device):
            self.head_seconds = _median_seconds(lambda: head(norm(hidden)), self.options.latency_repeats, self.device)
        return tables

    def _grid(self, component: Component) -> list[int]:
        """Units removed at each level, ascending, short of the whole sublayer: every count for heads, ZipLM's
        geometric widths 0.9ᵏ·C > 1% of C, rounded to ``round_to``, for MLP channels."""
        units = component.removable + 1
        if component.kind == "attention":
            return list(range(units))
        step = self.options.round_to
        widths = {units} | {max(step, round(units * 0.9**k / step) * step) for k in range(200) if 0.9**k > 0.01}
        return sorted(units - width for width in widths if width <= units)


def greedy_obs(
    weight: torch.Tensor, hessian: torch.Tensor, width: int, dampening: float, count: int, with_losses: bool = False
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Remove ``count`` blocks of ``width`` input columns one at a time by least ρ_S, with the OBS update.

    Returns the compensated weight (removed columns zero), the removed block indices in order and,
    with ``with_losses``, each step's ρ_S (float64, in the metric of the damped H).
    """
    W, H = _damped(weight, hessian, dampening)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    if width == 1:
        order, losses = _greedy_columns(W, Hinv, count)
        result = (W.to(weight.dtype), torch.tensor(order, dtype=torch.long))
        return (*result, torch.tensor(losses, dtype=torch.float64)) if with_losses else result
    blocks = W.shape[1] // width
    removed = torch.zeros(blocks, dtype=torch.bool, device=W.device)
    columns = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    order, losses = [], []
    index = torch.arange(blocks, device=W.device)
    for _ in range(count):
        diagonal_blocks = Hinv.reshape(blocks, width, blocks, width)[index, :, index, :]
        inverse_blocks = torch.cholesky_inverse(torch.linalg.cholesky(diagonal_blocks))
        per_block = W.reshape(W.shape[0], blocks, width).transpose(0, 1)  # blocks × rows × width
        scaled = torch.bmm(per_block, inverse_blocks)
        scores = (scaled * per_block).sum((1, 2))
        scores[removed] = float("inf")
        j = int(torch.argmin(scores))
        span = slice(j * width, (j + 1) * width)
        rows = Hinv[span, :]
        W -= scaled[j] @ rows
        Hinv -= rows.T @ inverse_blocks[j] @ rows
        removed[j] = True
        columns[span] = True
        W[:, columns] = 0
        Hinv[columns, columns] = 1  # keeps later diagonal blocks invertible; S's rows and columns are otherwise zero
        order.append(j)
        losses.append(float(scores[j]))
    result = (W.to(weight.dtype), torch.tensor(order, dtype=torch.long))
    return (*result, torch.tensor(losses, dtype=torch.float64)) if with_losses else result


def _damped(weight: torch.Tensor, hessian: torch.Tensor, dampening: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of W and of H with its diagonal raised by ``dampening`` × its mean; inputs that
    never fire (H_jj = 0) get H_jj = 1 and a zero weight column, so H stays invertible."""
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H.diagonal().add_(dampening * H.diagonal().mean())
    return W, H


def stitched_weight(weight: torch.Tensor, level: _Levels, choice: int, width: int, dampening: float) -> torch.Tensor:
    """The output projection at ``level.removed[choice]`` structures removed, as the greedy pass leaves it:
    the first ones of ``level.order`` zeroed and the rest the least-squares optimum W'_K = W H_:K (H_KK)⁻¹."""
    count = level.removed[choice]
    if count == 0:
        return weight
    if count > len(level.order):  # the whole sublayer
        return torch.zeros_like(weight)
    W, H = _damped(weight, level.hessian.to(weight.device), dampening)
    kept = torch.ones(W.shape[1], dtype=torch.bool, device=W.device)
    for block in level.order[:count].tolist():
        kept[block * width : (block + 1) * width] = False
    result = torch.zeros_like(W)
    result[:, kept] = torch.linalg.solve(H[kept][:, kept], (W @ H[:, kept]).T).T
    return result.to(weight.dtype)


def _greedy_columns(W: torch.Tensor, Hinv: torch.Tensor, count: int) -> tuple[list[int], list[float]]:
    """The one-column case of ``greedy_obs`` in place, with rank-1 updates (ZipLM's ``size == 1`` path):
    ρ_j = ‖W_:j‖² / [H⁻¹]_jj, W ← W − W_:j [H⁻¹]_j: / [H⁻¹]_jj, H⁻¹ ← H⁻¹ − [H⁻¹]_:j [H⁻¹]_j: / [H⁻¹]_jj."""
    removed = torch.zeros(W.shape[1], dtype=torch.bool, device=W.device)
    squared = W.square().sum(0)
    order, losses = [], []
    for _ in range(count):
        scores = squared / Hinv.diagonal()
        scores[removed] = float("inf")
        j = int(torch.argmin(scores))
        row = Hinv[j].clone()
        column = W[:, j] / row[j]
        # ‖W_:c − column·row_c‖² from the old norms, without forming W²: one matrix-vector product per step.
        squared += row.square() * column.square().sum() - 2 * row * (column @ W)
        W.addr_(column, row, alpha=-1)
        W[:, j] = 0
        Hinv.addr_(row, row, alpha=-1 / float(row[j]))
        Hinv[j, j] = 1  # keeps the diagonal positive; row and column j are otherwise zero now
        removed[j] = True
        squared[j] = 0
        order.append(j)
        losses.append(float(scores[j]))
    W[:, removed] = 0  # later updates leave rounding-level values in the removed columns
    return order, losses


def choose_levels(levels: list[_Levels], budget: float, buckets: int = DP_BUCKETS, coefficients: list[float] | None = None) -> list[int]:
    """ZipLM's dynamic program: one level per component minimising Σ c·error (c: ``coefficients``, default 1)
    within Σ cost ≤ ``budget``, costs rounded to the nearest of ``buckets`` steps: the total may pass the budget by half
    a step per component (0.3 % of it for 60 sublayers), where rounding up would refuse exact fits (2 + 1 in 3).
    Solutions of equal error (units that contribute nothing) resolve to the one spending the most of the budget."""
    if budget <= 0:
        raise ValueError("the pruning budget leaves no time (or parameters) for the decoder layers; lower the sparsity")
    step = budget / buckets
    best = torch.full((buckets + 1,), float("inf"), dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for level, coefficient in zip(levels, coefficients or [1.0] * len(levels)):
        candidates = torch.full((len(level.removed), buckets + 1), float("inf"), dtype=torch.float64)
        for position, (cost, error) in enumerate(zip(level.costs, level.errors)):
            shift = round(cost / step)
            if shift <= buckets:
                candidates[position, shift:] = best[: buckets + 1 - shift] + coefficient * error
        best, choice = candidates.min(0)
        choices.append(choice)
    if torch.isinf(best).all():
        smallest = sum(min(level.costs) for level in levels)
        raise ValueError(f"the budget of {budget:.4g} cannot be met: the smallest widths cost {smallest:.4g}; lower the sparsity")
    spent = int(torch.nonzero(best == best.min()).max())  # of equal errors (dead units), the one closest to the budget
    chosen = []
    for level, choice in zip(reversed(levels), reversed(choices)):
        position = int(choice[spent])
        chosen.append(position)
        spent -= round(level.costs[position] / step)
    return chosen[::-1]


def _input_hessian(adapter: Any, layer: nn.Module, projection: nn.Linear, inputs: LayerInputs) -> torch.Tensor:
    """H = 2XXᵀ/n of the projection's inputs while the layer runs on ``inputs`` (float64)."""
    hessians = _InputHessians([projection])
    with hessians.recording():
        feed_layer(adapter, layer, inputs)
    return next(hessians.items())[1]


class _InputHessians:
    """H = 2XXᵀ/n (float64) of each projection's inputs, summed while ``recording`` over the runs of its layer."""

    def __init__(self, projections: list[nn.Linear]) -> None:
        self.sums = {
            projection: torch.zeros(projection.in_features, projection.in_features, dtype=torch.float64, device=projection.weight.device)
            for projection in projections
        }
        self.tokens = dict.fromkeys(projections, 0)

    @contextmanager
    def recording(self) -> Iterator[None]:
        def record(projection: nn.Module, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, projection.in_features)
            self.sums[projection].add_(x.T @ x)
            self.tokens[projection] += x.shape[0]

        handles = [projection.register_forward_pre_hook(record) for projection in self.sums]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def items(self) -> Iterator[tuple[nn.Linear, torch.Tensor]]:
        for projection, summed in self.sums.items():
            yield projection, summed * (2 / max(self.tokens[projection], 1))


def _shape_key(adapter: Any, layer: nn.Module, component: Component) -> tuple:
    projection = output_projection(adapter, layer, component)
    return (projection.in_features, projection.out_features, component.removable)


def _monotone(table: dict[int, float]) -> dict[int, float]:
    """A sublayer with fewer units is never slower: a measurement that says otherwise is timing noise,
    so each entry becomes the largest time measured at or below its width."""
    widths = sorted(table)
    times = torch.tensor([table[w] for w in widths]).cummax(0).values.tolist()
    return dict(zip(widths, times))


def _median_seconds(run: Any, repeats: int, device: torch.device) -> float:
    timings = []
    with torch.no_grad():
        for step in range(3 + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= 3:
                timings.append(time.perf_counter() - start)
    return float(torch.tensor(timings).median())
