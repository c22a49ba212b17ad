"""Recovery by knowledge distillation: train the pruned student against the dense teacher.

    trainer = DistillationTrainer(model=student, teacher=dense, distillation=DistillationConfig(temperature=2.0),
                                  args=args, train_dataset=data, callbacks=[PruningCallback()])

The loss (Hinton et al. 2015; Minitron, Muralidharan et al. 2024) mixes

- ``kd_weight`` × T² · KL(p_teacher^T ‖ p_student^T), forward KL of temperature-T softmaxes over
  the next-token positions that have a label (``labels != -100``, shifted as the causal-LM loss is)
  and an input that is not padding;
- ``label_weight`` × the student's own cross-entropy on the labels;
- ``hidden_weight`` × the mean squared error between student and teacher hidden states of the
  layers in ``layer_map`` (student layer → teacher layer; identity when depths match), each layer's
  output before the final norm (transformers returns the last one's after it). Head- and
  channel-pruned students keep the residual width, so their states are compared as they are (the
  identity projection); where the width differs (SliceGPT slices and rotates the residual stream)
  the student's state goes through a learned linear map to the teacher's width first (Minitron's
  intermediate-state loss, Muralidharan et al. 2024): one per mapped layer, fitted by least squares
  on the first batch (so the loss starts at what the student can already match), then trained with
  the student (a parameter group of the Trainer's optimizer), saved in each checkpoint beside the
  optimizer (``hidden_projections.safetensors``, so a resumed run continues them) and discarded after training;
- ``exit_weight`` × T² · KL(p_final ‖ p_exit): recovery of an early-exit path (LayerSkip, Elhoushi
  et al. 2024, trained here as self-distillation): the logits read after decoder layer
  ``exit_layer`` through the shared final norm and LM head are pulled towards the model's own
  final logits (detached), which raises the draft acceptance of ``generate(assistant_early_exit=k)``
  without a teacher model.

``layer_dropout`` (LayerSkip's other half, Elhoushi et al. 2024 Sec. 4.1) skips, while training,
decoder layer l of L for each sequence with probability p_max · (e^{l·ln2/(L−1)} − 1): never the
first, p_max for the last. A model trained so relies less on its later layers, so an early exit
agrees more with the full model; it composes with every loss above.

The teacher runs frozen in eval mode on its own device (``teacher_device``; any model that returns
logits, e.g. one loaded in 8-bit). Instead of keeping it resident, ``add_teacher_top_k`` stores its
top-k logits per position as dataset columns (Arrow files on disk); the loss then uses the teacher
distribution truncated to those k tokens and renormalised. ``trainer.precompute_teacher_top_k()``
does that to the training set a Trainer built (``SFTTrainer`` tokenises its own) and pads the
columns beside its collator, which would otherwise drop or fail to pad them. ``DistillationMixin`` adds the loss to
any Trainer subclass (TRL's ``SFTTrainer``, LLaMA-Factory's trainers); masks of pruned weights are
kept by ``PruningCallback`` as in any other run.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterator

import torch
from torch import nn
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from transformers import Trainer

from .adapters import get_adapter
from .distributed import all_reduce_sum, world
from .early_exit import check_exit_layers, exit_logits
from .options import coerce_scalar_fields

TOP_K_INDICES = "teacher_top_k_indices"
TOP_K_LOGITS = "teacher_top_k_logits"
HIDDEN_PROJECTIONS_NAME = "hidden_projections.safetensors"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillationConfig:
    """The recovery loss against a teacher: ``kd_weight`` × KL of the softened (``temperature``) distributions, its
    ``top_k`` tokens where set, plus ``label_weight`` × the labels' loss, ``hidden_weight`` × the distance of the hidden
    states ``layer_map`` pairs (student layer → teacher layer), and ``exit_weight`` × an early-exit draft's loss after
    ``exit_layer`` layers, with LayerSkip's ``layer_dropout``."""

    temperature: float = 2.0
    kd_weight: float = 1.0
    label_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: dict[int, int] = field(default_factory=dict)
    top_k: int | None = None  # truncate the live teacher's distribution too (the cache always is)
    exit_weight: float = 0.0
    exit_layer: int | None = None  # decoder layers the early-exit draft runs (see optimum_prune.early_exit)
    layer_dropout: float = 0.0  # LayerSkip's p_max: the last layer's skip probability while training

    def __post_init__(self) -> None:
        coerce_scalar_fields(self)
        if self.temperature <= 0:
            raise ValueError(f"DistillationConfig.temperature must be > 0, got {self.temperature}")
        weights = {
            "kd_weight": self.kd_weight, "label_weight": self.label_weight,
            "hidden_weight": self.hidden_weight, "exit_weight": self.exit_weight,
        }  # fmt: skip
        if any(w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(f"DistillationConfig weights must be >= 0 and not all 0, got {weights}")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError(f"DistillationConfig.top_k must be a positive number of tokens, got {self.top_k}")
        if self.exit_weight and self.exit_layer is None:
            raise ValueError("DistillationConfig.exit_weight trains an early exit: set exit_layer (the draft's decoder layers)")
        # Options only a weighted term reads would be silently ignored otherwise.
        if self.exit_layer is not None and not self.exit_weight:
            raise ValueError("DistillationConfig.exit_layer is the early exit exit_weight trains, and exit_weight is 0: set it, or drop exit_layer")
        if self.layer_map and not self.hidden_weight:
            raise ValueError("DistillationConfig.layer_map pairs the hidden states hidden_weight compares, and hidden_weight is 0: set it, or drop layer_map")
        if any(index < 0 for pair in self.layer_map.items() for index in pair):
            raise ValueError(f"DistillationConfig.layer_map pairs layer indices from 0 (student: teacher), got {self.layer_map}")
        if not 0 <= self.layer_dropout < 1:
            raise ValueError(f"DistillationConfig.layer_dropout must be in [0, 1) (the last layer's skip probability), got {self.layer_dropout}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    teacher_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """T² · mean over labelled next-token positions of KL(teacher ‖ student) at temperature T.

    ``teacher_logits`` are full-vocabulary logits ``[B, L, V]``, or with ``teacher_indices`` the
    teacher's top-k logits ``[B, L, k]`` at those token ids: the teacher distribution is then the
    softmax over the k tokens (renormalised) and the student's log-probabilities (over its whole
    vocabulary) are read at the same ids. The teacher is a fixed target: it gets no gradient.

    Positions are taken a chunk at a time, and each chunk's gradient is written as its loss is
    computed (as Liger-Kernel's fused losses do): what waits for backward is that gradient, one
    tensor of the student's dtype per labelled position and vocabulary entry. Through autograd,
    log-softmax and the KL product kept two fp32 tensors of that size (≈ 8 GB for 4 × 2,048 tokens
    of Llama-3's 128k vocabulary) and made several more on the way.
    """
    positions = (labels[:, 1:] != -100).nonzero()  # (row, position) pairs; position t predicts token t + 1
    return _TemperatureKL.apply(student_logits, teacher_logits.detach(), teacher_indices, positions, temperature)


# Vocabulary entries one chunk of positions holds in fp32 per buffer (128 MiB).
_CHUNK_ELEMENTS = 2**25


class _TemperatureKL(torch.autograd.Function):
    """``kd_loss``'s value and, for the student logits, its gradient T/N · (p_student − p_teacher)
    (p_teacher scattered over the vocabulary when truncated to top-k; it sums to 1 either way).
    The difference is kept unscaled: T/N and a loss scaler's factor come in backward, so an fp16
    student's small gradients do not underflow before the scaler raises them."""

    @staticmethod
    def forward(ctx: Any, student: torch.Tensor, teacher: torch.Tensor, indices: torch.Tensor | None, positions: torch.Tensor, temperature: float) -> torch.Tensor:
        count = max(len(positions), 1)
        rows_gradient = student.new_empty(len(positions), student.shape[-1]) if ctx.needs_input_grad[0] else None
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        step = max(1, _CHUNK_ELEMENTS // student.shape[-1])
        for start in range(0, len(positions), step):
            rows = tuple(positions[start : start + step].T)
            log_student = F.log_softmax(student[rows].float() / temperature, dim=-1)
            log_teacher = F.log_softmax(teacher[rows].float() / temperature, dim=-1)
            p_teacher = log_teacher.exp()
            ids = None if indices is None else indices[rows].long()
            total += (p_teacher * (log_teacher - (log_student if ids is None else log_student.gather(-1, ids)))).sum()
            if rows_gradient is not None:
                target = p_teacher if ids is None else torch.zeros_like(log_student).scatter_add_(-1, ids, p_teacher)
                rows_gradient[start : start + step] = log_student.exp() - target
        ctx.save_for_backward(rows_gradient, positions)
        ctx.student_shape, ctx.scale = student.shape, temperature / count
        return total / count * temperature**2

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        rows_gradient, positions = ctx.saved_tensors
        gradient = rows_gradient.new_zeros(ctx.student_shape)
        gradient[tuple(positions.T)] = rows_gradient * (grad_output * ctx.scale)
        return gradient, None, None, None, None


def distilled_labels(inputs: dict[str, Any]) -> torch.Tensor:
    """``labels`` where position t (which predicts token t + 1) is -100 also when input t is padding: a
    left-padded row's last pad position has a labelled next token, but no input of its own."""
    labels, mask = inputs["labels"], inputs.get("attention_mask")
    if mask is None or labels.shape != mask.shape:
        return labels
    shifted = labels[..., 1:].masked_fill(mask[..., :-1] == 0, -100)
    return torch.cat([labels[..., :1], shifted], dim=-1)


def _attended(inputs: dict[str, Any]) -> torch.Tensor:
    """Which positions of a batch hold tokens (its attention mask; all of them without one)."""
    mask = inputs.get("attention_mask")
    return mask.bool() if mask is not None else torch.ones_like(inputs["input_ids"], dtype=torch.bool)


def top_k_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of the ``k`` largest logits per position."""
    values, indices = logits.topk(k, dim=-1)
    return indices, values


class DistillationMixin:
    """Adds the distillation loss to a ``transformers.Trainer`` subclass (put it first in the bases)."""

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module | None = None,
        distillation: DistillationConfig | None = None,
        teacher_device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> None:
        distillation = distillation or DistillationConfig()
        # Everything that can refuse the arguments does so before Trainer.__init__, whose callbacks' on_init_end
        # change the model (PERP wraps its linears), and before the teacher is frozen or moved.
        given = _arguments_by_name(super().__init__, args, kwargs)
        model, training_args = given.get("model"), given.get("args")
        _check_trainer_arguments(distillation, training_args, given.get("compute_loss_func"))
        if distillation.exit_weight and model is not None:
            check_exit_layers(model, distillation.exit_layer)
        optimizer_given = (given.get("optimizers") or (None, None))[0] is not None
        projections = None if teacher is None or model is None else _teacher_checked(model, teacher, distillation, optimizer_given)
        super().__init__(*args, **kwargs)
        _check_trainer_arguments(distillation, self.args, self.compute_loss_func)  # one a trainer class sets itself
        if teacher is not None and model is None:  # built by model_init
            projections = _teacher_checked(self.model, teacher, distillation, optimizer_given)
        # compute_loss weighs each micro-batch by its share of the step's labelled positions
        # (num_items_in_batch), as transformers' own causal-LM loss does under gradient accumulation;
        # this tells the Trainer to count them and not to divide by the accumulation steps as well.
        self.model_accepts_loss_kwargs = True
        self.distillation = distillation
        self.teacher = teacher
        self.hidden_projections: nn.ModuleDict | None = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            if teacher_device is not None:
                teacher.to(teacher_device)
        if projections:
            self.hidden_projections = projections.to(next(self.model.parameters()).device)
            average_gradients_across_processes(self.hidden_projections.parameters())
            self._clip_projections_with_the_model()
        if not isinstance(self.data_collator, TopKPadding):  # stored top-k columns (add_teacher_top_k) padded as the rows
            self.data_collator = TopKPadding(self.data_collator, required=False)
        self._projections_fitted = False
        self._projection_gradients_step: int | None = None
        self._attended_in_step: Any = None  # the step's attended positions (see _get_num_items_in_batch)
        self._logged_terms: dict[str, list[torch.Tensor]] = {}  # each loss term per micro-batch since the last log

    def create_accelerator_and_postprocess(self) -> None:
        """Also where ``hyperparameter_search`` builds the accelerator again for each trial."""
        super().create_accelerator_and_postprocess()
        if getattr(self, "hidden_projections", None):
            self._clip_projections_with_the_model()

    def _clip_projections_with_the_model(self) -> None:
        """``max_grad_norm`` bounds one norm over everything the optimizer steps: the Trainer clips
        ``model.parameters()`` through the accelerator, so its clip takes the projections along. FSDP and DeepSpeed
        clip their sharded model their own way (they would not take a list of other parameters): there the
        projections stay unclipped."""
        accelerator = self.accelerator
        if self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return
        clip_model = accelerator.clip_grad_norm_

        def clip_with_projections(parameters: Iterator[nn.Parameter], max_norm: float, norm_type: float = 2) -> torch.Tensor:
            return clip_model([*parameters, *self.hidden_projections.parameters()], max_norm, norm_type=norm_type)

        accelerator.clip_grad_norm_ = clip_with_projections

    def precompute_teacher_top_k(self, batch_size: int = 1) -> None:
        """Store the teacher's top-k logits (``DistillationConfig.top_k``) with the training and evaluation
        sets, as the Trainer built them (e.g. after ``SFTTrainer`` tokenised them), pad them in each batch
        beside the Trainer's own collator, and drop the teacher: it is not resident while the student trains."""
        if self.teacher is None or self.distillation.top_k is None:
            raise ValueError("precompute_teacher_top_k needs the teacher and DistillationConfig.top_k")
        annotate = partial(add_teacher_top_k, teacher=self.teacher, k=self.distillation.top_k, batch_size=batch_size)
        self.train_dataset = annotate(self.train_dataset)
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {name: annotate(dataset) for name, dataset in self.eval_dataset.items()}
        elif self.eval_dataset is not None:
            self.eval_dataset = annotate(self.eval_dataset)
        collator = self.data_collator.collator if isinstance(self.data_collator, TopKPadding) else self.data_collator
        self.data_collator = TopKPadding(collator)
        self.teacher = None

    def create_optimizer(self) -> torch.optim.Optimizer:
        """The Trainer's optimizer, plus the learned width projections (if any) as their own group."""
        optimizer = super().create_optimizer()
        if self.hidden_projections:
            optimizer.add_param_group({"params": list(self.hidden_projections.parameters()), "weight_decay": 0.0})
        return optimizer

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Checkpoints hold the width projections beside the optimizer's moments for them: a resumed run
        would otherwise refit them from its first batch and apply the saved moments to the refitted maps."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.hidden_projections and self.args.should_save:
            save_file(self.hidden_projections.state_dict(), os.path.join(output_dir, HIDDEN_PROJECTIONS_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self.hidden_projections:
            return
        path = os.path.join(checkpoint, HIDDEN_PROJECTIONS_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "%s has no %s (it was not saved by a DistillationTrainer with width projections): they are refitted on "
                "the first batch, so the resumed run differs from an uninterrupted one",
                checkpoint, HIDDEN_PROJECTIONS_NAME,
            )  # fmt: skip
            return
        device = next(self.hidden_projections.parameters()).device
        self.hidden_projections.load_state_dict(load_file(path, device=str(device)))
        self._projections_fitted = True

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        for column in (TOP_K_INDICES, TOP_K_LOGITS):  # keep the cached teacher outputs in the batches
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch: Any = None):
        config = self.distillation
        cached = (inputs.pop(TOP_K_INDICES, None), inputs.pop(TOP_K_LOGITS, None))
        if inputs.get("labels") is None:
            raise ValueError("distillation needs 'labels' in the batches (they mark the positions to distil)")
        labels = distilled_labels(inputs)
        labelled = (labels[:, 1:] != -100).sum()  # the next-token positions the label and KD terms average over
        hidden = config.hidden_weight > 0
        unwrapped = self.accelerator.unwrap_model(model, keep_torch_compile=False)  # DDP's and compile's wrappers hide the model's structure
        dropping = layer_dropout(unwrapped, config.layer_dropout) if model.training and config.layer_dropout else nullcontext()
        model_inputs = {**inputs, "output_hidden_states": hidden or bool(config.exit_weight)}
        with dropping, (last_layer_output(unwrapped) if hidden else nullcontext([])) as student_last:
            if config.label_weight:  # the Trainer's own label loss (label smoothing; a subclass's, e.g. SFTTrainer's metrics)
                label_loss, outputs = super().compute_loss(model, model_inputs, return_outputs=True)  # this micro-batch's mean
            else:  # the model need not compute a label loss (it upcasts every logit to fp32 for it)
                outputs = model(**{name: value for name, value in model_inputs.items() if name != "labels"})
        loss = outputs.logits.new_zeros(())
        terms: dict[str, torch.Tensor] = {}  # each term unweighted, for the training logs
        if config.label_weight:  # with no labelled position the model's mean is 0/0: a zero that keeps the graph
            terms["label_loss"] = label_loss if bool(labelled) else outputs.logits.sum() * 0
            loss = loss + config.label_weight * terms["label_loss"]
        if config.exit_weight:
            draft_logits = exit_logits(unwrapped, outputs.hidden_states[config.exit_layer])
            terms["exit_loss"] = kd_loss(draft_logits, outputs.logits.detach(), labels, config.temperature)
            loss = loss + config.exit_weight * terms["exit_loss"]
        if config.kd_weight or hidden:
            teacher_outputs, indices, logits = self._teacher_targets(inputs, cached, hidden)
            if config.kd_weight:
                terms["kd_loss"] = kd_loss(outputs.logits, logits.to(outputs.logits.device), labels, config.temperature, indices)
                loss = loss + config.kd_weight * terms["kd_loss"]
        hidden_term = None
        if hidden:
            student_hidden = (*outputs.hidden_states[:-1], student_last[0])
            terms["hidden_loss"] = self._hidden_loss(student_hidden, teacher_outputs.hidden_states, inputs)
            hidden_term = config.hidden_weight * terms["hidden_loss"]
        if model.training:
            for name, term in terms.items():
                self._logged_terms.setdefault(name, []).append(term.detach())
        if num_items_in_batch is not None:  # each term weighs by this micro-batch's share of what it averages over
            loss = loss * self._share_of_step(labelled, num_items_in_batch)
            if hidden_term is not None:
                hidden_term = hidden_term * self._share_of_step(_attended(inputs).sum(), self._attended_in_step)
        if hidden_term is not None:
            loss = loss + hidden_term
        if return_outputs and not inputs.get("output_hidden_states") and outputs.get("hidden_states") is not None:
            # asked for by the losses only: evaluation would gather them with the logits as predictions
            outputs = type(outputs)(**{name: value for name, value in outputs.items() if name != "hidden_states"})
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs also get each loss term's mean over the micro-batches since the last log (unweighted:
        ``label_loss``, ``kd_loss``, ``exit_loss``, ``hidden_loss``), so that one can tell which term moves."""
        if "loss" in logs:
            for name, values in self._logged_terms.items():
                logs[name] = round(float(torch.stack([value.float() for value in values]).mean()), 4)
            self._logged_terms.clear()
        super().log(logs, *args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        """The step's labelled next-token positions, which the losses average over (the Trainer counts
        unshifted labels), over its micro-batches and, with ``average_tokens_across_devices``, processes;
        with a hidden-state term, its attended positions too (``_attended_in_step``), which that term averages over."""
        if self.distillation.hidden_weight:  # counted as labels are: the Trainer's count also gathers over processes
            attended = [{"labels": torch.where(_attended(batch), 0, -100)} for batch in batch_samples]
            self._attended_in_step = super()._get_num_items_in_batch(attended, device)
        return super()._get_num_items_in_batch([{"labels": distilled_labels(batch)[..., 1:]} for batch in batch_samples if "labels" in batch], device)

    def _share_of_step(self, count: torch.Tensor, step_total: Any) -> torch.Tensor:
        """The weight that turns this micro-batch's mean into its part of a mean over the whole step: the
        positions it averaged over (``count``) over the step's, times the processes when the count spans them
        (DDP averages gradients), as the Trainer scales its own loss."""
        share = count / torch.as_tensor(step_total, device=count.device).clamp(min=1)
        if self.args.average_tokens_across_devices:
            share = share * (self.accelerator.num_processes if self.args.n_gpu <= 1 else self.args.n_gpu)
        return share

    def _teacher_targets(self, inputs: dict[str, Any], cached: tuple, hidden: bool) -> tuple[Any, torch.Tensor | None, torch.Tensor]:
        indices, logits = cached
        if logits is not None and not hidden:
            return None, indices.to(inputs["labels"].device), logits
        if self.teacher is None:
            raise ValueError(
                "distillation needs a teacher: pass teacher= or add its top-k logits to the dataset with add_teacher_top_k "
                "(hidden-state losses always need the live teacher)"
            )
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            teacher_inputs = {name: value.to(device) for name, value in inputs.items() if name != "labels"}
            with last_layer_output(self.teacher) if hidden else nullcontext([]) as teacher_last:
                teacher_outputs = self.teacher(**teacher_inputs, output_hidden_states=hidden)
        if hidden:
            teacher_outputs.hidden_states = (*teacher_outputs.hidden_states[:-1], teacher_last[0])
        logits = teacher_outputs.logits
        indices = None
        if self.distillation.top_k is not None:
            indices, logits = top_k_logits(logits, self.distillation.top_k)
            indices = indices.to(inputs["labels"].device)
        return teacher_outputs, indices, logits

    def _hidden_loss(self, student_hidden: tuple[torch.Tensor, ...], teacher_hidden: tuple[torch.Tensor, ...], inputs: dict[str, Any]) -> torch.Tensor:
        # hidden_states[0] is the embedding output; layer i's output is hidden_states[i + 1].
        layer_map = self.distillation.layer_map or _identity_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
        mask = inputs.get("attention_mask")
        training = torch.is_grad_enabled()  # evaluation runs under no_grad
        if self.hidden_projections and training and self._projection_gradients_step != self.state.global_step:
            # The Trainer zeroes only the model's gradients after each optimizer step; the projections live
            # outside the model, so theirs are zeroed here, on the first micro-batch of each step.
            self.hidden_projections.zero_grad(set_to_none=True)
            self._projection_gradients_step = self.state.global_step
        losses = []
        for student_layer, teacher_layer in layer_map.items():
            s, t = student_hidden[student_layer + 1].float(), teacher_hidden[teacher_layer + 1].to(student_hidden[0].device).float()
            if self.hidden_projections and str(student_layer) in self.hidden_projections:
                projection = self.hidden_projections[str(student_layer)]
                if not self._projections_fitted:
                    if not training:  # an evaluation before training: a copy fitted on this batch; training fits its own
                        projection = copy.deepcopy(projection)
                    _fit_projection(projection, s, t, mask)
                s = projection(s)
            error = (s - t).pow(2).mean(-1)
            losses.append(error[mask.bool()].mean() if mask is not None else error.mean())
        self._projections_fitted = self._projections_fitted or training
        return torch.stack(losses).mean()


@contextmanager
def last_layer_output(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While active, the yielded list receives the last decoder layer's output at each forward: transformers
    returns the last layer's hidden state after the final norm and every other before it, so a student's last
    layer mapped to a teacher's middle one compared a normalised state with a raw one."""
    captured: list[torch.Tensor] = []

    def keep(_module: nn.Module, _args: tuple, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = get_adapter(model).decoder_layers()[-1].register_forward_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def layer_dropout_rates(num_layers: int, p_max: float) -> list[float]:
    """LayerSkip's per-layer skip probabilities p_max · (e^{l·ln2/(L−1)} − 1), l = 0 … L−1."""
    if num_layers == 1:
        return [0.0]
    return [p_max * (math.exp(l * math.log(2) / (num_layers - 1)) - 1) for l in range(num_layers)]


@contextmanager
def layer_dropout(model: nn.Module, p_max: float) -> Iterator[None]:
    """While active, each decoder layer passes each sequence's hidden states through unchanged with its
    ``layer_dropout_rates`` probability (the layer still runs; its output is discarded for those sequences)."""
    layers = get_adapter(model).decoder_layers()

    def dropping(rate: float):
        def hook(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            entering = args[0] if args else kwargs["hidden_states"]
            leaving = output[0] if isinstance(output, tuple) else output
            skipped = torch.rand(entering.shape[0], device=entering.device, dtype=torch.float32) < rate
            kept = torch.where(skipped.view(-1, *([1] * (entering.dim() - 1))), entering, leaving)
            return (kept, *output[1:]) if isinstance(output, tuple) else kept

        return hook

    handles = [
        layer.register_forward_hook(dropping(rate), with_kwargs=True)
        for layer, rate in zip(layers, layer_dropout_rates(len(layers), p_max))
        if rate > 0
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class DistillationTrainer(DistillationMixin, Trainer):
    """``transformers.Trainer`` with the distillation loss."""


def add_teacher_top_k(dataset: Any, teacher: nn.Module, k: int = 64, batch_size: int = 8) -> Any:
    """``dataset`` (a ``datasets.Dataset`` with ``input_ids``, of any lengths) with the teacher's top-k
    logits per position as two columns; ``datasets`` writes them to its Arrow cache on disk
    (``save_to_disk`` keeps them), so training needs no resident teacher."""
    device = next(teacher.parameters()).device
    teacher.eval()

    def annotate(batch: dict[str, list]) -> dict[str, list]:
        # Rows of different lengths run padded on the right (causal attention: a row's positions never see
        # the padding after them), then each row's results are cut back to its own length.
        lengths = [len(ids) for ids in batch["input_ids"]]
        longest = max(lengths)
        masks = batch.get("attention_mask") or [[1] * n for n in lengths]
        with torch.no_grad():
            ids = torch.tensor([row + [0] * (longest - len(row)) for row in batch["input_ids"]], device=device)
            mask = torch.tensor([row + [0] * (longest - len(row)) for row in masks], device=device)
            indices, values = top_k_logits(teacher(input_ids=ids, attention_mask=mask).logits, k)
        indices, values = indices.int().cpu().tolist(), values.float().cpu().tolist()
        return {TOP_K_INDICES: [row[:n] for row, n in zip(indices, lengths)], TOP_K_LOGITS: [row[:n] for row, n in zip(values, lengths)]}

    from datasets import IterableDataset

    described = {} if isinstance(dataset, IterableDataset) else {"desc": "Teacher top-k logits"}  # streamed: lazily, no bar
    return dataset.map(annotate, batched=True, batch_size=batch_size, **described)


class TopKPadding:
    """A Trainer's collator, plus the stored teacher columns padded to the batch's length on the side
    the collator padded each row's tokens (collators differ: TRL's pads right whatever the tokenizer
    says). Padded positions are never distilled (``compute_loss``)."""

    def __init__(self, collator: Any, required: bool = True) -> None:
        self.collator = collator
        self.required = required  # False: batches without stored columns go to the collator as they are (a live teacher)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        if not self.required and all(TOP_K_INDICES not in feature for feature in features):
            return self.collator(features)
        if any(TOP_K_INDICES not in feature for feature in features):
            raise ValueError(
                "a batch has no stored teacher top-k logits (the teacher was dropped by precompute_teacher_top_k): give "
                "the Trainer every evaluation set (eval_dataset=) before calling precompute_teacher_top_k"
            )
        stored = [(feature.pop(TOP_K_INDICES), feature.pop(TOP_K_LOGITS)) for feature in features]
        tokens = [list(feature["input_ids"]) for feature in features]
        batch = self.collator(features)
        rows, length = batch["input_ids"].shape
        if rows != len(features):
            raise ValueError(
                "stored teacher top-k logits need one batch row per example; packed or padding-free batches "
                "(padding_free / packing) are not supported with them: turn those off, or keep the live teacher"
            )
        k = len(stored[0][0][0])
        indices = torch.zeros(rows, length, k, dtype=torch.long)
        logits = torch.zeros(rows, length, k, dtype=torch.float32)
        for row, ((row_indices, row_logits), row_tokens) in enumerate(zip(stored, tokens)):
            n = len(row_indices)
            collated = batch["input_ids"][row].tolist()
            if collated[:n] == row_tokens:
                place = slice(0, n)
            elif collated[length - n :] == row_tokens:
                place = slice(length - n, length)
            else:
                raise ValueError(
                    f"the data collator changed the tokens of batch row {row} (not only padded them): the stored teacher "
                    "top-k logits cannot be placed beside them; keep the live teacher with this collator"
                )
            indices[row, place], logits[row, place] = torch.tensor(row_indices), torch.tensor(row_logits)
        return {**batch, TOP_K_INDICES: indices, TOP_K_LOGITS: logits}


def _hidden_projections(student: nn.Module, teacher: nn.Module, layer_map: dict[int, int]) -> nn.ModuleDict:
    """``Linear(student width → teacher width)`` for each mapped layer whose widths differ, keyed by
    the student layer (zero until ``_fit_projection``); the widths are read from one token through both models."""
    widths = []
    with torch.no_grad():
        for model in (student, teacher):
            device = next(model.parameters()).device
            hidden = model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=device), output_hidden_states=True).hidden_states
            widths.append([state.shape[-1] for state in hidden[1:]])
    mapping = layer_map or _identity_map(len(widths[0]), len(widths[1]))
    outside = {s: t for s, t in mapping.items() if s >= len(widths[0]) or t >= len(widths[1])}
    if outside:
        raise ValueError(
            f"DistillationConfig.layer_map {outside} names layers past the student's {len(widths[0])} or the teacher's "
            f"{len(widths[1])} decoder layers (indices from 0)"
        )
    projections = nn.ModuleDict()
    for student_layer, teacher_layer in mapping.items():
        student_width, teacher_width = widths[0][student_layer], widths[1][teacher_layer]
        if student_width != teacher_width:
            projection = nn.Linear(student_width, teacher_width, bias=False)
            nn.init.zeros_(projection.weight)
            projections[str(student_layer)] = projection
    return projections.to(next(student.parameters()).device)


def _fit_projection(projection: nn.Linear, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> None:
    """Set ``projection`` to the ridge least-squares map from the student's states to the teacher's (under
    DDP, on every process's first batch: the sums are all-reduced, so every process fits the same map)."""
    keep = mask.bool() if mask is not None else torch.ones(student.shape[:-1], dtype=torch.bool, device=student.device)
    with torch.no_grad():
        x, y = student.detach()[keep].double(), teacher[keep].double()
        gram, cross = x.T @ x, x.T @ y
        all_reduce_sum(gram, cross)
        gram.diagonal().add_(1e-2 * gram.diagonal().mean() + 1e-8)  # ridge: a batch may not span the student's width
        projection.weight.copy_(torch.linalg.solve(gram, cross).T.to(projection.weight.dtype))


def average_gradients_across_processes(parameters: Iterator[nn.Parameter]) -> None:
    """Under DDP, average these parameters' gradients over the processes as DDP does for the model's: the
    projections live outside the wrapped model, so each process would otherwise train its own."""
    size = world()[1]
    if size == 1:
        return

    def averaged(gradient: torch.Tensor) -> torch.Tensor:
        gradient = gradient.clone()
        all_reduce_sum(gradient)
        return gradient / size

    for parameter in parameters:
        parameter.register_hook(averaged)


def _identity_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    if student_layers != teacher_layers:
        raise ValueError(
            f"the student has {student_layers} layers and the teacher {teacher_layers}: hidden-state distillation "
            "needs DistillationConfig.layer_map (student layer -> teacher layer, e.g. the kept teacher layers)"
        )
    return {i: i for i in range(student_layers)}


def _arguments_by_name(init: Callable[..., None], args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments the trainer class after the mixin gets, by name: transformers' ``Trainer`` binds ``model`` and
    ``args`` positionally, LLaMA-Factory's trainers take them through ``**kwargs``; a class taking ``*args`` passes
    them on to ``Trainer``, whose names they then have."""
    signature = inspect.signature(init)
    if any(parameter.kind is inspect.Parameter.VAR_POSITIONAL for parameter in signature.parameters.values()):
        trainer = inspect.signature(Trainer.__init__)
        signature = trainer.replace(parameters=list(trainer.parameters.values())[1:])  # without self
    given = signature.bind_partial(*args, **kwargs).arguments
    for name, parameter in signature.parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD:
            given.update(given.pop(name, {}))
    return given


def _check_trainer_arguments(distillation: DistillationConfig, training_args: Any, compute_loss_func: Any) -> None:
    if compute_loss_func is not None:
        raise ValueError(
            "DistillationTrainer computes its own loss (label, KD, exit and hidden-state terms, each a micro-batch "
            "mean): compute_loss_func would replace only the label term and change how gradient accumulation scales "
            "it; add a custom term by overriding compute_loss in a subclass instead"
        )
    if distillation.layer_dropout and getattr(training_args, "gradient_checkpointing", False):
        raise ValueError(
            "DistillationConfig.layer_dropout skips layers with hooks that checkpointing's recomputation in backward "
            "would not see (gradients through the skipped layers): turn gradient_checkpointing off, or layer_dropout"
        )


def _teacher_checked(student: nn.Module, teacher: nn.Module, distillation: DistillationConfig, optimizer_given: bool) -> nn.ModuleDict | None:
    """Refuse a teacher the student cannot learn from; the width projections its hidden-state term trains, if any."""
    if {id(p) for p in teacher.parameters()} & {id(p) for p in student.parameters()}:
        raise ValueError(
            "the teacher shares parameters with the student (the same model object, or one wrapping it): freezing the "
            "teacher would freeze the student, and the student would learn from itself; pass a copy of the dense model "
            "made before pruning (copy.deepcopy(model)), or load it again"
        )
    _check_vocabularies(teacher, student)
    if not distillation.hidden_weight:
        return None
    projections = _hidden_projections(student, teacher, distillation.layer_map)
    if projections and optimizer_given:
        raise ValueError(
            "DistillationConfig.hidden_weight with widths that differ trains projections from the student's "
            "widths to the teacher's, which an optimizer passed as optimizers= does not hold: let the Trainer "
            "build its optimizer (create_optimizer adds them), or set hidden_weight=0"
        )
    return projections


def _check_vocabularies(teacher: nn.Module, student: nn.Module) -> None:
    sizes = [m.get_output_embeddings().out_features for m in (teacher, student)]
    if sizes[0] != sizes[1]:
        raise ValueError(
            f"teacher and student vocabularies differ ({sizes[0]} vs {sizes[1]} logits): distillation compares "
            "next-token distributions token by token, so both must share one tokenizer"
        )
