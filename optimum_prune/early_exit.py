"""Dynamic depth: choose the exit layer for transformers' self-speculative decoding (LayerSkip).

``generate(..., assistant_early_exit=k)`` drafts tokens with the model's first ``k`` decoder
layers (then its final norm and LM head) and verifies them with the whole model, so greedy output
is the full model's. What it lacks is a way to pick ``k``; this module measures it:

- the *agreement* at ``k``: over calibration windows, the fraction of positions whose greedy token
  read at layer ``k`` equals the full model's (teacher-forced: the expected acceptance rate α of
  the drafts);
- the cost c of a draft step relative to a full one: the bytes of weights a token reads (decoding at
  batch 1 is bound by memory traffic) through the first ``k`` layers and the LM head, against all
  layers and the head — not k/L: a small model's head weighs as much as several layers
  (SmolLM2-135M's, 49,152 × 576, as much as eight of its 30), and a token reads only the top-k
  of a mixture-of-experts layer's experts;
- the expected speed-up of speculative decoding with that α and c and the best draft length
  γ ≤ ``max_draft`` (Leviathan et al. 2023, Theorem 3.8 and Eq. 1): (1 − α^{γ+1}) / ((1 − α)(γ·c + 1));
- the Block Influence (ShortGPT) left after ``k`` — how much the skipped layers still change the
  residual stream — for reading the table.

``enable_early_exit(model, k, γ)`` records the choice as ``config.early_exit`` (saved in
``config.json``); ``model.generate(ids, **early_exit_kwargs(model))`` uses it after any reload.
It is not written as ``generation_config.assistant_early_exit``: with transformers 4.57 the
draft's own nested ``generate`` call then gets that model-level default back, drafts with early
exit itself and fails ("Passing `MinLengthLogitsProcessor` when using assisted_generation").
The draft length γ, however, must go to ``generation_config.num_assistant_tokens`` (saved in
``generation_config.json``): transformers reads it from the assistant's own generation config —
here the model's — and ignores a ``num_assistant_tokens`` passed to ``generate``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import nn

from .adapters import DecoderAdapter, get_adapter, transformers_model
from .calibration import CalibrationSource, calibration_windows
from .calibration.engine import evaluating, forwards_restored
from .dispatch import refuse_layer_walks
from .methods.layers import block_influence

logger = logging.getLogger(__name__)


@dataclass
class ExitLayer:
    layer: int  # decoder layers run by the draft
    agreement: float
    draft_cost: float  # of a draft step, relative to a full one
    draft_length: int
    expected_speedup: float
    remaining_influence: float  # Σ Block Influence of layers ≥ layer


@dataclass
class EarlyExitReport:
    num_layers: int
    candidates: list[ExitLayer] = field(default_factory=list)

    @property
    def best(self) -> ExitLayer:
        return max(self.candidates, key=lambda c: c.expected_speedup)

    def __str__(self) -> str:
        lines = [f"{'exit':>4}  {'agreement':>9}  {'cost':>5}  {'draft':>5}  {'speed-up':>8}  {'influence left':>14}"]
        for c in self.candidates:
            lines.append(
                f"{c.layer:>4}  {c.agreement:>9.1%}  {c.draft_cost:>5.2f}  {c.draft_length:>5}  {c.expected_speedup:>8.2f}  "
                f"{c.remaining_influence:>14.3f}"
            )
        best = self.best
        lines.append(f"best: exit after layer {best.layer} of {self.num_layers} (γ={best.draft_length}, ×{best.expected_speedup:.2f} expected)")
        if best.expected_speedup <= 1:
            lines.append("no exit is expected to speed decoding up: leave early exit off, or recover an exit path first (exit_weight)")
        return "\n".join(lines)


def choose_early_exit(
    model: nn.Module,
    calibration: CalibrationSource = None,
    tokenizer: Any = None,
    candidates: list[int] | None = None,
    num_samples: int = 8,
    seq_len: int = 512,
    max_draft: int = 10,
    seed: int = 0,
) -> EarlyExitReport:
    """Measure every candidate exit layer (default: 1 … L−1) on calibration windows."""
    adapter = get_adapter(model)
    refuse_layer_walks(model, "choose_early_exit")
    num_layers = len(adapter.decoder_layers())
    candidates = sorted(set(candidates)) if candidates else list(range(1, num_layers))
    check_exit_layers(model, *candidates)
    windows = calibration_windows(calibration, tokenizer, num_samples, seq_len, seed, model, "choose_early_exit")
    influence = block_influence(adapter, windows, next(model.parameters()).device)
    agreement = _agreement(model, windows, candidates)
    costs = draft_costs(model)
    report = EarlyExitReport(num_layers)
    for k in candidates:
        gamma, speedup = _best_draft(agreement[k], costs[k], max_draft)
        report.candidates.append(ExitLayer(k, agreement[k], costs[k], gamma, speedup, sum(influence[k:])))
    return report


def draft_costs(model: nn.Module) -> list[float]:
    """Entry k: the bytes of weights a draft step through the first k decoder layers and the LM head
    reads, relative to a full step's (packed quantized weights count as stored)."""
    adapter = get_adapter(model)
    head = adapter.model.get_output_embeddings()
    read = [_stored_bytes(head) if head is not None else 0]
    for layer in adapter.decoder_layers():
        read.append(read[-1] + _bytes_per_token(adapter, layer))
    return [total / read[-1] for total in read]


def _bytes_per_token(adapter: DecoderAdapter, layer: nn.Module) -> float:
    """Weight bytes one decoded token reads in ``layer``: of a mixture-of-experts block's routed experts,
    the top-k the router picks (k / n of their bytes on average)."""
    block = adapter.moe_block(layer)
    if block is None:
        return _stored_bytes(layer)
    experts = adapter.block_experts(block)
    unread = 1 - adapter.experts_per_token(block) / len(experts)
    return _stored_bytes(layer) - unread * _stored_bytes(experts)


def _stored_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in chain(module.parameters(), module.buffers()))


def enable_early_exit(model: nn.Module, layer: int, draft_length: int | None = None) -> None:
    """Record that ``generate`` should draft with the first ``layer`` decoder layers in ``config.early_exit``,
    and ``draft_length`` tokens at most per draft (None: keep the generation config's) in
    ``generation_config.num_assistant_tokens``, where transformers reads it, with a constant schedule."""
    check_exit_layers(model, layer)
    if draft_length is not None and (isinstance(draft_length, bool) or not isinstance(draft_length, int) or draft_length < 1):
        raise ValueError(f"draft_length must be a positive number of tokens, got {draft_length!r}")
    model.config.early_exit = {"exit_layer": layer, "draft_length": draft_length}
    if draft_length is not None:
        model.generation_config.num_assistant_tokens = draft_length
        model.generation_config.num_assistant_tokens_schedule = "constant"


def early_exit_kwargs(model: nn.Module) -> dict[str, int]:
    """``generate`` keyword arguments for the exit recorded by ``enable_early_exit`` ({} if none); the
    draft length travels in the model's generation config."""
    recorded = getattr(model.config, "early_exit", None)
    if not recorded:
        return {}
    check_exit_layers(model, recorded["exit_layer"])
    draft_length = recorded.get("draft_length")
    if draft_length is not None and model.generation_config.num_assistant_tokens != draft_length:
        logger.warning(
            "config.early_exit records drafts of %d tokens but generation_config.num_assistant_tokens is %s, which transformers "
            "uses; call enable_early_exit(model, %d, %d) again to restore it",
            draft_length, model.generation_config.num_assistant_tokens, recorded["exit_layer"], draft_length,
        )  # fmt: skip
    return {"assistant_early_exit": recorded["exit_layer"]}


def check_exit_layers(model: nn.Module, *layers: int) -> None:
    adapter = get_adapter(model)
    num_layers = len(adapter.decoder_layers())
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 1 <= layer < num_layers:
            raise ValueError(
                f"exit layer {layer!r} must be an integer in [1, {num_layers - 1}]: the draft runs that many of the model's "
                f"{num_layers} decoder layers"
            )
    adapter.check_unsliced("an early exit reads the stream after its layer with the final norm and LM head, which read "
                           "the last layer's; draft with a model pruned otherwise")  # fmt: skip
    _check_draft_stops(model, adapter)


class _RanPastExit(Exception):
    """Raised by the probe of ``_check_draft_stops`` when a layer past the exit runs."""


# Model classes whose forward stops where transformers' early-exit draft tells it to (probed once per class).
_DRAFT_STOPS: set[type] = set()


def _check_draft_stops(model: nn.Module, adapter: DecoderAdapter) -> None:
    """transformers drafts by lowering the base model's ``config.num_hidden_layers`` for the draft's steps
    (``EarlyExitCandidateGenerator``); a model whose forward runs all its layers whatever that says
    (Qwen2-MoE in transformers 4.57) would draft with the whole model and gain nothing. One token with
    an exit after layer 1 tells: the second layer must not run."""
    model = transformers_model(model)  # peft: the model transformers drafts with
    if type(model) in _DRAFT_STOPS:
        return
    prefix = model.base_model_prefix
    base = getattr(model, prefix, None) if prefix else None
    if base is None:  # transformers reads it as getattr(model, model.base_model_prefix), without a default
        raise ValueError(
            f"transformers' early-exit drafting lowers the layer count of the base model it finds as the attribute named by "
            f"base_model_prefix, which {type(model).__name__} does not have ({prefix!r}): generate would fail"
        )
    count = base.config.num_hidden_layers

    def ran_past_exit(*_: Any) -> None:
        raise _RanPastExit

    handle = adapter.decoder_layers()[1].register_forward_pre_hook(ran_past_exit)
    base.config.num_hidden_layers = 1
    try:
        with torch.no_grad(), forwards_restored(model):
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=next(model.parameters()).device), use_cache=False)
    except _RanPastExit:
        raise ValueError(
            f"{type(model).__name__} runs all its decoder layers whatever config.num_hidden_layers says, which is how "
            "transformers' early-exit drafting stops after the exit layer: its drafts would cost a full step"
        ) from None
    else:
        _DRAFT_STOPS.add(type(model))
    finally:
        handle.remove()
        base.config.num_hidden_layers = count


def _agreement(model: nn.Module, windows: torch.Tensor, candidates: list[int]) -> dict[int, float]:
    """Fraction of positions where layer k's greedy token equals the full model's, per candidate k.

    Layer k's token is what the draft computes — the final norm and LM head applied to the residual
    stream after k layers — read from one full pass per window: every candidate costs one LM head,
    not a forward through k layers. Logits live for one window and one candidate at a time.
    """
    device = next(model.parameters()).device
    matches = dict.fromkeys(candidates, 0)
    with evaluating(model), torch.no_grad():
        for window in windows:
            outputs = model(input_ids=window[None].to(device), use_cache=False, output_hidden_states=True)
            reference = outputs.logits.argmax(-1)
            for k in candidates:
                matches[k] += int((exit_logits(model, outputs.hidden_states[k]).argmax(-1) == reference).sum())
    return {k: count / windows.numel() for k, count in matches.items()}


def exit_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """What the early-exit draft computes from its last layer's output: final norm, then the LM head."""
    return get_adapter(model).output_logits(hidden)


def _best_draft(alpha: float, cost: float, max_draft: int) -> tuple[int, float]:
    """(γ, speed-up) maximising the expected speed-up of speculative decoding (Leviathan et al., Eq. 1 / Thm 3.8)."""

    def speedup(gamma: int) -> float:
        tokens = gamma + 1 if alpha >= 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
        return tokens / (gamma * cost + 1)

    gamma = max(range(1, max_draft + 1), key=speedup)
    return gamma, speedup(gamma)
