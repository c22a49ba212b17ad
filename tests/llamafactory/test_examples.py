"""The example YAMLs stay valid: their pruning: sections and every LLaMA-Factory key they use."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from llamafactory_ext.config import read_yaml, split_pruning
from llamafactory_ext.training import TrainingSections

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "llamafactory").glob("*.yaml"))


def llamafactory_keys() -> set[str]:
    from llamafactory.hparams import DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, TrainingArguments

    classes = (DataArguments, FinetuningArguments, GeneratingArguments, ModelArguments, TrainingArguments)
    return {field.name for cls in classes for field in dataclasses.fields(cls)}


def test_there_is_one_yaml_per_stage():
    names = {path.stem for path in EXAMPLES}
    assert {"prune_wanda_2of4", "sft_lora_recovery", "pt_lora_recovery", "export_merged", "chat_pruned"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_yaml_is_valid(path, workspace):
    args = read_yaml(path)
    args["dataset_dir"] = str(workspace / "data")  # the examples' own data dir exists after prepare.py
    lf_args, section = split_pruning(args)
    if "distill" in lf_args:  # its teacher defaults to the model, which exists only after prepare.py
        lf_args["model_name_or_path"] = str(workspace / "tiny")
    lf_args, _ = TrainingSections.split(lf_args, pruning=section is not None)
    unknown = set(lf_args) - llamafactory_keys() - {"stage"}
    assert not unknown, f"{path.name}: keys LLaMA-Factory does not know: {unknown}"
    assert lf_args.get("stage") in (None, "prune", "pt", "sft")
    if lf_args.get("stage") in ("prune", "pt", "sft"):
        assert section is not None and section.config.calibration_seq_len == 512
