"""The pruning: section is validated, with one clear error, before anything is loaded."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import llamafactory_ext
from llamafactory_ext.cli import main
from llamafactory_ext import stages
from llamafactory_ext.config import PruningSection, model_loading_kwargs, read_yaml, split_pruning
from llamafactory_ext.distill import DistillSection, distilling_trainers
from llamafactory_ext.training import TrainingSections
from optimum_prune import ExpertDroppingSchedule
from optimum_prune.distillation import DistillationConfig, DistillationMixin

from ..conftest import tiny_model
from .conftest import base_args, write_yaml


def run_cli(tmp_path, capsys, config: dict | str, command: str = "train") -> str:
    path = tmp_path / "config.yaml"
    path.write_text(config) if isinstance(config, str) else write_yaml(path, config)
    with pytest.raises(SystemExit) as exit_info:
        main([command, str(path)])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize(
    "pruning, message",
    [
        ({"method": "wanda", "sparsty": 0.5}, "pruning.sparsty is not a valid key; valid keys: activation_device, allocation, "),
        ({"method": "wanda", "sparsity": 1.5}, r"pruning.sparsity must be in \[0, 1\)"),
        ({"method": "wanda", "sparsity": "5:4"}, "pruning.sparsity '5:4' needs 0 < N < M"),
        ({"method": "prune_everything"}, "pruning.method 'prune_everything' is not a registered pruning method; known: experts, kcm, kprune, layers, llm_surgeon, llm_surgeon_structured, low_rank, magnitude"),
        ({"method": "wanda", "calibration_dataset": "not_registered"}, "pruning.calibration_dataset 'not_registered' is not in .*dataset_info.json; registered: wiki_pt, wiki_sft"),
        ("wanda", "pruning: must be a mapping of PruningConfig fields"),
        ({"method": "magnitude", "calibration_dataset": "nope"}, "pruning.calibration_dataset: method 'magnitude' needs no calibration data"),
        ({"method": "wanda", "calibration_dataset": ""}, "pruning.calibration_dataset is empty"),
        ({"method": ["wanda"]}, r"pruning.method must be one name \(one of .*\), got \['wanda'\]"),
        ({"method": "width", "sparsity": 0.2, "method_options": {"round_to": 0}}, "error: pruning.method_options.round_to must be >= 1, got 0$"),
    ],
)
def test_bad_pruning_section_is_one_clear_error(workspace, tmp_path, capsys, pruning, message):
    config = {**base_args(workspace, tmp_path / "out", stage="prune", dataset="wiki_pt"), "pruning": pruning}
    error = run_cli(tmp_path, capsys, config)
    assert error.startswith("llamafactory-prune: error: ")
    assert re.search(message, error), error
    assert not (tmp_path / "out").exists()


def test_what_the_run_logs_names_the_yaml_keys(workspace, tmp_path, monkeypatch, caplog):
    """Its errors said pruning.<key>, its warnings PruningConfig.<field> (e.g. keep_zeros after a SparseGPT step)."""
    import logging

    def run_train(args, section, training):
        logging.getLogger("optimum_prune.report").warning(
            "set PruningConfig.method_options.keep_zeros=True; PruningConfig.parts['vision'].sparsity"
        )

    monkeypatch.setattr(stages, "run_train", run_train)
    path = tmp_path / "config.yaml"
    write_yaml(path, {**base_args(workspace, tmp_path / "out", stage="prune"), "pruning": {"method": "magnitude"}})
    with caplog.at_level(logging.WARNING):
        assert main(["train", str(path)]) == 0
    assert "set pruning.method_options.keep_zeros=True; pruning.parts.vision.sparsity" in caplog.text


def test_calibrating_method_without_any_dataset(workspace, tmp_path, capsys):
    config = {**base_args(workspace, tmp_path / "out", stage="prune"), "pruning": {"method": "wanda"}}
    assert "pruning.calibration_dataset is required" in run_cli(tmp_path, capsys, config)


def test_a_saved_recipe_pasted_in_reads_as_the_same_config(workspace, tmp_path):
    """pruning_config.json's format_version and version stamps were refused as unknown keys."""
    import json

    from optimum_prune import PruningConfig

    recipe = PruningConfig(method="magnitude", sparsity="2:4", ignore=["*.o_proj"])
    recipe.save_pretrained(tmp_path / "recipe")
    saved = json.loads((tmp_path / "recipe" / "pruning_config.json").read_text())
    assert {"format_version", "transformers_version"} <= set(saved)
    _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": saved})
    assert section.config == recipe
    _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": {**saved, "torch_version": "3.0"}})  # a later release's stamp
    assert section.config == recipe
    with pytest.raises(ValueError, match="pruning: format_version 2 is not supported"):
        split_pruning({**base_args(workspace, tmp_path), "pruning": {**saved, "format_version": 2}})


def test_a_saved_recipe_pasted_in_reads_settings_its_method_ignores_as_unset(workspace, tmp_path, caplog):
    """What an earlier version accepted and ignored, from_pretrained warns of and reads as unset; the YAML refused it."""
    import logging

    from optimum_prune import PruningConfig

    PruningConfig(method="width", sparsity=0.2, method_options={"criterion": "magnitude_l1"}).save_pretrained(tmp_path / "recipe")
    saved = json.loads((tmp_path / "recipe" / "pruning_config.json").read_text())
    saved["method_options"].update(components="mlp", head_mode="kv_group")
    (tmp_path / "recipe" / "pruning_config.json").write_text(json.dumps(saved))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": saved})
    assert section.config == PruningConfig.from_pretrained(tmp_path / "recipe")
    assert "the pruning: section sets method_options.head_mode='kv_group'" in caplog.text
    written_by_hand = {key: value for key, value in saved.items() if not key.endswith("_version")}
    with pytest.raises(ValueError, match="pruning.method_options"):
        split_pruning({**base_args(workspace, tmp_path), "pruning": written_by_hand})


def test_magnitude_needs_no_dataset(workspace, tmp_path):
    _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": {"method": "magnitude", "sparsity": 0.3}})
    assert section.calibration_dataset is None and section.config.sparsity == 0.3


@pytest.fixture
def more_datasets(workspace, tmp_path):
    """The workspace's dataset_info.json plus an openai-format chat dataset (stage detection reads only the info)."""
    info = json.loads((workspace / "data" / "dataset_info.json").read_text())
    info["chats"] = {"file_name": "chats.json", "formatting": "openai", "columns": {"messages": "messages"}}
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(info))
    return str(tmp_path / "data")


def test_calibration_dataset_defaults_to_the_yaml_dataset(workspace, tmp_path, more_datasets):
    args = base_args(workspace, tmp_path, dataset=["wiki_sft", "chats"], dataset_dir=more_datasets)
    section = PruningSection.from_mapping({"method": "wanda"}, args)
    assert section.calibration_dataset == "wiki_sft,chats" and section.calibration_stage == "sft"
    listed = PruningSection.from_mapping({"method": "wanda", "calibration_dataset": ["chats", "wiki_sft"]}, args)
    assert listed.calibration_dataset == "chats,wiki_sft"  # a YAML list, as LLaMA-Factory's own `dataset` may be


@pytest.mark.parametrize(
    "dataset, dataset_dir, stage",
    [("wiki_pt", None, "pt"), ("wiki_sft", None, "sft"), ("chats", None, "sft"), ("someone/alpaca_data", "ONLINE", "sft")],
)
def test_calibration_is_tokenised_as_its_format_says(workspace, tmp_path, more_datasets, dataset, dataset_dir, stage):
    """Conversational data (alpaca with responses, sharegpt, openai; hub datasets read as LLaMA-Factory
    reads them) goes through the chat template as in SFT, plain text as in pre-training, whatever stage
    the YAML trains."""
    args = base_args(workspace, tmp_path, stage="sft", dataset="wiki_sft", dataset_dir=dataset_dir or more_datasets)
    section = PruningSection.from_mapping({"method": "wanda", "calibration_dataset": dataset}, args)
    assert section.calibration_stage == stage


def test_mixing_conversational_and_plain_text_calibration_is_refused(workspace, tmp_path):
    args = base_args(workspace, tmp_path, stage="sft", dataset="wiki_sft")
    with pytest.raises(ValueError, match=r"mixes conversational \(wiki_sft\) and plain-text \(wiki_pt\) datasets"):
        PruningSection.from_mapping({"method": "wanda", "calibration_dataset": "wiki_sft,wiki_pt"}, args)


def test_settings_of_the_training_run_do_not_block_the_calibration_read(workspace, tmp_path):
    """Evaluation, prediction and SFT-only settings are checked by LLaMA-Factory for the run it trains,
    not for reading the (here plain-text) calibration data."""
    config = {
        **base_args(workspace, tmp_path / "out", stage="prune", dataset="wiki_sft", eval_dataset="wiki_sft", val_size=0.1),
        "eval_strategy": "steps", "predict_with_generate": True, "train_on_prompt": True,
        "pruning": {"method": "wanda", "calibration_dataset": "wiki_pt", "num_calibration_samples": 2, "calibration_seq_len": 32},
    }
    path = write_yaml(tmp_path / "config.yaml", config)
    assert main(["train", str(path)]) == 0
    assert (tmp_path / "out" / "pruning_config.json").is_file()


def test_missing_dataset_info(workspace, tmp_path, capsys):
    config = {**base_args(workspace, tmp_path / "out", stage="prune", dataset="wiki_pt", dataset_dir=str(tmp_path)), "pruning": {"method": "wanda"}}
    assert "dataset_info.json does not exist; set `dataset_dir`" in run_cli(tmp_path, capsys, config)


def test_without_the_llamafactory_extra_the_command_says_what_to_install(tmp_path):
    """In a process of its own, as the console script runs: the package's __init__ imported omegaconf (through
    .config) before main could say what to install."""
    import subprocess
    import sys

    script = "import sys; sys.modules['omegaconf'] = None\nfrom llamafactory_ext.cli import main\nsys.exit(main(['train', 'prune.yaml']))\n"
    (tmp_path / "prune.yaml").write_text("stage: prune\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    error = result.stderr.splitlines()[-1]  # after any warning the environment's variables print (CI's TRANSFORMERS_CACHE)
    assert error.startswith("llamafactory-prune: error: llamafactory-prune needs the [llamafactory] extra (")
    assert "pip install 'optimum-prune[llamafactory]'" in error


def test_without_llamafactory_itself_the_command_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    """The [llamafactory] extra without the README's second step (llamafactory installed with --no-deps): the
    MissingDependency raised while reading a calibrated pruning section was a traceback."""
    import sys

    monkeypatch.setitem(sys.modules, "llamafactory", None)  # not installed
    err = run_cli(tmp_path, capsys, "model_name_or_path: tiny\nstage: prune\ntemplate: default\noutput_dir: out\n"
                                    "pruning:\n  method: wanda\n  calibration_dataset: wiki_pt\n")
    assert err.startswith("llamafactory-prune: error: ") and "pip install --no-deps llamafactory==0.9.5" in err


def test_malformed_yaml(tmp_path, capsys):
    assert "is not valid YAML" in run_cli(tmp_path, capsys, "pruning: [method: wanda\n  sparsity: 0.5")


def test_pruning_with_an_unsupported_stage(workspace, tmp_path, capsys):
    config = {**base_args(workspace, tmp_path / "out", stage="dpo", dataset="wiki_sft"), "pruning": {"method": "magnitude"}}
    assert "works with stage: prune, pt or sft; got stage: 'dpo'" in run_cli(tmp_path, capsys, config)


@pytest.mark.parametrize("command", ["export", "chat", "api"])
def test_pruning_section_outside_train_is_refused(workspace, tmp_path, capsys, command):
    """Export and chat do not prune: a `pruning:` section there would otherwise be dropped silently."""
    config = {**base_args(workspace, tmp_path / "out"), "export_dir": str(tmp_path / "exported"), "pruning": {"method": "magnitude"}}
    error = run_cli(tmp_path, capsys, config, command)
    assert f"the `pruning:` section only applies to `train`; `{command}` does not prune" in error
    assert not (tmp_path / "exported").exists()


def test_pruning_into_the_checkpoint_being_pruned_is_refused(tmp_path, capsys, bpe_tokenizer):
    source = tmp_path / "dense"
    tiny_model().save_pretrained(source)
    bpe_tokenizer.save_pretrained(source)
    before = sorted(path.name for path in source.iterdir())
    config = {"stage": "prune", "model_name_or_path": str(source), "template": "default", "output_dir": str(source),
              "pruning": {"method": "magnitude"}}  # fmt: skip
    assert f"output_dir {source} is the checkpoint being pruned" in run_cli(tmp_path, capsys, config)
    assert sorted(path.name for path in source.iterdir()) == before


def test_overrides_apply_to_the_pruning_section(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"stage": "prune", "pruning": {"method": "wanda", "sparsity": 0.5}})
    args = read_yaml(path, ["pruning.sparsity=2:4", "learning_rate=1e-4"])
    assert args["pruning"]["sparsity"] == "2:4" and args["learning_rate"] == 1e-4
    with pytest.raises(ValueError, match="override 'learning_rate' is not of the form key=value"):
        read_yaml(path, ["learning_rate"])


def test_unquoted_nm_pattern_is_not_a_base_60_integer(tmp_path):
    """YAML 1.1 (PyYAML, OmegaConf) reads `2:4` as 124; the pattern must survive unquoted."""
    path = tmp_path / "c.yaml"
    path.write_text("learning_rate: 1.0e-4\nmax_steps: 10\npruning:\n  method: wanda\n  sparsity: 2:4\n")
    args = read_yaml(path)
    assert args == {"learning_rate": 1e-4, "max_steps": 10, "pruning": {"method": "wanda", "sparsity": "2:4"}}


def test_every_other_scalar_reads_as_llamafactory_cli_reads_it(tmp_path):
    """Dates were datetime objects, which OmegaConf then refused ("Value 'date' is not a supported primitive
    type"); 0o17, +.5 and .5e3 were numbers where OmegaConf keeps the text."""
    from omegaconf import OmegaConf

    spellings = ["2024-01-01", "2024-01-01 10:00:00", "0o17", "017", "+.5", ".5e3", ".5e-3", "1e3", "1.5e+3", "1_000",
                 "0x1F", "0b101", "-.inf", ".NaN", "yes", "~", "'2:4'"]  # fmt: skip
    path = tmp_path / "c.yaml"
    path.write_text("".join(f"key{index}: {spelling}\n" for index, spelling in enumerate(spellings)))
    read = read_yaml(path)
    expected = OmegaConf.to_container(OmegaConf.load(path))
    assert {key: repr(value) for key, value in read.items()} == {key: repr(value) for key, value in expected.items()}


def test_torchaudio_stand_in_in_a_fresh_interpreter():
    """LLaMA-Factory imports torchaudio at module level; without a usable torchaudio the stand-in lets
    text pipelines import, transformers still reports it absent, and audio use fails clearly."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["torchaudio"] = None  # unusable here even where a torchaudio is installed: import raises
from llamafactory_ext.compat import import_llamafactory
import_llamafactory()
from llamafactory.train.tuner import run_exp, export_model
from llamafactory.chat import ChatModel
import torchaudio, transformers.utils.import_utils as iu
assert not iu.is_torchaudio_available()
try:
    torchaudio.load("x.wav")
except ImportError as error:
    print("stand-in:", error)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "install the torchaudio build matching your torch" in result.stdout


def test_launching_under_torchrun_directly_is_refused(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = {**base_args(workspace, tmp_path / "out", stage="prune"), "pruning": {"method": "magnitude"}}
    assert "set FORCE_TORCHRUN=1" in run_cli(tmp_path, capsys, config)


@pytest.mark.parametrize(
    ("distill", "extra", "message"),
    [
        ({"temprature": 2.0, "teacher": "TINY"}, {}, "distill.temprature is not a valid key"),
        ({"kd_weight": 1.0}, {}, "distill.teacher is required"),
        ({"teacher": "no/such/dir"}, {}, "distill.teacher 'no/such/dir' is not a local checkpoint directory"),
        ({"teacher": "./no-such-dir"}, {}, "distill.teacher './no-such-dir' is not a local checkpoint directory"),
        ({"teacher": "TINY", "teacher_dtype": "int8"}, {}, "distill.teacher_dtype must be one of"),
        ({"teacher": "TINY", "teacher_quantization": "int3"}, {}, "distill.teacher_quantization must be one of int8, nf4"),
        ({"teacher": "TINY", "temperature": 0}, {}, "distill: DistillationConfig.temperature must be > 0"),
        ({"teacher": "TINY"}, {"stage": "prune"}, "works with stage: pt or sft"),
        ("teacher", {}, "distill: must be a mapping"),
    ],
)
def test_distill_section_errors_name_the_key(workspace, tmp_path, distill, extra, message):
    from llamafactory_ext.distill import split_distill

    if isinstance(distill, dict) and distill.get("teacher") == "TINY":
        distill = {**distill, "teacher": str(workspace / "tiny")}
    args = {**base_args(workspace, tmp_path), "stage": "sft", **extra, "distill": distill}
    with pytest.raises(ValueError) as error:
        split_distill(args, pruning=False)
    assert message in str(error.value)


def test_distill_teacher_defaults_to_the_model_being_pruned(workspace, tmp_path):
    from llamafactory_ext.distill import split_distill

    args = {**base_args(workspace, tmp_path), "stage": "sft", "distill": {"top_k": 8}}
    rest, section = split_distill(args, pruning=True)
    assert "distill" not in rest and section.teacher == str(workspace / "tiny") and section.config.top_k == 8
    assert split_distill(args, pruning=True, validate=False) == (rest, None)  # export / chat drop it
    hub = {**args, "model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}  # LLaMA-Factory YAMLs usually name Hub ids
    assert split_distill(hub, pruning=True)[1].teacher == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_distill_teacher_loads_with_the_yaml_hub_settings(workspace, tmp_path, monkeypatch):
    """As LLaMA-Factory's reference models inherit the YAML's model_revision, hf_hub_token, cache_dir and trust_remote_code."""
    import transformers

    from llamafactory_ext.distill import split_distill

    loads = []
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append((a, k)) or torch.nn.Linear(1, 1))
    hub = {"model_revision": "v1", "hf_hub_token": "hf_token", "cache_dir": str(tmp_path / "cache"), "trust_remote_code": True}
    _, section = split_distill({**base_args(workspace, tmp_path), "stage": "sft", **hub, "distill": {}}, pruning=True)
    section.load_teacher("cpu")
    [(args, kwargs)] = loads
    assert args == (str(workspace / "tiny"),)
    assert kwargs == {"dtype": torch.float32, "revision": "v1", "token": "hf_token", "cache_dir": str(tmp_path / "cache"), "trust_remote_code": True}


def test_pruning_offload_must_be_disk(workspace, tmp_path):
    with pytest.raises(ValueError, match="pruning.offload must be one of disk"):
        split_pruning({**base_args(workspace, tmp_path), "pruning": {"method": "magnitude", "offload": "gpu"}})
    _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": {"method": "magnitude", "offload": "disk"}})
    assert section.offload == "disk"


@pytest.mark.parametrize(
    "pruning, refused",
    [
        ({"method": "width", "sparsity": 0.2, "method_options": {"criterion": "magnitude_l1"}}, "per-layer methods"),
        ({"method": "wanda", "allocation": "sensitivity", "calibration_dataset": "wiki_pt"}, "pruning.allocation 'sensitivity' needs gradients"),
    ],
)
def test_pruning_offload_of_a_recipe_that_holds_the_whole_model_is_refused_with_the_section(workspace, tmp_path, pruning, refused):
    """It was refused only once LLaMA-Factory had loaded and tokenised the dataset, naming no key."""
    with pytest.raises(ValueError, match=rf"^pruning\.offload: disk: .*{refused}"):
        split_pruning({**base_args(workspace, tmp_path), "pruning": {**pruning, "offload": "disk"}})


def test_pruning_activation_device_is_a_device_name(workspace, tmp_path):
    with pytest.raises(ValueError, match="pruning.activation_device 'gpu0' is not a device name"):
        split_pruning({**base_args(workspace, tmp_path), "pruning": {"method": "wanda", "calibration_dataset": "wiki_pt", "activation_device": "gpu0"}})
    _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": {"method": "wanda", "calibration_dataset": "wiki_pt", "activation_device": "cpu"}})
    assert section.activation_device == "cpu"
    _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": {"method": "wanda", "calibration_dataset": "wiki_pt", "activation_device": "disk"}})
    assert section.activation_device == "disk"


def test_pruning_activation_device_is_refused_for_methods_that_keep_none(workspace, tmp_path):
    """Refused when the YAML is read, before the model loads (it used to fail inside prune, after loading)."""
    pruning = {"method": "layers", "sparsity": 0.2, "activation_device": "cpu"}
    with pytest.raises(ValueError, match="pruning.activation_device applies to the per-layer methods.*leave pruning.activation_device unset"):
        split_pruning({**base_args(workspace, tmp_path), "pruning": pruning})
    pruning = {"method": "magnitude", "activation_device": "cpu"}  # per layer, but without calibration: no activations
    with pytest.raises(ValueError, match="'magnitude' .allocation 'uniform'. reads no calibration: leave pruning.activation_device unset"):
        split_pruning({**base_args(workspace, tmp_path), "pruning": pruning})
    owl = {**pruning, "allocation": "owl", "calibration_dataset": "wiki_pt"}
    _, section = split_pruning({**base_args(workspace, tmp_path), "pruning": owl})
    assert section.activation_device == "cpu"


def test_precompute_top_k_needs_top_k_and_no_hidden_loss(workspace, tmp_path):
    from llamafactory_ext.distill import split_distill

    args = {**base_args(workspace, tmp_path), "stage": "sft"}
    for distill in ({"precompute_top_k": True}, {"precompute_top_k": True, "top_k": 8, "hidden_weight": 1.0}):
        with pytest.raises(ValueError, match="distill.precompute_top_k stores the teacher's top-k logits"):
            split_distill({**args, "distill": {"teacher": str(workspace / "tiny"), **distill}}, pruning=False)
    for prediction in ({"do_predict": True}, {"predict_with_generate": True}):
        section = {"teacher": str(workspace / "tiny"), "precompute_top_k": True, "top_k": 8}
        with pytest.raises(ValueError, match="teacher is gone by the time LLaMA-Factory predicts"):
            split_distill({**args, **prediction, "distill": section}, pruning=False)


@pytest.mark.parametrize(
    ("name", "section", "extra", "message"),
    [
        ("perp", {"lora_rank": 4}, {}, "perp.lora_rank is not a valid key; valid keys: alpha, biases, lora, norms, rank, target_modules"),
        ("perp", {"lora": "dora"}, {}, "perp: PERPConfig.lora must be 'mask', 'scale' or None"),
        ("perp", {}, {"finetuning_type": "lora"}, "the `perp:` section needs finetuning_type: full (got 'lora')"),
        ("perp", {}, {"stage": "prune"}, "the `perp:` section works with stage: pt or sft"),
        ("perp", "mask", {}, "perp: must be a mapping"),
        ("expert_dropping", {"experts": 2}, {}, "expert_dropping.experts is not a valid key; valid keys: end_step, every, final_experts, start_step"),
        ("expert_dropping", {"final_experts": 0}, {}, "expert_dropping: ExpertDroppingSchedule needs final_experts >= 1"),
        ("expert_dropping", {}, {"finetuning_type": "lora"}, "the `expert_dropping:` section needs finetuning_type: full"),
        ("expert_dropping", {}, {"perp": {}}, "`perp:` and `expert_dropping:` cannot be combined"),
    ],
)
def test_training_section_errors_name_the_key(workspace, tmp_path, name, section, extra, message):
    from llamafactory_ext.training import TrainingSections

    args = {**base_args(workspace, tmp_path), "stage": "sft", "finetuning_type": "full", **extra, name: section}
    with pytest.raises(ValueError) as error:
        TrainingSections.split(args, pruning=False)
    assert message in str(error.value)


def test_training_sections_become_configs_and_round_trip_to_the_workers(workspace, tmp_path):
    from llamafactory_ext.training import TrainingSections

    from optimum_prune import ExpertDroppingSchedule, PERPConfig

    args = {**base_args(workspace, tmp_path), "stage": "sft", "finetuning_type": "full"}
    sections = {
        "perp": ({"lora": "scale", "rank": 4, "target_modules": ["q_proj", "v_proj"]}, PERPConfig(lora="scale", rank=4, target_modules=("q_proj", "v_proj"))),
        "expert_dropping": ({"final_experts": 2, "end_step": 10}, ExpertDroppingSchedule(final_experts=2, end_step=10)),
    }
    for name, (section, expected) in sections.items():
        rest, read = TrainingSections.split({**args, name: section}, pruning=False)
        assert rest == args and getattr(read, name) == expected
        assert TrainingSections.split({**rest, **read.to_mapping()}, pruning=False)[1] == read  # the torchrun workers' copy
        assert TrainingSections.split({**args, name: section}, pruning=False, validate=False) == (args, TrainingSections())  # export / chat


def test_packing_does_not_pad_the_calibration_stream(workspace, tmp_path):
    """LLaMA-Factory pads each SFT pack to full length: with packing on, the pads were calibrated on."""
    from llamafactory_ext.stages import read_calibration

    args = base_args(workspace, tmp_path / "out", stage="sft", dataset="wiki_sft")
    pruning = {"method": "wanda", "num_calibration_samples": 8, "calibration_seq_len": 256}
    plain = read_calibration(args, PruningSection.from_mapping(pruning, args)).windows
    packed_args = {**args, "packing": True}
    packed = read_calibration(packed_args, PruningSection.from_mapping(pruning, packed_args)).windows
    assert torch.equal(packed, plain)


def test_plain_text_calibration_reads_whole_documents(workspace, tmp_path, bpe_tokenizer):
    """Unpacked, LLaMA-Factory cut each text at cutoff_len (set to calibration_seq_len): only documents' openings were
    calibrated on, and a few long articles warned of too little text."""
    import json

    from llamafactory_ext.stages import read_calibration
    from optimum_prune.calibration import sample_windows
    from optimum_prune.data import wikipedia_articles

    articles = wikipedia_articles("calibration")[:2]
    data = tmp_path / "data"
    data.mkdir()
    (data / "articles.json").write_text(json.dumps([{"text": article} for article in articles]))
    (data / "dataset_info.json").write_text(json.dumps({"articles": {"file_name": "articles.json", "columns": {"prompt": "text"}}}))
    args = base_args(workspace, tmp_path / "out", stage="pt", dataset="articles", dataset_dir=str(data))
    pruning = {"method": "wanda", "num_calibration_samples": 8, "calibration_seq_len": 64}
    calibration = read_calibration(args, PruningSection.from_mapping(pruning, args))
    stream = [token for article in articles for token in bpe_tokenizer(article + bpe_tokenizer.eos_token, add_special_tokens=False)["input_ids"]]
    assert len(stream) > 100 * 64
    assert torch.equal(calibration.windows, sample_windows(torch.tensor(stream), 8, 64, 0))
    assert calibration.tokenizer.model_max_length == bpe_tokenizer.model_max_length


def test_a_teacher_with_another_tokenizer_of_the_same_size_is_refused(workspace, tmp_path):
    """Only the logit counts were compared: a teacher whose ids name other tokens trained the student on nonsense."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llamafactory_ext.distill import split_distill
    from optimum_prune.data import wikipedia_articles

    from ..conftest import TINY, tiny_model

    other = Tokenizer(models.BPE())
    other.pre_tokenizer, other.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<eos>"])
    other.train_from_iterator(wikipedia_articles("calibration")[5:10], trainer=trainer)
    teacher = tmp_path / "teacher"
    tiny_model(seed=1).save_pretrained(teacher)
    args = {**base_args(workspace, tmp_path), "stage": "sft", "distill": {"teacher": str(teacher)}}
    assert split_distill(args, pruning=False)[1].teacher == str(teacher)  # no tokenizer saved: taken to be the student's
    PreTrainedTokenizerFast(tokenizer_object=other, eos_token="<eos>", pad_token="<eos>").save_pretrained(teacher)
    with pytest.raises(ValueError, match=r"distill.teacher '.*teacher' has another tokenizer than .*tiny \(about \d+ token ids differ\)"):
        split_distill(args, pruning=False)


def test_a_yaml_without_hub_settings_loads_as_llamafactory_does():
    assert model_loading_kwargs({}) == {"revision": "main", "token": None, "cache_dir": None, "trust_remote_code": False}


def test_the_distill_section_reaches_the_torchrun_workers_whole(workspace, tmp_path):
    pytest.importorskip("bitsandbytes")
    args = {**base_args(workspace, tmp_path), "stage": "sft", "finetuning_type": "lora"}
    distill = {"top_k": 8, "precompute_top_k": True, "teacher_device": "cpu", "teacher_dtype": "bfloat16", "teacher_quantization": "nf4"}
    rest, read = TrainingSections.split({**args, "distill": distill}, pruning=True)
    worker_yaml = write_yaml(tmp_path / "worker.yaml", {**rest, **read.to_mapping()})  # what _run_under_torchrun writes
    again = TrainingSections.split(read_yaml(worker_yaml), pruning=False)[1]
    assert again == read and again.distill.teacher_quantization == "nf4" and again.distill.precompute_top_k


def test_an_expert_dropping_section_becomes_the_callbacks_schedule(workspace, tmp_path):
    schedule = {"final_experts": 2, "end_step": 10}
    args = {**base_args(workspace, tmp_path), "stage": "sft", "finetuning_type": "full", "expert_dropping": schedule}
    [callback] = TrainingSections.split(args, pruning=False)[1].callbacks(keep_masks=False)
    assert callback.expert_dropping is not None and callback.expert_dropping.schedule == ExpertDroppingSchedule(**schedule)


def test_a_perp_section_needs_full_finetuning_when_the_yaml_leaves_llamafactorys_default_lora(workspace, tmp_path):
    with pytest.raises(ValueError, match="needs finetuning_type: full"):
        TrainingSections.split({**base_args(workspace, tmp_path), "stage": "sft", "perp": {}}, pruning=False)


def test_the_pruning_seed_samples_the_calibration_windows(workspace, tmp_path):
    args = base_args(workspace, tmp_path / "out", stage="prune", dataset="wiki_pt")
    def windows(seed):
        section = PruningSection.from_mapping({"method": "wanda", "num_calibration_samples": 4, "calibration_seq_len": 32, "seed": seed}, args)
        return stages.read_calibration(args, section).windows
    assert torch.equal(windows(3), windows(3)) and not torch.equal(windows(3), windows(0))


def test_a_calibration_dataset_shorter_than_one_window_names_the_key(workspace, tmp_path):
    args = base_args(workspace, tmp_path / "out", stage="prune", dataset="wiki_pt")
    section = PruningSection.from_mapping({"method": "wanda", "calibration_seq_len": 10**7}, args)
    with pytest.raises(ValueError, match="fewer than one window of pruning.calibration_seq_len 10000000; give more text or lower pruning.calibration_seq_len"):
        stages.read_calibration(args, section)


def test_a_tokenized_path_of_the_training_run_is_not_written_by_the_calibration_read(workspace, tmp_path):
    args = base_args(workspace, tmp_path / "out", stage="pt", dataset="wiki_pt", tokenized_path=str(tmp_path / "tokenized"))
    section = PruningSection.from_mapping({"method": "wanda", "num_calibration_samples": 2, "calibration_seq_len": 32}, args)
    assert stages.read_calibration(args, section).windows.shape == (2, 32)
    assert not (tmp_path / "tokenized").exists()


def test_sections_reach_the_torchrun_relaunch_and_lora_by_default_is_merged(workspace, tmp_path, monkeypatch):
    launched, merged = [], []
    monkeypatch.setattr(stages, "_wants_torchrun", lambda: True)
    monkeypatch.setattr(stages, "_run_under_torchrun", lambda args, keep_masks: launched.append((args, keep_masks)))
    monkeypatch.setattr(stages, "prune_and_save", lambda *a, **k: None)
    monkeypatch.setattr(stages, "merge_adapter", lambda *a, **k: merged.append(a))
    args = {**base_args(workspace, tmp_path / "out", stage="sft", dataset="wiki_sft", do_train=True),  # no finetuning_type: lora
            "pruning": {"method": "magnitude", "sparsity": 0.5}, "distill": {"top_k": 8}}
    rest, section = split_pruning(args)
    rest, training = TrainingSections.split(rest, pruning=True)
    stages.run_train(rest, section, training)
    [(launched_args, keep_masks)] = launched
    assert keep_masks and launched_args["distill"]["top_k"] == 8 and launched_args["model_name_or_path"].endswith("pruned")
    [(base, adapter, target, *_)] = merged
    assert Path(target) == tmp_path / "out" / "merged"


def test_offload_disk_is_kept_for_a_method_that_calibrates(workspace, tmp_path):
    pruning = {"method": "wanda", "calibration_dataset": "wiki_pt", "offload": "disk"}
    assert split_pruning({**base_args(workspace, tmp_path), "pruning": pruning})[1].offload == "disk"


def test_precompute_top_k_refuses_an_early_exit_loss(workspace, tmp_path):
    from llamafactory_ext.distill import split_distill

    distill = {"teacher": str(workspace / "tiny"), "precompute_top_k": True, "top_k": 8, "exit_weight": 0.5, "exit_layer": 1}
    with pytest.raises(ValueError, match="leave hidden_weight and exit_weight at 0"):
        split_distill({**base_args(workspace, tmp_path), "stage": "sft", "distill": distill}, pruning=False)


def test_a_yaml_key_read_as_a_boolean_is_named_with_a_hint_to_quote_it():
    """`on:` beside a misspelt key: sorting True among the strings raised a TypeError."""
    from llamafactory_ext.sections import check_section
    from optimum_prune.yaml_files import load_yaml

    with pytest.raises(ValueError, match=r"pruning.True \(an unquoted YAML key read as a bool: quote it\) is not a valid key"):
        PruningSection.from_mapping(load_yaml("method: magnitude\non: 1\nsparsty: 0.5\n", "x"), {})
    with pytest.raises(ValueError, match="distill.True .* is not a valid key"):
        check_section("distill", {True: 1, "tempreature": 2.0}, ["teacher", "temperature"], "fields", {"stage": "sft"})


@pytest.mark.parametrize("dataset_dir", ["ONLINE", "REMOTE:org/datasets"])
def test_hub_dataset_dirs_are_read_by_llamafactorys_parser_not_looked_up_locally(monkeypatch, dataset_dir):
    import types

    import llamafactory.data.parser as parser

    from llamafactory_ext.config import _calibration_stage

    seen = []

    def get_dataset_list(names, directory):
        seen.append((names, directory))
        return [types.SimpleNamespace(formatting="alpaca", response="output") for _ in names]

    monkeypatch.setattr(parser, "get_dataset_list", get_dataset_list)
    assert _calibration_stage("a, b", dataset_dir) == "sft"
    assert seen == [(["a", "b"], dataset_dir)]


def test_without_dataset_dir_the_calibration_datasets_are_read_from_llamafactorys_default_data_folder(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps({"chats": {"file_name": "chats.json"}}))
    monkeypatch.chdir(tmp_path)
    section = PruningSection.from_mapping({"method": "wanda"}, {"dataset": "chats"})
    assert (section.calibration_dataset, section.calibration_stage) == ("chats", "sft")


@pytest.mark.parametrize("blank", [None, "wanda"])
def test_a_blank_or_malformed_pruning_section_is_an_error_not_no_section(blank):
    with pytest.raises(ValueError, match="pruning: must be a mapping of PruningConfig fields"):
        split_pruning({"stage": "prune", "pruning": blank})


def test_an_empty_pruning_section_is_a_section_of_defaults_not_none():
    with pytest.raises(ValueError, match="pruning.calibration_dataset is required: method 'wanda' needs calibration data"):
        split_pruning({"stage": "prune", "pruning": {}})  # the default method, wanda, calibrates


@pytest.mark.parametrize("stage", ["pt", "sft"])
def test_training_sections_work_with_both_training_stages(stage):
    from llamafactory_ext.sections import check_section

    check_section("distill", {"temperature": 2.0}, ["temperature"], "fields", {"stage": stage})  # no error


def test_the_distill_section_reaches_both_llamafactory_training_stages():
    """stage: pt trains with LLaMA-Factory's CustomTrainer, sft with CustomSeq2SeqTrainer: both distil, and only while the stage runs."""
    from llamafactory.train.pt import workflow as pt_workflow
    from llamafactory.train.sft import workflow as sft_workflow

    section = DistillSection(DistillationConfig(), teacher="unused")
    with distilling_trainers(section):
        assert issubclass(pt_workflow.CustomTrainer, DistillationMixin)
        assert issubclass(sft_workflow.CustomSeq2SeqTrainer, DistillationMixin)
    assert not issubclass(pt_workflow.CustomTrainer, DistillationMixin)


def test_the_teacher_loads_in_teacher_dtype(tmp_path):
    """teacher_dtype: bfloat16 halves the teacher's memory; it was loaded in float32 regardless."""
    tiny_model().save_pretrained(tmp_path / "teacher")
    section = DistillSection(DistillationConfig(), teacher=str(tmp_path / "teacher"), teacher_dtype="bfloat16")
    assert section.load_teacher("cpu").dtype == torch.bfloat16


def split_training_sections(tmp_path, **sections):
    (tmp_path / "dense").mkdir(exist_ok=True)
    (tmp_path / "dense" / "config.json").write_text("{}")
    base = {"stage": "sft", "finetuning_type": "full", "model_name_or_path": str(tmp_path / "dense")}
    return TrainingSections.split({**base, **sections}, pruning=True)[1]


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"expert_dropping": {"final_experts": 2.5}}, "expert_dropping.final_experts must be int, got 2.5"),  # slice indices, mid-training
        ({"perp": {"rank": 8.0}}, "perp.rank must be int, got 8.0"),  # new_empty(), when the adapters were built
        ({"perp": {"alpha": "32"}}, "perp.alpha must be float, got '32'"),
        ({"perp": {"norms": None}}, "perp.norms must be given a value"),  # a blank turned norm training off
        ({"perp": {"target_modules": 5}}, "perp.target_modules must be a list, got 5"),
        ({"distill": {"top_k": 0.5}}, "distill.top_k must be int, got 0.5"),  # topk(), mid-training
        ({"distill": {"temperature": "2.0"}}, "distill.temperature must be float"),  # was "'<=' not supported ..."
        ({"distill": {"exit_layer": "4", "exit_weight": 1.0}}, "distill.exit_layer must be int"),
        ({"distill": {"hidden_weight": 1.0, "layer_map": {0: "x"}}}, r"distill.layer_map\[0\] must be int, got 'x'"),
        ({"distill": {"kd_weight": True}}, "distill.kd_weight must be float, got True"),
        ({"distill": {"teacher_dtype": ["bfloat16"]}}, "distill.teacher_dtype must be one of"),  # was a TypeError traceback
    ],
)
def test_training_sections_check_each_values_type_before_anything_loads(tmp_path, sections, message):
    """The dataclasses check ranges, not types: a wrong type failed once training ran, or read another way."""
    with pytest.raises(ValueError, match=message):
        split_training_sections(tmp_path, **sections)


def test_training_sections_keep_well_typed_values(tmp_path):
    sections = split_training_sections(
        tmp_path, perp={"rank": 4, "alpha": 8, "target_modules": ["q_proj"]}, distill={"layer_map": {0: 1}, "hidden_weight": 1.0}
    )
    assert sections.perp.alpha == 8.0 and isinstance(sections.perp.alpha, float) and sections.perp.target_modules == ("q_proj",)
    assert sections.distill.config.layer_map == {0: 1}
    # as LLaMA-Factory's lora_target: a comma-separated string (its annotation's str member)
    assert split_training_sections(tmp_path, perp={"target_modules": "q_proj, v_proj"}).perp.target_modules == ("q_proj", "v_proj")


@pytest.mark.parametrize("value", [False, 1.5, ["cpu"]])
def test_an_activation_device_that_is_no_name_is_a_value_error(value):
    """`activation_device: off` reads as false: torch.device raised a TypeError, a traceback from the CLI."""
    with pytest.raises(ValueError, match="activation_device .* is not a device name"):
        PruningSection.from_mapping({"method": "wanda", "sparsity": 0.5, "activation_device": value}, {"dataset": "x"})


@pytest.mark.parametrize(
    ("override", "message"), [("lora_target.5=1", "list index out of range"), ("lora_target.foo=1", "invalid literal for int")]
)
def test_an_override_omegaconf_cannot_apply_is_a_value_error_naming_it(tmp_path, override, message):
    """OmegaConf's ConfigIndexError was a traceback from the CLI; its ValueError did not name the override."""
    path = write_yaml(tmp_path / "c.yaml", {"stage": "sft", "lora_target": ["q_proj", "v_proj"]})
    with pytest.raises(ValueError, match=rf"override '{override}' cannot be applied: {message}"):
        read_yaml(path, [override])


def _alias_bomb(levels: int, width: int = 10) -> str:
    lines = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\nstage: sft\n"


def test_a_yaml_whose_aliases_expand_to_a_billion_values_is_refused(tmp_path):
    """A 600-byte YAML expanding to 10⁹ values: llamafactory-cli's OmegaConf.load refuses it, but read_yaml handed the
    parsed (shared) lists to OmegaConf.create, which expands them (10⁵ values took over a minute)."""
    bomb, anchors = tmp_path / "bomb.yaml", tmp_path / "anchors.yaml"
    bomb.write_text(_alias_bomb(9))
    with pytest.raises(ValueError, match=r"bomb\.yaml: its YAML aliases expand it past 100,000 values"):
        read_yaml(bomb)
    anchors.write_text("base: &b {lr: 1.0e-4, steps: 10}\nrun: *b\nstage: sft\n")  # ordinary anchors read
    assert read_yaml(anchors)["run"] == {"lr": 1.0e-4, "steps": 10}


@pytest.mark.parametrize("depth", [32, 2000])
def test_a_yaml_nested_too_deep_is_refused_naming_the_file(tmp_path, depth):
    """PyYAML reads recursively: 2000 levels raised a raw RecursionError, and OmegaConf.create one past ~95 levels."""
    deep = tmp_path / "deep.yaml"
    deep.write_text("stage: sft\na: " + "[" * depth + "]" * depth + "\n")
    with pytest.raises(ValueError, match=r"deep\.yaml: its YAML nests lists or mappings more than 32 levels deep"):
        read_yaml(deep)
    deep.write_text("stage: sft\na: " + "[" * 31 + "]" * 31 + "\n")  # 32 levels with the document's mapping
    assert read_yaml(deep)["stage"] == "sft"


def test_without_arguments_the_error_lists_only_what_is_required(capsys):
    """argparse listed the optional key=value overrides among the required arguments."""
    with pytest.raises(SystemExit):
        main([])
    assert capsys.readouterr().err.endswith("the following arguments are required: command, config\n")


def test_non_utf8_llamafactory_yaml_is_named(tmp_path):
    from llamafactory_ext.config import read_yaml

    path = tmp_path / "train.yaml"
    path.write_bytes(b"stage: pt\n# " + "café".encode("latin-1") + b"\n")
    with pytest.raises(ValueError, match="train.yaml"):
        read_yaml(path)


def test_distill_teacher_must_be_one_checkpoint():
    from llamafactory_ext.training import TrainingSections

    args = {"model_name_or_path": "x", "stage": "pt", "finetuning_type": "full", "output_dir": "o", "distill": {"teacher": ["a", "b"]}}
    with pytest.raises(ValueError, match="distill.teacher"):  # was: TypeError "expected str, bytes or os.PathLike object, not list"
        TrainingSections.split(args, pruning=False, validate=True)


@pytest.mark.parametrize("name", llamafactory_ext.__all__)
def test_every_name_the_package_lists_loads_from_it(name):
    """restore_zeros, run_export and run_interactive moved to export.py / interactive.py; the package's lazy table
    still looked for them in stages.py (AttributeError)."""
    assert getattr(llamafactory_ext, name) is not None
