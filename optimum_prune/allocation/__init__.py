"""Layer-wise sparsity allocations. One module each, registered on import below."""

from . import owl, sensitivity  # noqa: F401  (each registers its allocation)
from .base import ALLOCATIONS, Allocation, AllocationSpec, per_layer_allocations, register_allocation, shifted_for_existing_zeros

__all__ = [
    "ALLOCATIONS", "Allocation", "AllocationSpec", "per_layer_allocations", "register_allocation", "shifted_for_existing_zeros",
]  # fmt: skip
