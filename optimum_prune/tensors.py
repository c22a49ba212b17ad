"""Telling whether two tensor objects are the same data, for what is computed once per tensor."""

from __future__ import annotations

from typing import Hashable

import torch


def tensor_identity(inputs: torch.Tensor) -> Hashable:
    """Equal for two tensors (``detach`` makes a new object per call) that view the same memory the same way at the
    same version; only meaningful while both are alive, as a freed block's address may be reused."""
    return (
        inputs.untyped_storage().data_ptr(), inputs.storage_offset(), tuple(inputs.shape), inputs.stride(),
        inputs.dtype, inputs.device, inputs._version,
    )  # fmt: skip
