"""Registers ``optimum-cli prune`` (optimum-cli imports every module of this namespace package)."""

from optimum_prune.integrations.optimum import PruneCommand

REGISTER_COMMANDS = [PruneCommand]
