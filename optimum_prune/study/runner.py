"""Run a study grid point by point, caching each finished point so an interrupted sweep resumes."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.utils.logging import tqdm

from ..devices import check_device
from ..atomic_files import write_text_atomic
from .grid import Protocol, StudyGrid, StudyPoint
from .measure import device_name, evaluation_tokens_available, layer_redundancy, measure_point, model_files

logger = logging.getLogger(__name__)

MEASURES = ("perplexity", "stored_bytes", "sparse_format_bytes", "parameters", "pruning_seconds", "quantization_seconds")


@dataclass
class StudyRow:
    """A point with what was measured (``error`` instead when the point could not be built)."""

    label: str
    pruning: dict[str, Any] | None
    quantization: str | None
    result: dict[str, Any]

    @property
    def measured(self) -> bool:
        return "error" not in self.result


@dataclass
class StudyResults:
    protocol: Protocol
    rows: list[StudyRow]
    redundancy: dict[str, list] | None
    versions: dict[str, str]
    measured_now: int  # points computed in this run (the rest came from the cache)


def run_study(grid: StudyGrid, output: str | os.PathLike, device: str | torch.device | None = None) -> StudyResults:
    """Measure every point of ``grid`` not already cached under ``output/points/``.

    A cached point is reused only if its file parses, names the same point and model files (``model_files``: a model
    saved again at the same path is another) and holds every measure (and a latency measured on this run's latency
    device when one is asked for); otherwise it is measured again. Each point's
    file is written whole and renamed into place, so a sweep killed mid-point loses that point only.
    """
    from .outputs import software_versions, versions

    device = check_device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _check_evaluation_fits(grid.protocol)  # before the output folder is made
    _check_study_folder(Path(output))
    points_dir = Path(output) / "points"
    try:
        points_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # the output (or a folder above it) is a file; a folder this user cannot write
        raise ValueError(f"the study's folder {str(points_dir)!r} cannot be made ({error.strerror or error}): give another output folder") from None
    latency_device = _latency_device(grid.latency)
    latency_name = device_name(latency_device) if latency_device is not None else None
    rows, measured_now = [], 0
    software = {**software_versions(), "device": str(device)}  # pruning seconds depend on it
    fingerprint = model_files(grid.protocol)
    for point in tqdm(grid.points, desc="Study points"):
        path = points_dir / f"{point.key(grid.protocol)}.json"
        result = _cached(path, point, fingerprint, latency_name, software)
        if result is None:
            logger.info("measuring %s", point.label)
            try:
                result = {**measure_point(point, grid.protocol, device, latency_device), "versions": software}
            except ValueError as error:  # the point cannot be built (e.g. quanto refuses a non-uniform model)
                result = {"error": str(error), "versions": software}
            record = {
                "label": point.label, "pruning": point.pruning, "quantization": point.quantization,
                "model_files": fingerprint, "result": result,
            }
            write_text_atomic(path, json.dumps(record, indent=1))
            measured_now += 1
        rows.append(StudyRow(point.label, point.pruning, point.quantization, result))
    redundancy = _redundancy(grid.protocol, fingerprint, points_dir, device) if grid.redundancy else None
    return StudyResults(grid.protocol, rows, redundancy, versions(device, latency_device), measured_now)


def _check_evaluation_fits(protocol: Protocol) -> None:
    """Before any point: a count past the evaluation split would fail each point's evaluation after its pruning."""
    available = evaluation_tokens_available(protocol)
    if protocol.evaluation_tokens > available:
        whole = available // protocol.evaluation_seq_len * protocol.evaluation_seq_len
        raise ValueError(
            f"grid.evaluation.tokens ({protocol.evaluation_tokens:,}) is more than the {available:,} tokens the bundled "
            f"evaluation split holds for this model's tokenizer: give at most {whole:,} (whole windows of "
            "grid.evaluation.seq_len)"
        )


def _check_study_folder(output: Path) -> None:
    """A study writes into a folder of its own: new, empty or an earlier study's (it holds ``points/``). Another
    folder's results.csv or REPORT.md would be replaced, and a link (a grid shipped with its results folder, or
    ``points`` in it) would have the files written wherever it points."""
    for folder in (output, output / "points"):
        if folder.is_symlink():
            raise ValueError(
                f"the study's folder {str(folder)!r} is a symbolic link (to {os.readlink(folder)}); a study writes into a "
                "folder of its own: remove the link, or give another output folder"
            )
    if output.is_dir() and not (output / "points").is_dir() and any(output.iterdir()):
        raise ValueError(
            f"the output folder {str(output)!r} holds other files and no earlier study's points/ folder; a study writes "
            "results.csv, results.json, REPORT.md and plots into it, replacing any of that name: give a new or empty "
            "output folder"
        )


def _latency_device(setting: str) -> torch.device | None:
    if setting == "none" or (setting == "auto" and not torch.cuda.is_available()):
        return None
    if setting in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise ValueError("grid.latency is 'cuda' but no CUDA device is available; use 'auto', 'cpu' or 'none'")
        return torch.device("cuda")
    return torch.device("cpu")


def _cached(
    path: Path, point: StudyPoint, fingerprint: str, latency_device: str | None, software: dict[str, str]
) -> dict[str, Any] | None:
    """The stored result of ``point`` on the model files ``fingerprint`` (``model_files``), if whole (with a latency
    measured on ``latency_device`` when one is asked for); a point that could not be built is tried again when the
    ``software`` differs from that of the failed try. A record without model files (an earlier version's) is not reused."""
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        result = stored["result"]
        stored_point = (stored["pruning"], stored["quantization"], stored.get("model_files"))
        same = stored_point == (point.pruning, point.quantization, fingerprint)
        timed = latency_device is None or result.get("latency_device") == latency_device
        if "error" in result:
            complete = result.get("versions") == software
        else:
            complete = all(m in result for m in MEASURES) and timed
    except (ValueError, KeyError, TypeError, AttributeError):  # AttributeError: a "result" that is not a mapping
        logger.warning("%s is unreadable; measuring %s again", path, point.label)
        return None
    return result if same and complete else None


def _redundancy(protocol: Protocol, fingerprint: str, points_dir: Path, device: torch.device) -> dict[str, list]:
    """The dense model's layer redundancy, cached per protocol with the model files' ``fingerprint``."""
    key = hashlib.sha256(json.dumps(asdict(protocol), sort_keys=True).encode()).hexdigest()[:16]
    path = points_dir / f"redundancy-{key}.json"
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored["model_files"] == fingerprint and _whole_redundancy(stored["redundancy"]):
            return stored["redundancy"]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, damaged, or an earlier version's (no model files)
        pass
    redundancy = layer_redundancy(protocol, device)
    write_text_atomic(path, json.dumps({"model_files": fingerprint, "redundancy": redundancy}))
    return redundancy


def _whole_redundancy(redundancy: Any) -> bool:
    """Whether a cached redundancy holds what the report and its plot read: a Block Influence per layer, and for each
    span n = 1 … L the angular distances from the L − n + 1 layers it can start at."""
    influence, distances = redundancy["block_influence"], redundancy["angular_distance"]

    def numbers(values: Any) -> bool:
        return isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)

    return (
        numbers(influence) and isinstance(distances, list) and len(distances) == len(influence)
        and all(numbers(row) and len(row) == len(influence) - span for span, row in enumerate(distances))
    )  # fmt: skip
