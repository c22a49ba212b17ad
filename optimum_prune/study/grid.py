"""The study grid: which pruning recipes × quantizations to measure, and the protocol they share.

A grid is a YAML (or dict) such as::

    model: default                  # or a local checkpoint directory
    seed: 0
    calibration: {samples: 8, seq_len: 256}
    evaluation: {tokens: 8192, seq_len: 512}
    latency: auto                   # auto (CUDA when available), cuda, cpu or none
    redundancy: true                # Block Influence / angular-distance plots of the dense model
    pruning:
      - none
      - method: wanda
        sweep: {sparsity: [0.5, "2:4"]}
      - method: width
        method_options: {criterion: wanda_sp, ranking: layer}
        sweep: {sparsity: [0.1, 0.2]}
    quantization: [none, int8, int4]

Each ``pruning`` entry is a ``PruningConfig`` (its fields as keys) whose ``sweep`` lists the values
to try; a swept key may reach into an options dict (``method_options.num_layers: [4, 8]``). The
points are every entry's sweep × every ``quantization`` (optimum-quanto weight-only, see
``optimum_prune.compress``). The whole grid is checked before anything runs: every point builds
its ``PruningConfig`` here, so a typo fails in a second rather than an hour into the sweep.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from ..calibration.sources import read_text_file
from ..compress import require_quanto
from ..config import PruningConfig
from ..evaluation import check_whole_windows
from ..models import load_tokenizer, missing_tokenizer

LATENCY_DEVICES = ("auto", "cuda", "cpu", "none")
PROTOCOL_FIELDS = ("num_calibration_samples", "calibration_seq_len", "seed")  # owned by the grid, not by an entry
GRID_KEYS = ("model", "seed", "calibration", "evaluation", "latency", "redundancy", "pruning", "quantization")


@dataclass(frozen=True)
class Protocol:
    """What every point shares; part of each point's cache key, so changing it re-runs every point."""

    model: str = "default"
    seed: int = 0
    calibration_samples: int = 8
    calibration_seq_len: int = 256
    evaluation_tokens: int = 8192
    evaluation_seq_len: int = 512


@dataclass(frozen=True)
class StudyPoint:
    """One pruning recipe (or none) followed by one quantization (or none)."""

    label: str
    pruning: dict[str, Any] | None  # PruningConfig.to_dict() with the protocol's calibration settings
    quantization: str | None  # a QuantoConfig ``weights`` value

    def key(self, protocol: Protocol) -> str:
        """Stable identity of the point under ``protocol``: the name of its cached result."""
        spec = {"pruning": self.pruning, "quantization": self.quantization, "protocol": protocol.__dict__}
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def config(self) -> PruningConfig | None:
        return None if self.pruning is None else PruningConfig.from_dict(self.pruning)


@dataclass(frozen=True)
class StudyGrid:
    protocol: Protocol
    points: tuple[StudyPoint, ...]
    latency: str = "auto"
    redundancy: bool = True

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "StudyGrid":
        from ..yaml_files import load_yaml

        path = Path(path)
        if not path.is_file():
            problem = "is a directory, not a YAML file" if path.is_dir() else "does not exist"
            raise ValueError(f"grid file {str(path)!r} {problem}")
        data = load_yaml(read_text_file(path, "grid file"), f"grid file {str(path)!r}")
        return cls.from_dict(data, base=path.parent)

    @classmethod
    def from_dict(cls, data: Any, base: Path | None = None) -> "StudyGrid":
        """Check and expand a grid; ``base`` resolves a relative ``model`` path (the grid file's folder)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a grid is a mapping with keys {', '.join(GRID_KEYS)}; got {type(data).__name__}")
        unknown = sorted(set(data) - set(GRID_KEYS))
        if unknown:
            raise ValueError(f"grid has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(GRID_KEYS)}")
        for required in ("pruning", "quantization"):
            if not isinstance(data.get(required), list) or not data[required]:
                raise ValueError(f"grid.{required} must be a non-empty list (use [none] for the unpruned/unquantized model only)")
        protocol = _protocol(data, base)
        latency = data.get("latency", "auto")
        if latency not in LATENCY_DEVICES:
            raise ValueError(f"grid.latency must be one of {', '.join(LATENCY_DEVICES)}, got {latency!r}")
        redundancy = data.get("redundancy", True)
        if not isinstance(redundancy, bool):
            raise ValueError(f"grid.redundancy must be true or false, got {redundancy!r}")
        recipes = [recipe for index, entry in enumerate(data["pruning"]) for recipe in _expand(entry, index, protocol)]
        quantizations = [_quantization(value, index) for index, value in enumerate(data["quantization"])]
        points = tuple(
            StudyPoint(_label(label, quantization), pruning, quantization)
            for (label, pruning), quantization in itertools.product(recipes, quantizations)
        )
        labels = [p.label for p in points]
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        if duplicates:
            raise ValueError(
                f"grid gives several points the label(s) {', '.join(map(repr, duplicates))}: give the pruning entries "
                "that differ outside their sweep a distinct 'name'"
            )
        return cls(protocol, points, latency, redundancy)


def _protocol(data: Mapping[str, Any], base: Path | None) -> Protocol:
    model = data.get("model", "default")
    if not isinstance(model, str) or not model:
        raise ValueError(f"grid.model must be 'default' or a checkpoint directory, got {model!r}")
    if model != "default":
        directory = Path(model) if base is None or Path(model).is_absolute() else base / model
        if not (directory / "config.json").is_file():
            raise ValueError(f"grid.model {model!r} is not a checkpoint directory (no config.json in {str(directory)!r})")
        if load_tokenizer(directory) is None:  # every point calibrates or evaluates text
            raise missing_tokenizer(directory, "the study (calibration and perplexity)")
        model = str(directory.resolve())
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"grid.seed must be an integer, got {seed!r}")
    calibration = _section(data, "calibration", ("samples", "seq_len"))
    evaluation = _section(data, "evaluation", ("tokens", "seq_len"))
    defaults = Protocol()
    tokens, window = evaluation.get("tokens", defaults.evaluation_tokens), evaluation.get("seq_len", defaults.evaluation_seq_len)
    if tokens < window:
        raise ValueError(f"grid.evaluation.tokens ({tokens}) is less than one window of grid.evaluation.seq_len ({window}); raise it")
    check_whole_windows(tokens, window, "grid.evaluation.tokens", "grid.evaluation.seq_len")
    return Protocol(
        model=model,
        seed=seed,
        calibration_samples=calibration.get("samples", defaults.calibration_samples),
        calibration_seq_len=calibration.get("seq_len", defaults.calibration_seq_len),
        evaluation_tokens=evaluation.get("tokens", defaults.evaluation_tokens),
        evaluation_seq_len=evaluation.get("seq_len", defaults.evaluation_seq_len),
    )


def _section(data: Mapping[str, Any], name: str, keys: tuple[str, ...]) -> dict[str, int]:
    section = data.get(name, {})
    if not isinstance(section, Mapping):
        raise ValueError(f"grid.{name} must be a mapping with keys {', '.join(keys)}, got {section!r}")
    unknown = sorted(set(section) - set(keys))
    if unknown:
        raise ValueError(f"grid.{name} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}")
    for key, value in section.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"grid.{name}.{key} must be a positive integer, got {value!r}")
    return dict(section)


def _expand(entry: Any, index: int, protocol: Protocol) -> list[tuple[str, dict[str, Any] | None]]:
    """(label, PruningConfig dict) of every sweep combination of ``pruning[index]``."""
    where = f"grid.pruning[{index}]"
    if entry in ("none", None):
        return [("dense", None)]
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where} must be 'none' or a mapping of PruningConfig fields (with an optional sweep), got {entry!r}")
    entry = dict(entry)
    sweep = entry.pop("sweep", {}) or {}
    if not isinstance(sweep, Mapping):
        raise ValueError(f"{where}.sweep must map field names to non-empty lists of values, got {sweep!r}")
    # a swept method names itself in each label ("method=sparsegpt"): the entry's, or the default, would be wrong for all but one
    name = entry.pop("name", None) or ("" if "method" in sweep else entry.get("method", PruningConfig().method))
    if not all(isinstance(k, str) and isinstance(v, list) and v for k, v in sweep.items()):
        raise ValueError(f"{where}.sweep must map field names to non-empty lists of values, got {sweep!r}")
    clashes = [f for f in PROTOCOL_FIELDS if f in entry or f in sweep]
    if clashes:
        raise ValueError(f"{where} sets {clashes[0]}: the grid's calibration section and seed set it for every point")
    recipes, swept_as = [], {}
    for values in itertools.product(*sweep.values()):
        fields = {**entry, "num_calibration_samples": protocol.calibration_samples,
                  "calibration_seq_len": protocol.calibration_seq_len, "seed": protocol.seed}
        for key, value in zip(sweep, values):
            _assign(fields, key, value, where)
        swept = ", ".join(f"{key.rpartition('.')[2]}={value}" for key, value in zip(sweep, values))
        try:
            config = PruningConfig.from_dict(fields)  # builds (and so checks) every options dict
        except (ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{where} ({swept or 'no sweep'}): {error}") from None
        same = swept_as.setdefault(config.to_json_string(), values)
        if same is not values:  # e.g. sparsity 0.5 and "0.5": the same recipe, measured twice under one label
            raise ValueError(
                f"{where}.sweep gives the same recipe twice: {', '.join(map(repr, same))} and {', '.join(map(repr, values))} "
                f"of {', '.join(sweep)} are equal values; remove the duplicate"
            )
        recipes.append((f"{name} {swept}".strip(), config.to_dict()))
    return recipes


def _assign(fields: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set ``fields[key]``; ``a.b`` sets key ``b`` of the options dict ``a``."""
    head, dot, tail = key.partition(".")
    if not dot:
        fields[key] = value
        return
    options = fields.setdefault(head, {})
    if not isinstance(options, dict) or "." in tail:
        raise ValueError(f"{where}.sweep key {key!r}: only one level of nesting, into an options dict such as method_options")
    fields[head] = {**options, tail: value}


def _quantization(value: Any, index: int) -> str | None:
    if value in ("none", None):
        return None
    from transformers import QuantoConfig

    try:
        QuantoConfig(weights=value)
    except ValueError as error:
        raise ValueError(f"grid.quantization[{index}] is {value!r} (optimum-quanto weight-only, or none): {error}") from None
    require_quanto(f"grid.quantization[{index}]")  # before the first point is measured, not after it
    return value


def _label(pruning: str, quantization: str | None) -> str:
    return pruning if quantization is None else f"{pruning} + {quantization}"
