"""compressed-tensors sparsity metadata: validated by the real compressed-tensors and transformers loaders."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors import SparsityCompressionConfig
from transformers import AutoModelForCausalLM, CompressedTensorsConfig, QuantoConfig

from optimum_prune import PruningConfig, compress, compressed_tensors_config, prune, save_pruned, sparsity_config, verify_sparsity
from optimum_prune.cli import main as cli_main
from tests.conftest import tiny_model

LINEARS_PER_LAYER = 7


def test_two_four_model_is_described_as_two_four_with_only_lm_head_ignored():
    model = tiny_model()
    prune(model, {"method": "magnitude", "sparsity": "2:4"})
    metadata = sparsity_config(model)
    assert metadata["sparsity_structure"] == "2:4" and metadata["targets"] == ["Linear"]
    assert metadata["ignore"] == ["lm_head"]
    parameters = list(model.parameters())
    zeros = sum(int((p == 0).sum()) for p in parameters)
    assert metadata["global_sparsity"] == pytest.approx(zeros / sum(p.numel() for p in parameters))
    parsed = SparsityCompressionConfig.load_from_registry(metadata["format"], **metadata)
    assert parsed.sparsity_structure == "2:4" and parsed.ignore == ["lm_head"]


def test_unstructured_model_ignores_the_layers_left_dense():
    model = tiny_model()
    prune(model, {"method": "magnitude", "sparsity": 0.5, "ignore": ["*.o_proj"]})
    metadata = sparsity_config(model)
    assert metadata["sparsity_structure"] == "unstructured"
    assert metadata["ignore"] == [f"model.layers.{i}.self_attn.o_proj" for i in range(3)] + ["lm_head"]


def test_experts_left_dense_are_ignored_and_routers_llm_surgeon_pruned_are_not():
    """Unstructured metadata listed unrouted experts left dense as sparse targets, and llm_surgeon's planned
    linears left out the routers prune_router had it prune."""
    from tests.adapters.test_moe import tiny_moe
    from tests.conftest import token_windows

    model = tiny_moe("mixtral", num_local_experts=16, num_experts_per_tok=1)
    config = PruningConfig(method="wanda", sparsity=0.5, moe_options={"unrouted_experts": "dense"})
    report = prune(model, config, calibration=token_windows(2, 4))
    ignored = set(sparsity_config(model)["ignore"])
    assert report.unrouted and set(report.unrouted) <= ignored
    assert not [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name not in ignored and not (m.weight == 0).any()]
    model = tiny_moe("mixtral")
    prune(model, PruningConfig(method="llm_surgeon", sparsity=0.5, moe_options={"prune_router": True}), calibration=token_windows(2, 16))
    assert "model.layers.0.block_sparse_moe.gate" not in sparsity_config(model)["ignore"]


def test_the_metadata_takes_a_config_as_a_dict_and_checks_one_changed_after_construction():
    model = tiny_model()
    config = PruningConfig(method="magnitude", sparsity="2:4")
    prune(model, config)
    assert sparsity_config(model, config.to_dict()) == sparsity_config(model, config)
    assert compressed_tensors_config(model, config.to_dict()).sparsity_config.sparsity_structure == "2:4"
    config.sparsity = 1.5
    with pytest.raises(ValueError, match="PruningConfig.sparsity"):
        sparsity_config(model, config)


def test_saved_metadata_reloads_through_transformers_bit_exact(tmp_path):
    model = tiny_model()
    prune(model, {"method": "magnitude", "sparsity": "2:4"})
    save_pruned(model, tmp_path / "sparse", compressed_tensors_metadata=True)
    assert not hasattr(model.config, "quantization_config")  # the in-memory model is left as it was
    stored = json.loads((tmp_path / "sparse" / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "compressed-tensors" and stored["sparsity_config"]["sparsity_structure"] == "2:4"
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "sparse", dtype=torch.float32)
    assert isinstance(reloaded.config.quantization_config, CompressedTensorsConfig)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_cli_writes_the_metadata_and_says_how_it_reloads(tmp_path, model_dir, capsys):
    code = cli_main([
        "--model", str(model_dir), "--method", "magnitude", "--sparsity", "2:4", "--output", str(tmp_path / "out"),
        "--compressed-tensors-metadata",
    ])  # fmt: skip
    assert code == 0
    stored = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert stored["sparsity_config"]["sparsity_structure"] == "2:4"
    # it said "stock transformers": without compressed-tensors that fails, with it the model loads in float16
    assert "reload: AutoModelForCausalLM.from_pretrained(..., dtype=torch.float32), compressed-tensors installed" in capsys.readouterr().out


def test_errors_name_the_fix():
    model = tiny_model()
    with pytest.raises(ValueError, match="carries no pruning_config"):
        sparsity_config(model)
    prune(model, {"method": "width", "sparsity": 0.2, "num_calibration_samples": 2, "calibration_seq_len": 8}, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="structured method 'width' leaves smaller dense matrices"):
        sparsity_config(model)
    quantized = tiny_model()
    prune(quantized, {"method": "magnitude", "sparsity": "2:4"})
    int8 = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}}
    quantized.config.quantization_config = CompressedTensorsConfig(config_groups={"group_0": int8})
    with pytest.raises(ValueError, match="already carries a CompressedTensorsConfig quantization config"):
        compressed_tensors_config(quantized)
    quanto_int8 = tiny_model()
    compress(quanto_int8, [PruningConfig(method="magnitude", sparsity="2:4"), QuantoConfig(weights="int8")])
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is quantized \(e.g. by optimum-quanto"):
        compressed_tensors_config(quanto_int8)


@pytest.fixture
def two_four_with_metadata(tmp_path):
    model = tiny_model()
    prune(model, {"method": "magnitude", "sparsity": "2:4"})
    return save_pruned(model, tmp_path / "two_four", compressed_tensors_metadata=True)


def test_a_reloaded_model_is_saved_again_with_its_metadata_written_anew(two_four_with_metadata, tmp_path):
    """Saving a reloaded checkpoint again (e.g. to add a tokenizer) with its metadata was refused as 'quantized'."""
    model = AutoModelForCausalLM.from_pretrained(two_four_with_metadata, dtype=torch.float32)
    loaded_with = model.config.quantization_config
    resaved = save_pruned(model, tmp_path / "again", compressed_tensors_metadata=True)
    stored = json.loads((resaved / "config.json").read_text())["quantization_config"]["sparsity_config"]
    assert stored == json.loads((two_four_with_metadata / "config.json").read_text())["quantization_config"]["sparsity_config"]
    # The model is left as it was loaded: its metadata deleted, its hf_quantizer failed every later save.
    assert model.config.quantization_config is loaded_with
    plain = save_pruned(model, tmp_path / "plain")
    assert "quantization_config" in json.loads((plain / "config.json").read_text())
    model.save_pretrained(tmp_path / "stock")


def test_global_sparsity_counts_the_zeros_of_every_parameter_biases_included():
    model = tiny_model("qwen2")  # q / k / v biases, zero-initialised
    prune(model, {"method": "magnitude", "sparsity": "2:4"})
    parameters = list(model.parameters())
    assert any(p.dim() == 1 and bool((p == 0).any()) for p in parameters)
    zeros = sum(int((p == 0).sum()) for p in parameters)
    assert sparsity_config(model)["global_sparsity"] == pytest.approx(zeros / sum(p.numel() for p in parameters))


def test_pruning_a_reloaded_model_drops_the_metadata_its_weights_no_longer_match(two_four_with_metadata, tmp_path):
    """A 2:4 checkpoint pruned on to 70 % kept saying 2:4 in its saved config."""
    model = AutoModelForCausalLM.from_pretrained(two_four_with_metadata, dtype=torch.float32)
    prune(model, {"method": "magnitude", "sparsity": 0.7})
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((save_pruned(model, tmp_path / "plain") / "config.json").read_text())
    rewritten = save_pruned(model, tmp_path / "described", compressed_tensors_metadata=True)
    assert json.loads((rewritten / "config.json").read_text())["quantization_config"]["sparsity_config"]["sparsity_structure"] == "unstructured"


def test_a_reloaded_model_prunes_to_non_uniform_shapes_and_reloads(two_four_with_metadata, tmp_path):
    """Non-uniform shapes are recorded in quantization_config: the metadata there refused them after the weights changed."""
    model = AutoModelForCausalLM.from_pretrained(two_four_with_metadata, dtype=torch.float32)
    prune(model, {"method": "width", "sparsity": 0.3, "method_options": {"ranking": "global"}, "num_calibration_samples": 2,
                  "calibration_seq_len": 16}, torch.randint(0, 128, (2, 16)))  # fmt: skip
    reloaded = AutoModelForCausalLM.from_pretrained(save_pruned(model, tmp_path / "narrow"), dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits)


def test_a_reloaded_model_quantizes_its_metadata_replaced_and_a_model_loaded_quantized_is_named_as_such(two_four_with_metadata, caplog):
    """The metadata was taken for a non-uniform structure's record, refused with advice to prune uniformly."""
    model = AutoModelForCausalLM.from_pretrained(two_four_with_metadata, dtype=torch.float32)
    compress(model, [QuantoConfig(weights="int8")])
    assert "quantizer's own quantization_config takes its place" in caplog.text
    assert getattr(model.config, "quantization_config", None) is None and verify_sparsity(model, "2:4")["conforming"]
    quantized = tiny_model()
    quantized.config.quantization_config = CompressedTensorsConfig(config_groups={"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8}}})
    with pytest.raises(ValueError, match="the model was loaded quantized .CompressedTensorsConfig in its config.: optimum-quanto"):
        compress(quantized, [QuantoConfig(weights="int8")])


def test_pruning_a_checkpoint_with_metadata_from_disk_drops_it(two_four_with_metadata, tmp_path):
    prune(str(two_four_with_metadata), {"method": "magnitude", "sparsity": 0.7}, output_dir=tmp_path / "from_disk")
    assert "quantization_config" not in json.loads((tmp_path / "from_disk" / "config.json").read_text())


def test_two_four_then_fewer_layers_is_described_by_its_two_four_step(tmp_path):
    """Removing layers leaves the kept layers 2:4: the metadata was refused because the last step was structured."""
    model = tiny_model(num_hidden_layers=4)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=windows)
    prune(model, PruningConfig(method="layers", sparsity=0.25), calibration=windows)
    output = save_pruned(model, tmp_path / "shallow", compressed_tensors_metadata=True)
    stored = json.loads((output / "config.json").read_text())
    assert stored["pruning_config"]["method"] == "layers" and stored["num_hidden_layers"] == 3
    assert stored["quantization_config"]["sparsity_config"]["sparsity_structure"] == "2:4"
    assert stored["quantization_config"]["sparsity_config"]["ignore"] == ["lm_head"]
    reloaded = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_a_later_step_that_fills_the_zeros_in_leaves_no_metadata():
    model = tiny_model()
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=windows)
    prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=windows)
    with pytest.raises(ValueError, match="no linear the wanda step pruned is still sparse .* save without compressed_tensors_metadata"):
        sparsity_config(model)


def test_two_four_then_uniform_width_leaves_the_linears_that_lost_input_columns_out():
    """Removed MLP channels shift down_proj's groups of four; the other linears only lose rows and stay 2:4."""
    model = tiny_model(num_hidden_layers=2)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=windows)
    prune(model, PruningConfig(method="width", sparsity=0.2, method_options={"criterion": "wanda_sp", "components": "mlp"}), calibration=windows)
    assert model.model.layers[0].mlp.down_proj.in_features % 4  # the 2:4 step's own check would refuse it
    metadata = sparsity_config(model)
    assert metadata["sparsity_structure"] == "2:4"
    assert metadata["ignore"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]


def test_a_step_another_version_wrote_is_passed_over(tmp_path):
    """Every recorded step is read now (to find the last unstructured one): an unreadable earlier one raised."""
    model = tiny_model(num_hidden_layers=4)
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=windows)
    prune(model, PruningConfig(method="layers", sparsity=0.25), calibration=windows)
    model.config.pruning_history = [{"format_version": 99, "method": "future"}, *model.config.pruning_history]
    assert sparsity_config(model)["sparsity_structure"] == "2:4"
    assert save_pruned(model, tmp_path / "out", compressed_tensors_metadata=True).is_dir()


def test_n_m_patterns_other_than_two_four_are_described_as_unstructured():
    """compressed-tensors names one N:M structure, 2:4; a 4:8 model's zeros are described as unstructured."""
    model = tiny_model()
    prune(model, {"method": "magnitude", "sparsity": "4:8"})
    metadata = sparsity_config(model)
    assert metadata["sparsity_structure"] == "unstructured" and metadata["ignore"] == ["lm_head"]


def test_parts_pruned_to_different_targets_are_described_as_unstructured_and_all_targeted():
    """A 2:4 language model beside a 50 % unstructured vision tower: not 2:4 as a whole, and the vision linears
    are sparse targets, not ignored for failing the first part's pattern."""
    from .conftest import TINY
    from .multimodal.conftest import tiny_llava

    model = tiny_llava(image_token_id=TINY["vocab_size"])
    prune(model, {"method": "magnitude", "parts": {"language": {"sparsity": "2:4"}, "vision": {"sparsity": 0.5}}})
    metadata = sparsity_config(model)
    assert metadata["sparsity_structure"] == "unstructured"
    assert not [name for name in metadata["ignore"] if "vision_tower" in name and name.endswith("proj")], metadata["ignore"]
