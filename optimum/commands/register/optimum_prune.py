"""Registers ``optimum-cli prune``, and lets optimum-cli's other commands load pruned checkpoints.

optimum-cli imports every module of this namespace package at start-up, for every command. A command that loads a
checkpoint (``export onnx``) needs what ``import optimum_prune`` registers with transformers to read pruned
checkpoints with per-layer shapes (README: ONNX export), so this module imports the package, except for the command
lines that load none (``env``, and any asking for help: ``export onnx --help``), which start without torch and the
Trainer; the prune subparser takes its arguments when a command line reaches it. A package that fails to import is logged, and the other commands still run.
"""

from __future__ import annotations

import logging
import sys
from argparse import ArgumentParser, Namespace
from typing import Any, Sequence

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

if sys.argv[1:2] not in ([], ["env"]) and not {"-h", "--help"} & set(sys.argv[1:]):
    try:
        import optimum_prune  # noqa: F401
    except Exception as error:  # a broken install of this plugin must not take optimum-cli's own commands with it
        logging.getLogger(__name__).warning(
            "optimum-prune could not be imported (%s: %s): optimum-cli prune, and loading pruned checkpoints with "
            "per-layer shapes, are unavailable", type(error).__name__, error,
        )  # fmt: skip


class _ArgumentsWhenParsed:
    """Mixed into the ``prune`` subparser: it takes ``optimum-prune``'s arguments when a command line reaches it."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Namespace | None = None) -> Any:
        if not getattr(self, "_prune_arguments", False):
            from optimum_prune.cli import add_arguments

            add_arguments(self)
            self._prune_arguments = True
        return super().parse_known_args(args, namespace)


class PruneCommand(BaseOptimumCLICommand):
    """``optimum-cli prune``: the arguments and behaviour of the ``optimum-prune`` command."""

    COMMAND = CommandInfo(name="prune", help="Prune a causal LM (unstructured, N:M or structured) and save it.")

    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        parser.__class__ = type(f"Prune{type(parser).__name__}", (_ArgumentsWhenParsed, type(parser)), {})

    def run(self) -> None:
        from optimum_prune.cli import run_or_exit

        run_or_exit(self.parser, self.args)


REGISTER_COMMANDS = [PruneCommand]
