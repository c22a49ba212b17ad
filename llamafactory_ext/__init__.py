"""LLaMA-Factory integration of optimum-prune: a ``pruning:`` section in LLaMA-Factory YAMLs,
``stage: prune``, pruning before LLaMA-Factory's own training, and its export and chat of pruned
models keeping their zeros when they merge a LoRA adapter.

Command line: ``llamafactory-prune {train,export,chat,api} config.yaml [key=value ...]``.
The pieces are importable for scripts: ``split_pruning`` / ``PruningSection`` (the YAML
section), ``read_calibration`` + ``prune_and_save``, ``merge_adapter`` (the stages) and ``restore_zeros`` (export).
"""

import importlib
from typing import Any

from .compat import import_llamafactory

# Loaded on first use (PEP 562): .config needs omegaconf and .stages LLaMA-Factory's requirements (the
# [llamafactory] extra), and importing them here would fail `llamafactory-prune` before it can say what to install.
_PIECES = {
    **dict.fromkeys(("PruningSection", "read_yaml", "split_pruning"), "config"),
    **dict.fromkeys(("merge_adapter", "prune_and_save", "read_calibration", "run_train"), "stages"),
    **dict.fromkeys(("restore_zeros", "run_export"), "export"),
    "run_interactive": "interactive",
}


def __getattr__(name: str) -> Any:
    if name in _PIECES:
        return getattr(importlib.import_module(f".{_PIECES[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PruningSection",
    "import_llamafactory",
    "merge_adapter",
    "prune_and_save",
    "read_calibration",
    "read_yaml",
    "restore_zeros",
    "run_export",
    "run_interactive",
    "run_train",
    "split_pruning",
]
