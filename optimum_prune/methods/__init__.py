"""Pruning methods. A method is one module here plus one import line below (its registry line)."""

from . import magnitude, sparsegpt, wanda  # noqa: F401  (each module registers its method)
from .base import METHODS, LayerPruner, MethodSpec, register_method

__all__ = ["METHODS", "LayerPruner", "MethodSpec", "register_method"]
