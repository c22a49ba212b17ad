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
