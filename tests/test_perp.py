"""PERP: retraining biases, norms and mask-preserving LoRA keeps the pruned zeros and recovers loss."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from optimum_prune import PERPConfig, PruningCallback, PruningConfig, get_adapter, merge_perp, prepare_perp, prune, verify_sparsity
from optimum_prune.perp import MaskLoRALinear, ScaleLoRALinear

from .adapters.test_moe import tiny_moe
from .conftest import tiny_model, token_windows
from .test_callback import pruned_tiny, run_trainer, train_dataset
from .test_distillation import dataset, training_args


def pruned_model() -> torch.nn.Module:
    model = tiny_model(num_hidden_layers=2)
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    return model


def calibration_loss(model: torch.nn.Module) -> float:
    ids = token_windows(samples=4, seq_len=16, seed=5)
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


@pytest.mark.parametrize("lora", ["mask", "scale"])
def test_adapters_start_from_the_pruned_model_and_train_a_small_fraction(lora):
    model = pruned_model()
    before = calibration_loss(model)
    summary = prepare_perp(model, PERPConfig(lora=lora, rank=2))
    adapters = [m for m in model.modules() if isinstance(m, MaskLoRALinear)]
    assert len(adapters) == summary.wrapped == 7 * 2
    assert all(isinstance(m, ScaleLoRALinear) == (lora == "scale") for m in adapters)
    assert calibration_loss(model) == pytest.approx(before, rel=1e-5)
    assert 0 < summary.fraction < 0.2 and "PERP trains" in str(summary)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in name or "norm" in name for name in trainable)


@pytest.mark.parametrize("lora", ["mask", "scale", None])
def test_retraining_lowers_the_loss_and_merging_keeps_every_zero(lora, tmp_path):
    model = pruned_model()
    zeros = {name: linear.weight == 0 for name, linear in model.named_modules() if isinstance(linear, torch.nn.Linear) and "layers" in name}
    before = calibration_loss(model)
    prepare_perp(model, PERPConfig(lora=lora, rank=4))
    Trainer(model=model, args=training_args(tmp_path, 15), train_dataset=dataset()).train()
    trained = calibration_loss(model)
    assert trained < before
    assert merge_perp(model) == (14 if lora else 0)
    assert calibration_loss(model) == pytest.approx(trained, rel=1e-4)  # merging changes nothing
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[name].weight == 0, mask) for name, mask in zeros.items())
    assert verify_sparsity(model)["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert not any(isinstance(m, MaskLoRALinear) for m in model.modules())


def test_by_default_the_linears_pruning_targets_are_adapted_including_every_expert():
    model = tiny_moe("mixtral")
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    targets = {name: linear for layer in get_adapter(model).qualified_prunable_linears() for name, linear in layer.items()}
    zeros = {name: linear.weight == 0 for name, linear in targets.items()}
    summary = prepare_perp(model)
    adapted = {name for name, module in model.named_modules() if isinstance(module, MaskLoRALinear)}
    assert adapted == set(targets) and summary.wrapped == len(targets)
    assert any(".experts." in name for name in adapted) and not any(name.endswith(".gate") for name in adapted)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MaskLoRALinear):
                module.lora_B.normal_()
    merge_perp(model)
    assert all(torch.equal(linear.weight == 0, zeros[name]) for name, linear in targets.items())


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="PERPConfig.lora must be"):
        PERPConfig(lora="dora")
    with pytest.raises(ValueError, match="trains nothing"):
        PERPConfig(biases=False, norms=False, lora=None)
    with pytest.raises(ValueError, match=r"PERPConfig.alpha scales MaskLoRA's update \(lora='mask'\); with lora='scale' nothing uses it"):
        PERPConfig(lora="scale", alpha=8.0)
    with pytest.raises(ValueError, match="match no linear"):
        prepare_perp(copy.deepcopy(pruned_model()), PERPConfig(target_modules=("c_attn",)))
    model = pruned_model()
    with pytest.raises(ValueError, match=r"PERPConfig.target_modules 'gate' match no linear of LlamaForCausalLM, whose linears are named "):
        prepare_perp(model, PERPConfig(target_modules=("q_proj", "gate")))  # one typo beside a match: its linears stayed untrained
    assert all(parameter.requires_grad for parameter in model.parameters())  # refused before freezing anything


def test_norms_without_biases_trains_the_norm_scales_only():
    """``requires_grad_`` on a LayerNorm module unfroze its bias too, training biases the user turned off."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    prepare_perp(model, PERPConfig(biases=False, norms=True, lora=None))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"1.weight"}
    prepare_perp(model, PERPConfig(biases=True, norms=False, lora=None))
    assert {name for name, p in model.named_parameters() if p.requires_grad} == {"0.bias", "1.bias"}


def test_preparing_twice_is_refused_instead_of_nesting_adapters():
    model = pruned_model()
    prepare_perp(model, PERPConfig(rank=2))
    with pytest.raises(ValueError, match=r"already has PERP adapters; call merge_perp\(model\) before preparing it again"):
        prepare_perp(model, PERPConfig(rank=2))
    merge_perp(model)
    assert prepare_perp(model, PERPConfig(rank=2)).wrapped == 14


def test_a_head_tied_to_the_embeddings_is_refused_as_a_target():
    """Merging writes the head's weight in place, which changed the tied input embeddings with it."""
    model = tiny_model(num_hidden_layers=2, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"lm_head shares its weight with the input embeddings \(tie_word_embeddings\)"):
        prepare_perp(model, PERPConfig(target_modules=("q_proj", "lm_head")))
    assert all(parameter.requires_grad for parameter in model.parameters())


def test_a_callback_reused_for_another_trainer_prepares_its_model_again(tmp_path):
    """After the first run merged, the next Trainer given the same callback trained the whole model."""
    from optimum_prune import PruningCallback

    callback = PruningCallback(perp=PERPConfig(lora="mask", rank=2))
    for run in range(2):
        model = pruned_model()
        embedding = model.get_input_embeddings().weight.detach().clone()
        Trainer(model=model, args=training_args(tmp_path / str(run), 2), train_dataset=dataset(), callbacks=[callback]).train()
        assert torch.equal(model.get_input_embeddings().weight, embedding)


def test_target_modules_as_one_comma_separated_string_match_whole_names():
    """LLaMA-Factory writes lora_target as "gate_proj,up_proj": matched as a substring, it wrapped MoE routers ("gate")."""
    model = tiny_moe("qwen2_moe")
    assert PERPConfig(target_modules="gate_proj, up_proj").target_modules == ("gate_proj", "up_proj")
    prepare_perp(model, PERPConfig(target_modules="gate_proj,up_proj"))
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, MaskLoRALinear)}
    assert wrapped == {"gate_proj", "up_proj"}


def test_through_the_pruning_callback_the_trainer_retrains_only_perp_and_saves_an_ordinary_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from optimum_prune import PruningCallback

    model = pruned_model()
    zeros = {name: linear.weight == 0 for name, linear in model.named_modules() if isinstance(linear, torch.nn.Linear) and "layers" in name}
    embedding = model.get_input_embeddings().weight.detach().clone()
    before = calibration_loss(model)
    callback = PruningCallback(perp=PERPConfig(lora="mask", rank=4))
    trainer = Trainer(model=model, args=training_args(tmp_path, 15), train_dataset=dataset(), callbacks=[callback])
    assert 0 < callback.perp_summary.fraction < 0.2  # prepared before the optimizer is built
    optimised = {id(p) for group in trainer.create_optimizer().param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.parameters() if p.requires_grad}
    trainer.train()
    assert calibration_loss(model) < before
    assert not any(isinstance(m, MaskLoRALinear) for m in model.modules())  # merged when training ended
    assert torch.equal(model.get_input_embeddings().weight, embedding)  # frozen throughout
    assert all(p.requires_grad for p in model.parameters())  # as before PERP froze it
    modules = dict(model.named_modules())
    assert all(torch.equal(modules[name].weight == 0, mask) for name, mask in zeros.items())
    trainer.save_model(str(tmp_path / "saved"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert calibration_loss(reloaded) == pytest.approx(calibration_loss(model), rel=1e-5)


def test_one_callback_given_to_two_trainers_prepares_both_models(tmp_path):
    """The second Trainer's model was never prepared (its first run was a silent full fine-tune), and the first
    model's train() was refused as if the callback had been added after its constructor."""
    from optimum_prune import PruningCallback

    callback = PruningCallback(perp=PERPConfig(lora="mask", rank=4))
    models = [pruned_model(), pruned_model()]
    trainers = [Trainer(model=m, args=training_args(tmp_path / str(i), 2), train_dataset=dataset(), callbacks=[callback]) for i, m in enumerate(models)]
    assert all(any(isinstance(module, MaskLoRALinear) for module in m.modules()) for m in models)
    for model, trainer in zip(reversed(models), reversed(trainers)):
        embedding = model.get_input_embeddings().weight.detach().clone()
        trainer.train()
        assert torch.equal(model.get_input_embeddings().weight, embedding)  # frozen: PERP, not a full fine-tune
        assert not any(isinstance(module, MaskLoRALinear) for module in model.modules())


def test_with_gradient_checkpointing_the_adapters_in_every_layer_still_train(tmp_path):
    """The frozen embeddings would give the checkpointed layers inputs needing no gradient: reentrant
    checkpointing then cuts the graph, and only the final norm would train."""
    from optimum_prune import PruningCallback

    model = pruned_model()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = training_args(tmp_path, 2)
    args.gradient_checkpointing = True
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[PruningCallback(perp=PERPConfig(lora="mask", rank=4))])
    first_layer_norm = model.model.layers[0].input_layernorm.weight
    trainer.train()
    assert not torch.equal(first_layer_norm, before["model.layers.0.input_layernorm.weight"])  # reached layer 0
    assert not model.get_input_embeddings()._forward_hooks  # the input-gradient hook went with the adapters


def test_the_callback_refuses_perp_it_cannot_set_up():
    from optimum_prune import IterativeSchedule, PruningCallback

    with pytest.raises(ValueError, match="cannot be combined with a pruning schedule"):
        PruningCallback(IterativeSchedule(final_sparsity=0.5, iterations=2), perp=PERPConfig())


def test_perp_added_after_the_trainer_was_built_is_an_error(tmp_path):
    from optimum_prune import PruningCallback

    trainer = Trainer(model=pruned_model(), args=training_args(tmp_path, 2), train_dataset=dataset())
    trainer.add_callback(PruningCallback(perp=PERPConfig()))
    with pytest.raises(ValueError, match="must be passed to the Trainer's constructor"):
        trainer.train()


def test_merging_makes_the_model_as_trainable_as_before_preparing():
    """Called directly (not through the callback), merge_perp left every weight frozen but biases and norms."""
    model = tiny_model()
    model.get_input_embeddings().requires_grad_(False)
    before = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    prepare_perp(model, PERPConfig())
    merge_perp(model)
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == before


def test_prune_refuses_a_model_with_perp_adapters_naming_merge_perp():
    model = tiny_model()
    prepare_perp(model, PERPConfig())
    with pytest.raises(ValueError, match=r"holds PERP adapters \(prepare_perp\): merge them first \(merge_perp\(model\)\)"):
        prune(model, PruningConfig(method="magnitude", sparsity=0.5))


def test_mask_lora_adds_its_masked_update_scaled_by_alpha_over_rank():
    model = tiny_model(num_hidden_layers=1)
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    prepare_perp(model, PERPConfig(rank=4, alpha=8.0))
    module = next(m for m in model.modules() if isinstance(m, MaskLoRALinear))
    with torch.no_grad():
        module.lora_B.normal_()
        x = torch.randn(3, module.base.in_features)
        weight = module.base.weight
        expected = x @ (weight + 2.0 * (module.lora_B @ module.lora_A) * (weight != 0)).T
        torch.testing.assert_close(module(x), expected)


@pytest.mark.parametrize("lora", ["mask", "scale"])
def test_every_adapter_gets_a_gradient_from_the_start(lora):
    model = tiny_model(num_hidden_layers=2)
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    prepare_perp(model, PERPConfig(lora=lora, rank=2))
    ids = token_windows(samples=2, seq_len=16, seed=5)
    model(input_ids=ids, labels=ids).loss.backward()
    adapters = [m for m in model.modules() if isinstance(m, MaskLoRALinear)]
    assert adapters and all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0 for m in adapters)


def test_adapters_on_linears_with_biases_start_from_the_pruned_model():
    model = tiny_model("qwen2", num_hidden_layers=2)  # q/k/v projections carry biases
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    ids = token_windows(samples=2, seq_len=16, seed=5)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    prepare_perp(model, PERPConfig(lora="mask", rank=2))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, before)


def test_rank_zero_is_a_config_error():
    with pytest.raises(ValueError, match="PERPConfig.rank must be >= 1, got 0"):
        PERPConfig(rank=0)


def test_a_trailing_comma_in_target_modules_is_ignored():
    assert PERPConfig(target_modules="q_proj, v_proj,").target_modules == ("q_proj", "v_proj")


def test_the_summary_counts_every_trainable_parameter():
    model = tiny_model(num_hidden_layers=2)
    summary = prepare_perp(model, PERPConfig(lora="mask", rank=2))
    assert summary.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert summary.total == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("lora", ["mask", "scale"])
def test_a_perp_run_resumed_into_another_model_object_ends_as_the_uninterrupted_run(tmp_path, lora):
    """resume_from_checkpoint restores every weight, whatever the model object held; MaskLoRA read its mask in the
    constructor, before the checkpoint was loaded, and the merge filled the checkpoint's zeros (sparsity 0.0)."""
    uninterrupted = pruned_tiny(0.5)
    callback = PruningCallback(perp=PERPConfig(lora=lora, rank=4))
    run_trainer(uninterrupted, tmp_path, callbacks=[callback], steps=4, save_strategy="steps", save_steps=2)
    resumed = tiny_model(seed=5)  # e.g. the dense base model: the checkpoint holds the pruned weights
    checkpoint = str(tmp_path / "run" / "checkpoint-2")
    run_trainer(resumed, tmp_path, callbacks=[PruningCallback(perp=PERPConfig(lora=lora, rank=4))], steps=4, resume_from_checkpoint=checkpoint)
    assert verify_sparsity(resumed, ignore=("lm_head",))["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    for (name, expected), actual in zip(uninterrupted.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(actual, expected, msg=name)


def test_a_prepared_model_resumed_from_a_checkpoint_merges_the_checkpoints_zeros(tmp_path):
    """The same through prepare_perp / merge_perp and a plain Trainer (no callback)."""

    def trained(model: torch.nn.Module, resume: str | None = None) -> torch.nn.Module:
        prepare_perp(model, PERPConfig(lora="mask", rank=4))
        args = TrainingArguments(
            output_dir=str(tmp_path / "run"), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
            save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, disable_tqdm=True,
        )  # fmt: skip
        Trainer(model=model, args=args, train_dataset=train_dataset()).train(resume_from_checkpoint=resume)
        merge_perp(model)
        return model

    uninterrupted = trained(pruned_tiny(0.5))
    resumed = trained(tiny_model(seed=5), resume=str(tmp_path / "run" / "checkpoint-2"))
    assert verify_sparsity(resumed, ignore=("lm_head",))["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    for (name, expected), actual in zip(uninterrupted.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(actual, expected, msg=name)


def test_mask_lora_trains_exactly_the_model_it_merges(tmp_path):
    """What the plain-LoRA warning points to: MaskLoRA trains under the mask, so the merged model is the trained one."""
    model, ids, seen = pruned_tiny(0.5), token_windows(samples=2, seq_len=8), {}

    class Snapshot(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):  # before PruningCallback's merge
            with torch.no_grad():
                seen["trained"] = model.eval()(input_ids=ids).logits

    run_trainer(model, tmp_path, callbacks=[Snapshot(), PruningCallback(perp=PERPConfig(lora="mask", rank=4))], steps=4)
    assert not any(isinstance(m, MaskLoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(input_ids=ids).logits, seen["trained"], atol=1e-5, rtol=1e-5)


def test_a_second_train_of_a_merged_perp_run_says_to_build_a_new_trainer(tmp_path):
    """The first run merged PERP's adapters at its end; the second train() was told the callback "must be passed to
    the Trainer's constructor", which it was. A new Trainer with the same callback prepares the model again."""
    model, callback = pruned_tiny(0.5), PruningCallback(perp=PERPConfig(lora="mask", rank=4))
    trainer = run_trainer(model, tmp_path, callbacks=[callback], steps=2)
    with pytest.raises(ValueError, match="merged PERP's adapters into the model when the last train\\(\\) ended"):
        trainer.train()
    run_trainer(model, tmp_path, callbacks=[callback], steps=2)
    assert verify_sparsity(model, ignore=("lm_head",))["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
