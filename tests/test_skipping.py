"""Dynamic expert skipping on tiny MoE models of the real transformers classes."""

from __future__ import annotations

import pytest
import torch

from optimum_prune import skip_experts

from .adapters.test_moe import FAMILIES, tiny_moe
from .conftest import tiny_model, token_windows


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", list(FAMILIES))
def test_beta_zero_equals_the_unmodified_model(family):
    model, ids = tiny_moe(family), token_windows(2, 12)
    expected = logits(model, ids)
    skipping = skip_experts(model, beta=0.0)
    assert torch.allclose(logits(model, ids), expected, atol=1e-6)
    assert skipping.skip_rate == 0.0 and skipping.expert_calls == 2 * 12 * 2 * 2  # tokens × top-2 × layers
    skipping.remove()
    assert torch.equal(logits(model, ids), expected)


def test_skip_rate_grows_with_beta_and_beta_one_keeps_only_the_top_expert():
    model, ids = tiny_moe(), token_windows(2, 12)
    rates = []
    for beta in (0.2, 0.5, 0.8, 1.0):
        skipping = skip_experts(model, beta)
        logits(model, ids)
        rates.append(skipping.skip_rate)
        skipping.remove()
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.5, abs=0.02) and rates[0] < rates[-1]


def test_skipped_expert_term_is_dropped():
    """With β = 1 each token keeps only its top expert, weighted as the router weighted it."""
    model = tiny_moe(num_hidden_layers=1)
    block = model.model.layers[0].block_sparse_moe
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        weights, selected = torch.topk(torch.softmax(block.gate(hidden[0]), -1), 2, dim=-1)
        top = weights[:, 0] / weights.sum(-1)
        expected = torch.stack([block.experts[int(e)](hidden[0, t]) * top[t] for t, e in enumerate(selected[:, 0])])
        skip_experts(model, beta=1.0)
        assert torch.allclose(block(hidden)[0][0], expected, atol=1e-6)


def test_generation_with_cache_and_bad_inputs():
    model = tiny_moe()
    skipping = skip_experts(model, beta=0.5)
    out = model.generate(token_windows(1, 4), max_new_tokens=5, do_sample=False, pad_token_id=0)
    uncached = tiny_moe()
    skip_experts(uncached, beta=0.5)
    assert torch.equal(out, uncached.generate(token_windows(1, 4), max_new_tokens=5, do_sample=False, pad_token_id=0, use_cache=False))
    # With the cache each token passes once: the 4 prompt tokens, then the 4 generated ones fed back.
    config = model.config
    assert skipping.expert_calls == 8 * config.num_experts_per_tok * config.num_hidden_layers
    with pytest.raises(ValueError, match="beta must be in"):
        skip_experts(tiny_moe(), beta=1.5)
    with pytest.raises(ValueError, match="has no mixture-of-experts layers"):
        skip_experts(tiny_model(), beta=0.3)


def test_one_variant_of_the_mixture_at_a_time_and_remove_undoes_its_own():
    """A second patch silently replaced the first, whose remove() then undid both (and the other's raised)."""
    from optimum_prune import fold_experts

    model = tiny_moe(num_local_experts=8)
    ids = token_windows(1, 8)
    with torch.no_grad():
        stock = model(ids).logits
        skipping = skip_experts(model, beta=0.9)
        with pytest.raises(ValueError, match="already run ExpertSkipping: one variant of the mixture at a time; remove"):
            fold_experts(model)
        skipping.remove()
        folding = fold_experts(model)
        skipping.remove()  # a stale handle leaves the other variant in place
        assert not torch.equal(model(ids).logits, stock)
        folding.remove()
        assert torch.equal(model(ids).logits, stock)
