"""Task-specific expert pruning: drop MoE experts progressively while fine-tuning (Chen et al. 2022,
"Task-Specific Expert Pruning for Sparse Mixture-of-Experts").

During fine-tuning on the target task the router concentrates on a few "professional" experts.
``ExpertDroppingCallback`` counts, per layer, how many training tokens the router sends to each
expert; at every ``every``-th step between ``start_step`` and ``end_step`` it drops the experts
with the fewest tokens since the previous drop, so the number kept falls linearly from all to
``final_experts`` at ``end_step``; training then goes on with the survivors.

A dropped expert is removed from routing at once (its router logit is masked, so no token reaches
it and it gets no gradient) but stays in memory until training ends: replacing the router's
parameters mid-run would detach them from the optimizer. At ``on_train_end`` the experts and
router rows go for good and the config records the new counts, so ``save_pretrained`` writes a
smaller MoE that reloads with stock transformers (the same count everywhere) or after
``import optimum_prune`` (per-layer counts). The dropped experts go into each checkpoint's
``trainer_state.json`` (``stateful_callbacks``), so a run resumed from one routes around them as before.

    trainer = Trainer(model, args, train_dataset=task_data,
                      callbacks=[ExpertDroppingCallback(ExpertDroppingSchedule(final_experts=2, end_step=600))])
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adapters import DecoderAdapter, get_adapter
from .distributed import all_reduce_sum
from .ignoring import as_patterns, check_ignore_patterns, kept_moe_layers
from .options import coerce_scalar_fields
from .sparsity import nearest_count
from .structure.loading import record_structure
from .training_hooks import RealTokens, end_training_run, forget_compiled_graphs, start_training_run

logger = logging.getLogger(__name__)
STATE_KEY = "optimum_prune.ExpertDropping"  # in TrainerState.stateful_callbacks, saved with every checkpoint


@dataclass(frozen=True)
class ExpertDroppingSchedule:
    """Experts a mixture-of-experts model keeps per layer while it trains: from all of them at ``start_step`` down to
    ``final_experts`` at ``end_step`` (None: half of the run's max_steps), one step of the drop every ``every`` steps."""

    final_experts: int = 1
    start_step: int = 0
    end_step: int | None = None  # None: half of the run's max_steps
    every: int = 50

    def __post_init__(self) -> None:
        coerce_scalar_fields(self)
        if self.final_experts < 1 or self.every < 1 or self.start_step < 0:
            raise ValueError(
                f"ExpertDroppingSchedule needs final_experts >= 1, every >= 1 and start_step >= 0, got "
                f"{self.final_experts}, {self.every} and {self.start_step}"
            )
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"ExpertDroppingSchedule.end_step ({self.end_step}) must come after start_step ({self.start_step})")

    def kept_at(self, step: int, experts: int, end_step: int) -> int:
        """Experts a layer keeps after ``step``: all before ``start_step``, falling linearly to ``final_experts``."""
        if step < self.start_step:
            return experts
        progress = min(1.0, (step - self.start_step) / (end_step - self.start_step))
        return max(self.final_experts, nearest_count(experts - progress * (experts - self.final_experts)))


class _LayerRouting:
    """One MoE layer during the run: tokens per expert since the last drop, and the dropped experts."""

    def __init__(self, adapter: DecoderAdapter, layer: nn.Module, real_tokens: RealTokens) -> None:
        self.block = adapter.moe_block(layer)
        self.layer = layer
        experts = len(adapter.block_experts(self.block))
        self.counts = torch.zeros(experts, dtype=torch.long)
        self.dropped = torch.zeros(experts, dtype=torch.bool)
        self.handle = adapter.router(self.block).register_forward_hook(self._route)
        self.adapter = adapter
        self.real_tokens = real_tokens

    def _route(self, _module: nn.Module, _args: tuple, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.masked_fill(self.dropped.to(logits.device), torch.finfo(logits.dtype).min)
        if self.block.training:
            real = self.real_tokens.of(logits.detach())
            chosen = self.adapter.route(self.block, real)[1]
            # A token whose logits are NaN (a forward that overflowed, whose step GradScaler skips) chose nothing:
            # its choices go to a bin past the experts (bincount with weights is not deterministic on CUDA).
            experts = len(self.counts)
            chosen = chosen.masked_fill(~real.isfinite().all(-1, keepdim=True), experts).reshape(-1)
            self.counts = self.counts.to(chosen.device)  # counted where routing runs: no device sync per call
            self.counts += torch.bincount(chosen, minlength=experts + 1)[:experts]
        return logits

    def drop_to(self, keep: int) -> None:
        alive = (~self.dropped).nonzero().flatten().tolist()
        if len(alive) <= keep:  # counting goes on: the next drop ranks by every token since the previous one
            return
        all_reduce_sum(self.counts)  # under DDP every process drops the same experts, by the tokens of all
        for expert in sorted(alive, key=lambda e: (int(self.counts[e]), e))[: len(alive) - keep]:
            self.dropped[expert] = True
        self.counts.zero_()


class ExpertDroppingCallback(TrainerCallback):
    """Drops the least-routed experts of every MoE layer on a schedule while a ``Trainer`` fine-tunes;
    ``ignore``: glob patterns of modules kept as they are (a pattern matching an MoE block, a module
    holding it or one inside it keeps that block's experts)."""

    def __init__(self, schedule: ExpertDroppingSchedule | None = None, ignore: str | list[str] | tuple[str, ...] = ()) -> None:
        self.schedule = schedule or ExpertDroppingSchedule()
        self.ignore = as_patterns(ignore, "ExpertDroppingCallback ignore")
        self.layers: list[_LayerRouting] = []
        self.real_tokens: RealTokens | None = None
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.adapter: DecoderAdapter | None = None
        self.end_step = 0

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        self.adapter = get_adapter(model)
        blocks = [(layer, self.adapter.moe_block(layer)) for layer in self.adapter.decoder_layers()]
        if not any(block is not None for _, block in blocks):
            raise ValueError(f"ExpertDroppingCallback needs a mixture-of-experts model; {type(self.adapter.model).__name__} has no MoE layer")
        self.adapter.require_softmax_router("ExpertDroppingCallback")
        check_ignore_patterns(self.adapter, self.ignore, "ExpertDroppingCallback ignore")
        kept = kept_moe_layers(self.adapter, self.ignore, "ExpertDroppingCallback ignore")
        blocks = [(layer, block) for index, (layer, block) in enumerate(blocks) if block is not None and index not in kept]
        top_k = max(self.adapter.experts_per_token(block) for _, block in blocks)
        if self.schedule.final_experts < top_k:
            raise ValueError(
                f"ExpertDroppingSchedule.final_experts ({self.schedule.final_experts}) is below the router's top-{top_k}: "
                f"keep at least {top_k} experts"
            )
        experts = max(len(self.adapter.block_experts(block)) for _, block in blocks)
        if self.schedule.final_experts >= experts:  # it would drop nothing, without a word
            raise ValueError(
                f"ExpertDroppingSchedule.final_experts ({self.schedule.final_experts}) is not below the model's {experts} "
                f"experts per layer: keep fewer, between {top_k} and {experts - 1}"
            )
        self.end_step = self.schedule.end_step or max(self.schedule.start_step + 1, state.max_steps // 2)
        if self.end_step > state.max_steps:
            logger.warning(
                "ExpertDroppingSchedule.end_step (%d) is past the run's %d steps: it ends at %d experts per layer, not "
                "final_experts=%d; lower end_step",
                self.end_step, state.max_steps, self.schedule.kept_at(state.max_steps, experts, self.end_step), self.schedule.final_experts,
            )  # fmt: skip
        start_training_run(self.adapter.model, self, state, self._remove_hooks, self._hooks)
        self.real_tokens = RealTokens(model)
        self.layers = [_LayerRouting(self.adapter, layer, self.real_tokens) for layer, _ in blocks]
        self._hooks.extend([self.real_tokens.handle, *(routing.handle for routing in self.layers)])
        forget_compiled_graphs(args, model)  # the routing hooks must be traced in
        if state.global_step > 0:
            self._resume(state)

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _resume(self, state: TrainerState) -> None:
        """Route around the experts the checkpoint's run had dropped; the token counts since its last drop
        are not in the checkpoint, so the next drop ranks by the tokens seen after the resume."""
        saved = state.stateful_callbacks.get(STATE_KEY)
        if saved is not None:
            for routing, dropped in zip(self.layers, saved["dropped"]):
                routing.dropped[dropped] = True
        elif any(self.schedule.kept_at(state.global_step, len(r.counts), self.end_step) < len(r.counts) for r in self.layers):
            raise ValueError(
                f"resumed at step {state.global_step}, after expert drops, from a checkpoint that does not record which "
                "experts were dropped (saved without ExpertDroppingCallback): start over, or resume from a checkpoint "
                "saved by this run"
            )
        step = state.global_step
        drops_ahead = any(self.schedule.kept_at(step, len(r.counts), self.end_step) > self.schedule.final_experts for r in self.layers)
        if drops_ahead and not self._drops_at(step):
            logger.warning(
                "resumed at step %d, between two expert drops: the routing counts since the previous drop are not in the "
                "checkpoint, so the next drop ranks experts by fewer tokens than an uninterrupted run",
                step,
            )

    def _drops_at(self, step: int) -> bool:
        due = step >= self.schedule.start_step and (step - self.schedule.start_step) % self.schedule.every == 0
        return due or step == self.end_step

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        step = state.global_step
        if self._drops_at(step):
            for routing in self.layers:
                routing.drop_to(self.schedule.kept_at(step, len(routing.counts), self.end_step))
            state.stateful_callbacks[STATE_KEY] = {"dropped": [r.dropped.nonzero().flatten().tolist() for r in self.layers]}

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or not self.layers:
            return
        kept = sum(int((~r.dropped).sum()) for r in self.layers) / len(self.layers)
        logs["experts_kept"] = kept  # mean over layers, for the callbacks after this one
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["experts_kept"] = kept

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        best = state.best_global_step
        if args.load_best_model_at_end and best is not None and self.layers:
            experts = len(self.layers[0].counts)
            if self.schedule.kept_at(best, experts, self.end_step) > self.schedule.kept_at(state.global_step, experts, self.end_step):
                logger.warning(
                    "load_best_model_at_end loaded the checkpoint of step %d, evaluated with %d experts routed per layer: "
                    "the later drops are applied to it now, without retraining, so its evaluation does not describe the "
                    "model returned; evaluate and save only after end_step, or turn load_best_model_at_end off",
                    best, self.schedule.kept_at(best, experts, self.end_step),
                )  # fmt: skip
        self._remove_hooks()
        end_training_run(self.adapter.model, self)
        forget_compiled_graphs(args, self.adapter.model)
        for routing in self.layers:
            kept = (~routing.dropped).nonzero().flatten().tolist()
            if len(kept) < len(routing.counts):
                self.adapter.keep_experts(routing.layer, kept)
        if self.layers:
            record_structure(self.adapter)
        self.layers = []
        self.adapter = self.real_tokens = None  # the model: a callback kept after training (a sweep's) kept it alive
