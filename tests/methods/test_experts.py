"""Expert pruning on tiny random MoE models of the real transformers classes."""

from __future__ import annotations

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_prune import PruningConfig, get_adapter, prune
from optimum_prune.methods import experts
from optimum_prune.methods.experts import ExpertPruning, ExpertPruningOptions, experts_to_keep, reap_scores

from ..adapters.test_moe import FAMILIES, block_inputs, tiny_moe
from ..conftest import LargestResult, token_windows


def block_output(block, hidden: torch.Tensor) -> torch.Tensor:
    """The routed experts' mixture only (Qwen2-MoE's shared expert is not affected by expert pruning)."""
    output = block(hidden.unsqueeze(0))[0].reshape(hidden.shape)
    shared = getattr(block, "shared_expert", None)
    if shared is not None:
        output = output - torch.sigmoid(block.shared_expert_gate(hidden)) * shared(hidden)
    return output


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("criterion", ["reconstruction", "frequency", "reap"])
def test_keeps_two_of_four_experts_and_reloads_with_a_stock_config(tmp_path, family, criterion):
    model = tiny_moe(family)
    report = prune(model, PruningConfig(method="experts", sparsity=0.5, method_options={"criterion": criterion}), calibration=token_windows(4, 16))
    adapter = get_adapter(model)
    blocks = [block for layer in adapter.decoder_layers() if (block := adapter.moe_block(layer)) is not None]
    for block in blocks:
        assert len(block.experts) == 2 and adapter.router_logits(block, torch.zeros(1, model.config.hidden_size)).shape[-1] == 2
    assert len(report.removed) == len(blocks) == 2 and "experts [" in report.removed[0]
    model.save_pretrained(tmp_path / "moe")
    config = (tmp_path / "moe" / "config.json").read_text()
    assert "quantization_config" not in config  # uniform: the stock expert-count field says it all
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = token_windows(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_reap_scores_are_the_mean_routing_weighted_output_norms_of_each_experts_tokens():
    model, windows = tiny_moe("mixtral"), token_windows(2, 8)
    adapter = get_adapter(model)
    block = adapter.moe_block(adapter.decoder_layers()[0])
    hidden = block_inputs(model, windows)
    with torch.no_grad():
        probabilities = torch.softmax(block.gate(hidden).float(), dim=-1)
        weights, selected = probabilities.topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)  # Mixtral renormalises its top-k
        expected = torch.zeros(len(block.experts), dtype=torch.float64)
        for expert in range(len(block.experts)):
            token, rank = (selected == expert).nonzero(as_tuple=True)
            if len(token):
                norms = block.experts[expert](hidden[token]).float().norm(dim=-1)
                expected[expert] = float((weights[token, rank] * norms).mean())
        scores = reap_scores(adapter, block, lambda: model(input_ids=windows))
    assert (expected > 0).sum() >= 3
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_reconstruction_loss_models_the_pruned_block_exactly(family):
    """F_S computed from the full block's expert outputs equals the block after keep_experts(S)."""
    model = tiny_moe(family)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers()[0]
    block = adapter.moe_block(layer)
    hidden = block_inputs(model, token_windows(2, 8))
    method = ExpertPruning(adapter, 0.5, [], ExpertPruningOptions(), torch.device("cpu"))
    with torch.no_grad():
        logits = block.gate(hidden).float()
        outputs = torch.stack([expert(hidden).float() for expert in block.experts])
        assert torch.allclose(method._mixture(block, logits, outputs, [0, 1, 2, 3]), block_output(block, hidden), atol=1e-5)
        predicted = method._mixture(block, logits, outputs, [1, 3])
        adapter.keep_experts(layer, [1, 3])
        assert torch.allclose(predicted, block_output(block, hidden), atol=1e-5)


def test_scoring_a_subset_reads_its_top_k_rows_without_copying_its_experts_outputs():
    """index_select copied |S| experts' outputs for every subset scored (E³ in the greedy search: hours at 128 experts)."""
    model = tiny_moe("mixtral")
    adapter = get_adapter(model)
    block = adapter.moe_block(adapter.decoder_layers()[0])
    method = ExpertPruning(adapter, 0.5, [], ExpertPruningOptions(), torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    experts_count, tokens, hidden = len(block.experts), 64, model.config.hidden_size
    logits, outputs = torch.randn(tokens, experts_count, generator=generator), torch.randn(experts_count, tokens, hidden, generator=generator)
    with torch.no_grad(), LargestResult() as probe:
        method._mixture(block, logits, outputs, list(range(experts_count)))
    assert probe.largest <= tokens * hidden


def test_exhaustive_search_picks_the_best_subset():
    model, windows = tiny_moe(num_local_experts=5), token_windows(2, 8)
    adapter = get_adapter(model)
    block = adapter.moe_block(adapter.decoder_layers()[0])
    hidden = block_inputs(model, windows)
    method = ExpertPruning(adapter, 0.4, [], ExpertPruningOptions(), torch.device("cpu"))
    method.check()
    subsets = [list(s) for s in itertools.combinations(range(5), 3)]
    with torch.no_grad():
        losses = method._subset_losses(block, hidden, subsets)
        assert method._reconstruction(block, lambda: model(windows), 5) == subsets[int(torch.argmin(losses))]
        greedy = ExpertPruning(adapter, 0.4, [], ExpertPruningOptions(max_subsets=1), torch.device("cpu"))
        greedy.check()
        kept = list(range(5))  # beyond max_subsets: remove, one at a time, the expert whose removal costs least
        while len(kept) > 3:
            candidates = [[e for e in kept if e != removed] for removed in kept]
            kept = candidates[int(torch.argmin(method._subset_losses(block, hidden, candidates)))]
        assert greedy._reconstruction(block, lambda: model(windows), 5) == kept


def test_exhaustive_search_scores_tokens_as_they_arrive(monkeypatch):
    """Chunked over batches and within them, the streamed losses are the losses of all tokens at once;
    the block's inputs are not kept."""
    model, windows = tiny_moe(num_local_experts=5), token_windows(3, 8)
    adapter = get_adapter(model)
    block = adapter.moe_block(adapter.decoder_layers()[0])
    method = ExpertPruning(adapter, 0.4, [], ExpertPruningOptions(), torch.device("cpu"))
    method.check()
    subsets = [list(s) for s in itertools.combinations(range(5), 3)]
    with torch.no_grad():
        whole = method._chunk_losses(block, block_inputs(model, windows), subsets)
        monkeypatch.setattr(experts, "TOKEN_CHUNK", 5)  # 8-token windows arrive one batch at a time, split 5 + 3
        monkeypatch.setattr(experts, "block_inputs", None)  # the exhaustive search must not keep the inputs
        streamed = torch.zeros(len(subsets), dtype=torch.float64)

        def one_batch_at_a_time() -> None:
            for window in windows:
                model(window[None])

        experts.each_block_chunk(block, one_batch_at_a_time, lambda chunk: streamed.add_(method._chunk_losses(block, chunk, subsets)))
        assert method._reconstruction(block, one_batch_at_a_time, 5) == subsets[int(torch.argmin(whole))]
    torch.testing.assert_close(streamed, whole, rtol=1e-5, atol=0)


def test_frequency_keeps_the_most_routed_experts_of_each_layer():
    model, windows = tiny_moe(), token_windows(4, 16)
    block = model.model.layers[0].block_sparse_moe
    with torch.no_grad():
        selected = torch.topk(block.gate(block_inputs(model, windows)), 2, dim=-1).indices
    counts = torch.bincount(selected.flatten(), minlength=4)
    expected_removed = sorted(torch.argsort(counts, descending=True, stable=True)[2:].tolist())
    report = prune(model, PruningConfig(method="experts", sparsity=0.5, method_options={"criterion": "frequency"}), calibration=windows)
    assert report.removed[0] == f"model.layers.0: experts {expected_removed}"


@pytest.mark.parametrize(
    "options, message",
    [({"num_experts": 1}, "router picks top-2, so keep between 2 and 3"), ({"num_experts": 4}, "keep between 2 and 3")],
)
def test_impossible_expert_counts_are_clear_errors(options, message):
    with pytest.raises(ValueError, match=message):
        prune(tiny_moe(), PruningConfig(method="experts", method_options=options), calibration=token_windows(2, 8))


def test_a_model_with_as_many_experts_as_the_router_picks_has_none_to_remove():
    model = tiny_moe()
    prune(model, PruningConfig(method="experts", method_options={"num_experts": 2}), calibration=token_windows(2, 8))
    with pytest.raises(ValueError, match="the router picks top-2 of 2 experts per layer: none can be removed"):  # "between 2 and 1"
        prune(model, PruningConfig(method="experts"), calibration=token_windows(2, 8))


def test_dense_models_are_refused():
    from ..conftest import tiny_model

    with pytest.raises(ValueError, match="need mixture-of-experts layers with the same expert count; LlamaForCausalLM has no mixture-of-experts layers"):
        prune(tiny_model(), PruningConfig(method="experts"), calibration=token_windows(2, 8))


def test_global_ranking_gives_layers_different_counts_that_reload(tmp_path):
    model = tiny_moe(num_local_experts=8)
    with torch.no_grad():  # layer 0's router prefers experts 0 and 1 by far: its other experts score low
        model.model.layers[0].block_sparse_moe.gate.weight[:2] *= 30
    options = {"criterion": "frequency", "ranking": "global"}
    prune(model, PruningConfig(method="experts", sparsity=0.5, method_options=options), calibration=token_windows(4, 16))
    counts = [len(layer.block_sparse_moe.experts) for layer in model.model.layers]
    assert sum(counts) == 8 and counts[0] < counts[1] and min(counts) >= 2
    model.save_pretrained(tmp_path / "moe")
    assert '"num_experts"' in (tmp_path / "moe" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert [len(layer.block_sparse_moe.experts) for layer in reloaded.model.layers] == counts
    ids = token_windows(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("layers, per_layer, sparsity, kept", [(3, 8, 0.3, 17), (3, 8, 0.4, 14), (2, 4, 0.4, 5)])
def test_global_ranking_keeps_the_nearest_count_over_the_model(layers, per_layer, sparsity, kept):
    """The budget was the per-layer rounded count times the layers: 0.3 of 3 × 8 kept 18 (removing 25 %), where
    17 (29.2 %) is the nearest to the request, as layers need not keep equal counts."""
    model = tiny_moe(num_hidden_layers=layers, num_local_experts=per_layer)
    options = {"criterion": "frequency", "ranking": "global"}
    report = prune(model, PruningConfig(method="experts", sparsity=sparsity, method_options=options), calibration=token_windows(4, 16))
    assert sum(len(layer.block_sparse_moe.experts) for layer in model.model.layers) == kept
    assert report.sparsity == pytest.approx(1 - kept / (layers * per_layer))
    assert not [line for line in report.removed if line.endswith("experts []")]  # a layer kept whole is no removal


def test_global_reap_ranks_experts_by_their_share_of_their_layers_score():
    """Layers compete by shares: scaling every expert output of a layer (its down projections) changes no count.
    Raw REAP scores let the louder layer keep more (frequency's equal totals per layer could not show it)."""
    counts = []
    for scale in (1.0, 3.0):
        model = tiny_moe(num_local_experts=8)
        with torch.no_grad():
            for expert in model.model.layers[1].block_sparse_moe.experts:
                expert.w2.weight *= scale
        options = {"criterion": "reap", "ranking": "global"}
        prune(model, PruningConfig(method="experts", sparsity=0.5, method_options=options), calibration=token_windows(4, 16))
        counts.append([len(layer.block_sparse_moe.experts) for layer in model.model.layers])
    assert counts[0] == counts[1]


def test_global_ranking_needs_a_comparable_criterion():
    with pytest.raises(ValueError, match="ranking='global' needs criterion 'frequency' or 'reap'"):
        PruningConfig(method="experts", method_options={"ranking": "global"})


@pytest.mark.parametrize("method", ["experts", "merge_experts"])
def test_router_load_balancing_loss_still_works_after_pruning(method, tmp_path):
    model = tiny_moe(output_router_logits=True, router_aux_loss_coef=0.02)
    prune(model, PruningConfig(method=method, sparsity=0.5), calibration=token_windows(2, 8))
    ids = token_windows(2, 8)
    output = model(input_ids=ids, labels=ids)
    kept = len(model.model.layers[0].block_sparse_moe.experts)
    assert model.num_experts == kept and all(logits.shape[-1] == kept for logits in output.router_logits)
    assert torch.isfinite(output.loss) and output.aux_loss > 0
    model.save_pretrained(tmp_path / "pruned")  # a reloaded model balances over the same experts
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.num_experts == kept
    torch.testing.assert_close(reloaded(input_ids=ids, labels=ids).aux_loss, output.aux_loss)


@pytest.mark.parametrize("method", ["experts", "merge_experts"])
def test_an_expert_count_is_reported_as_the_sparsity_it_removes(method):
    model = tiny_moe(num_local_experts=8)
    report = prune(model, PruningConfig(method=method, method_options={"num_experts": 6}), calibration=token_windows(4, 16))
    assert report.sparsity == 0.25  # 2 of 8 experts, not the default 0.5


def test_global_ranking_keeps_every_layers_top_k_best_experts_first(monkeypatch):
    """Layer 0's share is one dominant expert; layer 1's is flat. At 2 of 4 kept on average, layer 0 still keeps its
    top-2 (the router picks 2), and the budget left over goes to the best of the rest."""
    shares = iter([torch.tensor([97.0, 1.0, 1.0, 1.0]), torch.tensor([25.0, 25.0, 25.0, 25.0])])
    monkeypatch.setattr(ExpertPruning, "_expert_scores", lambda self, block, layer, inputs: next(shares).double())
    model = tiny_moe()
    options = {"criterion": "frequency", "ranking": "global"}
    prune(model, PruningConfig(method="experts", sparsity=0.5, method_options=options), calibration=token_windows(2, 8))
    assert [len(layer.block_sparse_moe.experts) for layer in model.model.layers] == [2, 2]


def test_sparsity_rounds_to_the_nearest_expert_count():
    adapter = get_adapter(tiny_moe())  # 4 experts, top-2
    assert experts_to_keep(adapter, 0.3, 0) == 3  # 4 × 0.7 = 2.8 experts kept: 3, not 2 (removing 50 % for a 30 % request)
    assert experts_to_keep(adapter, 0.45, 0) == 2
    assert experts_to_keep(adapter, 0.375, 0) == 3  # an exact half keeps the larger count (round() gave 2: halves to even)
    many = get_adapter(tiny_moe(num_local_experts=15))
    assert experts_to_keep(many, 0.9, 0) == 2  # 15 × (1 − 0.9) = 1.4999999999999996: a half, so 2 (1 was refused, below top-2)


@pytest.mark.parametrize("options", [{"method": "experts"}, {"method": "merge_experts"}, {"method": "experts", "method_options": {"criterion": "frequency", "ranking": "global"}}])
@pytest.mark.parametrize("dense", [{"mlp_only_layers": [1]}, {"decoder_sparse_step": 2}])
def test_dense_layers_among_moe_ones_stay_as_they_are_and_the_model_reloads(tmp_path, options, dense):
    """Qwen-MoE configs can make some layers dense (DeepSeek-V3's first ones are): the expert count is over MoE layers."""
    model = tiny_moe("qwen2_moe", num_hidden_layers=3, intermediate_size=80, **dense)
    adapter = get_adapter(model)
    dense_index = next(index for index, layer in enumerate(adapter.decoder_layers()) if adapter.moe_block(layer) is None)
    before = {name: tensor.clone() for name, tensor in adapter.decoder_layers()[dense_index].state_dict().items()}
    report = prune(model, PruningConfig(sparsity=0.5, **options), calibration=token_windows(4, 16))
    blocks = [block for layer in adapter.decoder_layers() if (block := adapter.moe_block(layer)) is not None]
    assert blocks and sum(map(len, (block.experts for block in blocks))) == 2 * len(blocks) and len(report.removed) == len(blocks)
    after = adapter.decoder_layers()[dense_index].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[name], after[name]) for name in before)
    model.save_pretrained(tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = token_windows(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
