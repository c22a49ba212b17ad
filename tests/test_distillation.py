"""Knowledge-distillation recovery: the loss against a direct computation, a frozen teacher, the top-k cache."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from datasets import Dataset, load_from_disk
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback, TrainingArguments

from optimum_prune import PruningCallback, PruningConfig, prune, verify_sparsity
from optimum_prune import distillation
from optimum_prune.distillation import (
    DistillationConfig, DistillationTrainer, add_teacher_top_k, kd_loss, layer_dropout, layer_dropout_rates,
)  # fmt: skip
from optimum_prune.early_exit import choose_early_exit, exit_logits

from .conftest import tiny_model, token_windows


def direct_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Σ_v p_t(v) log(p_t(v) / p_s(v)) per position, written out with softmax and log."""
    p_teacher = torch.softmax(teacher / temperature, dim=-1)
    p_student = torch.softmax(student / temperature, dim=-1)
    return (p_teacher * (p_teacher.log() - p_student.log())).sum(-1)


def test_kd_loss_equals_the_direct_computation_with_temperature_and_masked_labels():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=generator), torch.randn(2, 5, 11, generator=generator)
    labels = torch.tensor([[1, 2, 3, -100, 4], [-100, 5, 6, 7, 8]])
    # Position t predicts token t+1: positions with a label at t+1 count.
    counted = labels[:, 1:] != -100
    expected = direct_kl(student[:, :-1], teacher[:, :-1], 3.0)[counted].mean() * 9.0
    assert kd_loss(student, teacher, labels, temperature=3.0) == pytest.approx(float(expected), rel=1e-5)


def test_top_k_truncation_renormalises_the_teacher_over_its_k_tokens():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(1, 4, 13, generator=generator), torch.randn(1, 4, 13, generator=generator)
    labels = torch.ones(1, 4, dtype=torch.long)
    values, indices = teacher.topk(3, dim=-1)
    p_teacher = torch.softmax(values[:, :-1] / 2.0, dim=-1)  # renormalised over the top 3
    log_student = F.log_softmax(student[:, :-1] / 2.0, dim=-1).gather(-1, indices[:, :-1])
    expected = (p_teacher * (p_teacher.log() - log_student)).sum(-1).mean() * 4.0
    assert kd_loss(student, values, labels, temperature=2.0, teacher_indices=indices) == pytest.approx(float(expected), rel=1e-5)


def autograd_kd_loss(student, teacher, labels, temperature, indices=None):
    """The loss written with autograd's log-softmax, as the reference for kd_loss's own gradient."""
    positions = labels[:, 1:] != -100
    log_student = F.log_softmax(student[:, :-1][positions].float() / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher[:, :-1][positions].float() / temperature, dim=-1)
    if indices is not None:
        log_student = log_student.gather(-1, indices[:, :-1][positions])
    return (log_teacher.exp() * (log_teacher - log_student)).sum(-1).mean() * temperature**2


@pytest.mark.parametrize("top_k", [None, 4])
def test_kd_loss_gradient_equals_autograd_through_log_softmax_in_chunks(monkeypatch, top_k):
    monkeypatch.setattr(distillation, "_CHUNK_ELEMENTS", 3 * 17)  # chunks of 3 positions: 9 labelled ones
    generator = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(2, 6, 17, generator=generator), torch.randn(2, 6, 17, generator=generator)
    labels = torch.tensor([[5, 1, -100, 2, 3, -100], [-100, 4, 4, 6, 7, 8]])
    indices = None
    if top_k:
        teacher, indices = teacher.topk(top_k, dim=-1)
    weight = 0.7  # the loss enters the training loss scaled, as kd_weight does
    ours = student.clone().requires_grad_(True)
    (weight * kd_loss(ours, teacher, labels, 2.0, indices)).backward()
    reference = student.clone().requires_grad_(True)
    (weight * autograd_kd_loss(reference, teacher, labels, 2.0, indices)).backward()
    torch.testing.assert_close(ours.grad, reference.grad)
    assert ours.grad[0, 1].abs().sum() == 0 and ours.grad[:, -1].abs().sum() == 0  # unlabelled next tokens, last position
    assert ours.grad[1, 0].abs().sum() > 0


def test_kd_loss_keeps_only_the_student_dtype_gradient_rows_for_backward():
    """Autograd through log-softmax kept two fp32 [positions, vocabulary] tensors until backward."""
    student = torch.randn(2, 8, 100, dtype=torch.bfloat16, requires_grad=True)
    teacher, labels = torch.randn(2, 8, 100, dtype=torch.bfloat16), torch.ones(2, 8, dtype=torch.long)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor) or tensor, lambda tensor: tensor):
        loss = kd_loss(student, teacher, labels, 2.0)
    vocabulary_wide = [tensor for tensor in saved if tensor.shape[-1] == 100]
    assert [(t.dtype, tuple(t.shape)) for t in vocabulary_wide] == [(torch.bfloat16, (14, 100))]
    loss.backward()
    reference = student.detach().float().requires_grad_(True)
    autograd_kd_loss(reference, teacher.float(), labels, 2.0).backward()
    torch.testing.assert_close(student.grad.float(), reference.grad, atol=1e-4, rtol=2e-2)


def test_an_fp16_students_small_gradients_survive_until_the_loss_scaler():
    """T/N and the scaler's factor are applied in backward: with 4,096 positions, differences of
    p_student − p_teacher ≈ 3e-5 times T/N ≈ 2.4e-4 underflow fp16 if stored so."""
    student = torch.zeros(1, 4097, 8, dtype=torch.float16)
    student[..., 0] = 10.0  # the other entries: p_student ≈ 4.5e-5
    teacher = torch.full_like(student, 0.5)
    teacher[..., 0] = 10.0  # p_teacher ≈ 7.5e-5
    student.requires_grad_(True)
    labels = torch.ones(1, 4097, dtype=torch.long)
    (kd_loss(student, teacher, labels, 1.0) * 2.0**16).backward()  # GradScaler's initial factor
    reference = student.detach().float().requires_grad_(True)
    (autograd_kd_loss(reference, teacher.float(), labels, 1.0) * 2.0**16).backward()
    assert (reference.grad[0, :-1, 1:].abs() > 1e-4).all()
    torch.testing.assert_close(student.grad.float(), reference.grad, atol=1e-5, rtol=1e-2)


def dataset(samples: int = 16, seq_len: int = 16) -> Dataset:
    ids = token_windows(samples=samples, seq_len=seq_len, seed=5)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def training_args(tmp_path, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip


def teacher_student():
    teacher = tiny_model(seed=0)
    with torch.no_grad():  # a random model is nearly uniform; sharpen its next-token distributions
        teacher.lm_head.weight.mul_(30)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="magnitude", sparsity="2:4"))
    return teacher, student


def mean_kl(student, teacher, ids) -> float:
    with torch.no_grad():
        return float(kd_loss(student(input_ids=ids).logits, teacher(input_ids=ids).logits, ids, temperature=1.0))


def test_training_moves_the_student_towards_a_frozen_teacher_and_keeps_the_masks(tmp_path):
    teacher, student = teacher_student()
    teacher_state = {name: tensor.clone() for name, tensor in teacher.state_dict().items()}
    ids = token_windows(samples=4, seq_len=16, seed=9)
    before = mean_kl(student, teacher, ids)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(temperature=1.0, hidden_weight=0.1),
        args=training_args(tmp_path, 12), train_dataset=dataset(), callbacks=[PruningCallback()],
    )  # fmt: skip
    trainer.train()
    assert mean_kl(student, teacher, ids) < before
    assert all(torch.equal(tensor, teacher_state[name]) for name, tensor in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert verify_sparsity(student, "2:4")["conforming"]


@pytest.mark.parametrize("config", [
    DistillationConfig(temperature=1.0, label_weight=0.5, exit_weight=0.5, exit_layer=1),
    DistillationConfig(kd_weight=0.0, hidden_weight=1.0),
])  # fmt: skip
def test_gradient_accumulation_averages_over_the_steps_labelled_tokens(tmp_path, config):
    """As transformers' own loss under gradient accumulation: one batch of 4 and two accumulated batches
    of 2 log the same loss and leave the same weights, also when the samples hold different numbers of
    labelled tokens (every pairing here gives the two micro-batches different counts). The hidden-state
    term, a mean over attended positions, weighs by its share of those (it took the labelled share)."""
    teacher, _ = teacher_student()
    ids = token_windows(samples=4, seq_len=16, seed=5)
    labels = ids.clone()
    for row, labelled in enumerate((16, 10, 5, 2)):
        labels[row, : 16 - labelled] = -100
    train_dataset = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        student = teacher_student()[1]
        args = training_args(tmp_path, 1)
        args.per_device_train_batch_size, args.gradient_accumulation_steps = batch, accumulation
        trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=args, train_dataset=train_dataset)
        trainer.train()
        runs.append((trainer.state.log_history[0]["loss"], student.model.layers[0].mlp.up_proj.weight.detach().clone()))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-4)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("label_weight", [0.0, 0.5])
def test_the_student_computes_its_own_label_loss_only_when_it_is_weighted(tmp_path, label_weight):
    """transformers' causal-LM loss copies every logit to fp32: without label_weight the labels stay out of the forward."""
    teacher, student = teacher_student()
    config = DistillationConfig(temperature=1.0, label_weight=label_weight)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=training_args(tmp_path, 1), train_dataset=dataset())
    ids = token_windows(samples=2, seq_len=16, seed=9)
    student_calls = []
    student.register_forward_pre_hook(lambda _module, _args, kwargs: student_calls.append(set(kwargs)), with_kwargs=True)
    loss, outputs = trainer.compute_loss(student, {"input_ids": ids, "labels": ids}, return_outputs=True)
    assert ("labels" in student_calls[0]) == bool(label_weight) and (outputs.loss is not None) == bool(label_weight)
    expected = kd_loss(outputs.logits, teacher(input_ids=ids).logits, ids, 1.0) + (label_weight * outputs.loss if label_weight else 0)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


def test_a_sliced_student_learns_projections_to_the_teachers_width(tmp_path):
    """SliceGPT narrows (and rotates) the residual stream: the hidden-state loss maps each student
    state to the teacher's width through a projection fitted on the first batch, then trained with it."""
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    config = DistillationConfig(temperature=1.0, kd_weight=0.0, hidden_weight=1.0)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=training_args(tmp_path, 12), train_dataset=dataset())
    width = teacher.config.hidden_size
    assert len(trainer.hidden_projections) == teacher.config.num_hidden_layers
    assert all(p.weight.shape[0] == width and p.weight.shape[1] < width for p in trainer.hidden_projections.values())
    assert not any(p.weight.any() for p in trainer.hidden_projections.values())  # set by the first batch
    untrained = copy.deepcopy(student)
    trainer.train()
    held_out = token_windows(samples=4, seq_len=16, seed=9)
    batch = {"input_ids": held_out, "labels": held_out}
    with torch.no_grad():
        teacher_states = teacher(input_ids=held_out, output_hidden_states=True).hidden_states[1:]
        unprojected = float(torch.stack([state.pow(2).mean() for state in teacher_states]).mean())  # the loss with zero maps
        after = float(trainer.compute_loss(student, dict(batch)))
        assert after < 0.75 * unprojected
        assert after < float(trainer.compute_loss(untrained, dict(batch)))  # the student moved, not only the maps
    assert not any("hidden_projections" in name for name in student.state_dict())  # training-only


def test_width_projection_gradients_start_from_zero_at_every_optimizer_step(tmp_path):
    """The Trainer zeroes only the model's gradients: with one batch repeated and no update (lr 0),
    each step's projection gradient is the same, not the sum of every step's so far."""
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    row = token_windows(samples=1, seq_len=16, seed=5)[0].tolist()
    args = training_args(tmp_path, 3)
    args.learning_rate, args.gradient_accumulation_steps, args.per_device_train_batch_size = 0.0, 2, 2
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(kd_weight=0.0, hidden_weight=1.0), args=args,
        train_dataset=Dataset.from_dict({"input_ids": [row] * 12, "labels": [row] * 12}),
    )  # fmt: skip
    gradients = []

    class RecordGradients(TrainerCallback):
        def on_step_end(self, *_args, **_kwargs) -> None:
            gradients.append([p.grad.clone() for p in trainer.hidden_projections.parameters()])

    trainer.add_callback(RecordGradients())
    trainer.train()
    assert len(gradients) == 3 and all(float(g.abs().sum()) > 0 for g in gradients[0])
    for later in gradients[1:]:
        for first, gradient in zip(gradients[0], later):  # relative: these gradients are ~1e-7, below assert_close's atol
            torch.testing.assert_close(gradient, first, rtol=1e-3, atol=0)


def test_resuming_a_sliced_students_run_continues_its_width_projections(tmp_path):
    """The projections are training state like the optimizer's moments: a run resumed from a checkpoint
    ends where the uninterrupted run does (it refitted them from its first batch instead)."""
    teacher = tiny_model(seed=0)
    sliced = copy.deepcopy(teacher)
    prune(sliced, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    config = DistillationConfig(temperature=1.0, kd_weight=0.0, hidden_weight=1.0)
    runs = []
    for resume_from_checkpoint in (None, str(tmp_path / "run" / "checkpoint-3")):
        args = training_args(tmp_path, 6)
        args.save_strategy, args.save_steps = "steps", 3
        trainer = DistillationTrainer(model=copy.deepcopy(sliced), teacher=teacher, distillation=config, args=args, train_dataset=dataset())
        trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        runs.append(trainer)
    uninterrupted, resumed = runs
    for expected, actual in zip(uninterrupted.hidden_projections.parameters(), resumed.hidden_projections.parameters()):
        torch.testing.assert_close(actual, expected)
    for expected, actual in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        torch.testing.assert_close(actual, expected)


def test_width_projections_need_the_trainers_own_optimizer(tmp_path):
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="which an optimizer passed as optimizers= does not hold"):
        DistillationTrainer(
            model=student, teacher=teacher, distillation=DistillationConfig(hidden_weight=1.0), args=training_args(tmp_path, 1),
            train_dataset=dataset(), optimizers=(optimizer, None),
        )  # fmt: skip


@pytest.mark.parametrize("quantizer", ["quanto int8", "bitsandbytes int8"])
def test_a_teacher_quantized_to_8_bit_teaches_and_stays_frozen(quantizer, tmp_path):
    """The memory-aware teacher: quantized through the Optimum issue's paths (``compress`` with
    optimum-quanto, or bitsandbytes at load time), it still pulls the student towards it."""
    teacher, student = teacher_student()
    if quantizer == "quanto int8":
        pytest.importorskip("optimum.quanto")
        from transformers import QuantoConfig

        from optimum_prune import compress

        compress(teacher, [QuantoConfig(weights="int8")])
    else:
        pytest.importorskip("bitsandbytes")
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        teacher.save_pretrained(tmp_path / "teacher")
        teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    assert "quanto" in type(teacher.model.layers[0].mlp.up_proj).__module__ or "bitsandbytes" in type(teacher.model.layers[0].mlp.up_proj).__module__
    teacher_state = {name: tensor.clone() for name, tensor in teacher.state_dict().items() if isinstance(tensor, torch.Tensor)}
    ids = token_windows(samples=4, seq_len=16, seed=9)
    before = mean_kl(student, teacher, ids)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(temperature=1.0),
        args=training_args(tmp_path, 12), train_dataset=dataset(), callbacks=[PruningCallback()],
    )  # fmt: skip
    trainer.train()
    assert mean_kl(student, teacher, ids) < before
    assert all(torch.equal(tensor, teacher_state[name]) for name, tensor in teacher.state_dict().items() if name in teacher_state)
    assert verify_sparsity(student, "2:4")["conforming"]


def test_cached_top_k_round_trips_and_gives_the_live_teachers_loss(tmp_path):
    teacher, student = teacher_student()
    cached = add_teacher_top_k(dataset(samples=4), teacher, k=8)
    cached.save_to_disk(str(tmp_path / "cache"))
    reloaded = load_from_disk(str(tmp_path / "cache"))
    assert reloaded[0]["teacher_top_k_indices"] == cached[0]["teacher_top_k_indices"]

    config = DistillationConfig(temperature=2.0, top_k=8)
    live = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=training_args(tmp_path, 1))
    from_cache = DistillationTrainer(model=student, distillation=config, args=training_args(tmp_path, 1), train_dataset=reloaded)
    batch = next(iter(from_cache.get_train_dataloader()))  # the cached columns survive column pruning
    assert "teacher_top_k_logits" in batch
    plain = {name: batch[name] for name in ("input_ids", "labels")}
    with torch.no_grad():
        assert from_cache.compute_loss(student, dict(batch)) == pytest.approx(float(live.compute_loss(student, plain)), rel=1e-4)


def test_errors_name_the_fix(tmp_path):
    teacher = tiny_model(vocab_size=400)
    with pytest.raises(ValueError, match="vocabularies differ \\(400 vs 320 logits\\)"):
        DistillationTrainer(model=tiny_model(), teacher=teacher, args=training_args(tmp_path, 1))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        DistillationConfig(temperature=0)
    with pytest.raises(ValueError, match="not all 0"):
        DistillationConfig(kd_weight=0)
    with pytest.raises(ValueError, match="needs DistillationConfig.layer_map"):  # before any training
        DistillationTrainer(
            model=tiny_model(num_hidden_layers=2), teacher=tiny_model(), distillation=DistillationConfig(hidden_weight=1.0),
            args=training_args(tmp_path, 1),
        )  # fmt: skip
    checkpointing = training_args(tmp_path, 1)
    checkpointing.gradient_checkpointing = True
    with pytest.raises(ValueError, match="turn gradient_checkpointing off, or layer_dropout"):
        DistillationTrainer(model=tiny_model(), distillation=DistillationConfig(layer_dropout=0.2), args=checkpointing)
    ids = token_windows(samples=2, seq_len=8)
    no_teacher = DistillationTrainer(model=tiny_model(), args=training_args(tmp_path, 1))
    with pytest.raises(ValueError, match="distillation needs a teacher"):
        no_teacher.compute_loss(no_teacher.model, {"input_ids": ids, "labels": ids})


def distilling_sft_trainer(tmp_path, tokenizer, texts: list[str], steps: int, distillation: DistillationConfig, callbacks=()):
    """(TRL's SFTTrainer with DistillationMixin in front, on ``texts``, the pruned student)."""
    import trl

    from optimum_prune.distillation import DistillationMixin

    class DistillingSFTTrainer(DistillationMixin, trl.SFTTrainer):
        pass

    teacher, student = teacher_student()
    config = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-3,
        max_length=32, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillingSFTTrainer(
        model=student, teacher=teacher, distillation=distillation, args=config, train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer, callbacks=list(callbacks),
    )  # fmt: skip
    return trainer, student


def test_mixin_composes_with_trl_sft_trainer(tmp_path, bpe_tokenizer, monkeypatch):
    pytest.importorskip("trl")
    from optimum_prune import distillation
    from optimum_prune.data import wikipedia_articles

    kd_calls = []
    original_kd_loss = distillation.kd_loss
    monkeypatch.setattr(distillation, "kd_loss", lambda *args, **kwargs: kd_calls.append(1) or original_kd_loss(*args, **kwargs))

    texts = [article[:400] for article in wikipedia_articles("calibration")[:8]]
    trainer, student = distilling_sft_trainer(tmp_path, bpe_tokenizer, texts, 3, DistillationConfig(label_weight=0.5), callbacks=[PruningCallback()])
    trainer.train()
    assert len(kd_calls) == 3  # the mixin's compute_loss ran at every step, not SFTTrainer's own
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)
    assert verify_sparsity(student, "2:4")["conforming"]


def test_sft_trainer_trains_on_stored_teacher_top_k_without_the_teacher(tmp_path, bpe_tokenizer):
    """SFTTrainer tokenises its own dataset and its collator keeps only the columns it knows:
    precompute_teacher_top_k annotates what it built and pads the stored logits beside it."""
    pytest.importorskip("trl")
    from optimum_prune.data import wikipedia_articles
    from optimum_prune.distillation import TOP_K_INDICES

    texts = [article[: 60 + 40 * i] for i, article in enumerate(wikipedia_articles("calibration")[:6])]
    trainer, _ = distilling_sft_trainer(tmp_path, bpe_tokenizer, texts, 2, DistillationConfig(top_k=8, label_weight=0.0))
    trainer.precompute_teacher_top_k()
    assert trainer.teacher is None and TOP_K_INDICES in trainer.train_dataset.column_names
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 5)])  # unequal lengths: padded alike
    assert batch[TOP_K_INDICES].shape[:2] == batch["input_ids"].shape
    trainer.train()
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in trainer.state.log_history if "loss" in entry)


def test_stored_teacher_top_k_evaluates_as_the_live_teacher(tmp_path):
    """precompute_teacher_top_k annotates the evaluation sets too: the eval loss is the live teacher's;
    a set given only to evaluate() afterwards is a clear error, not a KeyError."""
    teacher, student = teacher_student()
    evaluation = {"wiki": dataset(samples=8), "more": dataset(samples=4, seq_len=12)}
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(top_k=8), args=training_args(tmp_path, 1),
        train_dataset=dataset(), eval_dataset=evaluation,
    )  # fmt: skip
    live = trainer.evaluate()
    trainer.precompute_teacher_top_k()
    stored = trainer.evaluate()
    assert trainer.teacher is None
    for name in evaluation:
        assert stored[f"eval_{name}_loss"] == pytest.approx(live[f"eval_{name}_loss"], rel=1e-5)
    with pytest.raises(ValueError, match="give the Trainer every evaluation set"):
        trainer.evaluate(dataset(samples=4))


def test_the_label_term_is_the_trainers_own_loss_with_label_smoothing(tmp_path):
    model, ids = tiny_model(), token_windows(samples=4, seq_len=16, seed=9)
    args = training_args(tmp_path, 1)
    args.label_smoothing_factor = 0.3
    plain = Trainer(model=model, args=args)
    distilling = DistillationTrainer(model=model, args=args, distillation=DistillationConfig(kd_weight=0.0, label_weight=1.0))
    with torch.no_grad():
        smoothed = float(plain.compute_loss(model, {"input_ids": ids, "labels": ids}))
        assert float(distilling.compute_loss(model, {"input_ids": ids, "labels": ids})) == pytest.approx(smoothed)
        assert smoothed != pytest.approx(float(model(input_ids=ids, labels=ids).loss))  # the smoothing changes it


def test_a_custom_loss_function_is_refused(tmp_path):
    with pytest.raises(ValueError, match="DistillationTrainer computes its own loss"):
        DistillationTrainer(model=tiny_model(), args=training_args(tmp_path, 1), compute_loss_func=lambda outputs, labels, **_: outputs.loss)


def test_exit_recovery_raises_the_draft_agreement(tmp_path):
    """Against the same training without the exit term (label loss only), the exit agrees more."""
    windows = token_windows(samples=4, seq_len=16)
    agreements = {}
    for exit_weight in (0.0, 1.0):
        model = tiny_model(num_hidden_layers=4)
        config = DistillationConfig(kd_weight=0.0, label_weight=1.0, exit_weight=exit_weight, exit_layer=2 if exit_weight else None)
        DistillationTrainer(model=model, distillation=config, args=training_args(tmp_path, 60), train_dataset=dataset()).train()
        report = choose_early_exit(model, windows, candidates=[2], num_samples=4, seq_len=16)
        agreements[exit_weight] = report.candidates[0].agreement
    assert agreements[1.0] > agreements[0.0], agreements


def test_layer_dropout_rates_rise_exponentially_from_zero_to_p_max():
    rates = layer_dropout_rates(5, 0.2)
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert rates[2] == pytest.approx(0.2 * (2**0.5 - 1))  # e^{l ln2 / (L-1)} - 1 at l = 2 of 5


def test_layer_dropout_skips_whole_sequences_at_the_layers_rate():
    """Two layers: the first is never skipped, the second with p_max — every sequence's logits are either
    the full model's or those of the first layer alone, in about that proportion."""
    model = tiny_model(num_hidden_layers=2)
    ids = token_windows(samples=1, seq_len=8).repeat(400, 1)
    with torch.no_grad():
        full = model(input_ids=ids[:1]).logits
        first_only = exit_logits(model, model(input_ids=ids[:1], output_hidden_states=True).hidden_states[1])
        torch.manual_seed(0)
        with layer_dropout(model, 0.3):
            dropped = model(input_ids=ids).logits
        after = model(input_ids=ids[:1]).logits
    is_full = [torch.allclose(row, full[0], atol=1e-5) for row in dropped]
    is_first_only = [torch.allclose(row, first_only[0], atol=1e-5) for row in dropped]
    assert all(a != b for a, b in zip(is_full, is_first_only))
    assert sum(is_first_only) / len(ids) == pytest.approx(0.3, abs=0.07)
    assert torch.equal(after, full)  # the hooks are gone


def test_training_with_layer_dropout_drops_while_training_only(tmp_path, monkeypatch):
    from optimum_prune import distillation

    hooked_steps = []
    original_layer_dropout = distillation.layer_dropout
    monkeypatch.setattr(distillation, "layer_dropout", lambda model, p: hooked_steps.append(p) or original_layer_dropout(model, p))
    model = tiny_model(num_hidden_layers=4)
    config = DistillationConfig(kd_weight=0.0, label_weight=1.0, exit_weight=1.0, exit_layer=2, layer_dropout=0.2)
    trainer = DistillationTrainer(model=model, distillation=config, args=training_args(tmp_path, 3), train_dataset=dataset())
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))
    assert hooked_steps == [0.2] * 3  # every training step ran with the layer-dropout hooks
    assert not any(layer._forward_hooks for layer in model.model.layers)  # and none is left behind
    fresh = tiny_model(num_hidden_layers=4)
    fresh.load_state_dict(model.state_dict())
    ids = token_windows(samples=2, seq_len=8)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, fresh(input_ids=ids).logits)


def test_a_compiled_student_distils_its_hidden_states_and_drops_layers(tmp_path):
    """Under torch_compile the student is wrapped in an OptimizedModule, which hid its layers from the adapter."""
    import dataclasses

    config = DistillationConfig(kd_weight=0.0, label_weight=1.0, hidden_weight=1.0, layer_dropout=0.2)
    args = dataclasses.replace(training_args(tmp_path, 2), torch_compile=True, torch_compile_backend="eager")
    teacher, student = teacher_student()
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=args, train_dataset=dataset())
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_exit_recovery_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="set exit_layer"):
        DistillationConfig(exit_weight=1.0)
    with pytest.raises(ValueError, match="layer_dropout must be in \\[0, 1\\)"):
        DistillationConfig(layer_dropout=1.0)
    with pytest.raises(ValueError, match="exit layer 4 must be an integer in \\[1, 3\\]"):
        DistillationTrainer(
            model=tiny_model(num_hidden_layers=4), distillation=DistillationConfig(exit_weight=1.0, exit_layer=4),
            args=training_args(tmp_path, 1), train_dataset=dataset(),
        )  # fmt: skip


def test_padding_positions_are_not_distilled():
    """Position t predicts token t + 1: a left-padded row's last pad position had a labelled next token and was
    distilled against whatever the teacher (or the zero-filled cache) held there."""
    from optimum_prune.distillation import distilled_labels

    labels = torch.tensor([[-100, -100, 5, 6], [3, 4, 5, -100]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    assert distilled_labels({"labels": labels, "attention_mask": mask}).tolist() == [[-100, -100, -100, 6], [3, 4, 5, -100]]


@pytest.mark.parametrize("side", ["right", "left"])
def test_stored_top_k_follow_the_side_the_collator_padded(side):
    """The side came from the tokenizer, which TRL's collator ignores (it pads right): a left-padding tokenizer
    put every short row's stored teacher logits beside the wrong tokens."""
    from optimum_prune.distillation import TopKPadding

    def collate(features):
        longest = max(len(f["input_ids"]) for f in features)
        pad = lambda row, value: [value] * (longest - len(row)) + row if side == "left" else row + [value] * (longest - len(row))  # noqa: E731
        return {
            "input_ids": torch.tensor([pad(f["input_ids"], 0) for f in features]),
            "labels": torch.tensor([pad(f["input_ids"], -100) for f in features]),
        }

    features = [
        {"input_ids": [5, 6, 7], "teacher_top_k_indices": [[1], [2], [3]], "teacher_top_k_logits": [[1.0], [2.0], [3.0]]},
        {"input_ids": [8], "teacher_top_k_indices": [[4]], "teacher_top_k_logits": [[4.0]]},
    ]
    batch = TopKPadding(collate)(features)
    expected = [[4], [0], [0]] if side == "right" else [[0], [0], [4]]
    assert batch["teacher_top_k_indices"][1].tolist() == expected and batch["teacher_top_k_indices"][0].tolist() == [[1], [2], [3]]


@pytest.mark.parametrize("streamed", [False, True])
def test_stored_top_k_of_rows_of_different_lengths_train_through_a_padding_collator(tmp_path, bpe_tokenizer, streamed):
    """Without precompute_teacher_top_k the stored columns reached the collator unpadded ("excessive nesting"); a
    streamed dataset could not be annotated at all."""
    from transformers import DataCollatorForLanguageModeling

    rows = [token_windows(1, n, seed=n)[0].clamp(min=1).tolist() for n in (12, 7, 9, 5)]
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    stored = add_teacher_top_k(dataset.to_iterable_dataset() if streamed else dataset, tiny_model(seed=0), k=8)
    trainer = DistillationTrainer(
        model=tiny_model(seed=1), args=training_args(tmp_path, 1), train_dataset=stored,
        data_collator=DataCollatorForLanguageModeling(bpe_tokenizer, mlm=False), distillation=DistillationConfig(temperature=2.0),
    )  # fmt: skip
    assert torch.isfinite(torch.tensor(trainer.train().training_loss))


def test_teacher_top_k_of_rows_of_different_lengths_in_one_batch_equal_one_row_at_a_time():
    teacher = tiny_model(seed=0)
    rows = Dataset.from_dict({"input_ids": [list(range(5, 21)), list(range(30, 39))]})
    together, alone = add_teacher_top_k(rows, teacher, k=4, batch_size=2), add_teacher_top_k(rows, teacher, k=4, batch_size=1)
    assert [len(row) for row in together["teacher_top_k_indices"]] == [16, 9]
    assert together["teacher_top_k_indices"] == alone["teacher_top_k_indices"]
    torch.testing.assert_close(torch.tensor(together[1]["teacher_top_k_logits"]), torch.tensor(alone[1]["teacher_top_k_logits"]))


def test_evaluation_gets_logits_and_fits_no_projection(tmp_path):
    """Hidden states the losses asked for reached compute_metrics as predictions (a tuple), and an evaluation
    before training fitted the width projections on its evaluation batch for good."""
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    config = DistillationConfig(temperature=1.0, hidden_weight=1.0)
    seen = []
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=config, args=training_args(tmp_path, 1), train_dataset=dataset(),
        eval_dataset=dataset(samples=4), compute_metrics=lambda prediction: seen.append(prediction.predictions) or {},
    )  # fmt: skip
    before = trainer.hidden_projections["0"].weight.detach().clone()
    trainer.evaluate()
    assert isinstance(seen[0], np.ndarray) and seen[0].shape == (4, 16, teacher.config.vocab_size)
    assert torch.equal(trainer.hidden_projections["0"].weight, before) and not trainer._projections_fitted


def test_exit_recovery_with_perp_and_a_batch_without_labels(tmp_path):
    """PERP wraps the linears before the exit-layer check read their widths (it failed), and a micro-batch with
    no labelled token made the label term 0/0, the logged loss NaN."""
    from optimum_prune import PERPConfig

    _, student = teacher_student()
    ids = token_windows(samples=8, seq_len=16, seed=3)
    labels = ids.clone()
    labels[4:] = -100  # the second batch of 4 has no label
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})
    config = DistillationConfig(kd_weight=0.0, label_weight=1.0, exit_weight=0.5, exit_layer=1)
    args = training_args(tmp_path, 2)
    args.dataloader_drop_last, args.seed = True, 0
    trainer = DistillationTrainer(
        model=student, distillation=config, args=args, train_dataset=data, callbacks=[PruningCallback(perp=PERPConfig(rank=2))]
    )
    trainer._get_train_sampler = lambda *_args: torch.utils.data.SequentialSampler(data)  # the unlabelled rows form a batch
    labelled, compute_loss = [], trainer.compute_loss

    def recording_loss(model, inputs, *args, **kwargs):
        labelled.append(int((inputs["labels"] != -100).sum()))
        loss = compute_loss(model, inputs, *args, **kwargs)
        assert torch.isfinite(loss if torch.is_tensor(loss) else loss[0])
        return loss

    trainer.compute_loss = recording_loss
    trainer.train()
    assert labelled == [64, 0]
    assert verify_sparsity(student, "2:4")["conforming"]


def test_a_students_last_layer_is_compared_before_the_final_norm_as_the_teachers_middle_one_is(tmp_path):
    """transformers returns the last layer's state after the final norm: a depth-pruned student holding exactly the
    teacher's first layers was 0.47 away from them (the raw states' mean square: 0.0009)."""
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    student.model.layers = student.model.layers[:2]
    student.config.num_hidden_layers = 2
    config = DistillationConfig(kd_weight=0.0, hidden_weight=1.0, layer_map={0: 0, 1: 1})
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=training_args(tmp_path, 1))
    ids = token_windows(samples=2, seq_len=16, seed=9)
    with torch.no_grad():
        assert float(trainer.compute_loss(student, {"input_ids": ids, "labels": ids})) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("terms", [
    dict(temperature=2.0),
    dict(kd_weight=0.0, hidden_weight=1.0),
    dict(kd_weight=0.0, exit_weight=1.0, exit_layer=1),
])  # fmt: skip
def test_a_left_padded_row_distils_as_it_does_alone(tmp_path, terms):
    teacher, student = teacher_student()
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=DistillationConfig(**terms), args=training_args(tmp_path, 1))
    ids = token_windows(samples=1, seq_len=12, seed=3)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    labels = torch.cat([torch.full((1, 4), -100), ids], 1)
    with torch.no_grad():
        alone = trainer.compute_loss(student, {"input_ids": ids, "labels": ids})
        left_padded = trainer.compute_loss(student, {"input_ids": padded, "attention_mask": mask, "labels": labels})
    assert float(left_padded) == pytest.approx(float(alone), rel=1e-4)


def test_evaluation_runs_every_layer_under_layer_dropout(tmp_path):
    model = tiny_model(num_hidden_layers=4)
    losses = []
    for rate in (0.0, 0.9):
        config = DistillationConfig(kd_weight=0.0, label_weight=1.0, layer_dropout=rate)
        trainer = DistillationTrainer(model=model, distillation=config, args=training_args(tmp_path, 1), eval_dataset=dataset(samples=8))
        losses.append(trainer.evaluate()["eval_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_the_exit_term_is_the_kl_of_the_exit_layers_logits_at_the_temperature(tmp_path):
    model = tiny_model(num_hidden_layers=4)
    config = DistillationConfig(kd_weight=0.0, exit_weight=1.0, exit_layer=2, temperature=3.0)
    trainer = DistillationTrainer(model=model, distillation=config, args=training_args(tmp_path, 1))
    ids = token_windows(samples=2, seq_len=16, seed=9)
    with torch.no_grad():
        loss = trainer.compute_loss(model, {"input_ids": ids, "labels": ids})
        outputs = model(input_ids=ids, output_hidden_states=True)
        draft = exit_logits(model, outputs.hidden_states[2])  # after the first two layers
        expected = direct_kl(draft[:, :-1], outputs.logits[:, :-1], 3.0).mean() * 9.0
    assert float(loss) == pytest.approx(float(expected), rel=1e-3)




def test_the_hidden_term_is_the_mean_square_error_of_the_mapped_layers_outputs(tmp_path):
    teacher, student = teacher_student()
    config = DistillationConfig(kd_weight=0.0, hidden_weight=1.0, layer_map={0: 1, 1: 0})
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=training_args(tmp_path, 1))
    ids = token_windows(samples=2, seq_len=16, seed=9)
    outputs = {}
    handles = [
        layer.register_forward_hook(lambda _m, _a, out, key=(name, index): outputs.__setitem__(key, out[0] if isinstance(out, tuple) else out))
        for name, model in (("student", student), ("teacher", teacher)) for index, layer in enumerate(model.model.layers)
    ]  # fmt: skip
    with torch.no_grad():
        loss = trainer.compute_loss(student, {"input_ids": ids, "labels": ids})
    for handle in handles:
        handle.remove()
    expected = sum((outputs["student", s] - outputs["teacher", t]).pow(2).mean() for s, t in ((0, 1), (1, 0))) / 2
    assert float(loss) == pytest.approx(float(expected), rel=1e-4)


def test_width_projections_are_fitted_on_the_attended_positions_only():
    from optimum_prune.distillation import _fit_projection

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 6, 4, generator=generator), torch.randn(2, 6, 8, generator=generator)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    masked, attended = torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(4, 8, bias=False)
    _fit_projection(masked, student, teacher, mask)
    _fit_projection(attended, student[mask.bool()][None], teacher[mask.bool()][None], None)
    torch.testing.assert_close(masked.weight, attended.weight)


def test_a_teacher_given_in_training_mode_teaches_deterministically(tmp_path):
    """A teacher passed in train mode would keep its dropout on: random targets."""
    teacher = tiny_model(seed=0, attention_dropout=0.5).train()
    student = tiny_model(seed=1)
    DistillationTrainer(model=student, teacher=teacher, args=training_args(tmp_path, 1))
    assert not teacher.training


def test_width_projections_keep_training_after_their_fit(tmp_path):
    """Fitted on the first batch, then trained with the student (the optimizer gets their parameter group)."""
    from transformers import TrainerCallback

    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(kd_weight=0.0, hidden_weight=1.0), args=training_args(tmp_path, 3),
        train_dataset=dataset(),
    )
    fitted = []

    class AfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            fitted.append(trainer.hidden_projections["0"].weight.detach().clone())

    trainer.add_callback(AfterFirstStep())
    trainer.train()
    assert not torch.equal(fitted[0], fitted[-1])


def test_width_projections_get_no_weight_decay(tmp_path):
    """The projections are fitted maps, not weights to shrink: their group has no weight decay."""
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    args = training_args(tmp_path, 1)
    args.weight_decay = 0.1
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(kd_weight=0.0, hidden_weight=1.0), args=args, train_dataset=dataset()
    )
    optimizer = trainer.create_optimizer()
    projection_ids = {id(p) for p in trainer.hidden_projections.parameters()}
    groups = [g for g in optimizer.param_groups if projection_ids & {id(p) for p in g["params"]}]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


def test_a_micro_batch_without_labels_adds_a_finite_zero_label_term(tmp_path):
    """A micro-batch with no labelled token has a NaN mean label loss; its term is a zero that keeps the graph."""
    model = tiny_model()
    trainer = DistillationTrainer(model=model, distillation=DistillationConfig(kd_weight=0.0, label_weight=1.0), args=training_args(tmp_path, 1))
    ids = token_windows(samples=2, seq_len=16, seed=9)
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": torch.full_like(ids, -100)})
    assert torch.isfinite(loss) and float(loss) == 0.0


def test_a_single_micro_batch_step_logs_the_plain_distillation_loss(tmp_path):
    """The step's labelled-token count is of shifted labels: counting the first token too shrank the loss (15/16 here)."""
    teacher = tiny_model(seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)
    student = tiny_model(seed=1)
    ids = token_windows(samples=4, seq_len=16, seed=5)
    args = training_args(tmp_path, 1)
    args.learning_rate = 0.0
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(temperature=1.0), args=args,
        train_dataset=Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()}),
    )  # fmt: skip
    trainer.train()
    with torch.no_grad():
        direct = float(trainer.compute_loss(student, {"input_ids": ids, "labels": ids}))
    assert trainer.state.log_history[0]["loss"] == pytest.approx(direct, rel=1e-4)


def test_stored_top_k_of_a_left_padded_row_equal_those_of_the_row_alone():
    """The teacher computing stored top-k logits sees the row's attention mask, not its pads."""
    from optimum_prune.distillation import add_teacher_top_k

    teacher = tiny_model(seed=0)
    row = list(range(5, 17))
    padded = Dataset.from_dict({"input_ids": [[0] * 4 + row], "attention_mask": [[0] * 4 + [1] * len(row)]})
    alone = Dataset.from_dict({"input_ids": [row]})
    stored, expected = add_teacher_top_k(padded, teacher, k=4)[0], add_teacher_top_k(alone, teacher, k=4)[0]
    torch.testing.assert_close(torch.tensor(stored["teacher_top_k_logits"][4:]), torch.tensor(expected["teacher_top_k_logits"]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"exit_layer": 2}, "exit_layer is the early exit exit_weight trains, and exit_weight is 0"),
        ({"layer_map": {0: 1}}, "layer_map pairs the hidden states hidden_weight compares, and hidden_weight is 0"),
        ({"hidden_weight": 1.0, "layer_map": {0: -1}}, "layer_map pairs layer indices from 0"),
    ],
)
def test_options_no_weighted_term_reads_are_refused(options, message):
    """They were accepted and read by nothing (a negative index would have counted from the end)."""
    with pytest.raises(ValueError, match=message):
        DistillationConfig(**options)


@pytest.mark.parametrize("layer_map", [{5: 1}, {1: 7}])
def test_a_layer_map_past_either_models_depth_is_refused(tmp_path, layer_map):
    """It failed with a bare 'IndexError: list index out of range' from inside the Trainer's constructor."""
    with pytest.raises(ValueError, match="names layers past the student's 3 or the teacher's 3 decoder layers"):
        DistillationTrainer(
            model=tiny_model(), teacher=tiny_model(seed=1), distillation=DistillationConfig(hidden_weight=1.0, layer_map=layer_map),
            args=training_args(tmp_path, 1),
        )  # fmt: skip


def test_the_student_itself_as_teacher_is_refused(tmp_path):
    """`dense = model; prune(model, ...)`, then teacher=dense: freezing the teacher froze the student, which failed at
    the first backward with 'element 0 of tensors does not require grad'."""
    model = tiny_model()
    with pytest.raises(ValueError, match="the teacher shares parameters with the student"):
        DistillationTrainer(model=model, teacher=model, args=training_args(tmp_path, 1), train_dataset=dataset())


def test_gradient_clipping_takes_the_width_projections_with_the_student(tmp_path):
    """max_grad_norm bounds the norm of every gradient the optimizer steps with, the projections' included
    (the Trainer clips model.parameters() only, and the projections live beside the model)."""
    teacher = tiny_model(seed=0)
    student = copy.deepcopy(teacher)
    prune(student, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    args = training_args(tmp_path, 2)
    args.max_grad_norm = 1e-4
    trainer = DistillationTrainer(
        model=student, teacher=teacher, distillation=DistillationConfig(kd_weight=0.0, hidden_weight=1.0), args=args, train_dataset=dataset()
    )
    norms = []

    class RecordNorms(TrainerCallback):
        def on_pre_optimizer_step(self, *_args, **_kwargs) -> None:
            parameters = [*student.parameters(), *trainer.hidden_projections.parameters()]
            projections = [p.grad for p in trainer.hidden_projections.parameters()]
            norms.append((torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters if p.grad is not None])), projections))

    trainer.add_callback(RecordNorms())
    trainer.train()
    assert len(norms) == 2
    for joint, projections in norms:
        assert any(float(g.abs().sum()) > 0 for g in projections)
        assert float(joint) <= 1e-4 * (1 + 1e-3)


def test_a_refused_distillation_trainer_leaves_the_student_and_teacher_as_they_were(tmp_path):
    """The refusals came after Trainer.__init__, whose callbacks' on_init_end had wrapped the student's linears in
    PERP adapters (a corrected retry then failed: "already has PERP adapters"), and after the teacher was frozen."""
    from optimum_prune.perp import MaskLoRALinear, PERPConfig

    student = tiny_model()
    prune(student, PruningConfig(method="magnitude", sparsity=0.5))
    teacher = copy.deepcopy(student).train()
    args = training_args(tmp_path, 1)
    args.gradient_checkpointing = True
    with pytest.raises(ValueError, match="layer_dropout skips layers"):
        DistillationTrainer(
            student, args, teacher=teacher, distillation=DistillationConfig(layer_dropout=0.1), callbacks=[PruningCallback(perp=PERPConfig())]
        )
    assert not any(isinstance(module, MaskLoRALinear) for module in student.modules())
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="computes its own loss"):
        DistillationTrainer(model=student, args=training_args(tmp_path, 1), compute_loss_func=lambda *a, **k: 0, callbacks=[PruningCallback(perp=PERPConfig())])
    assert not any(isinstance(module, MaskLoRALinear) for module in student.modules())


def test_a_trainer_subclass_taking_star_args_has_its_arguments_checked_by_trainers_names(tmp_path):
    """The next class's signature was (*args, **kwargs): the positional TrainingArguments landed under "args" unread, so
    layer_dropout with gradient checkpointing was refused only after Trainer.__init__ had wrapped the student."""

    class Passing(Trainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)

    class Distilling(distillation.DistillationMixin, Passing):
        pass

    from optimum_prune.perp import MaskLoRALinear, PERPConfig

    student = tiny_model()
    prune(student, PruningConfig(method="magnitude", sparsity=0.5))
    args = training_args(tmp_path, 1)
    args.gradient_checkpointing = True
    with pytest.raises(ValueError, match="layer_dropout skips layers"):
        Distilling(student, args, distillation=DistillationConfig(layer_dropout=0.1), callbacks=[PruningCallback(perp=PERPConfig())])
    assert not any(isinstance(module, MaskLoRALinear) for module in student.modules())  # refused before Trainer.__init__


def test_the_training_logs_carry_each_loss_term(tmp_path):
    """Only the weighted sum was logged: which term moved could not be told."""
    teacher, student = teacher_student()
    config = DistillationConfig(kd_weight=1.0, label_weight=0.5, temperature=2.0)
    trainer = DistillationTrainer(model=student, teacher=teacher, distillation=config, args=training_args(tmp_path, 3), train_dataset=dataset())
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 3
    for entry in logged:  # one micro-batch per step: the loss is the weighted sum of its terms
        assert entry["loss"] == pytest.approx(entry["kd_loss"] + 0.5 * entry["label_loss"], abs=2e-4)
    assert "kd_loss" not in trainer.evaluate(dataset(samples=4))
