"""torchrun entry point of ``llamafactory-prune train``: one rank of LLaMA-Factory's training
on the already-pruned model; with ``--keep-masks``, ``PruningCallback`` keeps the zeros on every rank.

    torchrun ... -m llamafactory_ext.worker config.yaml [--keep-masks]
"""

from __future__ import annotations

import sys

from optimum_prune import PruningCallback

from .compat import import_llamafactory
from .config import read_yaml


def main() -> None:
    import_llamafactory()
    from llamafactory.train.tuner import run_exp

    config, *flags = sys.argv[1:]
    run_exp(read_yaml(config), callbacks=[PruningCallback()] if "--keep-masks" in flags else [])


if __name__ == "__main__":
    main()
