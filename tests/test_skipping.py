"""Dynamic expert skipping on tiny MoE models of the real transformers classes."""

from __future__ import annotations

import copy

import numpy
import pytest
import torch

from optimum_prune import skip_experts, skipping_thresholds
from optimum_prune.adapters import UnsupportedArchitecture, get_adapter
from optimum_prune.skipping import moe_blocks

from .adapters.test_moe import SOFTMAX_ROUTED, tiny_moe
from .conftest import tiny_model, token_windows


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", SOFTMAX_ROUTED)
def test_beta_zero_equals_the_unmodified_model(family):
    model, ids = tiny_moe(family), token_windows(2, 12)
    expected = logits(model, ids)
    skipping = skip_experts(model, beta=0.0)
    assert torch.equal(logits(model, ids), expected)  # not renormalised again where nothing is skipped
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


def test_beta_one_routes_mixtral_as_top_1_routing():
    """As the paper's code, a router that rescales its top-k weights rescales the kept ones: a token that
    skips its second expert runs its top expert at weight 1 (the term was kept at w0 / (w0 + w1))."""
    model, ids = tiny_moe(), token_windows(2, 12)
    top_1 = copy.deepcopy(model)
    for layer in top_1.model.layers:
        layer.block_sparse_moe.top_k = 1
    skip_experts(model, beta=1.0)
    assert torch.allclose(logits(model, ids), logits(top_1, ids), atol=1e-6)


def test_a_router_that_does_not_rescale_keeps_the_weight_it_gave():
    """Qwen2-MoE with norm_topk_prob=False: the skipped term is dropped, the top expert keeps its softmax weight."""
    model = tiny_moe("qwen2_moe", num_hidden_layers=1)
    block = model.model.layers[0].mlp
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        weights, selected = torch.topk(torch.softmax(block.gate(hidden[0]), -1), 2, dim=-1)
        routed = torch.stack([block.experts[int(e)](hidden[0, t]) * weights[t, 0] for t, e in enumerate(selected[:, 0])])
        shared = torch.sigmoid(block.shared_expert_gate(hidden[0])) * block.shared_expert(hidden[0])
        skip_experts(model, beta=1.0)
        assert torch.allclose(block(hidden)[0][0], routed + shared, atol=1e-6)


def test_default_thresholds_are_each_layers_median_ratio_of_second_to_top_weight():
    """Lu et al.: β of a layer is the median over calibration tokens of w1 / w0 (so about half of the second experts are skipped)."""
    model, windows = tiny_moe(num_hidden_layers=3), token_windows(4, 16)
    ratios = [[] for _ in model.model.layers]
    handles = [
        layer.block_sparse_moe.gate.register_forward_hook(
            lambda _m, _a, out, found=found: found.append((lambda top: top[:, 1] / top[:, 0])(torch.softmax(out, -1).topk(2).values))
        )
        for layer, found in zip(model.model.layers, ratios)
    ]
    with torch.no_grad():
        model(windows)
    for handle in handles:
        handle.remove()
    expected = [float(numpy.median(torch.cat(found).numpy())) for found in ratios]
    assert skipping_thresholds(model, windows, num_samples=4, seq_len=16) == pytest.approx(expected, rel=1e-6)
    skipping = skip_experts(model, calibration=windows, num_samples=4, seq_len=16)
    assert skipping.betas == pytest.approx(expected, rel=1e-6)
    logits(model, windows)
    assert skipping.skip_rate == pytest.approx(0.25, abs=0.01)  # half of the second experts: a quarter of the calls
    with pytest.raises(ValueError, match="beta: 2 values for 3 mixture-of-experts layers"):
        skip_experts(tiny_moe(num_hidden_layers=3), beta=[0.1, 0.2])


def counted_alone(model, texts) -> tuple[int, int]:
    """(expert calls, skipped calls) of ``texts`` run one at a time, at β = 0.5."""
    alone = skip_experts(model, beta=0.5)
    for text in texts:
        logits(model, text[None])
    alone.remove()
    return alone.expert_calls, alone.skipped_calls


def test_skip_rate_counts_real_tokens_only():
    """The same texts give the same rate alone or left-padded into one batch."""
    model = tiny_moe()
    texts = [token_windows(1, 12, seed=1)[0], token_windows(1, 5, seed=2)[0]]
    batched = skip_experts(model, beta=0.5)
    ids = torch.zeros(2, 12, dtype=torch.long)
    mask = torch.zeros(2, 12, dtype=torch.long)
    for row, text in enumerate(texts):
        ids[row, -len(text):], mask[row, -len(text):] = text, 1
    with torch.no_grad():
        model(ids, attention_mask=mask)
    batched.remove()
    assert (batched.expert_calls, batched.skipped_calls) == counted_alone(model, texts)


def test_skip_rate_counts_every_real_token_of_a_cached_generation():
    """A cached step's mask spans the cache: at the first decode step after a prompt of k − 1 tokens it had the shape of
    the per-token top-k flags ([batch, k]), which were then read as positions and a real token's calls dropped."""
    top_k = 3
    model = tiny_moe(num_experts_per_tok=top_k)
    ids, mask = token_windows(2, top_k - 1, seed=1).clamp(min=1), torch.ones(2, top_k - 1, dtype=torch.long)
    ids[1, 0], mask[1, 0] = 0, 0  # left-padded by one
    skipping = skip_experts(model, beta=0.0)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    skipping.remove()
    tokens = int(mask.sum()) + 2 * 2  # the prompts' real tokens, then one per row at each cached step (the last is not run)
    assert skipping.expert_calls == tokens * top_k * model.config.num_hidden_layers and skipping.skipped_calls == 0


@pytest.mark.parametrize("additive", [False, True])
def test_skip_rate_counts_no_padding_of_a_packed_batch(additive):
    """A prepared 4-D mask (LLaMA-Factory's packed sequences: block-diagonal, its pads attending to nothing) had its pads
    counted as tokens: only 2-D masks were read."""
    model = tiny_moe()
    texts = [token_windows(1, 7, seed=1)[0], token_windows(1, 4, seed=2)[0]]
    packed = skip_experts(model, beta=0.5)
    sequence = torch.tensor([1] * 7 + [2] * 4 + [0])
    attends = (sequence[:, None] == sequence[None, :]) & (sequence[None, :] > 0) & torch.ones(12, 12, dtype=torch.bool).tril()
    mask = torch.zeros(12, 12).masked_fill(~attends, torch.finfo(torch.float32).min) if additive else attends
    positions = torch.tensor([*range(7), *range(4), 0])
    with torch.no_grad():
        model(torch.cat([*texts, torch.zeros(1, dtype=torch.long)])[None], attention_mask=mask[None, None], position_ids=positions[None])
    packed.remove()
    assert (packed.expert_calls, packed.skipped_calls) == counted_alone(model, texts)


def test_a_model_that_recorded_router_logits_can_be_patched():
    """transformers leaves the class's own forward on each block after output_router_logits=True."""
    model, ids = tiny_moe(), token_windows(1, 8)
    with torch.no_grad():
        model(ids, output_router_logits=True)
    assert "forward" in vars(model.model.layers[0].block_sparse_moe)
    skip_experts(model, beta=0.5).remove()
    assert "forward" not in vars(model.model.layers[0].block_sparse_moe)


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
    with pytest.raises(UnsupportedArchitecture, match="has no mixture-of-experts layers"):  # as prune's (a ValueError)
        skip_experts(tiny_model(), beta=0.3)
    with pytest.raises(UnsupportedArchitecture, match="has no mixture-of-experts layers"):
        skipping_thresholds(tiny_model(), token_windows(2, 8))


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


@pytest.mark.parametrize("variant", ["skip", "fold"])
def test_a_copy_of_a_patched_model_runs_the_exact_mixture(tmp_path, variant):
    """The copy's blocks ran the original's handle, which knew them not (KeyError), and no handle could remove them."""
    import pickle

    from optimum_prune import fold_experts, save_pruned

    model = tiny_moe(num_local_experts=8)
    ids = token_windows(1, 8)
    stock = logits(model, ids)
    patch = skip_experts(model, beta=0.9) if variant == "skip" else fold_experts(model)
    patched = logits(model, ids)
    assert not torch.equal(patched, stock)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(other, ids), stock)
        skip_experts(other, beta=0.9).remove()  # the copy takes a patch of its own
        save_pruned(other, tmp_path / "copy")
    assert torch.equal(logits(model, ids), patched)  # the original still runs its patch
    patch.remove()


@pytest.mark.parametrize("variant", ["skip", "fold"])
def test_save_pruned_refuses_a_mixture_running_a_variant_and_saves_once_it_is_removed(tmp_path, variant):
    """The checkpoint holds the exact mixture, so it used to reload as another model than the one saved."""
    from optimum_prune import fold_experts, save_pruned

    model = tiny_moe()
    patch = skip_experts(model, beta=0.5) if variant == "skip" else fold_experts(model)
    with pytest.raises(ValueError, match=rf"model.layers.0.block_sparse_moe runs {type(patch).__name__} .*call .remove\(\) on it before saving"):
        save_pruned(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    patch.remove()
    save_pruned(model, tmp_path / "out")


def test_thresholds_of_a_model_in_training_mode_are_measured_without_router_noise():
    """Straight from Trainer.train, Mixtral's router jitter noise moved every layer's β (and drew from the caller's
    random stream)."""
    windows = token_windows(4, 16)
    expected = skipping_thresholds(tiny_moe(router_jitter_noise=0.1), windows, num_samples=4, seq_len=16)
    model = tiny_moe(router_jitter_noise=0.1).train()
    assert skipping_thresholds(model, windows, num_samples=4, seq_len=16) == expected
    assert model.training


def test_measuring_thresholds_leaves_an_eval_model_in_eval_mode():
    model = tiny_moe()
    skipping_thresholds(model, token_windows(2, 16), num_samples=2, seq_len=16)
    assert not model.training
    skip_experts(model, calibration=token_windows(2, 16), num_samples=2, seq_len=16).remove()
    assert not model.training


@pytest.mark.parametrize("through", ["skipping_thresholds", "skip_experts"])
def test_thresholds_measured_on_text_use_the_windows_the_seed_draws(bpe_tokenizer, through):
    from optimum_prune.calibration import calibration_windows
    from optimum_prune.data import wikipedia_articles

    model, texts = tiny_moe(), wikipedia_articles("calibration")[:3]
    measured = {}
    for seed in (0, 1):
        if through == "skipping_thresholds":
            measured[seed] = skipping_thresholds(model, texts, bpe_tokenizer, num_samples=2, seq_len=16, seed=seed)
        else:
            skipping = skip_experts(model, calibration=texts, tokenizer=bpe_tokenizer, num_samples=2, seq_len=16, seed=seed)
            measured[seed] = skipping.betas
            skipping.remove()
        windows = calibration_windows(texts, bpe_tokenizer, 2, 16, seed)
        assert measured[seed] == skipping_thresholds(model, windows, num_samples=2, seq_len=16)
    assert measured[0] != measured[1]


def test_thresholds_of_a_top_1_router_are_refused():
    """β compares a token's second expert with its first: a top-1 router has none to skip."""
    with pytest.raises(ValueError, match="routers that pick two experts or more"):
        skipping_thresholds(tiny_moe(num_experts_per_tok=1), token_windows(2, 16), num_samples=2, seq_len=16)


def test_padding_adds_no_skipped_calls():
    """β = 1 skips every real token's second expert; pad positions count neither calls nor skips (the skip
    rate passed 1 when they did)."""
    model = tiny_moe()
    ids, mask = torch.zeros(1, 12, dtype=torch.long), torch.zeros(1, 12, dtype=torch.long)
    ids[0, -4:], mask[0, -4:] = token_windows(1, 4, seed=2)[0], 1
    skipping = skip_experts(model, beta=1.0)
    with torch.no_grad():
        model(ids, attention_mask=mask)
    skipping.remove()
    layers = model.config.num_hidden_layers
    assert (skipping.expert_calls, skipping.skipped_calls, skipping.skip_rate) == (4 * 2 * layers, 4 * layers, 0.5)


def test_per_layer_betas_apply_to_their_own_layer():
    """beta=[0, 1]: the first MoE layer runs as routed, the second keeps only each token's top expert."""
    model, ids = tiny_moe(), token_windows(2, 12)
    blocks = moe_blocks(get_adapter(model), "test")
    assert len(blocks) == 2

    def block_outputs():
        found = []
        handles = [block.register_forward_hook(lambda _m, _a, output: found.append(output[0].detach().clone())) for block in blocks]
        with torch.no_grad():
            model(ids)
        for handle in handles:
            handle.remove()
        return found

    dense = block_outputs()
    skipping = skip_experts(model, beta=[0.0, 1.0])
    patched = block_outputs()
    skipping.remove()
    torch.testing.assert_close(patched[0], dense[0])
    assert skipping.skipped_calls > 0


@pytest.mark.parametrize("install", ["skip_experts", "fold_experts"])
def test_a_removed_handle_frees_the_model_and_keeps_its_counters(install):
    """The handle held the model through its adapter after remove(): kept to read skip_rate or relative_error (as a
    sweep does per point), it kept each point's model alive."""
    import gc
    import weakref

    from optimum_prune import fold_experts

    model = tiny_moe()
    alive = weakref.ref(model)
    handle = skip_experts(model, beta=0.5) if install == "skip_experts" else fold_experts(model, measure_error=True)
    with torch.no_grad():
        model(input_ids=token_windows(2, 16))
    handle.remove()
    del model
    gc.collect()
    assert alive() is None
    assert (handle.skip_rate if install == "skip_experts" else handle.relative_error) >= 0
