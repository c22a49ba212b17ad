"""Layer-wise sparsity allocations. One module each, registered on import below."""

from . import owl, sensitivity  # noqa: F401  (each registers its allocation)
from .base import ALLOCATIONS, Allocation, AllocationSpec, shifted_for_existing_zeros, register_allocation

__all__ = ["ALLOCATIONS", "Allocation", "AllocationSpec", "shifted_for_existing_zeros", "register_allocation"]
