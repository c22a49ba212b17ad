"""Pruning methods. A method is one module here plus one import line below (its registry line)."""

from . import (  # noqa: F401  (each module registers its method)
    expert_merging,
    experts,
    kcm,
    kprune,
    layers,
    llm_surgeon,
    llm_surgeon_structured,
    low_rank,
    magnitude,
    mask_search,
    mpoe,
    slicegpt,
    sparsegpt,
    sublayers,
    wanda,
    width,
    ziplm,
)
from .base import (
    METHODS,
    LayerPruner,
    MethodSpec,
    ModelPruner,
    StructuredMethod,
    per_layer_methods,
    register_method,
    register_model_method,
    register_structured_method,
    zero_shares_per_row,
)

__all__ = [
    "METHODS",
    "LayerPruner",
    "MethodSpec",
    "ModelPruner",
    "StructuredMethod",
    "per_layer_methods",
    "register_method",
    "register_model_method",
    "register_structured_method",
    "zero_shares_per_row",
]
