"""Every registered method prunes a half-precision model: statistics in fp32, weights written back in the
model's dtype, no fp32 tensor leaking into a half layer (hooks that scale inputs cast back)."""

from __future__ import annotations

import pytest
import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.methods.base import METHODS

from ..adapters.test_moe import tiny_moe
from ..conftest import tiny_model, token_windows

MOE_ONLY = {"experts", "merge_experts", "mpoe"}
REMOVING_STRUCTURE = {  # a fifth of their units, layers or width; the others zero half the weights (or experts)
    "kcm", "kprune", "layers", "llm_surgeon_structured", "low_rank", "mask_search", "slicegpt", "sublayers", "width",
    "ziplm",
}  # fmt: skip


def cases() -> list[tuple[str, torch.dtype]]:
    return [(name, torch.bfloat16) for name in METHODS.names()] + [(name, torch.float16) for name in ("kprune", "mask_search")]


@pytest.mark.parametrize("method, dtype", cases(), ids=lambda value: str(value).removeprefix("torch."))
def test_half_precision_models_are_pruned_in_their_dtype(method, dtype):
    model = (tiny_moe() if method in MOE_ONLY else tiny_model()).to(dtype)
    sparsity = 0.2 if method in REMOVING_STRUCTURE else 0.5
    prune(model, PruningConfig(method=method, sparsity=sparsity), calibration=token_windows())
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        assert torch.isfinite(model(token_windows(1, 8)).logits).all()
