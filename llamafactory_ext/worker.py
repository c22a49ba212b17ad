"""torchrun entry point of ``llamafactory-prune train``: one rank of LLaMA-Factory's training
on the already-pruned model; with ``--keep-masks``, ``PruningCallback`` keeps the zeros on every rank,
and a ``distill:`` section in the YAML distils on every rank.

    torchrun ... -m llamafactory_ext.worker config.yaml [--keep-masks]
"""

from __future__ import annotations

import sys

from optimum_prune import PruningCallback

from .compat import import_llamafactory
from .config import read_yaml
from .distill import distilling_trainers, split_distill


def main() -> None:
    import_llamafactory()
    from llamafactory.train.tuner import run_exp

    config, *flags = sys.argv[1:]
    args, distill = split_distill(read_yaml(config), pruning=False)
    with distilling_trainers(distill):
        run_exp(args, callbacks=[PruningCallback()] if "--keep-masks" in flags else [])


if __name__ == "__main__":
    main()
