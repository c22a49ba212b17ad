"""``optimum-prune study GRID.yaml``: run (or resume) a pruning × quantization sweep and write its report."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Sequence

from ..devices import check_device
from ..cli import exiting_as_a_command, user_path
from .grid import StudyGrid
from .outputs import write_outputs
from .runner import run_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optimum-prune study",
        description="Sweep pruning recipes × quantizations on one model, cache every point, and write results.csv/json, "
        "the Pareto plot of perplexity vs bytes, layer-redundancy plots and REPORT.md. Rerunning resumes.",
    )
    parser.add_argument("grid", type=user_path, help="grid YAML (see optimum_prune.study.grid for its keys)")
    parser.add_argument(
        "--output", type=user_path, help="results directory (default: beside the grid, named after it without its suffix, or GRID.study)"
    )
    parser.add_argument("--device", help="where pruning and evaluation run (default: cuda if available, else cpu)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    output = args.output or _default_output(args.grid)
    points = output / "points"
    with exiting_as_a_command(parser, lambda _: f"the points measured so far are kept in {points}: run the same command again to resume"):
        if args.device is not None:
            check_device(args.device, "--device")
        grid = StudyGrid.from_yaml(args.grid)
        results = run_study(grid, output, device=args.device)
        command = shlex.join(["optimum-prune", "study", *(argv if argv is not None else [])])
        write_outputs(results, output, command)
    print(f"{len(results.rows)} points ({results.measured_now} measured now, the rest cached) -> {output / 'REPORT.md'}")
    return 0


def _default_output(grid: Path) -> Path:
    """``grid.yaml``'s results go in ``grid/``; a grid file without a suffix would name itself, so ``grid.study/``."""
    return grid.with_suffix("") if grid.suffix else grid.with_name(f"{grid.name}.study")
