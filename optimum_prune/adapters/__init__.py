"""Architecture adapters. A new family is one module here plus one import line below."""

from . import deepseek, gemma, granite, llama, llava, moe, olmo2, phi3, stablelm  # noqa: F401  (register their model classes)
from .base import (
    ADAPTERS,
    AttentionLayout,
    DecoderAdapter,
    DecoderStackAdapter,
    MLPLayout,
    ResidualBranch,
    TokenRouting,
    UnsupportedArchitecture,
    adapter_factory,
    get_adapter,
    register_adapter,
    transformers_model,
)

__all__ = [
    "ADAPTERS",
    "AttentionLayout",
    "DecoderAdapter",
    "DecoderStackAdapter",
    "MLPLayout",
    "ResidualBranch",
    "TokenRouting",
    "UnsupportedArchitecture",
    "adapter_factory",
    "get_adapter",
    "register_adapter",
    "transformers_model",
]
