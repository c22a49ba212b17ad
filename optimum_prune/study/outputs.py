"""What a study writes: results.json / results.csv, the Pareto and redundancy plots, and REPORT.md."""

from __future__ import annotations

import csv
import importlib.metadata
import io
import json
import logging
import math
import platform
from pathlib import Path
from typing import Any, Callable

import torch

from ..report import bare_figure, save_figure
from ..atomic_files import write_text_atomic
from .measure import device_name
from .pareto import best_within, pareto_front
from .runner import StudyResults, StudyRow

logger = logging.getLogger(__name__)
BUDGETS = (1.0, 0.75, 0.5, 0.4, 0.35, 0.3, 0.25)  # fractions of the dense model's stored bytes
SIZE_MEASURES = {
    "stored_bytes": "stored bytes (the saved checkpoint)",
    "sparse_format_bytes": "sparse-format bytes (pruned linears in their cheapest sparse layout, computed)",
}
CSV_COLUMNS = (
    "label", "method", "sparsity", "method_options", "quantization", "perplexity", "stored_bytes", "sparse_format_bytes", "parameters",
    "linear_zeros", "pruning_seconds", "quantization_seconds", "latency_ms", "latency_device", "error",
)


def software_versions() -> dict[str, str]:
    """The software that measures a point, recorded with each point: a sweep resumed after an upgrade
    mixes points of both, and its report says which."""
    found = {"python": platform.python_version()}
    for package in ("optimum-prune", "torch", "transformers", "optimum-quanto"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def versions(device: torch.device, latency_device: torch.device | None) -> dict[str, str]:
    """The software and hardware a study ran on, recorded with its numbers."""
    found = {**software_versions(), "platform": platform.platform(), "device": str(device)}
    if latency_device is not None:
        found["latency_device"] = device_name(latency_device)
    return found


def write_outputs(results: StudyResults, output: str | Path, command: str) -> None:
    """Write results.json, results.csv, pareto.png, redundancy.png (when computed) and REPORT.md into ``output``."""
    output = Path(output)
    rows = [row for row in results.rows if row.measured]
    write_text_atomic(output / "results.json", json.dumps(_json_safe({
        "command": command, "protocol": results.protocol.__dict__, "versions": results.versions,
        "points": [{"label": r.label, "pruning": r.pruning, "quantization": r.quantization, **r.result} for r in results.rows],
        "redundancy": results.redundancy,
    }), indent=1, allow_nan=False))
    write_text_atomic(output / "results.csv", _csv(results.rows))
    plots = []
    try:
        if rows:
            plot_pareto(rows, output / "pareto.png")
            plots.append("pareto.png")
        if results.redundancy:
            plot_redundancy(results.redundancy, output / "redundancy.png")
            plots.append("redundancy.png")
    except ImportError as error:  # matplotlib is the [plot] extra: the report is written without figures
        logger.warning("no plots: %s", error)
    write_text_atomic(output / "REPORT.md", report(results, command, plots))


def _csv(rows: list[StudyRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        pruning = row.pruning or {}
        writer.writerow({
            "label": row.label, "method": pruning.get("method", "none"), "sparsity": pruning.get("sparsity", 0),
            "method_options": json.dumps(pruning.get("method_options", {}), sort_keys=True),  # e.g. num_layers overrides sparsity
            "quantization": row.quantization or "none", **row.result,
        })
    return buffer.getvalue()


def report(results: StudyResults, command: str, plots: list[str]) -> str:
    """The markdown report: every point, the Pareto fronts, and the winner under each memory budget."""
    rows = [row for row in results.rows if row.measured]
    failed = [row for row in results.rows if not row.measured]
    if not rows:
        return "\n".join(
            ["# Pruning × quantization study", "", f"Command: `{command}`", "", "No point could be measured:", ""]
            + [f"- {row.label}: {row.result['error']}" for row in failed]
        ) + "\n"
    dense = next((r for r in rows if r.pruning is None and r.quantization is None), None)
    reference = dense.result["stored_bytes"] if dense else max(r.result["stored_bytes"] for r in rows)
    fronts = {measure: pareto_front(rows, _measure(measure), _perplexity) for measure in SIZE_MEASURES}
    latency = "latency_device" in results.versions  # measured on it for every point of this run
    p = results.protocol
    lines = [
        "# Pruning × quantization study", "", f"Command: `{command}`", "",
        f"Protocol: model `{p.model}`; calibration {p.calibration_samples} × {p.calibration_seq_len} tokens of the "
        f"bundled Wikipedia calibration split (seed {p.seed}); perplexity over the first {p.evaluation_tokens:,} tokens "
        f"of the evaluation split in {p.evaluation_seq_len}-token windows. Quantization: optimum-quanto weight-only, "
        "after pruning, of the decoder linears (embeddings and `lm_head` stay in full precision, as quanto leaves them). "
        "Sizes are relative to "
        + ("the dense model's checkpoint." if dense else "the largest checkpoint (the grid has no dense point)."),
        "", "Versions: " + ", ".join(f"{k} {v}" for k, v in results.versions.items()) + ".", "",
        *_other_versions(rows, results.versions),
        "## Points", "",
        "| point | perplexity | stored | sparse format | parameters | zeros in linears | pruning s | quantization s |"
        + (" latency ms |" if latency else "") + " on front |",
        "|---|---|---|---|---|---|---|---|" + ("---|" if latency else "") + "---|",
    ]
    for row in sorted(rows, key=lambda r: r.result["stored_bytes"]):
        r = row.result
        on = [name for name, front in (("stored", fronts["stored_bytes"]), ("sparse", fronts["sparse_format_bytes"])) if row in front]
        lines.append(
            f"| {row.label} | {r['perplexity']:.2f} | {_size(r['stored_bytes'], reference)} | "
            f"{_size(r['sparse_format_bytes'], reference)} | {r['parameters']:,} | {r['linear_zeros']:.1%} | "
            f"{r['pruning_seconds']:.1f} | {r['quantization_seconds']:.1f} |"
            + (f" {r['latency_ms']:.2f} |" if latency else "") + f" {', '.join(on)} |"
        )
    if failed:
        lines += ["", "Not measured (the combination could not be built or evaluated):", ""]
        lines += [f"- {row.label}: {row.result['error']}" for row in failed]
    lines += ["", "## Best perplexity within a memory budget", "", "| budget (of dense) | " + " | ".join(
        f"by {name.split(' (')[0]}" for name in SIZE_MEASURES.values()) + " |", "|---|---|---|"]
    for budget in BUDGETS:
        cells = []
        for measure in SIZE_MEASURES:
            best = best_within(rows, _measure(measure), _perplexity, budget * reference)
            cells.append("nothing fits" if best is None else f"{best.label} ({best.result['perplexity']:.2f})")
        lines.append(f"| {budget:.0%} | " + " | ".join(cells) + " |")
    for measure, description in SIZE_MEASURES.items():
        lines += ["", f"Pareto front by {description}: " + " → ".join(
            f"{row.label} ({_size(row.result[measure], reference)}, {row.result['perplexity']:.2f})" for row in fronts[measure]
        ) + "."]
    lines += ["", *[f"![{plot}]({plot})" for plot in plots]]
    return "\n".join(lines) + "\n"


def _other_versions(rows: list[StudyRow], current: dict[str, str]) -> list[str]:
    """Points reused from the cache that were measured with other software than this run's."""
    others = []
    for row in rows:
        recorded = row.result.get("versions")
        if recorded is None:
            others.append(f"- {row.label}: not recorded")
        elif any(current.get(name) != version for name, version in recorded.items()):
            others.append(f"- {row.label}: " + ", ".join(f"{k} {v}" for k, v in recorded.items() if current.get(k) != v))
    if not others:
        return []
    return ["Points cached from an earlier run with other software (their numbers may not compare):", "", *others, ""]


def _measure(name: str) -> Callable[[StudyRow], float]:
    return lambda row: row.result[name]


def _perplexity(row: StudyRow) -> float:
    return row.result["perplexity"]


def _size(size: int, reference: int) -> str:
    return f"{size / 2**20:.1f} MiB ({size / reference:.0%})"


def plot_pareto(rows: list[StudyRow], path: Path) -> None:
    """Perplexity (log) against each size measure, every point drawn and the front joined and labelled."""
    figure = bare_figure("plotting a study", figsize=(7 * len(SIZE_MEASURES), 5.5))
    axes = figure.subplots(1, len(SIZE_MEASURES), squeeze=False)
    for axis, (measure, description) in zip(axes[0], SIZE_MEASURES.items()):
        front = pareto_front(rows, _measure(measure), _perplexity)
        axis.scatter([r.result[measure] / 2**20 for r in rows], [r.result["perplexity"] for r in rows], color="tab:gray", s=18)
        axis.step([r.result[measure] / 2**20 for r in front], [r.result["perplexity"] for r in front], where="post", color="tab:red")
        for row in front:
            axis.annotate(row.label, (row.result[measure] / 2**20, row.result["perplexity"]), fontsize=7,
                          xytext=(4, 4), textcoords="offset points")
        axis.set_yscale("log")
        axis.set_xlabel(f"{description.split(' (')[0]} (MiB)")
        axis.set_ylabel("perplexity")
        axis.set_title(description, fontsize=9)
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def plot_redundancy(redundancy: dict[str, list], path: Path) -> None:
    """Block Influence per layer, and the angular distance from layer ℓ to ℓ+n as a heat-map: low
    values are the layers (and runs of layers) depth pruning removes first."""
    influence, distances = redundancy["block_influence"], redundancy["angular_distance"]
    figure = bare_figure("plotting a study", figsize=(9, 8))
    top, bottom = figure.subplots(2, 1, gridspec_kw={"height_ratios": [1, 2]})
    top.bar(range(len(influence)), influence, color="tab:blue")
    top.set_title("Block Influence (1 − cos(input, output)) per decoder layer")
    top.set_xlabel("layer")
    grid = torch.full((len(distances), len(influence)), float("nan"))
    for span, row in enumerate(distances):
        grid[span, : len(row)] = torch.tensor(row)
    image = bottom.imshow(grid.numpy(), aspect="auto", origin="lower", cmap="viridis",
                          extent=(-0.5, len(influence) - 0.5, 0.5, len(distances) + 0.5))
    figure.colorbar(image, ax=bottom, label="angular distance d(ℓ, ℓ+n)")
    bottom.set_xlabel("first layer ℓ of the span")
    bottom.set_ylabel("span n (layers)")
    bottom.set_title("Angular distance between the inputs of layers ℓ and ℓ+n (last token)")
    figure.tight_layout()
    save_figure(figure, path, dpi=110)


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats (a diverged model's inf perplexity) as the strings "inf" / "-inf" / "nan":
    JSON has no token for them (Python's json writes ``Infinity``, which strict readers refuse)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value
