"""What every committed benchmark table starts with: title, the command that made it, the
protocol, and the environment it ran in (imported by the scripts beside it)."""

from __future__ import annotations

import platform

import torch
import transformers

import optimum_prune


def table_header(title: str, command: str, protocol: str) -> list[str]:
    environment = (
        f"Environment: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, optimum-prune {optimum_prune.__version__}."
    )
    return [f"# {title}", "", f"Command: `{command}`", "", protocol, "", environment, ""]
