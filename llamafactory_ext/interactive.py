"""``llamafactory-prune chat / api``: LLaMA-Factory's own, on a pruned model whose adapter is merged first."""

from __future__ import annotations

import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Mapping

from omegaconf import OmegaConf

from .checkpoints import is_pruned_checkpoint, model_files
from .compat import import_llamafactory
from .patches import loading_sparsity_metadata_as_plain, merges_keeping_zeros


# With these LLaMA-Factory's chat applies an adapter unmerged, at run time, so its update fills the pruned zeros.
_UNMERGED_ADAPTER_SETTINGS = ("quantization_bit", "use_unsloth", "use_kt")


def run_interactive(command: str, args: Mapping[str, Any]) -> None:
    """``chat`` / ``api``: LLaMA-Factory's own entry points, with this package's checkpoint loader
    registered (non-uniform structured models need it); a LoRA adapter it merges into a pruned model
    keeps the model's zeros, as ``export`` does."""
    import_llamafactory()
    merging = bool(args.get("adapter_name_or_path")) and is_pruned_checkpoint(model_files(args))
    if merging:
        _check_adapter_is_merged(args)
    keeping_zeros = merges_keeping_zeros() if merging else nullcontext()
    with tempfile.TemporaryDirectory(prefix="llamafactory-prune-") as scratch, loading_sparsity_metadata_as_plain(), keeping_zeros:
        config_path = Path(scratch) / f"{command}.yaml"
        OmegaConf.save(OmegaConf.create(dict(args)), config_path)
        sys.argv = [sys.argv[0], str(config_path)]  # LLaMA-Factory's entry points read their YAML from argv
        if command == "chat":
            from llamafactory.chat.chat_model import run_chat

            run_chat()
        else:
            from llamafactory.api.app import run_api

            run_api()


def _check_adapter_is_merged(args: Mapping[str, Any]) -> None:
    """Refuse the settings under which LLaMA-Factory serves the adapter unmerged over a pruned model."""
    unmerged = [key for key in _UNMERGED_ADAPTER_SETTINGS if args.get(key)]
    if args.get("infer_backend", "huggingface") != "huggingface":
        unmerged.insert(0, "infer_backend")
    if unmerged:
        raise ValueError(
            f"{unmerged[0]}: {args[unmerged[0]]} with adapter_name_or_path on the pruned model {args['model_name_or_path']}: "
            "LLaMA-Factory then applies the adapter unmerged, which fills the pruned zeros; merge it first with "
            "`llamafactory-prune export` (zeros kept), then chat with export_dir as model_name_or_path"
        )
