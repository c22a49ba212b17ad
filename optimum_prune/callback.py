"""``PruningCallback``: keep a pruned model's zeros through any ``transformers.Trainer`` run, or
prune gradually while training.

    trainer = Trainer(model, args, train_dataset=data, callbacks=[PruningCallback()])   # keep masks
    PruningCallback(GradualSchedule(final_sparsity=0.5, end_step=600, every=50))          # prune while training
    PruningCallback(IterativeSchedule(final_sparsity=0.9, iterations=5))                   # prune, retrain, repeat
    PruningCallback(perp=PERPConfig())                   # PERP: retrain biases, norms and mask-preserving LoRA only
    PruningCallback(ExpertDroppingSchedule(final_experts=2, end_step=600))                  # drop MoE experts while fine-tuning

Keeping masks: the zeros the model has when training begins stay zero after every optimizer
step (gradients of pruned weights are zeroed as backward produces them, so gradient clipping
measures the pruned model's gradient and momentum never builds up there, and the weights are
zeroed again after each step, which also undoes coupled weight decay). With
peft the masks sit on ``get_base_layer().weight``, and ``merge_lora_preserving_sparsity``
merges without filling them. Gradual pruning follows the cubic schedule of Zhu & Gupta (2017)
or the iterative prune-retrain rounds of Han et al. (2015), and ranks weights by magnitude or, without any calibration set, by a Wanda-style score from the
activation norms seen in the training batches since the previous pruning step.

With ``perp``, the Trainer retrains only PERP's subset (``optimum_prune.perp``): the model is
prepared when the Trainer is built (``on_init_end``, before its optimizer exists, so the callback
must be passed to the Trainer's constructor) and the adapters are merged when training ends, so
the model the Trainer saves is an ordinary one with its zeros intact.

With an ``ExpertDroppingSchedule`` the callback drops the least-routed experts of a mixture-of-experts
model while it fine-tunes (``optimum_prune.expert_dropping``, which it runs alongside the masks).

Works with any Trainer subclass (TRL's ``SFTTrainer``, LLaMA-Factory's trainers through
``run_exp(args, callbacks=[...])``). The current sparsity is added to each log entry (the
trainer's ``log_history`` and the callbacks after this one).
"""

from __future__ import annotations

import logging
import os
import weakref
from contextlib import ExitStack
from typing import Any, Union

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .adapters import get_adapter
from .calibration.engine import all_finite
from .dispatch import refuse_offloaded
from .distributed import all_reduce_sum
from .expert_dropping import ExpertDroppingCallback, ExpertDroppingSchedule
from .ignoring import as_patterns, check_ignore_patterns
from .masks import SparsityMasks, prunable_linears
from .perp import PERPConfig, PERPSummary, merge_perp, prepare_perp
from .schedules import GradualSchedule, IterativeSchedule
from .sparsity import NMPattern, conforms_to, select_mask
from .sparsity_metadata import drop_sparsity_metadata
from .statistics import ColumnNorms, wanda_scores
from .stopped_runs import check_not_stopped
from .training_hooks import RealTokens, end_training_run, forget_compiled_graphs, start_training_run

logger = logging.getLogger(__name__)
Schedule = Union[GradualSchedule, IterativeSchedule, ExpertDroppingSchedule]


def _sharding(model: nn.Module) -> str | None:
    """The name of what shards the model's parameters across processes (FSDP, DeepSpeed ZeRO-3), if anything."""
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.tensor import DTensor

    if isinstance(model, FullyShardedDataParallel) or any(isinstance(p, DTensor) for p in model.parameters()):
        return "FSDP"
    if any(hasattr(p, "ds_numel") for p in model.parameters()):  # DeepSpeed marks its partitioned parameters so
        return "DeepSpeed ZeRO-3"
    return None


def _under_deepspeed(args: TrainingArguments, optimizer: Any) -> bool:
    """Whether the Trainer runs DeepSpeed (its config in the arguments, or accelerate's launcher turned it on)."""
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true")
    return bool(getattr(args, "deepspeed", None)) or launched or type(optimizer).__name__.startswith("DeepSpeed")


class PruningCallback(TrainerCallback):
    """Keeps pruned weights at zero during training; with a ``GradualSchedule`` or an
    ``IterativeSchedule``, prunes as it trains; with an ``ExpertDroppingSchedule``, drops experts.

    ``ignore``: glob patterns of linears never masked or pruned (names as in the unwrapped model,
    e.g. ``'model.layers.0.*'``). ``perp``: train only PERP's parameters (biases, norm scales,
    mask-preserving LoRA), merged into the weights when training ends.
    """

    def __init__(
        self, schedule: Schedule | None = None, ignore: str | list[str] | tuple[str, ...] = (), perp: PERPConfig | None = None
    ) -> None:
        if schedule is not None and not isinstance(schedule, (GradualSchedule, IterativeSchedule, ExpertDroppingSchedule)):
            raise TypeError(
                f"PruningCallback's schedule must be a GradualSchedule, IterativeSchedule or ExpertDroppingSchedule (e.g. "
                f"GradualSchedule(final_sparsity=0.5)), got {type(schedule).__name__} {schedule!r:.60}"
            )
        if perp is not None and schedule is not None:
            raise ValueError("PruningCallback: PERP retrains an already pruned model; it cannot be combined with a pruning schedule")
        self.ignore = as_patterns(ignore, "PruningCallback ignore")
        self.expert_dropping = ExpertDroppingCallback(schedule, self.ignore) if isinstance(schedule, ExpertDroppingSchedule) else None
        self.schedule = None if self.expert_dropping else schedule
        self.perp = perp
        self.perp_summary: PERPSummary | None = None  # of the model prepared last
        # Each Trainer's model is prepared in its constructor: one callback given to two Trainers prepares both.
        self._perp_prepared: weakref.WeakKeyDictionary[nn.Module, PERPSummary] = weakref.WeakKeyDictionary()
        self._perp_merged: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # trained and merged: a second train() is refused
        self.masks: SparsityMasks | None = None
        self._norms: dict[str, ColumnNorms] = {}
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._run_schedule: GradualSchedule | IterativeSchedule | None = None  # ``schedule`` resolved for the current run
        self._deferred = False
        self._scheduled: list[str] = []
        self._routing = ExitStack()  # the MoE routing decisions observed while a wanda schedule runs

    # --- Trainer events ----------------------------------------------------------------
    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        if self.perp is not None and model not in self._perp_prepared:
            self._perp_merged.discard(model)  # a new Trainer: its optimizer is built on the adapters prepared here
            self.perp_summary = self._perp_prepared[model] = prepare_perp(model, self.perp)
            logger.info("PruningCallback: %s", self.perp_summary)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        check_not_stopped(model, "train it with PruningCallback")
        if self.perp is not None and model in self._perp_merged:
            raise ValueError(
                "PruningCallback(perp=...) merged PERP's adapters into the model when the last train() ended, and this "
                "Trainer's optimizer holds those adapters: build a new Trainer with the callback in its constructor to "
                "retrain"
            )
        if self.perp is not None and model not in self._perp_prepared:
            raise ValueError(
                "PruningCallback(perp=...) must be passed to the Trainer's constructor (callbacks=[...]): added later, it "
                "cannot prepare the model before the Trainer builds its optimizer"
            )
        refuse_offloaded(model, "PruningCallback reads and zeros the weights in place while they train")
        sharding = _sharding(model)
        if sharding is not None:
            raise ValueError(
                f"PruningCallback reads and zeros whole weight matrices in every process, which {sharding} splits "
                "across processes: train with DDP (or DeepSpeed ZeRO stage 1 or 2) instead"
            )
        if self.schedule is not None and _under_deepspeed(args, kwargs.get("optimizer")):
            raise ValueError(
                "PruningCallback's schedule prunes while training, but DeepSpeed's optimizer keeps its own float32 copy of "
                "every weight and writes it back at each step, so the weights pruned would come back: train with DDP, or "
                "prune before training (optimum_prune.prune) and keep the zeros with PruningCallback() under DeepSpeed"
            )
        check_ignore_patterns(get_adapter(model), self.ignore, "PruningCallback ignore")
        # expert dropping's ignore keeps layers' experts, not their zeros: every pruned weight stays masked
        self.masks = SparsityMasks.from_zeros(model, () if self.expert_dropping is not None else self.ignore)
        self._scheduled = list(prunable_linears(model, self.ignore))  # what a schedule prunes: not the routers
        if self.schedule is None and self.expert_dropping is None:
            self._warn_if_ignore_unmasks_zeros(model)
        if self.expert_dropping is not None:
            self.expert_dropping.on_train_begin(args, state, control, model=model, **kwargs)
        if not self.masks.linears and not self.masks.frozen:
            raise ValueError("PruningCallback found no prunable linears in the model's decoder layers (check ignore=)")
        if self.schedule is not None and self.masks.packed():
            raise ValueError(
                f"PruningCallback's schedule prunes weights in place, but {self.masks.packed()[0]} holds bitsandbytes 4-bit "
                "codes (a QLoRA base, frozen): prune before quantizing (optimum_prune.prune on the full-precision model), "
                "then train the adapter"
            )
        self._run_schedule = self.schedule.resolved(state.max_steps) if self.schedule is not None else None
        if self._run_schedule is not None and state.global_step == 0:  # before any hook: a refused run changes nothing
            self._check_schedule_above_existing_sparsity()
        self._warn_if_lora_updates_the_pruned_weights(model)
        start_training_run(model, self, state, self._remove_hooks, self._hooks)
        self._hooks.extend(self.masks.mask_gradients_in_backward())
        forget_compiled_graphs(args, model)  # the hooks above (and the statistics hooks below) must be traced in
        if self._run_schedule is not None:
            self._run_schedule.check_fits(state.max_steps)
            drop_sparsity_metadata(model)
            if self._run_schedule.score == "wanda":
                self._observe_inputs(model)
                # A pruning step due at the start, before any activation, runs after the first training
                # step (a resumed run already took the one of its checkpoint's step).
                self._deferred = state.global_step == 0 and self._run_schedule.prunes_at(0) and self._run_schedule.target_at(0) != 0.0
                self._warn_if_resumed_mid_interval(state.global_step)
            elif self._run_schedule.prunes_at(state.global_step):
                self._prune(state.global_step)
        logger.info("PruningCallback: %d linears at %.2f%% sparsity", len(self.masks.linears), 100 * self.masks.sparsity())

    def on_optimizer_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.masks.apply()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._run_schedule is not None and (self._deferred or self._run_schedule.prunes_at(state.global_step)):
            self._deferred = False
            self._prune(state.global_step)
        if self.expert_dropping is not None:
            self.expert_dropping.on_step_end(args, state, control, **kwargs)

    def on_log(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: dict | None = None, **kwargs: Any) -> None:
        if self.expert_dropping is not None:
            self.expert_dropping.on_log(args, state, control, logs=logs, **kwargs)
        if self.masks is None or logs is None:
            return
        sparsity = round(self.masks.sparsity(), 6)
        logs["sparsity"] = sparsity
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1]["sparsity"] = sparsity

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any) -> None:
        self._warn_if_best_checkpoint_was_less_sparse(args, state)
        self.masks.apply()
        self._remove_hooks()
        self.masks = None  # it holds every pruned linear: a callback kept after training (a sweep's) kept their weights
        end_training_run(model, self)
        forget_compiled_graphs(args, model)
        if self.expert_dropping is not None:
            self.expert_dropping.on_train_end(args, state, control, model=model, **kwargs)
        if self.perp is not None:
            merged = merge_perp(model)
            del self._perp_prepared[model]  # a next Trainer given this callback prepares its model anew
            self._perp_merged.add(model)
            logger.info("PruningCallback: merged %d PERP adapters", merged)

    # --- gradual pruning ------------------------------------------------------------------
    def _warn_if_best_checkpoint_was_less_sparse(self, args: TrainingArguments, state: TrainerState) -> None:
        """The Trainer loads ``load_best_model_at_end``'s checkpoint before this callback's last masks are
        applied: one saved before the schedule's end is pruned further here, without retraining."""
        schedule, best = self._run_schedule, state.best_global_step
        if not args.load_best_model_at_end or schedule is None or best is None:
            return
        if schedule.sparsity_at(best) < schedule.final_fraction - 1e-9:
            logger.warning(
                "load_best_model_at_end loaded the checkpoint of step %d, saved at %.1f%% sparsity before the schedule "
                "reached %.1f%%: it is pruned to the final masks now, without retraining, so its evaluation does not "
                "describe the model returned; evaluate and save only after the schedule ends, or turn load_best_model_at_end off",
                best, 100 * schedule.sparsity_at(best), 100 * schedule.final_fraction,
            )  # fmt: skip

    def _warn_if_lora_updates_the_pruned_weights(self, model: nn.Module) -> None:
        """peft's LoRA adds a dense B·A to each adapted weight: the model trained and evaluated uses updates at the pruned
        weights, which ``merge_lora_preserving_sparsity`` drops, so the merged model is not the one trained."""
        try:
            from peft.tuners.lora import LoraLayer
        except ImportError:
            return
        pruned = {id(self.masks.linears[name]) for name, mask in self.masks.pruned.items() if bool(mask.any())}
        if self.schedule is not None:  # a schedule prunes every scheduled linear
            pruned |= {id(self.masks.linears[name]) for name in self._scheduled}
        adapted = [name for name, module in model.named_modules() if isinstance(module, LoraLayer) and id(module.get_base_layer()) in pruned]
        if adapted:
            logger.warning(
                "PruningCallback: %d pruned linears (%s, ...) carry peft LoRA adapters, whose update B·A is dense: the model "
                "trained and evaluated uses weights at the pruned positions that merge_lora_preserving_sparsity drops, so "
                "the merged model is not the one trained; retrain under the mask with PruningCallback(perp=PERPConfig(lora='mask'))",
                len(adapted), adapted[0],
            )  # fmt: skip

    def _warn_if_ignore_unmasks_zeros(self, model: nn.Module) -> None:
        """Linears ``ignore`` leaves unmasked train freely: zeros a pruned one holds fill in, the pruning undone there."""
        masked = set(prunable_linears(model, self.ignore))
        pruned = {
            name: float((linear.weight == 0).float().mean()) for name, linear in prunable_linears(model).items() if name not in masked
        }
        pruned = {name: share for name, share in pruned.items() if share > 0.01}  # not a dense model's few exact zeros
        if pruned:
            name, share = next(iter(pruned.items()))
            logger.warning(
                "PruningCallback ignore leaves %d pruned linears unmasked (%s, %.1f%% zeros, ...): training fills their "
                "zeros; ignore only linears left dense, or drop ignore to keep every zero", len(pruned), name, 100 * share,
            )  # fmt: skip

    def _check_schedule_above_existing_sparsity(self) -> None:
        """A schedule whose final sparsity the model already has would prune nothing, without a word; one whose early
        steps lie below it prunes nothing until the cubic (or the rounds) pass the model's own sparsity. An N:M
        final pattern is checked against every scheduled linear's width first: a schedule would fail at that step."""
        final = self._run_schedule.final_target
        schedule = type(self._run_schedule).__name__
        if isinstance(final, NMPattern):
            self._check_nm_schedule(final, schedule)
            return
        counts = [(int(self.masks.pruned[name].sum()), self.masks.pruned[name].numel()) for name in self._scheduled]
        existing = sum(zeros for zeros, _ in counts) / max(1, sum(size for _, size in counts))
        if existing >= final - 1e-9:
            raise ValueError(
                f"{schedule}.final_sparsity {final} is not above the model's existing sparsity {existing:.4g}: the schedule "
                "would prune nothing; raise final_sparsity, or train with PruningCallback() to keep the zeros"
            )
        start = getattr(self._run_schedule, "initial_sparsity", 0.0)
        if existing > start + 0.01:  # not the few exact zeros a dense (e.g. dequantised) model holds
            logger.warning(
                "%s starts from sparsity %.4g but the model is already %.4g sparse: its pruning steps below that prune "
                "nothing%s", schedule, start, existing,
                f"; set initial_sparsity={existing:.4g}" if isinstance(self._run_schedule, GradualSchedule) else "",
            )  # fmt: skip

    def _check_nm_schedule(self, final: NMPattern, schedule: str) -> None:
        linears = {name: self.masks.linears[name] for name in self._scheduled}
        for name, linear in linears.items():
            if linear.in_features % final.m:
                raise ValueError(
                    f"{schedule}.final_sparsity '{final}' cannot be applied to {name}: in_features={linear.in_features} is "
                    f"not a multiple of M={final.m}; leave these linears dense: add '*.{name.rsplit('.', 1)[-1]}' to "
                    "PruningCallback(ignore=...)"
                )
        if linears and all(conforms_to(linear.weight, final) for linear in linears.values()):
            raise ValueError(
                f"{schedule}.final_sparsity '{final}' is the pattern the model already follows: the schedule would prune "
                "nothing; give a sparser pattern, or train with PruningCallback() to keep the zeros"
            )

    def _warn_if_resumed_mid_interval(self, step: int) -> None:
        """Activation norms are not checkpointed: a run resumed between two pruning steps scores
        the next one on the batches seen since the resume only."""
        schedule = self._run_schedule
        pruning_ahead = schedule.sparsity_at(step) < schedule.final_fraction
        # where the norms restarted: a step that pruned (one whose target is 0 removes nothing and keeps them), or
        # step 1, where a pruning due at step 0 ran after the first training step
        pruned_here = schedule.prunes_at(step) and schedule.target_at(step) != 0.0
        deferred_here = step == 1 and schedule.prunes_at(0) and schedule.target_at(0) != 0.0
        if step == 0 or pruned_here or deferred_here or not pruning_ahead:
            return
        logger.warning(
            "PruningCallback: resumed at step %d, between two pruning steps of a score='wanda' schedule: the activation "
            "norms gathered since the previous pruning step are not in the checkpoint, so the next one scores on fewer "
            "batches than an uninterrupted run; checkpoints saved at pruning steps resume exactly",
            step,
        )

    def _remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._routing.close()

    def _observe_inputs(self, model: nn.Module) -> None:
        real_tokens = RealTokens(model)
        self._hooks.append(real_tokens.handle)
        adapter = get_adapter(model)
        # Which tokens each expert receives (the MoE routers' decisions): to leave their padded positions out too
        routings = [self._routing.enter_context(adapter.routed_tokens(layer)) for layer in adapter.decoder_layers()]
        routing_of = {prefix: routing for prefix, routing in zip(adapter.layer_names(), routings)}
        for name in self._scheduled:
            linear = self.masks.linears[name]
            self._norms[name] = ColumnNorms(linear.in_features, linear.weight.device)
            routing = next(routing for prefix, routing in routing_of.items() if name.startswith(prefix + "."))

            def record(module: nn.Module, args: tuple, name: str = name, routing: Any = routing) -> None:
                if module.training:
                    self._norms[name].add(real_tokens.of(args[0].detach(), routing.positions(module)))

            self._hooks.append(linear.register_forward_pre_hook(record))

    @torch.no_grad()
    def _prune(self, step: int) -> None:
        target = self._run_schedule.target_at(step)
        if target == 0.0:
            return
        if self._norms:  # under DDP each process saw its own batches: every one must score, and so prune, alike
            tokens = torch.tensor([norms.tokens for norms in self._norms.values()], dtype=torch.long)
            all_reduce_sum(tokens, *(norms.squared for norms in self._norms.values()))
            for norms, total in zip(self._norms.values(), tokens.tolist()):
                norms.tokens = total
        for name in self._scheduled:
            scores = self._scores(name, self.masks.linears[name])
            # Already-pruned weights stay pruned: they score below every kept weight.
            scores[self.masks.pruned[name]] = -1.0
            pruned = select_mask(scores, target, per_row=self._run_schedule.score == "wanda")
            self.masks.set(name, pruned | self.masks.pruned[name])
        self.masks.apply()
        shown = f"{target:.2%}" if isinstance(target, float) else str(target)  # an N:M pattern as it is
        logger.info("PruningCallback: step %d pruned to %s (%.2f%% of masked linears)", step, shown, 100 * self.masks.sparsity())

    def _scores(self, name: str, linear: nn.Linear) -> torch.Tensor:
        if self._run_schedule.score == "magnitude":
            return linear.weight.detach().abs().float()
        norms = self._norms[name]
        if norms.tokens == 0:  # an MoE expert no token was routed to since the previous step: its weights alone
            logger.info("PruningCallback: no training token reached %s since the previous pruning step: scored by magnitude", name)
            return linear.weight.detach().abs().float()
        if not all_finite(norms.squared):  # one overflowing forward; all-inf or NaN scores would prune by position
            raise ValueError(
                f"PruningCallback: the activation norms of {name} since the previous pruning step are NaN or inf (a "
                "training forward overflowed, e.g. in float16): train in bfloat16 or float32, or use score='magnitude'"
            )
        scores = wanda_scores(linear.weight, norms)
        self._norms[name] = ColumnNorms(linear.in_features, linear.weight.device)  # next interval starts afresh
        return scores
