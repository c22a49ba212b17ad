"""torchrun entry point of ``llamafactory-prune train``: one rank of LLaMA-Factory's training
on the already-pruned model; with ``--keep-masks``, ``PruningCallback`` keeps the zeros on every rank,
and the YAML's ``distill:``, ``perp:`` and ``expert_dropping:`` sections apply on every rank.

    torchrun ... -m llamafactory_ext.worker config.yaml [--keep-masks]
"""

from __future__ import annotations

import sys

from .compat import import_llamafactory
from .config import read_yaml
from .stages import train_here
from .training import TrainingSections


def main() -> None:
    import_llamafactory()
    config, *flags = sys.argv[1:]
    args, training = TrainingSections.split(read_yaml(config), pruning=False)
    train_here(args, "--keep-masks" in flags, training)


if __name__ == "__main__":
    main()
