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


def load_yaml(text: str, where: str) -> Any:
    """``text`` parsed; a syntax error is a ``ValueError`` naming ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as error:
        raise ValueError(f"{where} is not valid YAML: {error}") from None
