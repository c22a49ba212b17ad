"""Method and allocation options: small dataclasses validated from plain dicts.

Each method registers an options dataclass whose fields carry ``metadata={"help": ...}``.
``PruningConfig`` stores options as a plain dict completed with defaults, so the config
stays JSON-serialisable while every key and value is checked against the dataclass.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import types as types_module
import typing
from typing import Any, Callable, Mapping, TypeVar

import numpy

Options = TypeVar("Options")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """For methods without options."""


class NonZero:
    """An ``applies_when`` condition: any value but 0 (a weight whose 0 leaves out the term an option shapes)."""

    def __contains__(self, value: Any) -> bool:
        return value != 0

    def describe(self, other: str) -> str:
        return f"{other} != 0"


Allowed = tuple[Any, ...] | NonZero


def option(default: Any, help: str, applies_when: Mapping[str, Allowed] | None = None, fractions_only: bool = False) -> Any:
    """A field of an options dataclass. ``applies_when`` names the values of other options under which this one
    is read (``{"criterion": ("reconstruction",)}``, ``{"weight": NonZero()}``): set away from its default
    otherwise, it would be ignored, so ``build_options`` refuses it (and a stored config that sets it reads it as unset).
    ``fractions_only``: read only for a fractional sparsity (an N:M pattern fixes its own groups), which
    ``PruningConfig`` checks."""
    metadata: dict[str, Any] = {"help": help}
    if applies_when is not None:
        metadata["applies_when"] = dict(applies_when)
    if fractions_only:
        metadata["fractions_only"] = True
    return dataclasses.field(default=default, metadata=metadata)


def fraction_only_options(options_cls: type, values: Mapping[str, Any]) -> list[str]:
    """The options in ``values`` set away from their defaults that only a fractional sparsity reads."""
    return [
        spec.name for spec in dataclasses.fields(options_cls)
        if spec.metadata.get("fractions_only") and spec.name in values and values[spec.name] != spec.default
    ]  # fmt: skip


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_round_to(value: int) -> None:
    """The ``round_to`` option of the methods that round widths or ranks to a multiple of it."""
    if value < 1:
        raise ValueError(f"method_options.round_to must be >= 1, got {value}")


def build_options(options_cls: type[Options], values: Mapping[str, Any], field: str) -> Options:
    """Instantiate ``options_cls`` from ``values``, naming ``field`` and the valid keys on error."""
    if not isinstance(values, Mapping):
        raise TypeError(f"{field} must be a mapping of option names to values, got {type(values).__name__}")
    known = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(map(str, set(values) - set(known)))  # a YAML's `1:` or `on:` key is not a str
    if unknown:
        valid = ", ".join(sorted(known)) or "none"
        raise ValueError(f"{field} has unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    types, choices = option_types(options_cls), option_choices(options_cls)
    values = {name: as_option_type(value, *types[name], f"{field}.{name}") for name, value in values.items()}
    for name, value in values.items():
        if name in choices and value is not None:
            check_choice(f"{field}.{name}", value, choices[name])
    options = options_cls(**values)
    _check_applicable(options, field)
    return options


def as_option_type(value: Any, expected: type, optional: bool, field: str) -> Any:
    """``value`` as the option's type: numpy's numbers as Python's, and a whole number given for a float option
    as a float (7 from a command line or a YAML stores as 7.0, as Python's 7.0 does)."""
    if value is None and optional:
        return None
    if isinstance(value, numpy.bool_):  # not a Python bool (nor a number): read as one, as numpy's numbers are
        value = bool(value)
    if isinstance(value, bool) != (expected is bool):
        raise TypeError(f"{field} must be {expected.__name__}, got {value!r}")
    if expected is int and isinstance(value, numbers.Integral):
        return int(value)
    if expected is float and isinstance(value, numbers.Real):
        try:
            number = float(value)
        except OverflowError:  # an int past float range (a 400-digit YAML literal)
            number = math.inf
        if not math.isfinite(number):
            raise ValueError(f"{field} must be a finite number, got {value!r}")
        return number
    if not isinstance(value, expected):
        raise TypeError(f"{field} must be {expected.__name__}, got {value!r}")
    return value


@functools.cache
def option_types(options_cls: type) -> dict[str, tuple[type, bool]]:
    """Each option's type and whether it may be None, from the dataclass's annotations. Options stay JSON
    scalars (``PruningConfig`` stores them in its JSON): bool, int, float or str, or one of them ``| None``,
    each with a default; ``register_*`` asks this of an options class, so another kind fails there."""
    if not dataclasses.is_dataclass(options_cls):
        raise TypeError(
            f"{getattr(options_cls, '__name__', options_cls)}: an options class is a dataclass "
            "(@dataclass(frozen=True)) whose fields are declared with option(default, help)"
        )
    hints = typing.get_type_hints(options_cls)
    types = {}
    for spec in dataclasses.fields(options_cls):
        hint = hints[spec.name]
        members, scalars = _scalar_members(hint)
        if len(scalars) != 1 or scalars[0] not in (bool, int, float, str) or spec.default is dataclasses.MISSING:
            raise TypeError(
                f"{options_cls.__name__}.{spec.name}: an option is a bool, int, float or str (or one of them | None) "
                f"with a default, declared with option(default, help); got {hint} "
                f"{'without a default' if spec.default is dataclasses.MISSING else f'= {spec.default!r}'}"
            )
        types[spec.name] = (scalars[0], len(scalars) < len(members))
    _check_defaults(options_cls, types)
    return types


def _check_defaults(options_cls: type, types: Mapping[str, tuple[type, bool]]) -> None:
    """Each default is a value its option accepts: one that is not would be refused only when a user sets another
    option, or stored in every config as a value ``build_options`` refuses on reading it back."""
    choices = option_choices(options_cls)
    for spec in dataclasses.fields(options_cls):
        field = f"{options_cls.__name__}.{spec.name}"
        try:
            default = as_option_type(spec.default, *types[spec.name], f"{field}'s default")
            if spec.name in choices and default is not None:
                check_choice(f"{field}'s default", default, choices[spec.name])
        except ValueError as error:
            raise TypeError(str(error)) from None


@functools.cache
def option_choices(options_cls: type) -> dict[str, tuple[Any, ...]]:
    """The values each ``Literal[...]`` option may take, which ``build_options`` holds it to."""
    hints = typing.get_type_hints(options_cls)
    choices = {}
    for spec in dataclasses.fields(options_cls):
        literals = [member for member in _union_members(hints[spec.name]) if typing.get_origin(member) is typing.Literal]
        if literals:
            choices[spec.name] = tuple(value for member in literals for value in typing.get_args(member))
    return choices


def _union_members(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types_module.UnionType) else (hint,)


def _scalar_members(hint: Any) -> tuple[tuple[Any, ...], list[Any]]:
    """A field's annotation as (its union members, those that are not None), ``Literal`` read as its values' type."""
    members = tuple(_literal_type(member) for member in _union_members(hint))
    return members, [member for member in members if member is not type(None)]


def coerce_scalar_fields(instance: Any) -> None:
    """Each bool / int / float / str field of the (frozen) dataclass ``instance`` as its type, as options are
    (``as_option_type``): a float given for an int (``rank=8.0``) or a string for a number (``rank="8"``) is named
    here, with the class and field, not by a comparison or a tensor shape deep in training."""
    hints = typing.get_type_hints(type(instance))
    for spec in dataclasses.fields(instance):
        members, scalars = _scalar_members(hints[spec.name])
        if len(scalars) == 1 and scalars[0] in (bool, int, float, str):
            value = as_option_type(getattr(instance, spec.name), scalars[0], len(scalars) < len(members), f"{type(instance).__name__}.{spec.name}")
            object.__setattr__(instance, spec.name, value)


def _literal_type(member: Any) -> Any:
    """``Literal["a", "b"]`` stands for its values' type (``option_choices`` holds an option to the values)."""
    if typing.get_origin(member) is typing.Literal:
        kinds = {type(value) for value in typing.get_args(member)}
        return kinds.pop() if len(kinds) == 1 else member
    return member


def _check_applicable(options: Any, field: str) -> None:
    for spec in dataclasses.fields(options):
        unmet = _unmet(spec, getattr(options, spec.name), lambda other: getattr(options, other))
        if unmet:
            given = ", ".join(f"{other}={value!r}" for other, value in unmet.items())
            raise ValueError(
                f"{field}.{spec.name} applies only with {_describe(spec.metadata['applies_when'])}, not {given}: it would "
                "be ignored, so remove it"
            )


def ignored_options(options_cls: type, values: Mapping[str, Any]) -> list[str]:
    """The options in ``values`` that ``build_options`` refuses because the others (their defaults where unset)
    leave them unread."""
    specs = {spec.name: spec for spec in dataclasses.fields(options_cls)}

    def value_of(name: str) -> Any:
        return values[name] if name in values else specs[name].default

    return [name for name, value in values.items() if name in specs and _unmet(specs[name], value, value_of)]


def _unmet(spec: dataclasses.Field, value: Any, value_of: Callable[[str], Any]) -> dict[str, Any]:
    """The other options whose values leave an option set away from its default unread (its ``applies_when``)."""
    condition = spec.metadata.get("applies_when")
    if condition is None or value == spec.default:
        return {}
    return {other: value_of(other) for other, allowed in condition.items() if value_of(other) not in allowed}


def _describe(condition: Mapping[str, Allowed]) -> str:
    return " and ".join(
        allowed.describe(other) if isinstance(allowed, NonZero) else f"{other}=" + " or ".join(map(repr, allowed))
        for other, allowed in condition.items()
    )


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def describe_options(options_cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every option, for CLI help and docs."""
    described = []
    for spec in dataclasses.fields(options_cls):
        condition = spec.metadata.get("applies_when")
        text = spec.metadata.get("help", "") + (f" Only with {_describe(condition)}." if condition else "")
        text += " Only with a fractional sparsity (not N:M)." if spec.metadata.get("fractions_only") else ""
        described.append((spec.name, spec.default, text))
    return described


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
    expert_deviation: float = option(
        0.1, "λ of expert_sparsity='load': the most / least loaded expert gets target ∓ λ.", applies_when={"expert_sparsity": ("load",)}
    )

    def __post_init__(self) -> None:
        check_choice("unrouted_experts", self.unrouted_experts, ("magnitude", "dense"))
        check_choice("expert_sparsity", self.expert_sparsity, ("uniform", "load"))
        if not 0 <= self.expert_deviation < 0.5:
            raise ValueError(f"expert_deviation must be in [0, 0.5), got {self.expert_deviation}")
