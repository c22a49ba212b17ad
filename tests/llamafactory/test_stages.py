"""End to end through the real LLaMA-Factory: stage: prune, prune → LoRA recovery (run_exp) →
sparsity-preserving merge → export → chat, full fine-tuning, structured models, torchrun."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_prune  # noqa: F401  (registers the loader of non-uniform structured checkpoints)
from llamafactory_ext.cli import main
from llamafactory_ext import export, stages
from llamafactory_ext.export import restore_zeros
from llamafactory_ext.stages import merge_adapter
from optimum_prune import PruningConfig, prune, prune_checkpoint, save_pruned, verify_sparsity
from optimum_prune.distillation import DistillationMixin
from optimum_prune.masks import prunable_linears

from ..conftest import tiny_model
from .conftest import base_args, write_yaml

LORA_TRAINING = {
    "stage": "sft",
    "do_train": True,
    "finetuning_type": "lora",
    "lora_target": "all",
    "lora_rank": 4,
    "dataset": "wiki_sft",
    "cutoff_len": 64,
    "max_samples": 32,
    "per_device_train_batch_size": 4,
    "max_steps": 4,
    "learning_rate": 5.0e-3,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}
CALIBRATION = {"num_calibration_samples": 4, "calibration_seq_len": 32}


def train(tmp_path: Path, config: dict, env: dict | None = None) -> None:
    path = write_yaml(tmp_path / f"{Path(config['output_dir']).name}.yaml", config)
    if env is None:
        assert main(["train", str(path)]) == 0
    else:  # a separate process, as a user runs it (needed where the command re-launches itself)
        run_command("train", path, env)


def run_command(command: str, yaml_path: Path, env: dict) -> None:
    """``llamafactory-prune COMMAND YAML`` in a process of its own, with ``env`` added to its environment."""
    argv = [sys.executable, "-m", "llamafactory_ext.cli", command, str(yaml_path)]
    result = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


def zeros(directory: Path) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return {name: linear.weight.detach() == 0 for name, linear in prunable_linears(model).items()}


def assert_weights_moved(trained: Path, start: Path) -> None:
    """Training changed some kept weight: the masks held through real updates, not through a no-op run."""
    after, before = (prunable_linears(AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)) for d in (trained, start))
    assert any(not torch.equal(linear.weight, before[name].weight) for name, linear in after.items())


def assert_same_zeros(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name


@pytest.fixture(scope="module")
def recovered(workspace, tmp_path_factory) -> Path:
    """One prune (Wanda 50 %, calibrated on plain text) → LoRA SFT → merge run, shared by the checks below."""
    out = tmp_path_factory.mktemp("sft") / "run"
    pruning = {"method": "wanda", "sparsity": 0.5, "calibration_dataset": "wiki_pt", **CALIBRATION}
    config = {**base_args(workspace, out, **LORA_TRAINING), "pruning": pruning}
    train(out.parent, config)
    return out


def test_stage_prune_saves_an_nm_sparse_checkpoint(workspace, tmp_path):
    """Calibrated on instruction data through LLaMA-Factory's SFT tokenisation (template applied)."""
    config = {
        **base_args(workspace, tmp_path / "pruned", stage="prune"),
        "pruning": {"method": "sparsegpt", "sparsity": "2:4", "calibration_dataset": "wiki_sft", **CALIBRATION},
    }
    train(tmp_path, config)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    report = verify_sparsity(model, pattern="2:4")
    assert report["conforming"] and report["overall_sparsity"] >= 0.5
    assert model.config.pruning_config["method"] == "sparsegpt"
    assert (tmp_path / "pruned" / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pruned")]  # no staging left behind


def test_a_tilde_in_output_dir_means_the_home_directory_as_in_training_arguments(workspace, tmp_path, monkeypatch):
    """It was taken literally: the model went to ./~/..., while the training LLaMA-Factory then ran looked in $HOME."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    config = {**base_args(workspace, Path("~/pruned"), stage="prune"), "pruning": {"method": "magnitude", "sparsity": 0.5}}
    train(tmp_path, config)
    assert (tmp_path / "home" / "pruned" / "config.json").is_file() and not (tmp_path / "~").exists()


def test_checks_that_need_the_model_name_the_yaml_key(workspace, tmp_path, capsys):
    pruning = {"method": "magnitude", "sparsity": 0.5, "ignore": ["*.o_projj"]}
    path = write_yaml(tmp_path / "prune.yaml", {**base_args(workspace, tmp_path / "pruned", stage="prune"), "pruning": pruning})
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "pruning.ignore pattern(s) '*.o_projj' match no module" in err
    assert "PruningConfig" not in err and not (tmp_path / "pruned").exists()


def test_lora_recovery_merges_with_exact_sparsity(recovered):
    pruned = zeros(recovered / "pruned")
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(recovered / "pruned"))["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert_same_zeros(zeros(recovered / "merged"), pruned)
    merged = AutoModelForCausalLM.from_pretrained(recovered / "merged")
    base = AutoModelForCausalLM.from_pretrained(recovered / "pruned")
    changed = [n for n, p in merged.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert changed, "the merged adapter changed nothing"
    state = json.loads((recovered / "trainer_state.json").read_text())
    assert [e["sparsity"] for e in state["log_history"] if "loss" in e] == [pytest.approx(0.5, abs=1e-3)] * 4


def test_plain_peft_merge_would_fill_the_zeros(recovered):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(recovered / "pruned")
    plain = PeftModel.from_pretrained(base, recovered).merge_and_unload()
    assert verify_sparsity(plain)["overall_sparsity"] < 0.1


def test_export_restores_zeros_that_llamafactory_merge_fills(recovered, tmp_path):
    export = {
        "model_name_or_path": str(recovered / "pruned"),
        "adapter_name_or_path": str(recovered),
        "template": "default",
        "finetuning_type": "lora",
        "export_dir": str(tmp_path / "exported"),
    }
    assert main(["export", str(write_yaml(tmp_path / "export.yaml", export))]) == 0
    assert_same_zeros(zeros(tmp_path / "exported"), zeros(recovered / "pruned"))

    from llamafactory.train.tuner import export_model  # LLaMA-Factory alone: the zeros are filled

    export_model({**export, "export_dir": str(tmp_path / "plain")})
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(tmp_path / "plain"))["overall_sparsity"] < 0.1


def test_a_checkpoint_with_sparsity_metadata_exports_chats_and_trains_as_the_plain_model_it_is(recovered, workspace, tmp_path, monkeypatch):
    """transformers marks a compressed-tensors sparsity-only checkpoint quantized: LLaMA-Factory refused to merge
    for export, served the adapter unmerged in chat (its update filling the zeros) and refused full fine-tuning."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoTokenizer

    from optimum_prune import save_pruned

    base = tmp_path / "annotated"
    model = AutoModelForCausalLM.from_pretrained(recovered / "pruned", dtype=torch.float32)
    save_pruned(model, base, tokenizer=AutoTokenizer.from_pretrained(recovered / "pruned"), compressed_tensors_metadata=True)
    assert AutoModelForCausalLM.from_pretrained(base).is_quantized
    export = {"model_name_or_path": str(base), "adapter_name_or_path": str(recovered), "template": "default",
              "finetuning_type": "lora", "export_dir": str(tmp_path / "exported")}  # fmt: skip
    assert main(["export", str(write_yaml(tmp_path / "export.yaml", export))]) == 0
    assert_same_zeros(zeros(tmp_path / "exported"), zeros(recovered / "pruned"))

    from llamafactory.chat import chat_model

    served = []

    class ServedChatModel(chat_model.ChatModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            served.append(self.engine.model)

    monkeypatch.setattr(chat_model, "ChatModel", ServedChatModel)
    monkeypatch.setattr("builtins.input", lambda prompt="": "exit")
    chat = {key: export[key] for key in ("model_name_or_path", "adapter_name_or_path", "template", "finetuning_type")}
    assert main(["chat", str(write_yaml(tmp_path / "chat.yaml", chat))]) == 0
    assert_same_zeros({name: linear.weight == 0 for name, linear in prunable_linears(served[0]).items()}, zeros(recovered / "pruned"))

    out = tmp_path / "tuned"
    training = {**LORA_TRAINING, "finetuning_type": "full", "max_steps": 2}
    train(tmp_path, {**base_args(workspace, out, **training), "model_name_or_path": str(base)})
    assert_same_zeros(zeros(out), zeros(recovered / "pruned"))


def as_hub_repo(model: Path, cache: Path, repo_id: str) -> None:
    """``model`` as the Hub repository ``repo_id`` in the Hugging Face cache ``cache`` (read offline)."""
    repo, revision = cache / f"models--{repo_id.replace('/', '--')}", "0" * 40
    shutil.copytree(model, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_export_of_a_pruned_model_given_by_hub_id_restores_its_zeros(recovered, tmp_path):
    """The pruned model as a Hub repo, read offline from the Hugging Face cache the YAML names."""
    as_hub_repo(recovered / "pruned", tmp_path / "cache", "someone/pruned")
    export = {
        "model_name_or_path": "someone/pruned", "cache_dir": str(tmp_path / "cache"), "adapter_name_or_path": str(recovered),
        "template": "default", "finetuning_type": "lora", "export_dir": str(tmp_path / "exported"),
    }  # fmt: skip
    run_command("export", write_yaml(tmp_path / "export.yaml", export), {"HF_HUB_OFFLINE": "1"})
    assert_same_zeros(zeros(tmp_path / "exported"), zeros(recovered / "pruned"))


def test_a_model_from_another_hub_is_refused_where_its_pruning_decides(monkeypatch):
    monkeypatch.setenv("USE_MODELSCOPE_HUB", "1")
    with pytest.raises(ValueError, match="model_name_or_path: someone/pruned is fetched from ModelScope"):
        export.run_export({"model_name_or_path": "someone/pruned", "adapter_name_or_path": "adapter", "export_dir": "out"})


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"export_legacy_format": True}, "export_legacy_format: true writes .bin weights"),
        ({"export_hub_model_id": "me/m"}, "pushes the merged weights before"),
        ({"export_quantization_bit": 8, "adapter_name_or_path": None}, "LLaMA-Factory's GPTQ export spreads each column's rounding error"),
    ],
)
def test_exports_whose_zeros_could_not_be_restored_are_refused_before_writing(recovered, tmp_path, capsys, extra, message):
    export = {
        "model_name_or_path": str(recovered / "pruned"), "adapter_name_or_path": str(recovered), "template": "default",
        "finetuning_type": "lora", "export_dir": str(tmp_path / "exported"), **extra,
    }  # fmt: skip
    with pytest.raises(SystemExit):
        main(["export", str(write_yaml(tmp_path / "export.yaml", export))])
    assert message in capsys.readouterr().err and not (tmp_path / "exported").exists()


def test_llamafactory_chat_loads_the_merged_model(recovered):
    from llamafactory.chat import ChatModel

    chat = ChatModel({"model_name_or_path": str(recovered / "merged"), "template": "default", "infer_backend": "huggingface", "max_new_tokens": 6})
    responses = chat.chat([{"role": "user", "content": "Write about anarchism."}])
    assert responses and isinstance(responses[0].response_text, str) and responses[0].response_length > 0
    served = chat.engine.model.state_dict()  # the weights LLaMA-Factory serves are the merged, pruned ones
    for name, weight in AutoModelForCausalLM.from_pretrained(recovered / "merged").state_dict().items():
        assert torch.equal(served[name], weight.to(served[name].dtype)), name


def test_chat_with_an_adapter_on_the_pruned_model_serves_the_sparse_merge(recovered, tmp_path, monkeypatch):
    """LLaMA-Factory merges the adapter while loading, which fills the zeros; `chat` serves the merged/ weights."""
    from llamafactory.chat import chat_model

    served = []

    class ServedChatModel(chat_model.ChatModel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            served.append(self.engine.model)

    monkeypatch.setattr(chat_model, "ChatModel", ServedChatModel)  # run_chat builds it by this name
    monkeypatch.setattr("builtins.input", lambda prompt="": "exit")
    chat = {
        "model_name_or_path": str(recovered / "pruned"), "adapter_name_or_path": str(recovered), "template": "default",
        "finetuning_type": "lora", "infer_backend": "huggingface",
    }  # fmt: skip
    assert main(["chat", str(write_yaml(tmp_path / "chat.yaml", chat))]) == 0
    weights = served[0].state_dict()
    for name, weight in AutoModelForCausalLM.from_pretrained(recovered / "merged").state_dict().items():
        assert torch.allclose(weights[name].float(), weight, atol=1e-6), name
    assert_same_zeros({name: linear.weight == 0 for name, linear in prunable_linears(served[0]).items()}, zeros(recovered / "pruned"))


@pytest.mark.parametrize("extra", [{"infer_backend": "vllm"}, {"quantization_bit": 4}])
def test_chat_applying_an_adapter_unmerged_over_a_pruned_model_is_refused(recovered, tmp_path, capsys, extra):
    chat = {"model_name_or_path": str(recovered / "pruned"), "adapter_name_or_path": str(recovered), "template": "default", **extra}
    with pytest.raises(SystemExit):
        main(["chat", str(write_yaml(tmp_path / "chat.yaml", chat))])
    key, value = next(iter(extra.items()))
    assert f"{key}: {value} with adapter_name_or_path on the pruned model" in capsys.readouterr().err


def test_an_unknown_infer_dtype_is_refused_before_pruning(workspace, tmp_path, capsys, monkeypatch):
    import llamafactory_ext.stages as stages

    monkeypatch.setattr(stages, "read_calibration", lambda *_: pytest.fail("calibration read"))
    config = {**base_args(workspace, tmp_path / "out", **LORA_TRAINING), "infer_dtype": "fp8", "pruning": {"method": "magnitude"}}
    with pytest.raises(SystemExit):
        main(["train", str(write_yaml(tmp_path / "fp8.yaml", config))])
    assert "infer_dtype must be one of auto, float16, bfloat16, float32, got 'fp8'" in capsys.readouterr().err


def test_the_merge_after_training_is_saved_in_infer_dtype(workspace, tmp_path):
    """As LLaMA-Factory's export honours infer_dtype, so does the merge into export_dir; the zeros survive the cast."""
    out = tmp_path / "bf16"
    training = {**LORA_TRAINING, "max_steps": 1, "infer_dtype": "bfloat16", "export_dir": str(tmp_path / "merged_bf16")}
    train(tmp_path, {**base_args(workspace, out, **training), "pruning": {"method": "magnitude", "sparsity": 0.4}})
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_bf16", dtype="auto")
    assert merged.dtype == torch.bfloat16
    assert_same_zeros({name: linear.weight == 0 for name, linear in prunable_linears(merged).items()}, zeros(out / "pruned"))


def test_the_merge_is_saved_in_shards_of_max_shard_size_keeping_the_zeros(recovered, tmp_path):
    merge_adapter(recovered / "pruned", recovered, tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert_same_zeros(zeros(tmp_path / "sharded"), zeros(recovered / "pruned"))


def test_the_merge_after_training_takes_the_yamls_export_size(workspace, tmp_path, monkeypatch):
    """LLaMA-Factory's export shards by export_size (GB); the merge into export_dir does too."""
    shard_sizes = []

    def recording_save_pruned(*args, **kwargs):
        shard_sizes.append(kwargs.get("max_shard_size"))
        return save_pruned(*args, **kwargs)

    monkeypatch.setattr(stages, "save_pruned", recording_save_pruned)
    out = tmp_path / "sized"
    training = {**LORA_TRAINING, "max_steps": 1, "export_size": 2, "export_dir": str(tmp_path / "merged")}
    train(tmp_path, {**base_args(workspace, out, **training), "pruning": {"method": "magnitude", "sparsity": 0.4}})
    assert shard_sizes[-1] == "2GB"
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_full_finetuning_keeps_the_masks(workspace, tmp_path):
    out = tmp_path / "full"
    training = {**LORA_TRAINING, "finetuning_type": "full", "max_steps": 3}
    config = {**base_args(workspace, out, **training), "pruning": {"method": "magnitude", "sparsity": 0.4}}
    train(tmp_path, config)
    assert_same_zeros(zeros(out), zeros(out / "pruned"))
    assert_weights_moved(out, out / "pruned")
    assert not (out / "merged").exists()


def test_rerun_reuses_the_pruned_model(workspace, tmp_path):
    out = tmp_path / "again"
    config = {**base_args(workspace, out, **{**LORA_TRAINING, "max_steps": 1, "overwrite_output_dir": True}),
              "pruning": {"method": "magnitude", "sparsity": 0.3}}  # fmt: skip
    train(tmp_path, config)
    written = (out / "pruned" / "model.safetensors").stat().st_mtime_ns
    train(tmp_path, config)
    assert (out / "pruned" / "model.safetensors").stat().st_mtime_ns == written
    config["pruning"]["sparsity"] = 0.4
    train(tmp_path, config)
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(out / "pruned"))["overall_sparsity"] == pytest.approx(0.4, abs=1e-3)


def test_a_rerun_prunes_again_over_a_damaged_pruned_model(workspace, tmp_path, caplog):
    """A pruned model.safetensors cut off was reused (the record matched), and LLaMA-Factory's loader failed on it
    with a raw SafetensorError naming no file."""
    out = tmp_path / "again"
    config = {**base_args(workspace, out, **{**LORA_TRAINING, "max_steps": 1, "overwrite_output_dir": True}),
              "pruning": {"method": "magnitude", "sparsity": 0.3}}  # fmt: skip
    train(tmp_path, config)
    weights = out / "pruned" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="llamafactory_ext.stages"):
        train(tmp_path, config)
    assert weights.read_bytes() == whole
    assert f"the pruned model in {out / 'pruned'} cannot be reused, {weights} cannot be read" in caplog.text


def test_a_pruned_model_with_a_shard_missing_or_an_unreadable_index_is_not_reused(tmp_path):
    config = PruningConfig(method="magnitude", sparsity=0.5)
    pruned = tmp_path / "pruned"
    model = tiny_model()
    source = {"model_name_or_path": "base", "model_revision": "main", "model_files": "abc", "calibration_tokens_sha256": None}
    model.config.pruned_from = source
    save_pruned(model, pruned, config=config, max_shard_size="100KB")
    assert stages._differs_from_pruned(pruned, source, config) is None
    shard = sorted(pruned.glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert stages._differs_from_pruned(pruned, source, config) == f"its weights are damaged: {shard} cannot be read " + (
        f"(No such file or directory: {shard})"
    )
    (pruned / "model.safetensors.index.json").write_text("{")
    assert "model.safetensors.index.json is not a safetensors index" in stages._differs_from_pruned(pruned, source, config)


@pytest.mark.parametrize(
    "dataset, change",
    [
        ("wiki_pt", {"max_samples": 3}),  # fewer records: other calibration windows
        ("wiki_sft", {"default_system": "Answer in the style of a pirate, always."}),  # the chat template's system prompt
    ],
)
def test_rerun_with_other_calibration_tokens_prunes_again(workspace, tmp_path, dataset, change):
    """The record is the calibration tokens' digest, not a list of YAML keys that make them."""
    out = tmp_path / "again"
    config = {**base_args(workspace, out, **{**LORA_TRAINING, "max_steps": 1, "overwrite_output_dir": True}),
              "pruning": {"method": "wanda", "calibration_dataset": dataset, "num_calibration_samples": 2,
                          "calibration_seq_len": 32}}  # fmt: skip
    train(tmp_path, config)
    written = (out / "pruned" / "model.safetensors").read_bytes()
    train(tmp_path, {**config, **change})
    assert (out / "pruned" / "model.safetensors").read_bytes() != written


def test_non_uniform_structured_model_trains_merges_and_chats(workspace, tmp_path, capsys):
    out = tmp_path / "narrow"
    pruning = {"method": "width", "sparsity": 0.3, "method_options": {"criterion": "wanda_sp", "ranking": "global"}, **CALIBRATION}
    train(tmp_path, {**base_args(workspace, out, **LORA_TRAINING), "pruning": pruning})
    config = json.loads((out / "pruned" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "optimum_prune_structure"  # per-layer widths differ
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert {n: p.shape for n, p in merged.named_parameters()} == {n: p.shape for n, p in pruned.named_parameters()}
    assert_weights_moved(out / "merged", out / "pruned")
    from llamafactory.chat import ChatModel

    chat = ChatModel({"model_name_or_path": str(out / "merged"), "template": "default", "infer_backend": "huggingface", "max_new_tokens": 4})
    assert chat.chat([{"role": "user", "content": "Hello"}])[0].response_length > 0
    qlora = {**base_args(workspace, tmp_path / "qlora", **LORA_TRAINING), "model_name_or_path": str(out / "pruned"), "quantization_bit": 4}
    with pytest.raises(SystemExit):  # LLaMA-Factory would train plain LoRA, with only a warning
        main(["train", str(write_yaml(tmp_path / "qlora.yaml", qlora))])
    assert "quantization_bit: 4 with" in capsys.readouterr().err


def test_torchrun_relaunch_keeps_the_plugin(workspace, tmp_path):
    """FORCE_TORCHRUN re-launches training on 2 CPU processes (gloo); the masks must hold on each rank."""
    out = tmp_path / "ddp"
    config = {**base_args(workspace, out, **{**LORA_TRAINING, "max_steps": 2}), "pruning": {"method": "magnitude", "sparsity": 0.5}}
    train(tmp_path, config, env={"FORCE_TORCHRUN": "1", "NPROC_PER_NODE": "2"})
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["log_history"][-1]["epoch"] == pytest.approx(0.5)  # 2 steps × 4 × 2 ranks of 32 examples
    assert all("sparsity" in entry for entry in state["log_history"] if "loss" in entry)
    assert_same_zeros(zeros(out / "merged"), zeros(out / "pruned"))
    assert_weights_moved(out / "merged", out / "pruned")


# llamafactory-prune train under torchrun, its training ranks swapped for sleepers that record their process ids.
SLEEPING_RANK = """
import os, time
pid_file = os.path.join(os.environ["RANKS_DIR"], os.environ["RANK"])
with open(pid_file + ".tmp", "w") as written:
    written.write(str(os.getpid()))
os.replace(pid_file + ".tmp", pid_file)
time.sleep(120)
"""
LAUNCHING_SLEEPERS = """
import subprocess
from llamafactory_ext import stages
from optimum_prune.cli import exiting_on_sigterm

class Popen(subprocess.Popen):
    def __init__(self, args, *rest, **options):
        super().__init__([("sleeping_rank" if arg == "llamafactory_ext.worker" else arg) for arg in args], *rest, **options)

subprocess.Popen = Popen
with exiting_on_sigterm():  # as llamafactory_ext.cli.main runs it
    stages._run_under_torchrun({"stage": "sft"}, keep_masks=True)
"""


def test_sigterm_to_llamafactory_prune_stops_the_torchrun_training_ranks(tmp_path):
    """docker stop, a scheduler or timeout(1) signals the main process only; torchrun's workers run in sessions of
    their own, so torchrun has to be stopped (not SIGKILLed) for it to stop them."""
    (tmp_path / "sleeping_rank.py").write_text(SLEEPING_RANK)
    (tmp_path / "launch.py").write_text(LAUNCHING_SLEEPERS)
    ranks_dir = tmp_path / "ranks"
    ranks_dir.mkdir()
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "RANKS_DIR": str(ranks_dir), "NPROC_PER_NODE": "2", "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, str(tmp_path / "launch.py")], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while len(list(ranks_dir.glob("[0-9]"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    ranks = [int(pid_file.read_text()) for pid_file in ranks_dir.glob("[0-9]")]
    assert len(ranks) == 2
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=90) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while (running := [pid for pid in ranks if running_process(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in running:
        os.kill(pid, signal.SIGKILL)
    assert not running, "training ranks left running after llamafactory-prune exited"


def running_process(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_training_a_checkpoint_pruned_earlier_keeps_its_zeros(workspace, tmp_path):
    """stage: prune, then an ordinary YAML (no pruning: section) fine-tuning its output in full."""
    pruned = tmp_path / "pruned"
    train(tmp_path, {**base_args(workspace, pruned, stage="prune"), "pruning": {"method": "magnitude", "sparsity": 0.5}})
    out = tmp_path / "tuned"
    training = {**LORA_TRAINING, "finetuning_type": "full", "max_steps": 2}
    train(tmp_path, {**base_args(workspace, out, **training), "model_name_or_path": str(pruned)})
    assert_same_zeros(zeros(out), zeros(pruned))
    assert_weights_moved(out, pruned)
    # LLaMA-Factory's own save records the pruning only in config.json: training that output keeps its zeros too.
    assert not (out / "pruning_config.json").exists()
    again = tmp_path / "tuned-again"
    train(tmp_path, {**base_args(workspace, again, **training), "model_name_or_path": str(out)})
    assert_same_zeros(zeros(again), zeros(pruned))


def test_gradual_pruning_inside_llamafactory_run_exp(workspace, tmp_path):
    """PruningCallback passed straight to LLaMA-Factory's run_exp prunes a dense model while it trains."""
    from llamafactory.train.tuner import run_exp

    from optimum_prune import GradualSchedule, PruningCallback

    out = tmp_path / "gradual"
    training = {**LORA_TRAINING, "finetuning_type": "full", "max_steps": 4}
    run_exp(base_args(workspace, out, **training), callbacks=[PruningCallback(GradualSchedule("2:4", end_step=2, every=1))])
    report = verify_sparsity(AutoModelForCausalLM.from_pretrained(out), pattern="2:4")
    assert report["conforming"] and report["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [round(e["sparsity"], 2) for e in state["log_history"] if "loss" in e] == [0.25, 0.5, 0.5, 0.5]


def logged_losses(out: Path) -> list[float]:
    return [entry["loss"] for entry in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in entry]


def test_distill_section_trains_against_the_teacher(workspace, tmp_path):
    """Teacher = the model itself and LoRA starts as the identity, so pure KD starts at zero loss
    where the label loss starts near ln(vocab): the distillation objective is the one trained."""
    from llamafactory.train.sft import workflow

    original = workflow.CustomSeq2SeqTrainer
    distilled, labelled = tmp_path / "kd", tmp_path / "labels"
    training = {**LORA_TRAINING, "max_steps": 2}
    train(tmp_path, {**base_args(workspace, distilled, **training),
                     "distill": {"teacher": str(workspace / "tiny"), "kd_weight": 1.0, "label_weight": 0.0}})  # fmt: skip
    train(tmp_path, base_args(workspace, labelled, **training))
    assert logged_losses(distilled)[0] < 1e-4
    assert logged_losses(labelled)[0] > 1.0
    assert workflow.CustomSeq2SeqTrainer is original  # LLaMA-Factory's trainer class is restored


def test_distill_after_structured_pruning_defaults_to_the_dense_teacher(workspace, tmp_path, monkeypatch):
    from llamafactory_ext.distill import DistillSection

    teachers = []
    original_load_teacher = DistillSection.load_teacher
    monkeypatch.setattr(DistillSection, "load_teacher", lambda section, device: teachers.append(original_load_teacher(section, device)) or teachers[-1])
    out = tmp_path / "narrow-kd"
    pruning = {"method": "width", "sparsity": 0.3, "method_options": {"criterion": "wanda_sp", "ranking": "layer"}, **CALIBRATION}
    distill = {"temperature": 2.0, "label_weight": 0.5, "hidden_weight": 0.1, "top_k": 16}
    train(tmp_path, {**base_args(workspace, out, **{**LORA_TRAINING, "max_steps": 2}), "pruning": pruning, "distill": distill})
    assert [teacher.config.intermediate_size for teacher in teachers] == [128]  # the dense model taught
    losses = logged_losses(out)
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned")
    assert merged.config.intermediate_size == pruned.config.intermediate_size < 128  # the student kept its shape


def test_distill_from_a_teacher_loaded_in_8_bit(workspace, tmp_path, monkeypatch):
    """teacher_quantization loads the dense teacher through bitsandbytes (its CPU backend here) and it teaches."""
    pytest.importorskip("bitsandbytes")
    from llamafactory_ext.distill import DistillSection

    teachers = []
    original_load_teacher = DistillSection.load_teacher
    monkeypatch.setattr(DistillSection, "load_teacher", lambda section, device: teachers.append(original_load_teacher(section, device)) or teachers[-1])
    out = tmp_path / "kd-int8"
    distill = {"teacher": str(workspace / "tiny"), "teacher_quantization": "int8", "kd_weight": 1.0, "label_weight": 0.0}
    train(tmp_path, {**base_args(workspace, out, **{**LORA_TRAINING, "max_steps": 2}), "distill": distill})
    (teacher,) = teachers
    assert type(teacher.model.layers[0].mlp.up_proj).__name__ == "Linear8bitLt"
    losses = logged_losses(out)
    assert len(losses) == 2 and losses[0] < 0.1  # the student starts as the teacher, up to int8 rounding


def test_perp_section_retrains_only_its_subset_and_saves_an_ordinary_checkpoint(workspace, tmp_path):
    out = tmp_path / "perp"
    training = {**LORA_TRAINING, "finetuning_type": "full", "max_steps": 3}
    config = {**base_args(workspace, out, **training), "pruning": {"method": "magnitude", "sparsity": 0.5}, "perp": {"lora": "mask", "rank": 4}}
    train(tmp_path, config)
    assert_same_zeros(zeros(out), zeros(out / "pruned"))
    trained = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # merged: no adapter weights left
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned", dtype=torch.float32)
    assert torch.equal(trained.get_input_embeddings().weight, pruned.get_input_embeddings().weight)  # not in PERP's subset
    changed = [name for name, linear in prunable_linears(trained).items() if not torch.equal(linear.weight, prunable_linears(pruned)[name].weight)]
    assert changed  # the merged MaskLoRA moved the kept weights
    assert len(logged_losses(out)) == 3 and not (out / "merged").exists()


def test_expert_dropping_section_fine_tunes_a_mixtral_into_a_smaller_moe(workspace, tmp_path):
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    from ..conftest import TINY

    moe = tmp_path / "tiny-mixtral"
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(**{**TINY, "intermediate_size": 64, "num_local_experts": 4, "num_experts_per_tok": 2})).save_pretrained(moe)
    AutoTokenizer.from_pretrained(workspace / "tiny").save_pretrained(moe)
    out = tmp_path / "dropped"
    training = {**LORA_TRAINING, "finetuning_type": "full", "max_steps": 3}
    config = {**base_args(workspace, out, **training), "model_name_or_path": str(moe),
              "expert_dropping": {"final_experts": 2, "end_step": 2, "every": 1}}  # fmt: skip
    train(tmp_path, config)
    state = json.loads((out / "trainer_state.json").read_text())
    assert [entry["experts_kept"] for entry in state["log_history"] if "loss" in entry] == [3, 2, 2]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 2 and all(len(layer.block_sparse_moe.experts) == 2 for layer in model.model.layers)


def test_stage_prune_with_disk_offload_equals_the_in_memory_prune(workspace, tmp_path, monkeypatch):
    """On a bfloat16 checkpoint too: both prune in float32 (SparseGPT's updates would round differently)."""
    import llamafactory_ext.stages as stages
    from transformers import AutoTokenizer

    checkpoint = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(workspace / "tiny", dtype=torch.bfloat16).save_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(workspace / "tiny").save_pretrained(checkpoint)

    streamed = []
    monkeypatch.setattr(stages, "prune_checkpoint", lambda *a, **k: streamed.append(a) or prune_checkpoint(*a, **k))
    pruning = {"method": "sparsegpt", "sparsity": "2:4", **CALIBRATION}
    for name, extra in (("memory", {}), ("disk", {"offload": "disk"})):
        args = base_args(workspace, tmp_path / name, stage="prune", dataset="wiki_pt", model_name_or_path=str(checkpoint))
        train(tmp_path, {**args, "pruning": {**pruning, **extra}})
        assert len(streamed) == (name == "disk")  # only the disk run streams the checkpoint's layers
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk", dtype=torch.float32).state_dict()
    in_memory = AutoModelForCausalLM.from_pretrained(tmp_path / "memory", dtype=torch.float32).state_dict()
    assert offloaded.keys() == in_memory.keys()
    assert all(torch.equal(offloaded[name], in_memory[name]) for name in in_memory)


def test_stage_prune_loads_the_model_with_the_yaml_hub_settings(workspace, tmp_path, monkeypatch):
    """model_revision, hf_hub_token, cache_dir and trust_remote_code reach the pruned model, as they reach the tokenizer."""
    import llamafactory_ext.stages as stages

    loads = []
    load = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(stages.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loads.append(k) or load(*a, **k))
    hub = {"model_revision": "v1", "hf_hub_token": "hf_token", "cache_dir": str(tmp_path / "cache"), "trust_remote_code": True}
    train(tmp_path, {**base_args(workspace, tmp_path / "out", stage="prune", **hub), "pruning": {"method": "magnitude"}})
    assert [{key: kwargs.get(key) for key in ("revision", "token", "cache_dir", "trust_remote_code")} for kwargs in loads] == [
        {"revision": "v1", "token": "hf_token", "cache_dir": str(tmp_path / "cache"), "trust_remote_code": True}
    ]


def test_precomputed_teacher_top_k_trains_like_the_live_teacher(workspace, tmp_path, monkeypatch):
    """The teacher's top-k logits stored with the dataset (then the teacher freed) give the same
    first loss as the live teacher truncated to the same k."""
    teachers = []  # the teacher each trainer has once built, stored logits or not
    precompute = DistillationMixin.precompute_teacher_top_k

    def precomputing(self, *args, **kwargs):
        precompute(self, *args, **kwargs)
        teachers.append(self.teacher)

    monkeypatch.setattr(DistillationMixin, "precompute_teacher_top_k", precomputing)
    training = {**LORA_TRAINING, "max_steps": 1}
    distill = {"teacher": str(workspace / "tiny"), "top_k": 8, "label_weight": 0.5}
    losses = {}
    for name, extra in (("live", {}), ("stored", {"precompute_top_k": True})):
        train(tmp_path, {**base_args(workspace, tmp_path / name, **training), "distill": {**distill, **extra}})
        losses[name] = logged_losses(tmp_path / name)[0]
        assert teachers == ([None] if name == "stored" else [])  # stored, the teacher is dropped before training
    assert losses["stored"] == pytest.approx(losses["live"], rel=1e-4) and losses["live"] > 0


def test_precomputed_teacher_top_k_evaluates_too(workspace, tmp_path):
    """LLaMA-Factory's evaluation set gets the stored logits as well: evaluating after the teacher is gone works."""
    training = {**LORA_TRAINING, "max_steps": 2, "val_size": 0.25, "eval_strategy": "steps", "eval_steps": 1}
    distill = {"teacher": str(workspace / "tiny"), "top_k": 8, "label_weight": 0.5, "precompute_top_k": True}
    train(tmp_path, {**base_args(workspace, tmp_path / "evaluated", **training), "distill": distill})
    history = json.loads((tmp_path / "evaluated" / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
    assert len(evaluations) == 2 and all(math.isfinite(loss) and loss > 0 for loss in evaluations)


def test_restored_shards_keep_their_mode(tmp_path):
    """A rewritten shard took save_file's mode (0600 under safetensors 0.8, else the umask's), not the export's own."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    base = save_pruned(model, tmp_path / "base")
    shutil.copytree(base, tmp_path / "exported")
    shard = tmp_path / "exported" / "model.safetensors"
    shard.chmod(0o640)
    restore_zeros(base, tmp_path / "exported")
    assert shard.stat().st_mode & 0o777 == 0o640


def test_restore_zeros_stopped_by_a_full_disk_leaves_no_temporary_shard_and_says_what_is_restored(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    base = save_pruned(model, tmp_path / "base")
    tiny_model().save_pretrained(tmp_path / "exported", max_shard_size="100KB")

    def full_disk(tensors, path, metadata=None):
        Path(path).write_bytes(b"x" * 4096)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match=r"stopped at model-00001-of-\d+.safetensors \(No space left on device\): .* is only partly restored"):
        restore_zeros(base, tmp_path / "exported")
    assert not [path.name for path in (tmp_path / "exported").iterdir() if path.name.endswith(".tmp")]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit], ids=["ctrl-c", "sigterm"])
def test_an_interrupted_restore_of_the_pruned_zeros_says_export_dir_is_not_restored(tmp_path, monkeypatch, stop):
    import safetensors.torch

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    base = save_pruned(model, tmp_path / "base")
    tiny_model().save_pretrained(tmp_path / "exported", max_shard_size="100KB")
    save_file, saved = safetensors.torch.save_file, []

    def stopped_at_the_second_shard(*args, **kwargs):
        saved.append(args[1])
        if len(saved) == 2:
            raise stop
        return save_file(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", stopped_at_the_second_shard)
    with pytest.raises(stop) as stopped:
        restore_zeros(base, tmp_path / "exported")
    [note] = getattr(stopped.value, "__notes__", [None])
    assert re.fullmatch(r"restoring the pruned zeros was stopped at model-00002-of-\d+.safetensors: .* is only partly restored "
                        r"\(the shards before it are\); run the export again", note or ""), note  # fmt: skip
    assert not [path.name for path in (tmp_path / "exported").iterdir() if path.name.endswith(".tmp")]


def test_sigterm_during_an_export_says_what_it_left(workspace, tmp_path, monkeypatch, capsys):
    def stopped(args):
        stop = SystemExit(128 + signal.SIGTERM)  # exiting_on_sigterm's
        stop.add_note("export_dir is only partly restored")
        raise stop

    monkeypatch.setattr(export, "run_export", stopped)
    with pytest.raises(SystemExit):
        main(["export", str(write_yaml(tmp_path / "export.yaml", base_args(workspace, tmp_path / "unused")))])
    assert capsys.readouterr().err == "llamafactory-prune: export_dir is only partly restored\n"


def test_restore_zeros_refuses_another_model_before_touching_its_shards(tmp_path):
    pruned = tiny_model()
    prune(pruned, PruningConfig(method="magnitude", sparsity=0.5))
    pruned.save_pretrained(tmp_path / "base")
    tiny_model(num_hidden_layers=1).save_pretrained(tmp_path / "other")
    before = {path.name: path.read_bytes() for path in (tmp_path / "other").glob("*.safetensors")}
    with pytest.raises(ValueError, match="is it the same model"):
        restore_zeros(tmp_path / "base", tmp_path / "other")
    assert {path.name: path.read_bytes() for path in (tmp_path / "other").glob("*.safetensors")} == before
    tiny_model(intermediate_size=136).save_pretrained(tmp_path / "wider", max_shard_size="60KB")  # same names, other shapes
    before = {path.name: path.read_bytes() for path in (tmp_path / "wider").glob("*.safetensors")}
    with pytest.raises(ValueError, match=r"stores model.layers.\d.mlp.\w+_proj.weight as \[\d+, \d+\], not .*'s \[\d+, \d+\]; is it the same model"):
        restore_zeros(tmp_path / "base", tmp_path / "wider")
    assert {path.name: path.read_bytes() for path in (tmp_path / "wider").glob("*.safetensors")} == before


def refused(tmp_path: Path, capsys, config: dict) -> str:
    """``llamafactory-prune train`` on ``config`` exits with a usage error; its message."""
    with pytest.raises(SystemExit):
        main(["train", str(write_yaml(tmp_path / "refused.yaml", config))])
    return capsys.readouterr().err


@pytest.mark.parametrize("stage", ["rm", "ppo"])
def test_value_head_stages_on_a_pruned_model_are_refused_before_loading(workspace, tmp_path, capsys, stage):
    """LLaMA-Factory wraps the model in a value head: PruningCallback refused it only after model and data had loaded."""
    pruned = tmp_path / "pruned"
    train(tmp_path, {**base_args(workspace, pruned, stage="prune"), "pruning": {"method": "magnitude", "sparsity": 0.5}})
    config = {**base_args(workspace, tmp_path / "out", **{**LORA_TRAINING, "stage": stage}), "model_name_or_path": str(pruned)}
    assert f"stage: {stage} on the pruned model {pruned}: LLaMA-Factory wraps it in a value head" in refused(tmp_path, capsys, config)
    assert not (tmp_path / "out").exists()


def test_an_adapter_given_with_a_pruning_section_is_refused(workspace, tmp_path, capsys):
    config = {**base_args(workspace, tmp_path / "out", **LORA_TRAINING, adapter_name_or_path=str(tmp_path / "adapter")),
              "pruning": {"method": "magnitude", "sparsity": 0.5}}  # fmt: skip
    assert "adapter_name_or_path: " in refused(tmp_path, capsys, config) and not (tmp_path / "out").exists()


def test_an_earlier_adapter_merged_while_loading_keeps_the_zeros(workspace, tmp_path):
    """create_new_adapter: LLaMA-Factory merges the YAML's adapter into the pruned model before adding a new one."""
    pruned = tmp_path / "pruned"
    train(tmp_path, {**base_args(workspace, pruned, stage="prune"), "pruning": {"method": "magnitude", "sparsity": 0.5}})
    first = tmp_path / "first"
    train(tmp_path, {**base_args(workspace, first, **LORA_TRAINING), "model_name_or_path": str(pruned)})
    second = tmp_path / "second"
    training = {**LORA_TRAINING, "adapter_name_or_path": str(first), "create_new_adapter": True}
    train(tmp_path, {**base_args(workspace, second, **training), "model_name_or_path": str(pruned)})
    state = json.loads((second / "trainer_state.json").read_text())
    assert [e["sparsity"] for e in state["log_history"] if "loss" in e] == [pytest.approx(0.5, abs=1e-3)] * 4


def test_pruning_again_refuses_to_resume_checkpoints_of_the_earlier_pruned_model(workspace, tmp_path, capsys):
    """LLaMA-Factory resumes output_dir's last checkpoint: it held the model pruned at the earlier sparsity."""
    training = {**LORA_TRAINING, "finetuning_type": "full", "max_steps": 2, "save_strategy": "steps", "save_steps": 2}
    config = {**base_args(workspace, tmp_path / "out", **training), "pruning": {"method": "magnitude", "sparsity": 0.3}}
    train(tmp_path, config)
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    again = {**config, "pruning": {"method": "magnitude", "sparsity": 0.5}}
    expected = f"output_dir: {tmp_path / 'out'} holds checkpoints of a run on a pruned model this run would prune again (the model,"
    assert expected in refused(tmp_path, capsys, again)
    train(tmp_path, {**again, "overwrite_output_dir": True})
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(tmp_path / "out"))["overall_sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_offloaded_pruning_of_a_hub_model_reads_its_snapshot(workspace, tmp_path):
    """offload: disk took the Hub id for a directory (refused after the calibration read)."""
    as_hub_repo(workspace / "tiny", tmp_path / "cache", "someone/tiny")
    pruning = {"method": "wanda", "sparsity": 0.5, "offload": "disk", "calibration_dataset": "wiki_pt", **CALIBRATION}
    config = {**base_args(workspace, tmp_path / "out", stage="prune"), "model_name_or_path": "someone/tiny",
              "cache_dir": str(tmp_path / "cache"), "pruning": pruning}  # fmt: skip
    run_command("train", write_yaml(tmp_path / "offload.yaml", config), {"HF_HUB_OFFLINE": "1"})
    in_memory = {**config, "output_dir": str(tmp_path / "in-memory"), "pruning": {**pruning, "offload": None}}
    run_command("train", write_yaml(tmp_path / "in-memory.yaml", in_memory), {"HF_HUB_OFFLINE": "1"})
    assert_same_zeros(zeros(tmp_path / "out"), zeros(tmp_path / "in-memory"))


def test_a_model_replaced_at_the_same_path_is_pruned_again(workspace, tmp_path):
    """The reuse check compared the path and revision only: the pruned copy of the old model was trained."""
    model = tmp_path / "model"
    shutil.copytree(workspace / "tiny", model)
    config = {**base_args(workspace, tmp_path / "out", **LORA_TRAINING), "model_name_or_path": str(model),
              "pruning": {"method": "magnitude", "sparsity": 0.5}}  # fmt: skip
    train(tmp_path, config)
    tiny_model(seed=1).save_pretrained(model)
    train(tmp_path, {**config, "overwrite_output_dir": True})
    replaced = AutoModelForCausalLM.from_pretrained(model)
    expected = prune_copy(replaced)
    assert_same_zeros(zeros(tmp_path / "out" / "pruned"), {name: linear.weight == 0 for name, linear in prunable_linears(expected).items()})


def prune_copy(model: torch.nn.Module) -> torch.nn.Module:
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    return model


def test_tokens_the_yaml_adds_get_embeddings_before_pruning(workspace, tmp_path):
    """add_special_tokens: the pruned copy was saved with the new token in its tokenizer but not in its
    embeddings, so LLaMA-Factory's training on it did not resize them and failed (index out of range)."""
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    rows = json.loads((data / "wiki_sft.json").read_text())[:32]
    (data / "think.json").write_text(json.dumps([{**row, "output": "<think> " + row["output"]} for row in rows]))
    info = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**info, "think": {**info["wiki_sft"], "file_name": "think.json"}}))
    training = {**LORA_TRAINING, "dataset": "think", "dataset_dir": str(data), "add_special_tokens": "<think>", "max_steps": 1}
    config = {**base_args(workspace, tmp_path / "out", **training), "pruning": {"method": "wanda", "sparsity": 0.5, **CALIBRATION}}
    train(tmp_path, config)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "pruned")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out" / "pruned")
    assert pruned.get_input_embeddings().weight.shape[0] >= len(tokenizer) > tokenizer.convert_tokens_to_ids("<think>")  # LLaMA-Factory pads to 64
    assert (tmp_path / "out" / "merged" / "config.json").is_file()
    # Training keeps resize_vocab, so LoRA saves embed_tokens whole and the new rows train, as without pruning.
    saved = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["modules_to_save"] or []
    assert any("embed_tokens" in name for name in saved), saved


def test_a_missing_or_damaged_model_is_one_clear_error(workspace, tmp_path, capsys):
    """A local path that does not exist was reported as an invalid Hub repository id; a truncated weights file
    as safetensors' raw error (with offload: disk it already was the clear one)."""
    import shutil

    pruning = {"pruning": {"method": "magnitude", "sparsity": 0.5}}
    missing = {**base_args(workspace, tmp_path / "out", stage="prune"), "model_name_or_path": str(tmp_path / "nowhere"), **pruning}
    assert f"model_name_or_path: {tmp_path / 'nowhere'} does not exist" in refused(tmp_path, capsys, missing)
    shutil.copytree(workspace / "tiny", tmp_path / "truncated")
    weights = tmp_path / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    damaged = {**base_args(workspace, tmp_path / "out", stage="prune"), "model_name_or_path": str(tmp_path / "truncated"), **pruning}
    assert "the weights could not be read" in refused(tmp_path, capsys, damaged)
    assert not (tmp_path / "out").exists()


def test_an_export_dir_the_merge_could_not_replace_is_refused_before_pruning(workspace, tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    config = {**base_args(workspace, tmp_path / "out", **LORA_TRAINING, export_dir=str(tmp_path / "a-file")),
              "pruning": {"method": "magnitude", "sparsity": 0.5}}  # fmt: skip
    assert "a-file exists and is not a directory" in refused(tmp_path, capsys, config)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("export_dir, output_dir, word", [("run", "run", "is"), ("saves", "saves/run1", "holds")])
def test_an_export_dir_that_is_or_holds_the_output_dir_is_refused_before_pruning(workspace, tmp_path, capsys, export_dir, output_dir, word):
    """The merge replaces export_dir whole: it was refused only after training (as "holds other files")."""
    config = {**base_args(workspace, tmp_path / output_dir, **LORA_TRAINING, export_dir=str(tmp_path / export_dir)),
              "pruning": {"method": "magnitude", "sparsity": 0.5}}  # fmt: skip
    assert f"export_dir {str(tmp_path / export_dir)!r} {word} output_dir" in refused(tmp_path, capsys, config)
    assert not (tmp_path / output_dir).exists()


def test_a_tilde_in_export_dir_is_the_home_folder_as_in_output_dir(workspace, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)  # a literal "~" folder would land here
    config = {**base_args(workspace, tmp_path / "out", **LORA_TRAINING, export_dir="~/out"),
              "pruning": {"method": "magnitude", "sparsity": 0.5}}  # fmt: skip
    config["output_dir"] = "~/out"
    assert f"export_dir {str(tmp_path / 'home' / 'out')!r} is output_dir" in refused(tmp_path, capsys, config)


def test_a_lora_yaml_without_do_train_prunes_and_merges_nothing(workspace, tmp_path):
    """do_train: false trains no adapter, so there is none to merge (nor an export_dir to check)."""
    out = tmp_path / "untrained"
    config = {**base_args(workspace, out, **{**LORA_TRAINING, "do_train": False}), "pruning": {"method": "magnitude", "sparsity": 0.3}}
    train(tmp_path, config)
    assert verify_sparsity(AutoModelForCausalLM.from_pretrained(out / "pruned"))["overall_sparsity"] == pytest.approx(0.3, abs=1e-3)
    assert not (out / "merged").exists()


def test_a_pruned_model_an_earlier_version_recorded_is_not_said_to_have_changed(tmp_path):
    """Its pruned_from lacks the model files' fingerprint (added later): the refusal to resume blamed a change of
    model, calibration data or pruning section, none of which changed."""
    config = PruningConfig(method="magnitude", sparsity=0.5)
    pruned = tmp_path / "out" / "pruned"
    model = tiny_model()
    source = {"model_name_or_path": "base", "model_revision": "main", "model_files": "abc", "calibration_tokens_sha256": None}
    model.config.pruned_from = {key: value for key, value in source.items() if key != "model_files"}
    save_pruned(model, pruned, config=config)
    differs = stages._differs_from_pruned(pruned, source, config)
    assert differs.startswith("an earlier optimum-prune recorded where it came from")
    (tmp_path / "out" / "checkpoint-3").mkdir()
    (tmp_path / "out" / "checkpoint-3" / "trainer_state.json").write_text("{}")
    with pytest.raises(ValueError, match="without the model files' fingerprint"):
        stages._check_no_stale_checkpoints({"output_dir": str(tmp_path / "out")}, tmp_path / "out", differs)
    assert stages._differs_from_pruned(pruned, {**source, "model_revision": "v2"}, config) == stages.CHANGED


def test_a_pruned_model_of_a_pruned_source_is_reused_without_a_warning_about_its_steps(tmp_path, caplog):
    """The stage's own record holds the source's step before its own: the reuse check compares its own, silently."""
    config = PruningConfig(method="magnitude", sparsity=0.5)
    pruned = tmp_path / "out" / "pruned"
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.3))  # the source: a pruned model
    source = {"model_name_or_path": "base", "model_revision": "main", "model_files": "abc", "calibration_tokens_sha256": None}
    model.config.pruned_from = source
    prune(model, config)
    save_pruned(model, pruned)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert stages._differs_from_pruned(pruned, source, config) is None
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING] == []
    assert stages._differs_from_pruned(pruned, source, PruningConfig(method="magnitude", sparsity=0.3)) == stages.CHANGED


def test_distillation_refuses_a_loss_llamafactorys_trainer_sets_itself(tmp_path):
    """CustomSeq2SeqTrainer sets compute_loss_func itself (use_dft_loss, use_eaft_loss, use_asft_loss): the refusal
    read only the argument, and DFT became the label term unsaid."""
    from llamafactory_ext.compat import import_llamafactory

    import_llamafactory()
    from llamafactory.hparams import FinetuningArguments
    from llamafactory.hparams.training_args import TrainingArguments
    from llamafactory.train.sft.trainer import CustomSeq2SeqTrainer

    from optimum_prune import DistillationConfig

    class Distilling(DistillationMixin, CustomSeq2SeqTrainer):  # what llamafactory_ext.distill builds
        pass

    teacher = tiny_model(seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True, save_strategy="no")
    with pytest.raises(ValueError, match="computes its own loss"):
        Distilling(
            teacher=teacher, distillation=DistillationConfig(), finetuning_args=FinetuningArguments(use_dft_loss=True),
            processor=None, model=tiny_model(seed=1), args=args, tokenizer=None,
        )  # fmt: skip


def test_a_vision_language_model_keeps_its_processor_and_its_image_parts_take_a_data_free_method(workspace, tmp_path, bpe_tokenizer, capsys):
    """The pruned LLaVA lost its processor files (AutoProcessor could not load it for the training stage), and a
    calibrated method on pruning.parts.vision failed after loading, advising processor=, an argument of the API."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from ..multimodal.conftest import tiny_llava, tiny_llava_processor

    processor = tiny_llava_processor(bpe_tokenizer)
    tiny_llava(processor.tokenizer.convert_tokens_to_ids("<image>")).save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    args = {**base_args(workspace, tmp_path / "pruned", stage="prune"), "model_name_or_path": str(tmp_path / "llava")}
    train(tmp_path, {**args, "pruning": {"method": "magnitude", "parts": {"language": {}, "vision": {"sparsity": 0.3}}}})
    assert type(AutoProcessor.from_pretrained(tmp_path / "pruned")) is type(processor)
    pruned = LlavaForConditionalGeneration.from_pretrained(tmp_path / "pruned")
    assert verify_sparsity(pruned.model.vision_tower)["overall_sparsity"] == pytest.approx(0.3, abs=0.01)
    calibrated = {"method": "wanda", "calibration_dataset": "wiki_pt", "parts": {"language": {}, "vision": {}}, **CALIBRATION}
    path = write_yaml(tmp_path / "calibrated.yaml", {**args, "output_dir": str(tmp_path / "calibrated"), "pruning": calibrated})
    with pytest.raises(SystemExit) as exit_info:
        main(["train", str(path)])
    assert exit_info.value.code == 2 and not (tmp_path / "calibrated").exists()
    assert "pruning.parts.vision: method 'wanda' calibrates a vision tower or projector on images" in capsys.readouterr().err

