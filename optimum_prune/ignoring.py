"""``ignore`` patterns, one meaning everywhere: glob patterns over module names (``fnmatch``) that keep
the modules they match unchanged, with everything inside them. ``model.layers.0.self_attn`` keeps that
attention's projections, ``*.mlp`` every MLP's, ``model.layers.0.*`` layer 0's modules: a method that
removes a whole layer or block leaves one that holds a kept module, and one that prunes linears leaves
a linear held by a kept module."""

from __future__ import annotations

import hashlib
from fnmatch import fnmatchcase
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .adapters import DecoderAdapter


def as_patterns(ignore: str | Iterable[str] | None, field: str, ordered: bool = False) -> tuple[str, ...]:
    """``ignore`` as glob patterns: one string is one pattern (iterated, it would be its characters, and a ``'*'``
    among them keeps every module), any other iterable holds them; a list or tuple only where ``ordered`` (a config's
    JSON, whose patterns a set would order differently from run to run)."""
    if isinstance(ignore, str):
        return (ignore,)
    iterable = isinstance(ignore, (list, tuple)) if ordered else isinstance(ignore, Iterable) and not isinstance(ignore, Mapping)
    patterns = () if ignore is None else tuple(ignore) if iterable else None
    if patterns is None or not all(isinstance(pattern, str) for pattern in patterns):
        raise TypeError(f"{field} must be a glob pattern or a list of them, got {ignore!r}")
    return patterns


def is_ignored(name: str, patterns: Iterable[str]) -> bool:
    """Whether the module ``name`` is kept: a pattern matches it or a module that holds it."""
    parts = name.split(".")
    holders = [".".join(parts[:end]) for end in range(1, len(parts) + 1)]
    return any(fnmatchcase(holder, pattern) for pattern in patterns for holder in holders)


def holds_ignored(name: str, module: nn.Module, patterns: Iterable[str]) -> bool:
    """Whether removing ``module`` (named ``name``) whole would remove a kept module: it, or one inside it."""
    patterns = tuple(patterns)
    inside = (f"{name}.{child}" for child, _ in module.named_modules() if child)
    return is_ignored(name, patterns) or any(fnmatchcase(qualified, pattern) for qualified in inside for pattern in patterns)


def kept_moe_layers(adapter: DecoderAdapter, patterns: Iterable[str], field: str) -> set[int]:
    """The indices of the layers whose MoE block ``patterns`` keep (a pattern matches the block, a module holding
    it or one inside it, e.g. one expert): expert methods and expert dropping leave those blocks as they are."""
    patterns = tuple(patterns)
    kept, blocks = set(), 0
    for index, (name, layer) in enumerate(zip(adapter.layer_names(), adapter.decoder_layers())):
        block = adapter.moe_block(layer)
        block_name = next((f"{name}.{child}" for child, module in layer.named_modules() if module is block), None)
        blocks += block_name is not None
        if block_name is not None and holds_ignored(block_name, block, patterns):
            kept.add(index)
    if kept and len(kept) == blocks:
        raise ValueError(f"{field} {list(patterns)!r} keeps every MoE block: nothing is left to prune; narrow it")
    return kept


def check_ignore_patterns(adapter: DecoderAdapter, ignore: Iterable[str], field: str) -> None:
    """A pattern that matches no module is a typo that would silently prune what it meant to keep."""
    names = [name for name, _ in adapter.model.named_modules() if name]
    unmatched = [pattern for pattern in ignore if not any(fnmatchcase(name, pattern) for name in names)]
    if unmatched:
        example = next(iter(adapter.qualified_prunable_linears()[0]), names[0])
        raise ValueError(
            f"{field} pattern(s) {', '.join(map(repr, unmatched))} match no module of {type(adapter.model).__name__} "
            f"(names look like {example!r}); correct or remove them"
        )


# A kept module's parameters as they are: name → (shape, dtype, a digest of the bytes), so any change shows, a swap
# of values or a NaN's neighbour too.
Fingerprint = dict[str, tuple[Any, ...]]


def _fingerprint(module: nn.Module) -> Fingerprint:
    def digest(p: torch.Tensor) -> str:
        data = p.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
        return hashlib.blake2b(data, digest_size=16).hexdigest()

    return {name: (p.shape, p.dtype, digest(p)) for name, p in module.named_parameters(recurse=False)}


def kept_modules(model: nn.Module, patterns: Iterable[str]) -> dict[str, tuple[nn.Module, Fingerprint]]:
    """The modules ``patterns`` keep, with their parameters' fingerprints, taken before a structured method runs
    so that ``check_kept`` can tell afterwards whether the method (a plugin's too) really kept them."""
    patterns = tuple(patterns)
    return {name: (module, _fingerprint(module)) for name, module in model.named_modules() if name and is_ignored(name, patterns)}


def check_kept(model: nn.Module, kept: dict[str, tuple[nn.Module, Fingerprint]], method: str) -> None:
    """Raise if ``method`` removed, replaced or changed a module ``kept_modules`` recorded (a layer it removed may
    have renumbered the rest, so modules are found by identity, not by name)."""
    present = set(model.modules())
    for name, (module, before) in kept.items():
        if module not in present or _fingerprint(module) != before:
            change = "changed the parameters of" if module in present else "removed or replaced"
            raise RuntimeError(
                f"structured method {method!r} {change} {name}, which PruningConfig.ignore keeps. The model is left "
                "as the method made it; a StructuredMethod must leave every module ignore names as it is "
                "(optimum_prune.ignoring.holds_ignored says which layers, blocks and units hold one)"
            )
