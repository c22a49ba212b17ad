"""MEO expert folding at inference: exact where merging is, measured where it is not."""

from __future__ import annotations

import pytest
import torch

from optimum_prune.expert_folding import fold_experts

from .adapters.test_moe import tiny_moe
from .conftest import tiny_model, token_windows


@pytest.mark.parametrize("family, renormalised", [("mixtral", True), ("qwen2_moe", True), ("qwen2_moe", False), ("olmoe", False)])
def test_one_selected_expert_folds_exactly(family, renormalised):
    """Also where the router's top-1 weight is below 1 (no renormalisation): it scales the output only."""
    model = tiny_moe(family, num_experts_per_tok=1, **({} if family == "mixtral" else {"norm_topk_prob": renormalised}))
    ids = token_windows(2, 12)
    with torch.no_grad():
        exact = model(ids).logits
        folding = fold_experts(model, measure_error=True)
        torch.testing.assert_close(model(ids).logits, exact, rtol=1e-5, atol=1e-5)
    assert folding.relative_error < 1e-5
    folding.remove()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_gated_experts_fold_approximately_and_remove_restores_the_mixture(level):
    model = tiny_moe(num_local_experts=4, num_experts_per_tok=2)
    ids = token_windows(2, 12)
    with torch.no_grad():
        exact = model(ids).logits
        folding = fold_experts(model, level=level, measure_error=True)
        folded = model(ids).logits
        folding.remove()
        assert torch.equal(model(ids).logits, exact)
    assert 0 < folding.relative_error < 1.5
    assert not torch.allclose(folded, exact)


def test_sequence_level_generates_with_the_cache():
    model = tiny_moe()
    folding = fold_experts(model, level="sequence", measure_error=True)
    with torch.no_grad():
        ids = token_windows(1, 6)
        cached = model.generate(ids, max_new_tokens=5, do_sample=False)
        assert folding.relative_error > 0  # the folded experts ran, in place of the mixture
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False)
    folding.remove()
    assert cached.shape == (1, 11)
    assert torch.equal(cached[:, :7], uncached[:, :7])  # the first step routes the same prompt either way


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="level must be one of"):
        fold_experts(tiny_moe(), level="layer")
    with pytest.raises(ValueError, match="no mixture-of-experts layers"):
        fold_experts(tiny_model())
