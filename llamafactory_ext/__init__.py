"""LLaMA-Factory integration of optimum-prune: a ``pruning:`` section in LLaMA-Factory YAMLs,
``stage: prune``, pruning before LLaMA-Factory's own training, and its export and chat of pruned
models keeping their zeros when they merge a LoRA adapter.

Command line: ``llamafactory-prune {train,export,chat,api} config.yaml [key=value ...]``.
The pieces are importable for scripts: ``split_pruning`` / ``PruningSection`` (the YAML
section), ``read_calibration`` + ``prune_and_save``, ``merge_adapter`` and ``restore_zeros`` (the stages).
"""

from .compat import import_llamafactory
from .config import PruningSection, read_yaml, split_pruning
from .stages import merge_adapter, prune_and_save, read_calibration, restore_zeros, run_export, run_interactive, run_train

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
