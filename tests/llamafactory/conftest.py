"""A LLaMA-Factory workspace: a tiny Llama with a real tokenizer, and the Wikipedia datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytest.importorskip("llamafactory_ext.compat").import_llamafactory()


@pytest.fixture(scope="session")
def workspace(tmp_path_factory, bpe_tokenizer) -> Path:
    from llamafactory_ext.datasets import write_wikipedia_datasets

    from ..conftest import tiny_model

    root = tmp_path_factory.mktemp("lf")
    tiny_model().save_pretrained(root / "tiny")
    bpe_tokenizer.save_pretrained(root / "tiny")
    write_wikipedia_datasets(root / "data")
    return root


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def base_args(workspace: Path, output_dir: Path, **overrides) -> dict:
    return {
        "model_name_or_path": str(workspace / "tiny"),
        "template": "default",
        "dataset_dir": str(workspace / "data"),
        "output_dir": str(output_dir),
        **overrides,
    }
