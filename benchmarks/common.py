"""What every committed benchmark table starts with: title, the command that made it, the
protocol, and the environment it ran in (imported by the scripts beside it)."""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import transformers

import optimum_prune
from optimum_prune.models import cache_root
from optimum_prune.atomic_files import atomic_directory, write_text_atomic


def table_header(title: str, command: str, protocol: str) -> list[str]:
    environment = (
        f"Environment: {platform.processor() or platform.machine()} ({cpu_kernels()} kernels), {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, transformers {transformers.__version__}, optimum-prune {optimum_prune.__version__}."
    )
    return [f"# {title}", "", f"Command: `{command}`", "", protocol, "", environment, ""]


def cpu_kernels() -> str:
    """The instruction set torch's CPU kernels use here (AVX2, AVX512, ...): it sets their summation
    order, so results measured on machines of different kinds may differ in the last digits."""
    return torch.backends.cpu.get_cpu_capability()


def quick_or_full(description: str, table: str, quick_help: str) -> tuple[bool, Path]:
    """Parse ``--quick`` / ``--output``; return (quick, where the table goes: ``benchmarks/TABLE.md``
    for the full protocol, ``TABLE-quick.md`` for the quick one)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--output", type=Path, help=f"markdown table (default: benchmarks/{table}.md or {table}-quick.md)")
    args = parser.parse_args()
    return args.quick, args.output or Path(__file__).resolve().parent / f"{table}{'-quick' if args.quick else ''}.md"


def training_cache(name: str, recipe: Any) -> Path:
    """Where a model trained by a benchmark is cached: one directory per name and training recipe."""
    return cache_root() / f"{name}-{hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:12]}"


def cached_training_seconds(directory: Path) -> float | None:
    """Training time recorded with a finished cache entry, or None if there is none."""
    record = directory / "training.json"
    return json.loads(record.read_text())["seconds"] if record.is_file() else None


def save_training(directory: Path, steps: int, seconds: float, *parts: Any) -> None:
    """Save the model and its tokenizer/processor atomically: an interrupted save leaves no half-written cache."""
    with atomic_directory(directory) as staging:
        for part in parts:
            part.save_pretrained(staging)
        (staging / "training.json").write_text(json.dumps({"steps": steps, "seconds": seconds}))


def code_version() -> str:
    """The commit the library code is at (``-modified`` when ``optimum_prune/`` differs from it), recorded with
    each measured row so that a table mixing rows of several code versions says so."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        modified = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "optimum_prune"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-modified" if modified else "")


IMPORTED_VERSION = code_version()
"""The library this process imported, read as a benchmark starts (importing this module beside
``optimum_prune``), not when a row finishes: the tree may move on while a long run goes."""


def measured(row: dict) -> dict:
    """``row`` stamped with the library commit and CPU kernels it is measured with, for ``measured_with``."""
    return {**row, "commit": IMPORTED_VERSION, "cpu_kernels": cpu_kernels()}


def measured_with(rows: Iterable[dict], unit: str = "row") -> str:
    """The table line saying at which library commits and with which CPU kernels its ``rows`` were measured
    ("not recorded" for rows cached before ``measured`` stamped them), so that a table mixing several says so."""
    versions = Counter(
        f"{row['commit']} ({row['cpu_kernels']} CPU kernels)" if row.get("commit") and row.get("cpu_kernels") else "not recorded"
        for row in rows
    )
    return (
        f"Library commit the {unit}s were measured with: "
        + ", ".join(f"{version}: {count} {unit}{'s' if count != 1 else ''}" for version, count in versions.items())
        + ("." if len(versions) == 1 else f" — not one run: {unit}s of different versions or machines may differ slightly.")
    )


def save_rows(cache: Path, rows: dict) -> None:
    """Write the finished rows beside ``cache`` and rename into place: a run killed mid-write keeps the old file."""
    write_text_atomic(cache, json.dumps(rows, indent=2))
