"""The YAML's model as local files, and whether it is a pruned checkpoint (whose zeros every later step keeps)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from optimum_prune.config import CONFIG_NAME

from .compat import import_llamafactory
from .config import model_loading_kwargs


# What offloaded pruning reads of a Hub model: its safetensors weights, configuration, tokenizer and remote code.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.py"]


def model_files(args: Mapping[str, Any]) -> Path:
    """A local directory holding the YAML model's ``config.json`` (and ``pruning_config.json``, if any)."""
    return snapshot(args, ["config.json", CONFIG_NAME])


def snapshot(args: Mapping[str, Any], files: list[str]) -> Path:
    """The YAML model as a local directory: its path, or for a Hugging Face Hub id its snapshot of ``files``
    in the Hub cache, fetched with the YAML's revision, token and cache as LLaMA-Factory's loader fetches it."""
    name = str(args["model_name_or_path"])
    if Path(name).is_dir():
        return Path(name)
    import_llamafactory()
    from huggingface_hub import snapshot_download
    from llamafactory.extras.misc import use_modelscope, use_openmind

    if use_modelscope() or use_openmind():
        raise ValueError(
            f"model_name_or_path: {name} is fetched from ModelScope / Modelers, where llamafactory-prune cannot tell "
            "whether it was pruned (its zeros must then be kept); download it and give its local directory instead"
        )
    loading = model_loading_kwargs(args)
    fetched = snapshot_download(
        name, revision=loading["revision"], cache_dir=loading["cache_dir"], token=loading["token"],
        allow_patterns=files,
    )  # fmt: skip
    return Path(fetched)


def is_pruned_checkpoint(path: Path) -> bool:
    """Saved by ``save_pruned`` (``pruning_config.json``), or by LLaMA-Factory after training such a
    model: its ``config.json`` keeps the ``pruning_config`` entry, the only record a Trainer writes."""
    if (path / CONFIG_NAME).is_file():
        return True
    try:
        return "pruning_config" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
