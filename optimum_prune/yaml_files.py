"""YAML as the configs of this package read it (a LLaMA-Factory ``pruning:`` section, a study grid).

PyYAML's safe loader follows YAML 1.1, which reads an unquoted ``sparsity: 2:4`` as the base-60
integer 124 and ``1e-2`` as a string; here ``2:4`` stays the string ``'2:4'``, and every other scalar
reads as OmegaConf (and so LLaMA-Factory) reads it: ``1e-2`` a float, ``2024-01-01`` a string (no
timestamps), ``0o17`` and ``+.5`` strings.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` as OmegaConf extends it (exponents that need no dot, no timestamps), without YAML 1.1's
    base-60 numbers."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag.rpartition(":")[2] not in ("int", "float", "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


MAX_EXPANDED_NODES = 100_000  # OmegaConf.load (llamafactory-cli's reader) refuses past 10,000 expanded nodes
# Lists and mappings within each other, the document's own counted: a config needs a few. Its readers recurse:
# OmegaConf.create (~10 frames a level) overflows Python's stack past ~95 levels, PyYAML's reader past ~500.
MAX_DEPTH = 32


def load_yaml(text: str, where: str) -> Any:
    """``text`` parsed; a syntax error is a ``ValueError`` naming ``where``, and so is a document whose aliases
    expand it past ``MAX_EXPANDED_NODES`` (a "billion laughs": OmegaConf.create and every walk expand them) or that
    nests past ``MAX_DEPTH`` (every reader of it recurses: a RecursionError)."""
    too_deep = ValueError(f"{where}: its YAML nests lists or mappings more than {MAX_DEPTH} levels deep; write it flatter")
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {error}") from None
    except RecursionError:
        raise too_deep from None
    nodes, depth = _expanded_nodes(data, {})
    if nodes > MAX_EXPANDED_NODES:
        raise ValueError(f"{where}: its YAML aliases expand it past {MAX_EXPANDED_NODES:,} values (or refer to themselves); write it out")
    if depth > MAX_DEPTH:
        raise too_deep
    return data


def _expanded_nodes(value: Any, seen: dict[int, tuple[float, int]]) -> tuple[float, int]:
    """(values, levels of nesting) in ``value``, every shared (aliased) list or mapping counted each time it is
    referred to."""
    if not isinstance(value, (dict, list)):
        return 1, 0
    if id(value) not in seen:
        seen[id(value)] = (float("inf"), 0)  # a list holding itself never ends
        children = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        total, depth = 1.0, 1
        for child in children:
            nodes, levels = _expanded_nodes(child, seen)
            total, depth = total + nodes, max(depth, levels + 1)
            if total > MAX_EXPANDED_NODES or depth > MAX_DEPTH:
                break
        seen[id(value)] = (total, depth)
    return seen[id(value)]
