"""Checks shared by the YAML sections that change training (``distill:``, ``perp:``,
``expert_dropping:``), so each states its errors the same way."""

from __future__ import annotations

import types
import typing
from typing import Any, Iterable, Mapping

from optimum_prune.options import as_option_type

TRAINING_STAGES = ("pt", "sft")


def unknown_key(section: Mapping[Any, Any], valid: Iterable[str]) -> str | None:
    """The first key of ``section`` not in ``valid``, as an error names it (None if none): YAML reads an unquoted
    ``on`` / ``yes`` / ``off`` / ``no`` as a boolean and ``1`` as a number, which sort with no string."""
    unknown = sorted(set(section) - set(valid), key=str)
    if not unknown:
        return None
    key = unknown[0]
    return key if isinstance(key, str) else f"{key!r} (an unquoted YAML key read as a {type(key).__name__}: quote it)"


def check_section(name: str, section: Any, valid_keys: Iterable[str], what: str, lf_args: Mapping[str, Any]) -> None:
    """``section`` is a mapping of ``valid_keys`` (``what`` names them) in a YAML whose stage trains."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{name}: must be a mapping of {what}, got {type(section).__name__}")
    valid = sorted(valid_keys)
    key = unknown_key(section, valid)
    if key is not None:
        raise ValueError(f"{name}.{key} is not a valid key; valid keys: {', '.join(valid)}")
    if lf_args.get("stage") not in TRAINING_STAGES:
        raise ValueError(f"the `{name}:` section works with stage: pt or sft (training); got stage: {lf_args.get('stage')!r}")


def typed_values(name: str, config_class: type, section: Mapping[str, Any]) -> dict[str, Any]:
    """The section's values for ``config_class``'s fields, each checked against the field's annotation: the
    dataclasses check ranges, not types, so a YAML ``rank: 8.0``, ``alpha: "32"`` or a blank failed (or was read
    another way) only once training ran. Keys that are not fields (the teacher's) pass unchanged."""
    hints = typing.get_type_hints(config_class)
    return {key: _typed(value, hints[key], f"{name}.{key}") if key in hints else value for key, value in section.items()}


def _typed(value: Any, hint: Any, field: str) -> Any:
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    kinds = [member for member in members if member is not type(None)]
    if value is None:
        if type(None) in members:
            return None
        raise ValueError(f"{field} must be given a value (a blank reads as null); remove the key for its default")
    if len(kinds) > 1:  # e.g. PERPConfig.target_modules: a list, or LLaMA-Factory's comma-separated string
        refusals = []
        for kind in kinds:
            try:
                return _typed(value, kind, field)
            except ValueError as refusal:
                refusals.append(refusal)
        raise refusals[0]
    (kind,) = kinds
    origin, arguments = typing.get_origin(kind), typing.get_args(kind)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{field} must be a list, got {value!r}")
        return origin(_typed(item, arguments[0], f"{field}[{index}]") for index, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValueError(f"{field} must be a mapping, got {value!r}")
        return {_typed(key, arguments[0], f"{field} key {key!r}"): _typed(item, arguments[1], f"{field}[{key!r}]") for key, item in value.items()}
    try:
        return as_option_type(value, kind, False, field)
    except TypeError as error:
        raise ValueError(str(error)) from None
