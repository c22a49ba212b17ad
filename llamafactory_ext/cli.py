"""``llamafactory-prune``: ``llamafactory-cli`` for YAMLs with a ``pruning:`` section.

    llamafactory-prune train examples/llamafactory/prune_wanda_2of4.yaml
    llamafactory-prune train examples/llamafactory/sft_lora_recovery.yaml learning_rate=1e-4
    llamafactory-prune export examples/llamafactory/export_merged.yaml
    llamafactory-prune chat examples/llamafactory/chat_pruned.yaml

The YAML (with ``key=value`` overrides, as ``llamafactory-cli`` takes them) is read here; the
``pruning:`` section (``train`` only: the other commands run on a model pruned before) is validated
and handled, and everything else goes to LLaMA-Factory's own functions. A YAML without ``pruning:``
behaves exactly as under ``llamafactory-cli``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Sequence

from optimum_prune.cli import exiting_on_sigterm, messages_worded
from optimum_prune.dependencies import MissingDependency

from .compat import INSTALL_HINT

COMMANDS = {
    "train": "stage: prune prunes and saves; stage: pt/sft with `pruning:` prunes, trains with LLaMA-Factory (zeros kept), "
    "merges LoRA keeping sparsity; a `distill:` section trains against the dense teacher, a `perp:` section only "
    "biases, norms and mask-preserving LoRA, an `expert_dropping:` section drops MoE experts while fine-tuning",
    "export": "LLaMA-Factory's export; a LoRA adapter merged into a pruned model keeps the model's zeros",
    "chat": "LLaMA-Factory's CLI chat (pruned checkpoints, including non-uniform structured ones, load; an adapter "
    "merged into a pruned model keeps its zeros)",
    "api": "LLaMA-Factory's OpenAI-style API server (as chat loads the model)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamafactory-prune",
        description="Run LLaMA-Factory with a `pruning:` section in its YAML.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {name:<8}{text}" for name, text in COMMANDS.items()),
    )
    parser.add_argument("command", choices=list(COMMANDS), help="what to run (see below)")
    parser.add_argument("config", help="LLaMA-Factory YAML, optionally with a `pruning:` section")
    parser.add_argument("overrides", nargs="*", default=[], help="key=value overrides of the YAML, as llamafactory-cli takes them")  # a default: argparse otherwise lists it as required
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # OmegaConf and LLaMA-Factory's other requirements: the [llamafactory] extra
        from . import export, interactive, stages
        from .config import SECTION as PRUNING
        from .config import read_yaml, split_pruning, yaml_keys
        from .training import TrainingSections
    except ModuleNotFoundError as error:  # a package not installed (another ImportError is a bug to see whole)
        parser.exit(2, f"{parser.prog}: error: llamafactory-prune needs the [llamafactory] extra ({error}); {INSTALL_HINT}\n")
    try:
        args = read_yaml(options.config, options.overrides)
        if PRUNING in args and options.command != "train":
            raise ValueError(
                f"the `{PRUNING}:` section only applies to `train`; `{options.command}` does not prune. Prune first with "
                f"`llamafactory-prune train` (stage: prune, or pt/sft with this section), then set this YAML's "
                f"model_name_or_path to the pruned output and remove its `{PRUNING}:` section"
            )
        args, section = split_pruning(args)
        args, training = TrainingSections.split(args, pruning=section is not None, validate=options.command == "train")
    except (ValueError, FileNotFoundError, MissingDependency) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    try:
        with exiting_on_sigterm(), messages_worded(yaml_keys):  # its warnings name pruning.<key>, as its errors do
            if options.command == "train":
                stages.run_train(args, section, training)
            elif options.command == "export":
                export.run_export(args)
            else:
                interactive.run_interactive(options.command, args)
    except (ValueError, MissingDependency) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    except SystemExit as stop:  # SIGTERM: Python prints no traceback for it, so what it left would go unsaid
        for note in getattr(stop, "__notes__", []):
            print(f"{parser.prog}: {note}", file=sys.stderr)
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
