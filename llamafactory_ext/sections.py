"""Checks shared by the YAML sections that change training (``distill:``, ``perp:``,
``expert_dropping:``), so each states its errors the same way."""

from __future__ import annotations

from typing import Any, Iterable, Mapping

TRAINING_STAGES = ("pt", "sft")


def check_section(name: str, section: Any, valid_keys: Iterable[str], what: str, lf_args: Mapping[str, Any]) -> None:
    """``section`` is a mapping of ``valid_keys`` (``what`` names them) in a YAML whose stage trains."""
    if not isinstance(section, Mapping):
        raise ValueError(f"{name}: must be a mapping of {what}, got {type(section).__name__}")
    valid = sorted(valid_keys)
    unknown = sorted(set(section) - set(valid))
    if unknown:
        raise ValueError(f"{name}.{unknown[0]} is not a valid key; valid keys: {', '.join(valid)}")
    if lf_args.get("stage") not in TRAINING_STAGES:
        raise ValueError(f"the `{name}:` section works with stage: pt or sft (training); got stage: {lf_args.get('stage')!r}")
