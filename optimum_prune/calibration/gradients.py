"""Calibration-loss gradients and losses, one window at a time.

First-order Taylor criteria (LLM-Pruner, Shortened LLaMA) need ∂L/∂W of the language-model loss
on the calibration set, Fisher weights (FWSVD) its per-window square, Hessian traces (mixed
sparsity) a second derivative, and perplexity criteria the loss itself. All run the full model
on one window per forward, so full-vocabulary logits exist for a single window at a time, never
for the whole calibration set.

An fp16 model's backward underflows: SmolLM2's weight gradients came out 10–56 % off an fp32
reference (bf16: 3–6 %), and 1–2 % off with the loss multiplied by 2¹⁰ to 2¹⁴. Every gradient pass
(these and the methods' own) therefore runs under ``with_loss_scale``, as torch's GradScaler does
in training.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.utils.logging import tqdm

from .engine import all_finite

logger = logging.getLogger(__name__)
Result = TypeVar("Result")

# The loss scale an fp16 model's gradient passes start at (16× lower after each overflow).
FP16_LOSS_SCALE = 2.0**12


def with_loss_scale(model: nn.Module, run: Callable[[float], Result | None]) -> Result:
    """``run(scale)``: a gradient pass that multiplies its losses by ``scale``, takes the scale out of what
    it returns, and returns None where its sums overflowed (``overflowed``); it then runs again at a 16×
    smaller scale, as GradScaler backs off. Models without fp16 parameters run once, at scale 1. Sums that
    overflow at scale 1 are an error: what they would rank or prune by is not a number."""
    half = any(p.dtype == torch.float16 for p in model.parameters())
    scale = FP16_LOSS_SCALE if half else 1.0
    while (result := run(scale)) is None:
        if scale == 1:
            dtype = torch.float16 if half else next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
            wider = (
                f"prune it in float32 (model.float()){' or bfloat16' if half else ''}" if dtype in (torch.float16, torch.bfloat16)
                else "look for non-finite weights, or method options that scale the loss (a temperature)"
            )
            raise ValueError(
                f"the calibration gradients are not finite even at loss scale 1: the model's gradient pass overflows in {dtype}; {wider}"
            )
        logger.warning("fp16 gradients overflowed at loss scale %g: running the pass again at %g", scale, max(scale / 16, 1.0))
        scale = max(scale / 16, 1.0)
    return result


def overflowed(sums: Iterable[torch.Tensor | float]) -> bool:
    """Whether a gradient pass summed a non-finite value."""
    return not all(math.isfinite(v) if isinstance(v, float) else all_finite(v) for v in sums)


@contextmanager
def own_gradients(parameters: list[nn.Parameter]) -> Iterator[None]:
    """``.grad`` of ``parameters`` starts empty while active, and what it held before (a caller's pending training
    gradients) comes back after, also when the pass fails: calibration gradients neither add to nor erase them."""
    held = [parameter.grad for parameter in parameters]
    for parameter in parameters:
        parameter.grad = None
    try:
        yield
    finally:
        for parameter, gradient in zip(parameters, held):  # the parameter may have moved meanwhile (on_device)
            parameter.grad = None if gradient is None else gradient.to(parameter)


@contextmanager
def calibration_gradients(
    model: nn.Module, windows: torch.Tensor, parameters: list[nn.Parameter], description: str = "Calibration gradients"
) -> Iterator[None]:
    """While active, ``.grad`` of ``parameters`` holds the mean calibration-loss gradient (only they take one: the
    embeddings' and head's would be as large as a few layers'; requires_grad restored after)."""

    def run(scale: float) -> bool | None:
        for parameter in parameters:
            parameter.grad = None
        with grad_only(model, parameters):
            for loss in window_losses(model, windows, description):
                (loss * (scale / len(windows))).backward()
        gradients = [parameter.grad for parameter in parameters if parameter.grad is not None]
        if overflowed(gradients):
            return None
        for gradient in gradients:
            gradient.div_(scale)
        return True

    with own_gradients(parameters):
        with_loss_scale(model, run)
        yield


def fisher_rows(model: nn.Module, windows: torch.Tensor, linears: list[nn.Linear], description: str = "Fisher information") -> list[torch.Tensor]:
    """Empirical Fisher information of each output row of ``linears``: Σ_windows Σ_j (∂L_w/∂W_ij)².

    Each window is one sample, so its gradient is squared before summing (the mean gradient of
    ``calibration_gradients`` would cancel out). Only the given weights require grad meanwhile, and each
    gradient is folded into its rows and freed as soon as backward produces it: the weights' gradients
    never exist all at once. Linears sharing one weight get its rows (the gradient of all its uses) each.
    """
    weights = list({id(linear.weight): linear.weight for linear in linears}.values())  # one hook a weight

    def squared_into(total: torch.Tensor):
        def hook(weight: nn.Parameter) -> None:  # as each weight's gradient is ready: squared, summed, freed
            total.add_(weight.grad.double().square().sum(dim=1))
            weight.grad = None

        return hook

    def run(scale: float) -> list[torch.Tensor] | None:
        rows = [torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device) for weight in weights]
        handles = []
        with grad_only(model, weights):  # first: a frozen weight takes no hook
            try:
                for weight, total in zip(weights, rows):
                    handles.append(weight.register_post_accumulate_grad_hook(squared_into(total)))
                for loss in window_losses(model, windows, description):
                    (loss * scale).backward()
            finally:
                for handle in handles:
                    handle.remove()
        return None if overflowed(rows) else [total / scale**2 for total in rows]

    with own_gradients(weights):
        rows = dict(zip(map(id, weights), with_loss_scale(model, run)))
    return [rows[id(linear.weight)] for linear in linears]


def hessian_traces(
    model: nn.Module, windows: torch.Tensor, groups: list[list[nn.Parameter]], probes: int = 1, seed: int = 0,
    description: str = "Hessian traces", window_indices: Sequence[int] | None = None,
) -> list[float]:
    """Hutchinson estimates of tr(∂²L/∂θ²) for each group of parameters: E_v[vᵀHv], v Rademacher,
    averaged over ``windows``. Each window's probes are drawn from ``seed`` + its index in the whole
    calibration set (``window_indices``; default its position in ``windows``), so a process that holds
    a share of the windows draws the probes a single process would for them.

    Hv comes from a second backward pass through the gradient (double backprop), once per window
    and probe, so the whole model's activations and their graph stay on its device for one window:
    about three times the memory of a training step at that length. Attention runs on SDPA's math
    kernel meanwhile: the fused kernels have no second derivative.
    """
    device = next(model.parameters()).device
    parameters = [p for group in groups for p in group]
    indices = range(len(windows)) if window_indices is None else window_indices
    if len(indices) != len(windows):
        raise ValueError(f"hessian_traces got {len(indices)} window indices for {len(windows)} windows")

    def run(scale: float) -> list[float] | None:
        generator = torch.Generator(device=device)
        totals = [0.0] * len(groups)
        with grad_only(model, parameters), math_attention():
            for index, loss in zip(indices, window_losses(model, windows, description)):
                generator.manual_seed((seed + index) % 2**64)  # any PruningConfig.seed, also near the top of the range
                # An MoE expert no token of this window reached is not in its graph: its vᵀHv is 0.
                gradients = torch.autograd.grad(loss * scale, parameters, create_graph=True, allow_unused=True)
                used = [i for i, gradient in enumerate(gradients) if gradient is not None and gradient.requires_grad]
                for probe in range(probes):
                    vectors = [torch.randint(0, 2, p.shape, generator=generator, device=device).to(p.dtype) * 2 - 1 for p in parameters]
                    products = dict(zip(used, torch.autograd.grad(
                        [gradients[i] for i in used], [parameters[i] for i in used], grad_outputs=[vectors[i] for i in used],
                        retain_graph=probe < probes - 1, allow_unused=True,
                    ))) if used else {}  # fmt: skip
                    quadratic = iter(
                        0.0 if products.get(i) is None else float((vector * products[i]).sum(dtype=torch.float64))  # not in bf16's 8 bits
                        for i, vector in enumerate(vectors)
                    )
                    for index, group in enumerate(groups):
                        totals[index] += sum(next(quadratic) for _ in group)
        return None if overflowed(totals) else [total / (scale * len(windows) * probes) for total in totals]

    return with_loss_scale(model, run)


class _SharedMathAttention:
    """SDPA's math kernel while any user holds it. torch's kernel switch is process-wide: each ``sdpa_kernel`` block
    restores the flags it saw on entry, so two overlapping passes (threads) left the fused kernels off for good, or
    turned them back on under the other's double backward (which they cannot differentiate). Users share one switch,
    set by the first and undone by the last."""

    def __init__(self) -> None:
        self.lock, self.users, self.switch = threading.Lock(), 0, None

    @contextmanager
    def held(self) -> Iterator[None]:
        with self.lock:
            if self.users == 0:
                self.switch = sdpa_kernel(SDPBackend.MATH)
                self.switch.__enter__()
            self.users += 1
        try:
            yield
        finally:
            with self.lock:
                self.users -= 1
                if self.users == 0:
                    self.switch.__exit__(None, None, None)
                    self.switch = None


math_attention = _SharedMathAttention().held


@contextmanager
def grad_only(model: nn.Module, parameters: list[nn.Parameter]) -> Iterator[None]:
    """Only ``parameters`` require grad while active (autograd then builds no other weight's gradient)."""
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in flags:
        parameter.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def language_model_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token loss on ``ids`` (its own labels), without the routers' load-balancing term an MoE model
    saved with ``output_router_logits`` (as LLaMA-Factory's MoE fine-tunes save it) adds to its loss."""
    routers_off = {"output_router_logits": False} if getattr(getattr(model, "config", None), "output_router_logits", False) else {}
    return _required(model, model(input_ids=ids, labels=ids, use_cache=False, **routers_off), "loss")


def language_model_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The model's next-token logits on ``ids``."""
    return _required(model, model(input_ids=ids, use_cache=False), "logits")


def _required(model: nn.Module, output: Any, field: str) -> torch.Tensor:
    value = getattr(output, field, None)
    if value is None:
        raise ValueError(
            f"{type(model).__name__} computes no language-model {field} (a bare decoder has no LM head), which this "
            "method's criterion needs; load the model with AutoModelForCausalLM"
        )
    return value


def window_losses(model: nn.Module, windows: torch.Tensor, description: str) -> Iterator[torch.Tensor]:
    """The language-model loss of each calibration window, with autograd on."""
    device = next(model.parameters()).device
    with torch.enable_grad():
        for window in tqdm(windows, desc=description, leave=False):
            yield language_model_loss(model, window.unsqueeze(0).to(device))


def calibration_perplexity(model: nn.Module, windows: torch.Tensor) -> float:
    """exp(mean next-token loss) of ``model`` over the calibration windows; inf where the loss is NaN or past
    float range, so that a candidate (a layer removed, a width chosen) that breaks the model ranks last."""
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for window in windows:
            total += float(language_model_loss(model, window.unsqueeze(0).to(device)))
    return math.inf if math.isnan(total) else exp_or_inf(total / len(windows))


def exp_or_inf(mean_loss: float) -> float:
    """exp(``mean_loss``), inf past float range (a loss above ~709.8 nats) rather than ``OverflowError``."""
    return math.exp(mean_loss) if mean_loss < math.log(sys.float_info.max) else math.inf


def require_a_finite_score(scores: Iterable[float], candidates: str) -> None:
    """Raise when no candidate's calibration perplexity is finite: the ranking would be by position."""
    if not any(math.isfinite(score) for score in scores):
        raise ValueError(
            f"the calibration loss is NaN or overflows with any of the {candidates} removed, so none can be ranked: the "
            "model's weights hold NaN or inf, or its loss is out of range (evaluate it before pruning)"
        )
