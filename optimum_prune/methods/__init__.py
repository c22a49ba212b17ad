"""Pruning methods. A method is one module here plus one import line below (its registry line)."""

from . import expert_merging, experts, kprune, layers, low_rank, magnitude, mask_search, slicegpt, sparsegpt, sublayers, wanda, width, ziplm  # noqa: F401  (each module registers its method)
from .base import METHODS, LayerPruner, MethodSpec, StructuredMethod, register_method, register_structured_method

__all__ = ["METHODS", "LayerPruner", "MethodSpec", "StructuredMethod", "register_method", "register_structured_method"]
