"""torchrun entry point of ``llamafactory-prune train``: one rank of LLaMA-Factory's training
on the already-pruned model; with ``--keep-masks``, ``PruningCallback`` keeps the zeros on every rank,
and the YAML's ``distill:``, ``perp:`` and ``expert_dropping:`` sections apply on every rank.

    torchrun ... -m llamafactory_ext.worker config.yaml [--keep-masks]
"""

from __future__ import annotations

import sys

from .compat import import_llamafactory
from .config import read_yaml
from .distill import distilling_trainers
from .training import TrainingSections


def main() -> None:
    import_llamafactory()
    from llamafactory.train.tuner import run_exp

    config, *flags = sys.argv[1:]
    args, training = TrainingSections.split(read_yaml(config), pruning=False)
    with distilling_trainers(training.distill):
        run_exp(args, callbacks=training.callbacks("--keep-masks" in flags))


if __name__ == "__main__":
    main()
