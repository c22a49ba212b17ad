"""MEO expert folding at inference: exact where merging is, measured where it is not."""

from __future__ import annotations

import pytest
import torch

from optimum_prune.adapters import UnsupportedArchitecture, get_adapter
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
    with pytest.raises(UnsupportedArchitecture, match="no mixture-of-experts layers"):  # as prune's (a ValueError)
        fold_experts(tiny_model())


def direct_merge(adapter, block, tokens, weights, selected):
    """Each token's own merged expert, written out: s · W_down(act(W_gate x) ⊙ W_up x), W = Σ_k (g_k / s) W_k."""
    experts = adapter.block_experts(block)

    def projections(expert):  # its (gate, up, down) weights
        (gate, up), down = adapter.expert_projections(experts[int(expert)])
        return gate.weight, up.weight, down.weight

    rows = []
    for x, w, e in zip(tokens, weights, selected):
        s = w.sum()
        gate, up, down = (sum((g / s) * weight for g, weight in zip(w, kind)) for kind in zip(*map(projections, e)))
        act = adapter.expert_activation(experts[int(e[0])])
        rows.append(s * (down @ (act(gate @ x) * (up @ x))))
    return torch.stack(rows)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # renormalising / not renormalising router
def test_folding_runs_the_directly_merged_expert(family, level):
    model = tiny_moe(family, num_hidden_layers=1)
    adapter = get_adapter(model)
    block = adapter.moe_block(adapter.decoder_layers()[0])
    hidden = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = hidden.reshape(-1, 64)
        exact = block(hidden)[0].reshape(-1, 64)
        weights, selected = adapter.route(block, adapter.router(block)(tokens))
        if level == "sequence":
            dense = torch.zeros(10, 4).scatter_(1, selected, weights).reshape(2, 5, 4).mean(1)
            w, s = dense.topk(2, dim=-1)
            if adapter.renormalises(block):
                w = w / w.sum(-1, keepdim=True)
            weights, selected = w.repeat_interleave(5, 0), s.repeat_interleave(5, 0)
        shared = adapter.shared_expert_output(block, tokens)
        expected = direct_merge(adapter, block, tokens, weights, selected) + (0 if shared is None else shared)
        folding = fold_experts(model, level=level, measure_error=True)
        folded = block(hidden)[0].reshape(-1, 64)
    torch.testing.assert_close(folded, expected, rtol=1e-4, atol=1e-5)
    if shared is None:  # the routed output is the whole block's
        assert folding.relative_error == pytest.approx(float((folded - exact).norm() / exact.norm()), rel=1e-4)
    folding.remove()
