"""torchrun entry point of ``llamafactory-prune train``: one rank of LLaMA-Factory's training
on the already-pruned model; with ``--keep-masks``, ``PruningCallback`` keeps the zeros on every rank,
a ``distill:`` section in the YAML distils and a ``perp:`` section retrains PERP's subset on every rank.

    torchrun ... -m llamafactory_ext.worker config.yaml [--keep-masks]
"""

from __future__ import annotations

import sys

from .compat import import_llamafactory
from .config import read_yaml
from .distill import distilling_trainers, split_distill
from .perp import split_perp
from .stages import training_callbacks


def main() -> None:
    import_llamafactory()
    from llamafactory.train.tuner import run_exp

    config, *flags = sys.argv[1:]
    args, distill = split_distill(read_yaml(config), pruning=False)
    args, perp = split_perp(args)
    with distilling_trainers(distill):
        run_exp(args, callbacks=training_callbacks("--keep-masks" in flags, perp))


if __name__ == "__main__":
    main()
