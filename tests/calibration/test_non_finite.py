"""NaN and inf: a model holding them is refused before any change, activations that overflow stop the run at the
layer where they do, and losses past float range rank or read as inf instead of raising ``OverflowError``."""

import math

import pytest
import torch

from optimum_prune import PruningConfig, evaluate_perplexity, prune, save_pruned
from optimum_prune.calibration.engine import NonFiniteActivations
from optimum_prune.calibration.gradients import calibration_perplexity

from ..adapters.test_moe import tiny_moe
from ..conftest import tiny_model, token_windows


def nan_in_layer_1() -> torch.nn.Module:
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    return model


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p.nan_to_num(), before[name].nan_to_num()) for name, p in model.named_parameters())


@pytest.mark.parametrize(
    ("method", "options"),
    [("magnitude", {}), ("wanda", {}), ("sparsegpt", {}), ("width", {}), ("slicegpt", {}), ("layers", {"criterion": "perplexity"})],
)
def test_a_model_holding_nan_is_refused_before_any_change(method, options):
    """Wanda's all-NaN scores of layer 2 gave a mask by position, FLAP wrote NaN biases, block influence and
    perplexity ranked NaN layers as removable (sorted() with NaN keys), all without a word."""
    model = nan_in_layer_1()
    before = snapshot(model)
    sparsity = 0.34 if method == "layers" else 0.3
    with pytest.raises(ValueError, match=r"parameter model\.layers\.1\.mlp\.up_proj\.weight holds NaN or inf"):
        prune(model, PruningConfig(method=method, sparsity=sparsity, method_options=options), calibration=token_windows())
    assert unchanged(model, before)


def overflowing_in_layer_1() -> torch.nn.Module:
    """Finite weights whose activations overflow float32 inside layer 1 (its attention scores pass 3e38)."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.mul_(1e25)
    return model


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "width", "layers"])
def test_activations_that_overflow_stop_the_run_at_the_layer_before_it_is_pruned(method):
    model = overflowing_in_layer_1()
    before = {name: p.clone() for name, p in model.model.layers[1].named_parameters()}
    with pytest.raises(NonFiniteActivations, match=r"NaN or inf at the output of model\.layers\.1: an overflow in torch\.float32, or"):
        prune(model, PruningConfig(method=method, sparsity=0.34 if method == "layers" else 0.3), calibration=token_windows())
    assert all(torch.equal(p, before[name]) for name, p in model.model.layers[1].named_parameters())


def test_expert_pruning_stops_at_non_finite_router_inputs():
    """Frequency and REAP counted NaN router logits as choices: experts 0 and 1 went in every layer."""
    model = tiny_moe()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight.mul_(1e30)
    with pytest.raises(NonFiniteActivations, match=r"at the output of model\.layers\.0"):
        prune(model, PruningConfig(method="experts", sparsity=0.5, method_options={"criterion": "frequency"}), calibration=token_windows(vocab=model.config.vocab_size))


def test_a_layer_streamed_from_disk_names_its_non_finite_parameter(tmp_path):
    """Layers pruned from disk are read one at a time, so they are checked as they run."""
    model = nan_in_layer_1()
    model.save_pretrained(tmp_path / "model")
    with pytest.raises(NonFiniteActivations, match=r"output of model\.layers\.1: the parameter model\.layers\.1\.mlp\.up_proj\.weight holds NaN"):
        prune(str(tmp_path / "model"), PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows(), output_dir=tmp_path / "out")


def test_sparsegpt_names_the_linear_whose_hessian_overflows():
    """One input channel of ~1e19 (the model's outputs stay finite) overflows the float32 x·xᵀ: the Cholesky
    factorisation failed with a bare LinAlgError, naming neither the linear nor the cause."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[0] *= 1e20
    assert model(token_windows(2, 16, seed=5)).logits.isfinite().all()
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.[qkv]_proj: its Hessian .* overflowed: an input channel"):
        prune(model, PruningConfig(method="sparsegpt", sparsity=0.5), calibration=token_windows())


def huge_loss_model() -> torch.nn.Module:
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # finite logits, mean loss far above 709.8 nats
    return model


def test_a_loss_past_float_range_is_an_infinite_perplexity(bpe_tokenizer):
    model = huge_loss_model()
    assert evaluate_perplexity(model, bpe_tokenizer, seq_len=32, max_tokens=64) == math.inf  # was OverflowError
    assert calibration_perplexity(model, token_windows(samples=2)) == math.inf


def test_removal_by_perplexity_refuses_when_no_candidate_scores_a_finite_loss():
    with pytest.raises(ValueError, match="calibration loss is NaN or overflows with any of the layers removed, so none can be ranked"):
        prune(huge_loss_model(), PruningConfig(method="layers", sparsity=0.34, method_options={"criterion": "perplexity"}), calibration=token_windows())
    with pytest.raises(ValueError, match="with any of the sublayers removed"):
        prune(huge_loss_model(), PruningConfig(method="sublayers", sparsity=0.2, method_options={"criterion": "perplexity"}), calibration=token_windows())


def test_a_nan_loss_is_an_error_not_a_perplexity(bpe_tokenizer):
    with pytest.raises(ValueError, match="next-token loss is NaN on the evaluation text: its logits are not finite"):
        evaluate_perplexity(nan_in_layer_1(), bpe_tokenizer, seq_len=32, max_tokens=64)


def test_the_cli_stops_at_a_nan_dense_perplexity_and_writes_nothing(tmp_path, bpe_tokenizer, capsys):
    """It printed "perplexity (64 tokens)   nan   nan", saved the pruned NaN model and exited 0."""
    from optimum_prune.cli import main

    save_pruned(nan_in_layer_1(), tmp_path / "model", tokenizer=bpe_tokenizer)
    argv = ["-m", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--method", "magnitude", "--sparsity", "0.5",
            "--eval", "--eval-tokens", "64", "--eval-seq-len", "32"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code != 0 and "loss is NaN" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("method", "sparsity"), [("llm_surgeon", 0.5), ("llm_surgeon_structured", 0.4)])
def test_llm_surgeon_stops_at_non_finite_curvature(method, sparsity):
    """NaN K-FAC factors (14 of 21) read as dead units: layer 0 pruned whole, layer 2 left dense, 0.5 reported."""
    with pytest.raises(ValueError, match="calibration gradients are not finite even at loss scale 1"):
        prune(overflowing_in_layer_1(), PruningConfig(method=method, sparsity=sparsity, method_options={"shots": 2}), calibration=token_windows())


def test_kprune_names_non_finite_dense_predictions():
    """torch.multinomial failed on the teacher's NaN probabilities after layer 0 was being scored."""
    with pytest.raises(ValueError, match="K-prune: the dense model's logits are NaN or inf"):
        prune(overflowing_in_layer_1(), PruningConfig(method="kprune", sparsity=0.3), calibration=token_windows())


def test_wanda_names_a_linear_whose_squared_norms_overflow():
    """Inputs of ~1e20 compensated in q/k/v's weights (the model computes as before): their squares pass float32's
    range, all-inf scores, and q_proj was pruned by position."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.mul_(1e20)
        for name in ("q_proj", "k_proj", "v_proj"):
            getattr(model.model.layers[1].self_attn, name).weight.mul_(1e-20)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj: its inputs' squared norms .* overflowed"):
        prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows())


def test_a_wanda_schedule_stops_at_norms_a_training_forward_made_nan(tmp_path):
    """One overflowing training forward (GradScaler skips its step) left NaN norms: 11 linears pruned by position."""
    from transformers import TrainerControl, TrainerState

    from optimum_prune import GradualSchedule, PruningCallback

    from ..test_callback import started_outside_a_trainer

    callback = PruningCallback(GradualSchedule(final_sparsity=0.5, start_step=0, end_step=1, every=1, score="wanda"))
    model = tiny_model()
    with started_outside_a_trainer(callback, model, tmp_path, max_steps=2) as args:
        model.train()
        with torch.no_grad():
            model(input_ids=token_windows(samples=2, seq_len=8, seed=1))
            weight = model.model.layers[1].input_layernorm.weight
            saved = weight.clone()
            weight[:4] = float("nan")
            model(input_ids=token_windows(samples=2, seq_len=8, seed=2))
            weight.copy_(saved)
        with pytest.raises(ValueError, match=r"activation norms of model\.layers\.1\.\S+ since the previous pruning step are NaN"):
            callback.on_step_end(args, TrainerState(global_step=1, max_steps=2), TrainerControl())


def test_compress_refuses_a_model_holding_nan_before_any_step():
    """gptqmodel failed at the NaN layer ("NaN loss ... increase calibration samples"), layer 0 already rewritten."""
    pytest.importorskip("gptqmodel")
    from transformers import GPTQConfig

    from optimum_prune import compress

    model = tiny_model(hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"parameter model\.layers\.1\.mlp\.up_proj\.weight holds NaN or inf"):
        compress(model, [GPTQConfig(bits=4, group_size=32)], calibration=token_windows())
    assert unchanged(model, before)
