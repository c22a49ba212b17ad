"""Layer-wise sparsity allocations. One module each, registered on import below."""

from . import owl, sensitivity  # noqa: F401  (each registers its allocation)
from .base import ALLOCATIONS, Allocation, AllocationSpec, register_allocation, shifted_for_existing_zeros

__all__ = ["ALLOCATIONS", "Allocation", "AllocationSpec", "register_allocation", "shifted_for_existing_zeros"]
