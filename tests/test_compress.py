"""Prune → optimum-quanto quantize in one call, saved and reloaded with quanto's own loader."""

import json

import pytest
import torch
from transformers import QuantoConfig

from optimum_prune import NMPattern, PruningConfig, UnsupportedArchitecture, compress, prune, save_pruned, sparsify, verify_sparsity

from .conftest import TINY, tiny_model, token_windows

quanto = pytest.importorskip("optimum.quanto")

WIDE = dict(hidden_size=128, intermediate_size=256)  # multiples of quanto's int4 group size (128)


def test_a_step_changed_after_construction_is_checked_again():
    config = PruningConfig(method="magnitude")
    config.sparsity = NMPattern(2, 4)
    model = tiny_model()
    compress(model, [config])
    assert model.config.pruning_config["sparsity"] == "2:4"
    config.sparsity = 1.5
    with pytest.raises(ValueError, match="PruningConfig.sparsity"):
        compress(tiny_model(), [config])


@pytest.mark.parametrize("weights", ["int8", "float8", "int4", "int2"])
def test_pruned_weights_stay_exactly_zero_through_quantization_and_reload(weights, tmp_path):
    model = tiny_model(**WIDE)
    reports = compress(model, [PruningConfig(method="wanda", sparsity="2:4"), QuantoConfig(weights=weights)], calibration=token_windows())

    assert len(reports) == 1 and reports[0].method == "wanda"
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "QLinear"
    assert type(model.lm_head) is torch.nn.Linear  # lm_head stays in full precision
    measured = verify_sparsity(model, "2:4")  # counted on the dequantized weights
    assert measured["conforming"] and measured["overall_sparsity"] >= 0.5

    save_pruned(model, tmp_path / "compressed")
    reloaded = quanto.QuantizedModelForCausalLM.from_pretrained(tmp_path / "compressed")
    ids = token_windows(samples=2, seq_len=12, seed=4)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert verify_sparsity(reloaded._wrapped, "2:4")["conforming"]
    assert PruningConfig.from_pretrained(tmp_path / "compressed") == PruningConfig(method="wanda", sparsity="2:4")


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_the_model_quanto_reloads_is_sparsified_through_its_wrapper(weights, tmp_path):
    """optimum-quanto reloads a checkpoint as a QuantizedModelForCausalLM, which holds the transformers model."""
    model = tiny_model(**WIDE)
    compress(model, [PruningConfig(method="magnitude", sparsity="2:4"), QuantoConfig(weights=weights)])
    save_pruned(model, tmp_path / "compressed")
    reloaded = quanto.QuantizedModelForCausalLM.from_pretrained(tmp_path / "compressed")
    ids = token_windows(samples=2, seq_len=12, seed=4)
    with torch.no_grad():
        before = reloaded(input_ids=ids).logits
    assert verify_sparsity(reloaded, "2:4")["conforming"]
    report = sparsify(reloaded)
    assert len(report.repacked) == 7 * TINY["num_hidden_layers"] and not report.left_dense
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, before)


def test_quantos_default_int4_would_lose_the_zeros():
    """Why compress passes quanto an integer zero-point: its default int4 shift moves every zero."""
    model = tiny_model(**WIDE)
    compress(model, [PruningConfig(method="magnitude", sparsity=0.5)])
    quanto.quantize(model, weights=quanto.qint4, exclude=["lm_head"])
    quanto.freeze(model)
    assert verify_sparsity(model)["overall_sparsity"] < 0.01


def test_uniform_structured_result_quantizes_and_reloads(tmp_path):
    model = tiny_model(**WIDE)
    compress(
        model,
        [{"method": "width", "sparsity": 0.25, "method_options": {"criterion": "wanda_sp"}}, QuantoConfig(weights="int8")],
        calibration=token_windows(),
    )
    save_pruned(model, tmp_path / "narrow-int8")
    reloaded = quanto.QuantizedModelForCausalLM.from_pretrained(tmp_path / "narrow-int8")
    ids = token_windows(samples=1, seq_len=8, seed=2)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_a_shard_size_quanto_cannot_write_is_refused_before_writing(tmp_path):
    model = tiny_model(**WIDE)
    compress(model, [PruningConfig(method="magnitude", sparsity=0.5), QuantoConfig(weights="int8")])
    with pytest.raises(ValueError, match="max_shard_size: optimum-quanto saves its models in 5GB shards"):
        save_pruned(model, tmp_path / "int8", max_shard_size="1GB")
    assert not (tmp_path / "int8").exists()
    save_pruned(model, tmp_path / "int8", max_shard_size=5 * 10**9)  # the default, spelled otherwise: it was refused
    assert (tmp_path / "int8" / "config.json").is_file()


def test_a_non_uniform_structured_model_quantized_by_optimum_quanto_directly_is_not_saved(tmp_path):
    """compress refuses the combination; quantizing with optimum-quanto's own calls and then saving must too:
    quanto's reload builds the model from the plain config, so it came back at stock shapes (NaN logits)."""
    from optimum.quanto import freeze, qint8, quantize

    model = tiny_model(**WIDE)
    prune(model, PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), calibration=token_windows())
    assert getattr(model.config, "quantization_config", None) is not None  # non-uniform: shapes recorded
    quantize(model, weights=qint8)
    freeze(model)
    with pytest.raises(ValueError, match="optimum-quanto.s reload rebuilds the model from the plain config, so this non-uniform .*nothing was saved"):
        save_pruned(model, tmp_path / "int8")
    assert not (tmp_path / "int8").exists()


def test_bad_recipes_fail_before_any_step_runs():
    model = tiny_model(**WIDE)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"recipe\[0\]: quantization must be the single last step"):
        compress(model, [QuantoConfig(weights="int8"), PruningConfig(method="magnitude")])
    with pytest.raises(ValueError, match="activations='int8'.* weights only"):
        compress(model, [PruningConfig(method="magnitude"), QuantoConfig(weights="int8", activations="int8")])
    with pytest.raises(TypeError, match=r"recipe\[1\] is a str"):
        compress(model, [PruningConfig(method="magnitude"), "int8"])
    with pytest.raises(ValueError, match="recipe is empty"):
        compress(model, [])
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_non_uniform_structure_is_refused_before_quantizing():
    model = tiny_model("qwen2", num_hidden_layers=4, **WIDE)
    with pytest.raises(ValueError, match="non-uniform structured results"):
        compress(
            model,
            [PruningConfig(method="sublayers", sparsity=0.2, method_options={"sublayers": "attention"}), QuantoConfig(weights="int8")],
            calibration=token_windows(),
        )
    assert not any(type(m).__module__.startswith("optimum.quanto") for m in model.modules())


def test_modules_to_not_convert_match_like_in_transformers():
    model = tiny_model(**WIDE)
    compress(model, [PruningConfig(method="magnitude", sparsity=0.5), QuantoConfig(weights="int8", modules_to_not_convert=["mlp"])])
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "QLinear"
    assert type(layer.mlp.down_proj) is torch.nn.Linear and type(model.lm_head) is torch.nn.Linear


def test_int4_on_weights_quanto_packs_for_a_float_zero_point_is_refused_before_pruning():
    """bfloat16 int4 goes to quanto's TinyGemm layout, which refuses the integer zero-point that keeps zeros exact."""
    model = tiny_model(**WIDE).to(torch.bfloat16)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"recipe\[1\]: QuantoConfig\(weights='int4'\) on model.layers.0.self_attn.q_proj \(torch.bfloat16 on cpu\).*TinyGemm.*model.float\(\)"):
        compress(model, [PruningConfig(method="magnitude", sparsity="2:4"), QuantoConfig(weights="int4")])
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    compress(model, [PruningConfig(method="magnitude", sparsity="2:4"), QuantoConfig(weights="int8")])  # int8 is fine
    assert verify_sparsity(model, "2:4")["conforming"]


def test_a_quantizer_that_moves_pruned_weights_is_caught(monkeypatch):
    """The zero count after quantizing catches a quanto path that loses zeros (here: its default float shift)."""
    monkeypatch.setattr("optimum_prune.quanto.ZeroPreservingOptimizer", quanto.MaxOptimizer)
    model = tiny_model(**WIDE)
    with pytest.raises(ValueError, match=r"optimum-quanto left model.layers.0.self_attn.q_proj with \d+ zeros of the \d+ it had"):
        compress(model, [PruningConfig(method="magnitude", sparsity=0.5), QuantoConfig(weights="int4")])


def test_a_recipe_of_several_pruning_steps_records_each_in_order(tmp_path):
    """pruning_config is the last step's: a model that also lost a layer said nothing of it."""
    model = tiny_model(**WIDE)
    steps = [PruningConfig(method="layers", method_options={"num_layers": 1}), PruningConfig(method="wanda", sparsity="2:4")]
    compress(model, steps, calibration=token_windows())
    saved = json.loads((save_pruned(model, tmp_path / "pruned") / "config.json").read_text())
    assert PruningConfig.from_dict(saved["pruning_config"]) == steps[1]
    assert [PruningConfig.from_dict(entry) for entry in saved["pruning_history"]] == steps
    once = tiny_model()
    compress(once, [PruningConfig(method="magnitude")])
    assert not hasattr(once.config, "pruning_history")


def test_the_calibration_shared_by_a_recipe_is_no_warning_for_a_step_that_reads_none(caplog):
    compress(tiny_model(), [PruningConfig(method="magnitude", sparsity=0.3), PruningConfig(method="wanda")], calibration=token_windows())
    assert "reads no calibration data" not in caplog.text


@pytest.mark.parametrize(
    ("family", "step", "refusal"),
    [
        ("gemma2", {"method": "slicegpt", "sparsity": 0.25}, "post_attention_layernorm.*SliceGPT does not apply"),
        ("phi3", {"method": "width", "sparsity": 0.2}, "fuses its projections"),
        ("olmo2", {"method": "width", "sparsity": 0.2}, r"over all heads at once \(self_attn.q_norm, self_attn.k_norm\)"),
        ("llama", {"method": "experts", "sparsity": 0.5}, "no mixture-of-experts layers"),
        ("llama", {"method": "mpoe"}, "LlamaForCausalLM has none with two or more experts"),
        ("mixtral", {"method": "layers", "method_options": {"num_layers": 1}}, "cannot apply this structured method"),
    ],
)
def test_a_step_the_architecture_can_never_take_is_refused_before_the_first_step_runs(family, step, refusal):
    from .adapters.test_moe import tiny_moe

    model = tiny_moe() if family == "mixtral" else tiny_model(family)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(UnsupportedArchitecture, match=rf"recipe\[1\]: .*{refusal}"):
        compress(model, [PruningConfig(method="magnitude", sparsity=0.5), step], calibration=token_windows())
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_a_step_that_fits_only_what_the_earlier_steps_produce_is_not_refused_up_front():
    """2:4 needs input widths in multiples of 4: 258 MLP channels are not, the 180 that width pruning keeps are."""
    model = tiny_model(hidden_size=128, intermediate_size=258)
    with pytest.raises(ValueError, match="cannot be applied to model.layers.0.mlp.down_proj"):
        compress(tiny_model(hidden_size=128, intermediate_size=258), [PruningConfig(method="magnitude", sparsity="2:4")])
    width = PruningConfig(method="width", sparsity=0.2025, method_options={"components": "mlp", "criterion": "magnitude_l2"})
    compress(model, [width, PruningConfig(method="magnitude", sparsity="2:4")])
    assert model.model.layers[0].mlp.down_proj.in_features == 180
    assert verify_sparsity(model, "2:4")["conforming"]


def test_a_step_that_fails_says_which_and_that_the_earlier_steps_were_applied():
    """Called again on the same model, the fixed recipe would apply the earlier steps twice."""
    model = tiny_model(intermediate_size=130)
    width = PruningConfig(method="width", sparsity=0.25, method_options={"components": "mlp", "criterion": "magnitude_l2"})
    with pytest.raises(ValueError, match="not a multiple of M=4") as refused:  # 82 channels kept
        compress(model, [width, PruningConfig(method="magnitude", sparsity="2:4")])
    assert refused.value.__notes__[-1] == "compress stopped at recipe[1]; recipe[0:1] (width 0.25) had been applied to the model"
    assert model.model.layers[0].mlp.down_proj.in_features < 130


def test_a_gptq_step_without_gptqmodel_names_the_version_the_extra_installs(monkeypatch):
    """It named optimum's own floor (>= 1.6); the [gptq] extra pins gptqmodel 5.6 (README, GPTQ)."""
    import optimum.utils
    from transformers import GPTQConfig

    from optimum_prune.dependencies import MissingDependency

    monkeypatch.setattr(optimum.utils, "is_gptqmodel_available", lambda: False)
    with pytest.raises(MissingDependency, match=r"recipe\[1\]: GPTQConfig needs gptqmodel 5\.6: pip install 'optimum-prune\[gptq\]'"):
        compress(tiny_model(), [PruningConfig(method="magnitude", sparsity=0.5), GPTQConfig(bits=4, group_size=32)])


def test_compress_names_a_single_step_given_as_the_recipe():
    from optimum_prune import compress

    with pytest.raises(TypeError, match=r"\[step\]"):  # was: "recipe[0] is a str" (the dict's first key)
        compress(tiny_model(), {"method": "magnitude"})


def test_int8_weights_in_a_bfloat16_model_warn_of_the_cpu_kernel_crash(caplog):
    """torch 2.13's CPU int8 matmul for bfloat16 (torch._weight_int8pack_mm) segfaults on the unaligned weights
    optimum-quanto's reload gives: said where the recipe makes such a model, not found by a crashed process."""
    import logging

    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        compress(tiny_model().to(torch.bfloat16), [PruningConfig(method="magnitude", sparsity=0.5), QuantoConfig(weights="int8")])
    assert "crashed the process (a segfault)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        compress(tiny_model(), [PruningConfig(method="magnitude", sparsity=0.5), QuantoConfig(weights="int8")])
    assert "segfault" not in caplog.text
