"""K-prune (Park, Choi & Kang, "Accurate Retraining-free Pruning for Pretrained Encoder-based Language
Models", ICLR 2024, arXiv 2308.03449): knowledge-preserving, iterative, retraining-free pruning of
heads and MLP channels, adapted to decoder LLMs.

The sublayers are visited bottom-up (attention 0, MLP 0, attention 1, ...). At each one, three steps
(the paper's Alg. 1; numbers follow the official code, snudm-starlab/K-prune):

1. Knowledge measurement. Every unit u of this sublayer and of the sublayers above it has a mask
   m_u = 1 on its columns of the output projection (o_proj, down_proj). With the predictive
   knowledge loss K_pred = T²·KL(p_dense^T ‖ p_pruned^T) between the dense model's and the current
   model's next-token distributions at temperature T (Eq. 4), a unit's predictive score is
   Z_pred(u) = mean over samples of ½ (∂K_pred/∂m_u)², averaged over the unit's columns; its
   representational score (Eq. 5) is Z_rep(u) = E_tokens[x_c²] · mean_i W[i, c]², the energy the
   unit's column c adds to the sublayer output, averaged the same way. The unit's score is
   (λ_rep·Z_rep + λ_pred·Z_pred)/cost(u), times μ for heads.
   The gradient of K_pred itself is exactly zero while the model is still dense (p_pruned = p_dense
   is K_pred's minimum), so in the official code Z_pred vanishes for every unit until something is
   removed, and the first sublayers are chosen by Z_rep alone, against later scores on another
   scale (SmolLM2 at 20 %, quick protocol, untuned: perplexity 21 → 709,246). By default
   (``predictive_gradient="sampled"``; same run: 44.2) the gradient is that of
   T²·mean_t(−log p_pruned^T(y_t)) with every y_t drawn from the dense model's (coarsened) distribution: its mean is ∂K_pred/∂m, and its square's mean adds the Fisher
   information of p_pruned — K_pred's curvature, i.e. its second-order term at the dense model —
   so Z_pred measures the predictive knowledge a unit carries from the first sublayer on.
   ``predictive_gradient="kl"`` keeps the official code's gradient.
2. Knowledge-preserving mask search. All candidate units (this sublayer and above) are sorted by
   score; the threshold is the lowest score such that the units scoring above it fit in the budget
   still left (each sublayer's best unit is kept whatever its score, so those are charged first);
   only this sublayer's units under the threshold are removed. The kept units' cost is then charged
   to the budget, so later sublayers see what is left.
3. Knowledge-preserving weight tuning. The output projection of the kept units is refitted by least
   squares so that the pruned model's residual stream after this sublayer matches the dense
   model's: min_W ‖A_S Wᵀ − (Y_dense − X_pruned)‖², with A_S the kept units' inputs to the output
   projection, X_pruned the pruned model's stream entering the sublayer and Y_dense the dense
   model's stream leaving it. Errors of the sublayers below are therefore corrected, not only kept.
   With fewer than ``MIN_TOKENS_PER_COLUMN`` (8) calibration tokens per kept column the fit overfits
   the calibration set (measured below), so it is skipped for that sublayer and the report says so.
   A sublayer that loses no unit is left as it is (the official code refits it too; on a tiny model
   that changed the calibration error by 6 % and the held-out one by 5 % the other way).

Adaptation to decoders (the paper prunes BERT and DistilBERT):
- A head unit is a key/value group with its query heads (a single head without GQA), so every
  per-layer count keeps a valid layout; an MLP unit is a channel (gate/up row, down_proj column).
- The cost is parameters, as for the other structured methods: ``sparsity`` is the fraction of the
  decoder layers' linear parameters. Per token a unit's FLOPs are proportional to its parameters;
  the paper's attention-score FLOPs (which grow with context) are not counted.
- The dense soft predictions are over a 49k–128k vocabulary, so they cannot be cached whole: the
  dense model's top-k tokens per position (``teacher_top_k``) and the mass of the rest are kept,
  and K_pred is the exact KL between the two distributions coarsened to those k + 1 outcomes.
- Each calibration window is one sample; its gradient is squared before averaging. The
  representational and weight-tuning targets come from two residual streams walked side by side
  (dense and pruned), so no dense copy of the model is kept.
- Memory: the model, three activation buffers of ``samples × seq_len × hidden`` (the pruned stream,
  the dense stream, the dense stream after attention), the top-k cache (``samples × seq_len × k``
  indices and log-probabilities) and, while scoring, one window's forward and backward through the
  layers from the current one up, with full-vocabulary logits for that window only.
- Cost: two backward passes per decoder layer (one per sublayer), each from that layer to the top:
  about as much compute as one epoch of training on the calibration set per decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..calibration import LayerInputs, capture_first_layer_inputs, feed_layer, run_layer
from ..calibration.engine import all_finite, on_device
from ..calibration.gradients import grad_only, language_model_logits, overflowed, with_loss_scale
from ..options import NonZero, check_choice, check_round_to, option
from ..report import PruningReport
from .base import StructuredMethod, register_structured_method
from .units import (
    COMPONENTS, Component, components_option, group_columns, group_units, layer_parameters, output_projection,
    round_to_option,
)


# Weight tuning fits every kept input column of an output projection: with fewer than this many
# calibration tokens per column the least squares overfits them. Measured on SmolLM2 (heads only,
# 10 %): at 2.7–5 tokens per column tuning raised the perplexity from 60 to 664, at 11–21 it
# lowered it from 86 to 66.
MIN_TOKENS_PER_COLUMN = 8


@dataclass(frozen=True)
class KPruneOptions:
    components: str = components_option()
    round_to: int = round_to_option()
    temperature: float = option(
        2.0, "Softmax temperature T of the predictive-knowledge KL (paper: 2).", applies_when={"predictive_weight": NonZero()}
    )
    predictive_weight: float = option(1.0, "λ_pred, weight of the predictive-knowledge score (paper: 1).")
    representational_weight: float = option(2.5e-4, "λ_rep, weight of the representational-knowledge score (paper's scripts: 2.5e-4).")
    head_weight: float = option(
        64.0, "μ, multiplier of head scores against channel scores (paper: 64).", applies_when={"components": ("all",)}
    )
    predictive_gradient: str = option(
        "sampled", "Gradient squared for Z_pred: 'sampled' (−log-likelihood of tokens drawn from the dense model; informative while the "
        "model is dense) or 'kl' (the KL's own, the official code's; zero until something is removed).",
        applies_when={"predictive_weight": NonZero()},
    )
    teacher_top_k: int = option(
        128, "Dense-model tokens kept per position for the KL; the rest of the vocabulary is one outcome.",
        applies_when={"predictive_weight": NonZero()},
    )  # fmt: skip
    damping: float = option(
        1e-4, "Ridge damping of the weight-tuning least squares, relative to their mean diagonal (paper: none).",
        applies_when={"tune": (True,)},
    )  # fmt: skip
    tune: bool = option(True, "Knowledge-preserving weight tuning of each output projection after its units are removed.")

    def __post_init__(self) -> None:
        check_choice("components", self.components, COMPONENTS)
        check_round_to(self.round_to)
        check_choice("predictive_gradient", self.predictive_gradient, ("sampled", "kl"))
        for name in ("temperature", "head_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"method_options.{name} must be > 0, got {getattr(self, name)}")
        for name in ("predictive_weight", "representational_weight", "damping"):
            if getattr(self, name) < 0:
                raise ValueError(f"method_options.{name} must be >= 0, got {getattr(self, name)}")
        if self.predictive_weight + self.representational_weight == 0:
            raise ValueError("method_options.predictive_weight and representational_weight are both 0: every unit would score 0; keep one > 0")
        if self.teacher_top_k < 1:
            raise ValueError(f"method_options.teacher_top_k must be a positive number of tokens, got {self.teacher_top_k}")


@register_structured_method("kprune", options=KPruneOptions)
class KPrune(StructuredMethod[KPruneOptions]):
    """K-prune: iterative, knowledge-preserving removal of heads and MLP channels with least-squares weight tuning."""

    def check(self) -> None:
        self.units = group_units(self, self.options.components, self.options.round_to)
        self.units.plan_counts()  # raises for a budget the units cannot reach

    def prune(self, windows: torch.Tensor | None, report: PruningReport) -> None:
        with on_device([self.adapter.model], self.device):
            self._prune(windows, report)

    def _prune(self, windows: torch.Tensor, report: PruningReport) -> None:
        adapter, components = self.adapter, self.units.components
        layers, names = adapter.decoder_layers(), adapter.layer_names()
        teacher = TeacherTargets.of(adapter.model, windows, self.device, self.options.teacher_top_k, self.options.temperature)
        pruned = capture_first_layer_inputs(adapter, windows, self.device)
        dense = LayerInputs(list(pruned.hidden_states), pruned.layer_kwargs)
        total = sum((c.removable + 1) * c.unit_parameters for c in components)
        budget = total - self.sparsity * sum(layer_parameters(adapter, layer) for layer in layers)  # cost the kept units may have
        removed_scores = {kind: [0.0] * len(layers) for kind in ("attention", "mlp")}
        untuned: list[str] = []
        for index in tqdm(range(len(layers)), desc="K-prune"):
            layer = layers[index]
            dense_after = _streams_leaving(adapter, layer, dense)
            dense.hidden_states = dense_after["mlp"]
            for component in [c for c in components if c.layer == index]:
                candidates = components[components.index(component) :]
                scores = self._knowledge_scores(index, candidates, pruned, teacher)
                removed = threshold_removal(scores, [c.unit_parameters for c in candidates], [c.removable for c in candidates], budget)
                count = self.units.rounded(component, len(removed))
                if count != len(removed):  # the lowest scored, as the threshold ranks them
                    removed = torch.argsort(scores[0], stable=True)[:count].sort().values
                budget -= (component.removable + 1 - len(removed)) * component.unit_parameters
                if len(removed):
                    removed_scores[component.kind][index] = float(scores[0][removed].sum())
                    if not self._remove_and_tune(layer, component, removed, pruned, dense_after[component.kind]):
                        untuned.append(f"{names[index]} {component.kind}")
                    report.removed.append(f"{names[index]} {component.kind}: {len(removed)} of {component.removable + 1} units")
            pruned.hidden_states = run_layer(adapter, layer, pruned)
        for kind, values in removed_scores.items():
            report.layer_scores[f"removed knowledge score ({kind})"] = values
        if untuned:
            report.notes.append(
                f"K-prune: weight tuning skipped for {len(untuned)} sublayers ({', '.join(untuned[:4])}{', ...' if len(untuned) > 4 else ''}): "
                f"with fewer than {MIN_TOKENS_PER_COLUMN} calibration tokens per kept input column the least squares would overfit them; "
                "use more calibration tokens"
            )

    # --- 1. knowledge measurement -------------------------------------------------------------

    def _knowledge_scores(
        self, first: int, candidates: list[Component], inputs: LayerInputs, teacher: "TeacherTargets"
    ) -> list[torch.Tensor]:
        """Per candidate component, its units' (λ_rep·Z_rep + λ_pred·Z_pred)·(μ for heads)/cost."""
        adapter, layers = self.adapter, self.adapter.decoder_layers()
        consumers = [output_projection(adapter, layers[c.layer], c) for c in candidates]
        masks = [torch.ones(c.in_features, device=c.weight.device, dtype=torch.float32, requires_grad=True) for c in consumers]
        squared = [torch.zeros(c.in_features, dtype=torch.float64, device=c.weight.device) for c in consumers]
        energy = [torch.zeros(c.in_features, dtype=torch.float64, device=c.weight.device) for c in consumers]

        def masking(mask: torch.Tensor, column_energy: torch.Tensor):
            def hook(_module: nn.Module, args: tuple) -> tuple:
                column_energy.add_(args[0].detach().double().square().reshape(-1, mask.numel()).sum(0))
                return ((args[0] * mask).to(args[0].dtype),)  # the fp32 mask would make half inputs fp32

            return hook

        handles = [consumer.register_forward_pre_hook(masking(m, e)) for consumer, m, e in zip(consumers, masks, energy)]
        tokens = sum(hidden.shape[0] * hidden.shape[1] for hidden in inputs.hidden_states)

        def run(scale: float) -> bool | None:
            for total in (*squared, *energy):
                total.zero_()
            samples = torch.Generator().manual_seed((self.seed + first) % 2**64)  # the same draws for every run
            with grad_only(adapter.model, []), torch.enable_grad():
                for window, (hidden, kwargs) in enumerate(zip(inputs.hidden_states, inputs.layer_kwargs)):
                    for layer in layers[first:]:
                        hidden = adapter.run_layer(layer, hidden, kwargs)
                    logits = adapter.output_logits(hidden)
                    if self.options.predictive_gradient == "kl":
                        loss = teacher.kl(window, logits)
                    else:
                        loss = teacher.sampled_nll(window, logits, samples)
                    for total, gradient in zip(squared, torch.autograd.grad(loss * scale, masks)):
                        total.add_(gradient.detach().double().square() / (2 * scale**2))
            return None if overflowed(squared) else True

        try:
            with_loss_scale(adapter.model, run)
        finally:
            for handle in handles:
                handle.remove()
        options, scores = self.options, []
        for component, consumer, total, column_energy in zip(candidates, consumers, squared, energy):
            predictive = total / len(inputs.hidden_states)
            # the energy a column adds to the residual stream: the projection's term times the layer's residual_scale
            stream_scale = adapter.residual_scale(layers[component.layer]) ** 2
            representational = column_energy / tokens * consumer.weight.detach().double().square().mean(0) * stream_scale
            per_column = options.representational_weight * representational + options.predictive_weight * predictive
            per_unit = per_column.reshape(-1, group_columns(adapter, layers[component.layer], component)).mean(1)
            kind_weight = options.head_weight if component.kind == "attention" else 1.0
            scores.append((per_unit * kind_weight / component.unit_parameters).float().cpu())
        return scores

    # --- 3. knowledge-preserving weight tuning ---------------------------------------------------

    def _remove_and_tune(
        self, layer: nn.Module, component: Component, removed: torch.Tensor, inputs: LayerInputs, dense_after: list[torch.Tensor]
    ) -> bool:
        """Cut the units, then (``tune``) refit the output projection; False when tuning was skipped for too few calibration tokens."""
        consumer = output_projection(self.adapter, layer, component)
        width = group_columns(self.adapter, layer, component)
        kept_units = sorted(set(range(component.removable + 1)) - set(removed.tolist()))
        kept = (torch.tensor(kept_units).unsqueeze(1) * width + torch.arange(width)).reshape(-1).to(consumer.weight.device)
        tokens = sum(hidden.shape[0] * hidden.shape[1] for hidden in inputs.hidden_states)
        enough = tokens >= MIN_TOKENS_PER_COLUMN * len(kept)
        solution = self._least_squares(layer, component, consumer, kept, inputs, dense_after) if self.options.tune and enough else None
        component.removed = len(removed)
        component.scores = torch.ones(component.removable + 1)
        component.scores[removed] = 0  # the cut removes the lowest-scored units
        self.units.cut(layer, component)
        if solution is not None:
            with torch.no_grad():
                output_projection(self.adapter, layer, component).weight.copy_(solution)
        return enough or not self.options.tune

    def _least_squares(
        self, layer: nn.Module, component: Component, consumer: nn.Linear, kept: torch.Tensor,
        inputs: LayerInputs, dense_after: list[torch.Tensor],
    ) -> torch.Tensor:
        """W = argmin ‖A_S Wᵀ − (Y_dense − X_pruned − b)‖² over the calibration tokens, as ``consumer.weight`` after the cut
        (where the sublayer's output is normalised before the add, Y_dense − X_pruned as the adapter maps it back)."""
        gram = torch.zeros(len(kept), len(kept), dtype=torch.float64, device=consumer.weight.device)
        cross = torch.zeros(len(kept), consumer.out_features, dtype=torch.float64, device=consumer.weight.device)
        captured: dict[str, torch.Tensor] = {}
        handle = consumer.register_forward_hook(lambda _m, args, output: captured.update(a=args[0].detach()[..., kept], output=output.detach()))

        def entering(kind: str, stream: torch.Tensor, _leaving: torch.Tensor) -> None:
            if kind == component.kind:
                captured["x"] = stream.detach()

        try:
            for hidden, kwargs, target in zip(inputs.hidden_states, inputs.layer_kwargs, dense_after):
                with self.adapter.observing_residuals(layer, entering), torch.no_grad():
                    self.adapter.run_layer(layer, hidden, kwargs)
                a = captured["a"].double().reshape(-1, len(kept))
                term = self.adapter.output_target(layer, component.kind, target - captured["x"], captured["output"])
                b = term.double().reshape(-1, consumer.out_features)
                if consumer.bias is not None:
                    b = b - consumer.bias.detach().double()
                gram.add_(a.T @ a)
                cross.add_(a.T @ b)
        finally:
            handle.remove()
        diagonal = torch.arange(len(kept), device=gram.device)
        gram[diagonal, diagonal] += self.options.damping * gram.diagonal().mean().clamp_min(1e-12)
        return torch.linalg.lstsq(gram, cross).solution.T.to(consumer.weight.dtype)


def threshold_removal(scores: list[torch.Tensor], costs: list[int], caps: list[int], budget: float) -> torch.Tensor:
    """K-prune's mask search: the units of the first component (the target) to remove.

    Over all candidates' units, ranked by score, the best that together cost at most ``budget`` stay;
    the target's units ranked after them go, at most ``caps[0]`` of them. Ranks, not the threshold
    score: units tied at it (dead ones, all scoring 0) would all go, far past the budget.
    Every component keeps one unit, its best: those are charged to the budget first (ranked among the
    rest, a later component's could fall under the threshold, be kept anyway when its turn came, and
    leave the model above the budget).
    """
    values = torch.cat([s.double().index_fill(0, s.argmax(), float("inf")) for s in scores])
    unit_costs = torch.cat([torch.full((s.numel(),), float(c), dtype=torch.float64) for s, c in zip(scores, costs)])
    order = torch.argsort(values, descending=True, stable=True)
    kept_cost = unit_costs[order].cumsum(0)
    fitting = int((kept_cost <= budget).sum())  # the highest-scored units that fit
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    target_ranks = rank[: scores[0].numel()]
    removed = torch.nonzero(target_ranks >= fitting).flatten()
    if len(removed) > caps[0]:  # the lowest ranked
        removed = removed[torch.argsort(target_ranks[removed], descending=True)[: caps[0]]]
    return removed.sort().values


class TeacherTargets:
    """The dense model's next-token distributions at temperature T, coarsened to its top-k tokens and the rest."""

    def __init__(self, indices: torch.Tensor, log_probabilities: torch.Tensor, temperature: float) -> None:
        self.indices = indices  # [windows, 1, positions, k]
        self.log_probabilities = log_probabilities  # [windows, 1, positions, k + 1]: the k tokens, then the rest of the vocabulary
        self.temperature = temperature

    @classmethod
    def of(cls, model: nn.Module, windows: torch.Tensor, device: torch.device, k: int, temperature: float) -> "TeacherTargets":
        indices = log_probabilities = torch.empty(0)
        with torch.no_grad():
            for position, window in enumerate(tqdm(windows, desc="Dense predictions", leave=False)):
                logits = language_model_logits(model, window.unsqueeze(0).to(device)).float()
                if not all_finite(logits):  # torch.multinomial would fail later, after layers were pruned
                    raise ValueError(
                        "K-prune: the dense model's logits are NaN or inf on the calibration windows (its activations "
                        "overflow, e.g. in float16, or its weights hold NaN): prune it in bfloat16 or float32"
                    )
                ids = logits.topk(min(k, logits.shape[-1] - 1), dim=-1).indices
                coarse = _coarse_log_softmax(logits, ids, temperature)
                if position == 0:  # one block for all windows: small tensors kept between freed logits fragmented the heap
                    indices = ids.new_empty((len(windows), *ids.shape))  # (CPU, glibc: 1.3 GB peak for 128 windows' 0.75 MB)
                    log_probabilities = coarse.new_empty((len(windows), *coarse.shape))
                indices[position], log_probabilities[position] = ids, coarse
        return cls(indices, log_probabilities, temperature)

    def kl(self, window: int, student_logits: torch.Tensor) -> torch.Tensor:
        """T² · mean over positions of KL(teacher ‖ student), both coarsened to (the teacher's top-k, the rest), at T."""
        teacher = self.log_probabilities[window]
        student = _coarse_log_softmax(student_logits.float(), self.indices[window], self.temperature)
        return (teacher.exp() * (teacher - student)).sum(-1).mean() * self.temperature**2

    def sampled_nll(self, window: int, student_logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """T² · mean over positions of −log p_student^T(y), y drawn per position from the coarsened teacher.

        Its expectation over the draws is :meth:`kl` plus a constant, so its gradient is an unbiased
        estimate of the KL's whose variance is the student's Fisher information.
        """
        teacher = self.log_probabilities[window]
        flat = teacher.exp().reshape(-1, teacher.shape[-1]).cpu()
        drawn = torch.multinomial(flat, 1, generator=generator).reshape(*teacher.shape[:-1], 1).to(teacher.device)
        student = _coarse_log_softmax(student_logits.float(), self.indices[window], self.temperature)
        return -student.gather(-1, drawn).mean() * self.temperature**2


def _coarse_log_softmax(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log-probabilities at ``temperature`` of the tokens ``ids`` and, last, of all other tokens together."""
    scaled = logits / temperature
    rest = scaled.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([scaled.gather(-1, ids), rest], dim=-1).log_softmax(-1)


def _streams_leaving(adapter: Any, layer: nn.Module, inputs: LayerInputs) -> dict[str, list[torch.Tensor]]:
    """Per sublayer kind, the residual stream leaving it, for every calibration batch."""
    streams: dict[str, list[torch.Tensor]] = {"attention": [], "mlp": []}

    def sink(kind: str, _entering: torch.Tensor, leaving: torch.Tensor) -> None:
        streams[kind].append(leaving.detach())

    with adapter.observing_residuals(layer, sink):
        feed_layer(adapter, layer, inputs)
    return streams
