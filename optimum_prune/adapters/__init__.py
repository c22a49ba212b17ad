"""Architecture adapters. A new family is one module here plus one import line below."""

from . import llama  # noqa: F401  (registers its model classes)
from .base import ADAPTERS, AttentionLayout, DecoderAdapter, MLPLayout, ResidualBranch, get_adapter, register_adapter

__all__ = [
    "ADAPTERS",
    "AttentionLayout",
    "DecoderAdapter",
    "MLPLayout",
    "ResidualBranch",
    "get_adapter",
    "register_adapter",
]
