"""Checks shared by the YAML sections that change training (``distill:``, ``perp:``,
``expert_dropping:``), so each states its errors the same way."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

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
