"""torchrun entry point of ``llamafactory-prune train``: one rank of LLaMA-Factory's training
on the already-pruned model, with ``PruningCallback`` keeping the zeros on every rank."""

from __future__ import annotations

import sys

from optimum_prune import PruningCallback

from .compat import import_llamafactory
from .config import read_yaml


def main() -> None:
    import_llamafactory()
    from llamafactory.train.tuner import run_exp

    run_exp(read_yaml(sys.argv[1]), callbacks=[PruningCallback()])


if __name__ == "__main__":
    main()
