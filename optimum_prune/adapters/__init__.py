"""Architecture adapters, one module per family, registered on import below."""

from . import llama  # noqa: F401  (registers the Llama family)
from .base import ADAPTERS, DecoderAdapter, get_adapter, register_adapter

__all__ = ["ADAPTERS", "DecoderAdapter", "get_adapter", "register_adapter"]
