"""The LLM Surgeon (van der Ouderaa, Nagel, van Baalen, Asano & Blankevoort, ICLR 2024): unstructured
and N:M pruning with Kronecker-factored curvature, a global threshold across layers, correlated
weight updates and a multi-shot schedule. Equations follow the paper's Sec. 3–4 as the official
code (Qualcomm-AI-research/llm-surgeon) implements them.

Curvature (Sec. 3.1, K-FAC): each linear's block of the empirical Fisher of the calibration loss
is F ≈ G ⊗ A, with A = E[a aᵀ] over its input tokens and G = E[g gᵀ] over the loss gradients g with
respect to its output (true next-token labels), both per token. Removing a set K of weights and
updating the rest optimally under the quadratic model costs (Eq. 6–7)

    ΔL_K = ½ θ_Kᵀ [F⁻¹]_KK⁻¹ θ_K,      Δθ = −F⁻¹ E_Kᵀ [F⁻¹]_KK⁻¹ θ_K,    F⁻¹ = G⁻¹ ⊗ A⁻¹,

so a single weight's cost is W_rc² / (2 [G⁻¹]_rr [A⁻¹]_cc) (Eq. 10), an N:M group's (N of every M kept)
the sum of its M − N cheapest, and the correlated update of a group of weights Q solves
([G⁻¹]_{QrQr} ⊙ [A⁻¹]_{QcQc}) x = w_Q and applies ΔW = −G⁻¹ X A⁻¹ with X holding x at Q (Eq. 13).
G and A are damped by ``damp_g`` / ``damp_a`` times their mean diagonal before inversion.

Schedule (Sec. 3.5): over ``shots`` shots the target rises linearly, α_t = t·α/T; each shot
re-estimates the curvature on the current model, takes one threshold on the costs of every
weight of every layer so that α_t of them are (or stay) removed — already removed weights cost 0 —
and removes them with the correlated update, in groups of whole rows of at most ``max_correlate``
weights, each group seeing the previous groups' updates (the code's defaults for unstructured and
semi-structured runs). As in the official code, the weights earlier shots removed enter the solve
too, held at zero while the rest compensate the new removals: zeroing them again after an update
that ignored them undid part of it (tiny Llama, 5 shots: 3× the output error; one shot is identical).
A shot's systems therefore grow with the removed fraction, ≈ (T + 1)/2 times one shot's work over T
shots. The paper's optional LoRA steps between shots are not run here (recover afterwards with PERP
or LLaMA-Factory).

Memory: the whole model on the calibration device for one window's forward and backward (full-
vocabulary logits for that window only; weights take no gradients), and for every target linear
its two factors and their inverses: 2·(out² + in²) values (SmolLM2-135M: 2.7 GiB in fp32; a 7B
Llama: ~130 GiB, which is why the official code keeps them on the CPU — so does this one when
``factors_on_cpu``). The costs behind the global threshold are computed a linear at a time
(radix select), never for every weight at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn
from transformers.utils.logging import tqdm

from ..calibration.engine import on_device
from ..calibration.gradients import grad_only, language_model_loss, overflowed, with_loss_scale
from ..options import option
from ..report import LinearReport, PruningReport
from ..sparsity import NMPattern
from .base import ModelPruner, register_model_method
from .magnitude import MagnitudeOptions, MagnitudePruner


@dataclass(frozen=True)
class LLMSurgeonOptions:
    shots: int = option(5, "Shots T of the linear schedule α_t = t·α/T, the curvature re-estimated before each (paper: 5 to 40).")
    damp_g: float = option(0.1, "Damping of G relative to its mean diagonal (paper's unstructured and 2:4 runs: 0.1).")
    damp_a: float = option(0.01, "Damping of A relative to its mean diagonal (paper: 0.01).")
    max_correlate: int = option(2000, "Most weights removed together in one correlated solve (whole rows; paper: 2000).")
    factors_on_cpu: bool = option(False, "Keep the K-FAC factors on the CPU between the backward passes and the updates.")

    def __post_init__(self) -> None:
        for name in ("shots", "max_correlate"):
            if getattr(self, name) < 1:
                raise ValueError(f"method_options.{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("damp_g", "damp_a"):
            if getattr(self, name) <= 0:
                raise ValueError(f"method_options.{name} must be > 0 (the factors are inverted), got {getattr(self, name)}")


@register_model_method("llm_surgeon", options=LLMSurgeonOptions)
class LLMSurgeon(ModelPruner[LLMSurgeonOptions]):
    """LLM Surgeon: K-FAC costs, one threshold across all layers, correlated updates, over several shots."""

    def prune(self, windows: torch.Tensor, report: PruningReport) -> None:
        linears = {name: linear for layer in self.linears for name, linear in layer.items()}
        pattern = self.target if isinstance(self.target, NMPattern) else None
        final = pattern.sparsity if pattern else float(self.target)
        with on_device([self.adapter.model], self.device):
            linears = self._set_aside_unrouted(linears, windows, report)
            for shot in tqdm(range(1, self.options.shots + 1), desc="LLM Surgeon shots"):
                inverses = self._inverse_factors(kfac_factors(self.adapter.model, windows, list(linears.values()), self.options.factors_on_cpu))
                fraction = shot / self.options.shots
                costs = {name: partial(element_costs, linear.weight, *inverses[linear]) for name, linear in linears.items()}
                masks = nm_masks(costs, pattern, fraction) if pattern else threshold_masks(costs, fraction * final)
                for name, mask in masks:  # a linear's costs are its own weight's: updating one leaves the others' as they were
                    correlated_update(linears[name], mask, *inverses[linears[name]], self.options.max_correlate)
                del inverses
        for index, layer in enumerate(self.linears):
            for name, linear in layer.items():
                weight = linear.weight
                measured = int((weight == 0).sum()) / weight.numel()
                report.linears.append(LinearReport(name, index, final, measured, weight.numel()))

    def _set_aside_unrouted(self, linears: dict[str, nn.Linear], windows: torch.Tensor, report: PruningReport) -> dict[str, nn.Linear]:
        """Experts no calibration token reaches have A = 0, so every weight of theirs would cost nothing and go
        first. As the per-layer methods do (``moe_options.unrouted_experts``), they are pruned by magnitude to the
        target or left dense, reported, and kept out of the threshold and the updates (one forward pass finds them)."""
        experts = {id(module) for layer in self.adapter.decoder_layers() for expert in self.adapter.experts(layer) for module in expert.modules()}
        candidates = {name: linear for name, linear in linears.items() if id(linear) in experts}
        if not candidates:
            return linears
        reached = tokens_reaching(self.adapter.model, windows, candidates)
        unrouted = [name for name in candidates if not reached[name]]
        if not unrouted:
            return linears
        report.record_unrouted(unrouted, self.moe_options.unrouted_experts)
        if self.moe_options.unrouted_experts == "magnitude":
            for name in unrouted:
                MagnitudePruner(linears[name], MagnitudeOptions()).prune(self.target)
        return {name: linear for name, linear in linears.items() if name not in unrouted}

    def _inverse_factors(self, factors: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]]) -> dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
        return {
            linear: (damped_inverse(g, self.options.damp_g), damped_inverse(a, self.options.damp_a))
            for linear, (g, a) in factors.items()
        }


@torch.no_grad()
def tokens_reaching(model: nn.Module, windows: torch.Tensor, linears: dict[str, nn.Linear]) -> dict[str, int]:
    """How many calibration tokens each of ``linears`` receives in a forward pass over ``windows``."""
    counts = dict.fromkeys(linears, 0)

    def count(name: str, linear: nn.Linear, args: tuple, _output: torch.Tensor) -> None:
        counts[name] += args[0].numel() // linear.in_features

    handles = [linear.register_forward_hook(partial(count, name)) for name, linear in linears.items()]
    try:
        device = next(model.parameters()).device
        for window in windows:
            model(input_ids=window.unsqueeze(0).to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return counts


def kfac_factors(
    model: nn.Module, windows: torch.Tensor, linears: list[nn.Linear], on_cpu: bool = False
) -> dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear, (G, A): the mean over calibration tokens of g gᵀ (g = ∂L/∂output, L the window's mean
    next-token loss) and of a aᵀ (a = input), rescaled to equal Frobenius norms (G ⊗ A unchanged)."""
    device = next(model.parameters()).device
    store = torch.device("cpu") if on_cpu else None
    sums = {linear: [torch.zeros(linear.out_features, linear.out_features, device=store or linear.weight.device, dtype=torch.float32),
                     torch.zeros(linear.in_features, linear.in_features, device=store or linear.weight.device, dtype=torch.float32)]
            for linear in linears}  # fmt: skip
    scale = 1.0  # the loss scale of the pass running (fp16 models: see calibration.gradients)

    def forward(linear: nn.Linear, args: tuple, output: torch.Tensor) -> None:
        a = args[0].detach().float().reshape(-1, linear.in_features)
        sums[linear][1].add_((a.T @ a).to(sums[linear][1].device))

        def backward(gradient: torch.Tensor) -> None:
            g = gradient.detach().float().reshape(-1, linear.out_features) / scale
            sums[linear][0].add_((g.T @ g).to(sums[linear][0].device))

        output.register_hook(backward)

    def run(pass_scale: float) -> bool | None:
        nonlocal scale
        scale = pass_scale
        for total in (total for pair in sums.values() for total in pair):
            total.zero_()
        with grad_only(model, []), torch.enable_grad():
            for window in tqdm(windows, desc="K-FAC curvature", leave=False):
                (language_model_loss(model, window.unsqueeze(0).to(device)) * scale).backward()
        # Non-finite inputs too (activations that overflowed): NaN curvature read as dead units pruned layers whole.
        return None if overflowed(total for pair in sums.values() for total in pair) else True

    handles = [linear.register_forward_hook(forward) for linear in linears]
    # Weights take no gradient; making the embeddings' output require one makes autograd reach every linear's output.
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _a, output: output.requires_grad_(True)))
    try:
        with_loss_scale(model, run)
    finally:
        for handle in handles:
            handle.remove()
    tokens = windows.numel()
    factors = {}
    for linear, (g, a) in sums.items():
        g, a = g / tokens, a / tokens
        balance = (g.norm() * a.norm()).sqrt()
        factors[linear] = (g / g.norm().clamp_min(1e-30) * balance, a / a.norm().clamp_min(1e-30) * balance)
    return factors


def element_costs(weight: torch.Tensor, g_inverse: torch.Tensor, a_inverse: torch.Tensor) -> torch.Tensor:
    """ΔL of removing each weight alone: W_rc² / (2 [G⁻¹]_rr [A⁻¹]_cc) (Eq. 10); 0 for a weight whose
    output gets no gradient or whose input is always zero (it does not touch the loss)."""
    w = weight.detach().float().to(g_inverse.device)
    denominator = 2 * torch.outer(g_inverse.diagonal(), a_inverse.diagonal())
    return torch.where(denominator > 0, w.square() / denominator.clamp_min(1e-30), 0.0).to(weight.device)


Costs = dict[str, Callable[[], torch.Tensor]]  # per linear, a function computing its (non-negative) costs


def threshold_masks(costs: Costs, fraction: float) -> Iterator[tuple[str, torch.Tensor]]:
    """One threshold over every layer's costs: exactly the ``fraction`` cheapest weights of the whole model
    (costs tied at the threshold, e.g. the zero cost of weights removed already, are taken in index order).

    Each linear's mask comes when the iteration reaches it, and costs are computed a linear at a time
    (three times: two radix-select passes, then the mask): a cost per weight of the whole model in
    fp32 (32 GB at 8B, and as much again concatenated for a sort) is never held.
    """
    threshold, ties = _threshold(costs, fraction)
    for name, cost in costs.items():
        values = cost()
        mask = values < threshold if threshold is not None else torch.zeros_like(values, dtype=torch.bool)
        if ties:
            tied = (values == threshold).flatten().nonzero().flatten()[:ties]
            mask.view(-1)[tied] = True
            ties -= len(tied)
        yield name, mask


def _threshold(costs: Costs, fraction: float) -> tuple[torch.Tensor | None, int]:
    """The largest cost among the ``fraction`` cheapest of all (None: none is chosen), and how many of
    those tie with it.

    Radix select on fp32 bit patterns, which order as the values do for non-negative floats: one
    histogram pass over the high 16 bits counts the costs and finds the threshold's bin, one over
    the low 16 bits of that bin's costs finds the threshold itself.
    """
    high = sum(torch.bincount(_bit_patterns(cost) >> 16, minlength=2**15).cpu() for cost in costs.values())
    count = round(fraction * int(high.sum()))
    if count == 0:
        return None, 0
    high_bin = int(torch.searchsorted(high.cumsum(0), count))
    below = int(high[:high_bin].sum())
    low = torch.zeros(2**16, dtype=torch.long)
    for cost in costs.values():
        patterns = _bit_patterns(cost)
        low += torch.bincount(patterns[patterns >> 16 == high_bin] & 0xFFFF, minlength=2**16).cpu()
    low_bin = int(torch.searchsorted(low.cumsum(0), count - below))
    threshold = torch.tensor(high_bin << 16 | low_bin, dtype=torch.int32).view(torch.float32)
    return threshold, count - below - int(low[:low_bin].sum())


def _bit_patterns(cost: Callable[[], torch.Tensor]) -> torch.Tensor:
    patterns = cost().float().flatten().view(torch.int32)
    if (patterns < 0).any():
        raise ValueError("LLM Surgeon's costs must be non-negative (a weight's cost is W² over a positive curvature)")
    return patterns.long()


def nm_masks(costs: Costs, pattern: NMPattern, fraction: float) -> Iterator[tuple[str, torch.Tensor]]:
    """N:M (N of every M kept): a group's cost is the sum of its M − N cheapest weights; the ``fraction``
    cheapest groups of the whole model lose those (the last shot, fraction 1, gives every group the pattern)."""

    def cheapest(cost: Callable[[], torch.Tensor]) -> Any:
        values = cost()
        return values.reshape(values.shape[0], -1, pattern.m).topk(pattern.m - pattern.n, dim=-1, largest=False)

    def group_costs(cost: Callable[[], torch.Tensor]) -> torch.Tensor:
        return cheapest(cost).values.sum(-1)

    for name, chosen in threshold_masks({name: partial(group_costs, cost) for name, cost in costs.items()}, fraction):
        order = cheapest(costs[name]).indices
        mask = torch.zeros(*order.shape[:2], pattern.m, dtype=torch.bool, device=order.device)
        mask.scatter_(-1, order, chosen.unsqueeze(-1).expand_as(order))
        yield name, mask.reshape(order.shape[0], -1)


def correlated_update(linear: nn.Linear, mask: torch.Tensor, g_inverse: torch.Tensor, a_inverse: torch.Tensor, max_correlate: int) -> None:
    """Remove the weights in ``mask`` with the correlated OBS update (Eq. 13; those already zero are held at zero by
    it), in groups of whole rows of at most ``max_correlate`` weights, each seeing the previous groups' update;
    then zero everything in ``mask``."""
    weight = linear.weight
    W = weight.detach().to(g_inverse.device, torch.float64)
    mask = mask.to(W.device)
    alive = torch.outer(g_inverse.diagonal() > 0, a_inverse.diagonal() > 0)  # dead rows/columns just go to zero
    solved = mask & alive
    g_inverse, a_inverse = g_inverse.double(), a_inverse.double()
    for rows, columns in _row_groups(solved, max_correlate):
        values = W[rows, columns]
        system = g_inverse[rows][:, rows] * a_inverse[columns][:, columns]
        x = torch.linalg.solve(system, values)
        touched, position = torch.unique(rows, return_inverse=True)
        scattered = torch.zeros(len(touched), W.shape[1], dtype=W.dtype, device=W.device)
        scattered.index_put_((position, columns), x, accumulate=True)
        W -= g_inverse[:, touched] @ (scattered @ a_inverse)  # not (G·X)·A: out × in² per group instead of touched × in²
        W[rows, columns] = 0
    W[mask] = 0
    with torch.no_grad():
        weight.copy_(W.to(weight.device, weight.dtype))


def _row_groups(mask: torch.Tensor, limit: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(row, column) indices of ``mask``'s entries in groups of whole rows holding at most ``limit`` entries
    (a row with more is split)."""
    rows, columns = torch.nonzero(mask, as_tuple=True)  # ordered by row
    spans, start, previous = [], 0, 0
    for end in torch.bincount(rows, minlength=mask.shape[0]).cumsum(0).tolist():  # where each row's entries end
        if end - start > limit and previous > start:  # this row does not fit: close the group before it
            spans.append((start, previous))
            start = previous
        while end - start > limit:  # a row longer than the limit is split
            spans.append((start, start + limit))
            start += limit
        previous = end
    if previous > start:
        spans.append((start, previous))
    return [(rows[a:b], columns[a:b]) for a, b in spans]


def damped_inverse(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """(F + damping·mean(diag F)·I)⁻¹ in float64 via Cholesky; rows and columns with zero diagonal stay zero."""
    matrix = factor.double()
    alive = matrix.diagonal() > 0
    inverse = torch.zeros_like(matrix)
    if alive.any():
        sub = matrix[alive][:, alive]
        sub = sub + damping * sub.diagonal().mean() * torch.eye(len(sub), dtype=sub.dtype, device=sub.device)
        inverse[torch.outer(alive, alive)] = torch.cholesky_inverse(torch.linalg.cholesky(sub)).flatten()
    return inverse.float()
