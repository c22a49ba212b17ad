"""Layer-wise sparsity allocations. One module each, registered on import below."""

from . import owl  # noqa: F401  (registers "owl")
from .base import ALLOCATIONS, Allocation, AllocationSpec, register_allocation

__all__ = ["ALLOCATIONS", "Allocation", "AllocationSpec", "register_allocation"]
