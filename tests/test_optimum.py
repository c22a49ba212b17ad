"""The Optimum shapes: configuration files, ``OptimumPruner`` and the real ``optimum-cli prune``."""

import dataclasses
import importlib.metadata
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_prune
from optimum_prune import OptimumPruner, PruningConfig, prune, verify_sparsity
from optimum_prune.cli import build_parser
from optimum_prune.models import load_model

from .conftest import console_script, tiny_model, token_windows


def test_config_round_trips_through_optimums_configuration_files(tmp_path):
    config = PruningConfig(method="sparsegpt", sparsity="2:4", method_options={"block_size": 32}, ignore=["*.o_proj"])
    config.save_pretrained(tmp_path / "saved")

    stored = json.loads((tmp_path / "saved" / "pruning_config.json").read_text())
    assert stored["optimum_version"] and stored["transformers_version"]  # stamped by optimum's BaseConfig
    assert stored["optimum_prune_version"] == importlib.metadata.version("optimum-prune") == optimum_prune.__version__
    assert set(stored) == set(config.to_dict()) | {"optimum_version", "transformers_version", "optimum_prune_version"}
    assert PruningConfig.from_pretrained(tmp_path / "saved") == config
    assert PruningConfig.from_pretrained(tmp_path / "saved" / "pruning_config.json") == config
    assert PruningConfig.from_json_file(tmp_path / "saved" / "pruning_config.json") == config


def test_from_pretrained_keyword_arguments_override_fields_as_transformers_configs_do(tmp_path):
    PruningConfig(method="wanda", sparsity="2:4").save_pretrained(tmp_path)
    config = PruningConfig.from_pretrained(tmp_path, sparsity=0.6, seed=5, local_files_only=True)
    assert (config.method, config.sparsity, config.seed) == ("wanda", 0.6, 5)
    with pytest.raises(TypeError, match="got spasity, which name no PruningConfig field"):
        PruningConfig.from_pretrained(tmp_path, spasity=0.6)
    config, unused = PruningConfig.from_pretrained(tmp_path, seed=1, spasity=0.6, return_unused_kwargs=True)
    assert (config.seed, config.sparsity, unused) == (1, "2:4", {"spasity": 0.6})
    with pytest.raises(ValueError, match=r"PruningConfig.sparsity must be in \[0, 1\)"):
        PruningConfig.from_pretrained(tmp_path, sparsity=1.5)  # validated like the stored fields


def test_an_overriding_method_or_allocation_drops_the_stored_options_and_parts_follow_an_overriding_sparsity(tmp_path):
    """The stored options are the other method's (every default filled in), and a part without its own sparsity
    follows the config's: both once made an override fail, or silently keep the stored value."""
    PruningConfig(method="sparsegpt", allocation="owl", parts={"language": {}}).save_pretrained(tmp_path / "a")
    config = PruningConfig.from_pretrained(tmp_path / "a", method="wanda", allocation="uniform", sparsity=0.7)
    assert config.method_options == PruningConfig(method="wanda").method_options
    assert config.allocation_options == {} and config.part_targets() == {"language": 0.7}
    kept = PruningConfig.from_pretrained(tmp_path / "a", method="sparsegpt", method_options={"block_size": 32})
    assert kept.method_options["block_size"] == 32 and kept.allocation_options["outlier_threshold"] == 5.0
    PruningConfig(method="magnitude", parts={"language": {"sparsity": 0.4}}).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="would reach no part"):  # its own sparsity: it once kept 0.4 without a word
        PruningConfig.from_pretrained(tmp_path / "b", sparsity=0.7)
    written_out = {**PruningConfig(parts={"language": {}}).to_dict(), "parts": {"language": {"sparsity": 0.5}}}
    assert PruningConfig.from_dict(written_out) == PruningConfig(parts={"language": {}})  # as earlier versions stored it
    assert dataclasses.replace(config, sparsity=0.3).part_targets() == {"language": 0.3}


def test_a_recipe_file_that_is_not_json_is_named(tmp_path):
    (tmp_path / "pruning_config.json").write_text("{bad")
    with pytest.raises(ValueError, match="pruning_config.json' is a file; give a directory"):
        PruningConfig().save_pretrained(tmp_path / "pruning_config.json")
    for path in (tmp_path, tmp_path / "pruning_config.json"):
        with pytest.raises(ValueError, match="pruning_config.json is not valid JSON: Expecting property name"):
            PruningConfig.from_pretrained(path)


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="has no pruning_config.json"):
        PruningConfig.from_pretrained(tmp_path)
    (tmp_path / "pruning_config.json").write_text(json.dumps({"method": "wanda", "sparsity": 1.5}))
    with pytest.raises(ValueError, match=r"PruningConfig.sparsity must be in \[0, 1\)"):
        PruningConfig.from_pretrained(tmp_path)


def test_a_pruned_models_directory_gives_its_recipe_from_config_json_alone(tmp_path):
    """A pruned model saved with the stock ``save_pretrained`` has no pruning_config.json; its config.json records the recipe."""
    model = tiny_model()
    recipe = PruningConfig(method="magnitude", sparsity=0.3, ignore=["*.o_proj"])
    prune(model, recipe)
    model.save_pretrained(tmp_path / "stock")
    assert not (tmp_path / "stock" / "pruning_config.json").exists()
    assert PruningConfig.from_pretrained(tmp_path / "stock") == recipe
    assert PruningConfig.from_pretrained(tmp_path / "stock", sparsity=0.6, local_files_only=True).sparsity == 0.6
    tiny_model().save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match=r"has no pruning_config.json \(nor a config.json recording a pruning_config\)"):
        PruningConfig.from_pretrained(tmp_path / "dense")
    other = PruningConfig(method="wanda", sparsity=0.5)  # subfolder= is where the files are, not the folder above
    other.save_pretrained(tmp_path / "stock" / "recipe")
    assert PruningConfig.from_pretrained(tmp_path / "stock", subfolder="recipe") == other
    model.save_pretrained(tmp_path / "repo" / "model")
    assert PruningConfig.from_pretrained(tmp_path / "repo", subfolder="model") == recipe


def test_optimum_pruner_prunes_and_saves_a_checkpoint_directory(model_dir, tmp_path):
    pruner = OptimumPruner.from_pretrained(model_dir)
    config = PruningConfig(method="wanda", sparsity="2:4", num_calibration_samples=4, calibration_seq_len=32)
    report = pruner.prune(config, save_dir=tmp_path / "pruned", calibration_dataset=["A short calibration text. " * 40])

    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    model, tokenizer = load_model(tmp_path / "pruned")
    assert verify_sparsity(model, "2:4")["conforming"]
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(model_dir).get_vocab()  # the tokenizer was saved with it
    assert PruningConfig.from_pretrained(tmp_path / "pruned") == config


def test_optimum_pruner_takes_a_tokenizer_for_a_checkpoint_without_one(tmp_path, bpe_tokenizer):
    tiny_model().save_pretrained(tmp_path / "weights-only")
    pruner = OptimumPruner.from_pretrained(tmp_path / "weights-only", tokenizer=bpe_tokenizer)
    config = PruningConfig(method="wanda", num_calibration_samples=2, calibration_seq_len=16)
    pruner.prune(config, save_dir=tmp_path / "pruned", calibration_dataset=["A short calibration text. " * 40])
    assert load_model(tmp_path / "pruned")[1].get_vocab() == bpe_tokenizer.get_vocab()


def test_optimum_pruner_refuses_its_save_dir_before_pruning(tmp_path):
    """As the CLI does: a save_dir it cannot replace, or the checkpoint it loaded, leaves the model unpruned."""
    tiny_model().save_pretrained(tmp_path / "dense")
    (tmp_path / "a-file").write_text("")
    pruner = OptimumPruner.from_pretrained(tmp_path / "dense")
    for save_dir, message in ((tmp_path / "a-file", "exists and is not a directory"), (tmp_path / "dense", "save_dir .* is the checkpoint being pruned")):
        with pytest.raises(ValueError, match=message):
            pruner.prune(PruningConfig(method="magnitude"), save_dir=save_dir)
        assert verify_sparsity(pruner.model)["overall_sparsity"] == 0.0


def test_optimum_pruner_takes_a_loaded_model_and_token_ids(tmp_path):
    model = tiny_model("qwen2")
    pruner = OptimumPruner.from_pretrained(model)
    pruner.prune({"method": "width", "sparsity": 0.25}, save_dir=tmp_path / "narrow", calibration_dataset=token_windows())  # a dict, as prune takes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "narrow")
    dense = sum(p.numel() for p in tiny_model("qwen2").parameters())
    assert sum(p.numel() for p in reloaded.parameters()) < dense and reloaded.config.pruning_config["method"] == "width"
    ids = token_windows(samples=1, seq_len=8, seed=5)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def _optimum_cli() -> str:
    return console_script("optimum-cli")


def test_optimum_cli_prune_is_registered_and_documents_every_option():
    result = subprocess.run([_optimum_cli(), "prune", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for text in ("--method", "--sparsity", "--output", "--model", "slicegpt", "sparsegpt.block_size", "owl.max_deviation"):
        assert text in result.stdout
    assert all(action.help for action in build_parser()._actions)  # the same options, each with a help text
    assert "prune" in subprocess.run([_optimum_cli(), "--help"], capture_output=True, text=True).stdout


def test_optimum_cli_loads_the_library_for_the_commands_that_load_checkpoints():
    """optimum-cli imports every register module for every command: ``--help`` (of any command: ``export onnx -h`` took
    3 s loading the library) and ``env`` start without torch & co., ``export`` needs the package's shape loader, and a
    package that fails to import leaves optimum-cli's own commands."""
    check = (
        "import sys; sys.argv = ['optimum-cli', *sys.argv[1:]]; import optimum.commands.register.optimum_prune; "
        "print(sorted(name for name in ('optimum_prune', 'torch_pruning', 'torch') if name in sys.modules))"
    )
    helps = (["--help"], ["export", "--help"], ["export", "onnx", "-h"])
    for arguments, loaded in (([], "[]"), *((help, "[]") for help in helps), (["env"], "[]"), (["export", "onnx"], "['optimum_prune', 'torch', 'torch_pruning']")):
        result = subprocess.run([sys.executable, "-c", check, *arguments], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.strip() == loaded, (arguments, result.stdout, result.stderr)
    broken = "import sys; sys.modules['torch_pruning'] = None; " + check  # an install whose import fails
    result = subprocess.run([sys.executable, "-c", broken, "export"], capture_output=True, text=True)
    assert result.returncode == 0 and "optimum-prune could not be imported (ModuleNotFoundError" in result.stderr, result.stderr


def test_optimum_cli_prune_runs_end_to_end(model_dir, tmp_path):
    output = tmp_path / "cli"
    result = subprocess.run(
        [_optimum_cli(), "prune", "-m", str(model_dir), "--method", "magnitude", "--sparsity", "0.5", "--output", str(output)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "magnitude 0.5" in result.stdout
    model, _ = load_model(output)
    assert verify_sparsity(model)["overall_sparsity"] == pytest.approx(0.5, abs=0.01)

    bad = subprocess.run(
        [_optimum_cli(), "prune", "-m", str(model_dir), "--sparsity", "5:4", "--output", str(tmp_path / "bad")],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2
    assert "optimum-cli prune: error: --sparsity '5:4'" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_from_pretrained_prefers_the_given_tokenizer_and_loads_in_the_given_dtype(model_dir, bpe_tokenizer):
    pruner = OptimumPruner.from_pretrained(model_dir, tokenizer=bpe_tokenizer, dtype=torch.bfloat16)
    assert pruner.tokenizer is bpe_tokenizer  # the checkpoint has a tokenizer of its own
    assert next(pruner.model.parameters()).dtype == torch.bfloat16
