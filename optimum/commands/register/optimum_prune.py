"""Registers ``optimum-cli prune``.

optimum-cli imports every module of this namespace package at start-up, for every command, so this one
imports optimum only: ``optimum_prune`` (torch, transformers' Trainer, Torch-Pruning) loads when a command
line reaches ``prune``, not for ``optimum-cli export onnx`` or ``--help``, which it would slow down or break.
"""

from __future__ import annotations

from argparse import ArgumentParser, Namespace
from typing import Any, Sequence

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo


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
