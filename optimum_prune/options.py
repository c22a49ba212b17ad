"""Method and allocation options: small dataclasses validated from plain dicts.

Each method registers an options dataclass whose fields carry ``metadata={"help": ...}``.
``PruningConfig`` stores options as a plain dict completed with defaults, so the config
stays JSON-serialisable while every key and value is checked against the dataclass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

Options = TypeVar("Options")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For methods without options."""


def option(default: Any, help: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": help})


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def build_options(options_cls: type[Options], values: Mapping[str, Any], field: str) -> Options:
    """Instantiate ``options_cls`` from ``values``, naming ``field`` and the valid keys on error."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{field} must be a mapping of option names to values, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise ValueError(f"{field} has unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    for name, value in values.items():
        expected = type(known[name].default)
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            continue
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise TypeError(f"{field}.{name} must be {expected.__name__}, got {value!r}")
    return options_cls(**values)


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def describe_options(options_cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every option, for CLI help and docs."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(options_cls)]


@dataclasses.dataclass(frozen=True)
class MoEOptions:
    """How unstructured methods treat mixture-of-experts layers (ignored by dense models)."""

    routing_weighted: bool = option(
        True,
        "Weigh each token in an expert's calibration statistics by its routing weight (the block scales the "
        "expert's output by it); False counts every routed token equally.",
    )
    unrouted_experts: str = option(
        "magnitude",
        "Experts that receive no calibration token: 'magnitude' prunes them data-free by |W|, 'dense' leaves them "
        "dense. Either way the report lists them.",
    )
    prune_router: bool = option(False, "Also prune the routers (dense by default: tiny, and they choose every token's experts).")
    expert_sparsity: str = option(
        "uniform",
        "Sparsity of each expert within a layer: 'uniform' (the layer's target), or 'load' (router hints: experts "
        "that receive more calibration tokens keep more weights; sparsity spreads linearly over the load ranking, "
        "target ± expert_deviation, so the experts' mean stays at the target).",
    )
    expert_deviation: float = option(0.1, "λ of expert_sparsity='load': the most / least loaded expert gets target ∓ λ.")

    def __post_init__(self) -> None:
        check_choice("unrouted_experts", self.unrouted_experts, ("magnitude", "dense"))
        check_choice("expert_sparsity", self.expert_sparsity, ("uniform", "load"))
        if not 0 <= self.expert_deviation < 0.5:
            raise ValueError(f"expert_deviation must be in [0, 0.5), got {self.expert_deviation}")
