"""Expert merging (MC-SMoE) on tiny random MoE models of the real transformers classes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from optimum_prune import PruningConfig, get_adapter, prune
from optimum_prune.methods.expert_merging import ExpertMerging, ExpertMergingOptions, _ExpertLinears

from ..adapters.test_moe import SOFTMAX_ROUTED, block_inputs, tiny_moe
from ..conftest import token_windows


@pytest.mark.parametrize("family", SOFTMAX_ROUTED)
def test_merges_four_experts_into_two_and_reloads_with_a_stock_config(tmp_path, family):
    model = tiny_moe(family)
    report = prune(model, PruningConfig(method="merge_experts", sparsity=0.5), calibration=token_windows(4, 16))
    adapter = get_adapter(model)
    assert len(report.removed) == len(adapter.decoder_layers())
    for entry, layer in zip(report.removed, adapter.decoder_layers()):
        block = adapter.moe_block(layer)
        assert len(block.experts) == 2 and block.gate.weight.shape[0] == 2
        groups = eval(entry.split("merged experts ")[1])  # noqa: S307  (the report's own list literal)
        assert sorted(e for group in groups for e in group) == [0, 1, 2, 3] and len(groups) == 2
    model.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = token_windows(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def permuted_copy(model, source: int, target: int, seed: int = 0) -> torch.Tensor:
    """Make expert ``target`` of layer 0 a neuron-permuted copy of expert ``source``; return the permutation."""
    experts = model.model.layers[0].block_sparse_moe.experts
    order = torch.randperm(experts[source].w1.out_features, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        experts[target].w1.weight.copy_(experts[source].w1.weight[order])
        experts[target].w3.weight.copy_(experts[source].w3.weight[order])
        experts[target].w2.weight.copy_(experts[source].w2.weight[:, order])
    return order


def test_alignment_recovers_a_neuron_permutation():
    model = tiny_moe()
    permuted_copy(model, 0, 1)
    experts = model.model.layers[0].block_sparse_moe.experts
    adapter = get_adapter(model)
    reference, member = (_ExpertLinears(*adapter.expert_projections(experts[i])) for i in (0, 1))
    member.permute(member.alignment_to(reference))
    assert all(torch.equal(a, b) for a, b in zip(member.weights, reference.weights))


@pytest.mark.parametrize("align", [True, False])
def test_merging_permuted_copies_is_lossless_only_when_aligned(align):
    model = tiny_moe()
    permuted_copy(model, 0, 1)
    block = model.model.layers[0].block_sparse_moe
    original = {name: w.detach().clone() for name, w in block.experts[0].named_parameters()}
    method = ExpertMerging(get_adapter(model), 0.5, [], ExpertMergingOptions(align=align), torch.device("cpu"))
    merged = method._merged_expert(block, [0, 1], torch.tensor([3.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    same = all(torch.allclose(p, original[name], atol=1e-6) for name, p in merged.named_parameters())
    assert same == align


def test_members_join_the_most_similar_dominant_and_average_by_routing_frequency():
    """MC-SMoE: grouping by the cosine of router-logit columns (a raw dot product groups by scale), averaging weighted by
    routing frequency (a plain mean passed every test)."""
    model = tiny_moe()
    block = model.model.layers[0].block_sparse_moe
    experts = {name: w.detach().clone() for name, w in block.experts.named_parameters()}
    method = ExpertMerging(get_adapter(model), 0.5, [], ExpertMergingOptions(align=False), torch.device("cpu"))
    merged = method._merged_expert(block, [0, 2], torch.tensor([3.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    for name, weight in merged.named_parameters():
        torch.testing.assert_close(weight, 0.75 * experts[f"0.{name}"] + 0.25 * experts[f"2.{name}"])

    method.check()
    sign = torch.tensor([1.0, -1.0] * 4)  # experts 2 and 3 follow expert 0's pattern, at a hundredth of its scale
    logits = torch.stack([10 * sign + 12, sign + 100, 0.1 * sign + 0.05, 0.1 * sign + 0.04], dim=1)
    assert method.merge(model.model.layers[0], logits) == [[0, 2, 3], [1]]


def test_merged_experts_take_the_dominant_router_rows():
    model, windows = tiny_moe(), token_windows(4, 16)
    rows = model.model.layers[0].block_sparse_moe.gate.weight.detach().clone()
    report = prune(model, PruningConfig(method="merge_experts", sparsity=0.5), calibration=windows)
    dominant = [group[0] for group in eval(report.removed[0].split("merged experts ")[1])]  # noqa: S307
    assert torch.equal(model.model.layers[0].block_sparse_moe.gate.weight, rows[dominant])


def test_keeping_fewer_experts_than_top_k_is_refused():
    with pytest.raises(ValueError, match="router picks top-2"):
        prune(tiny_moe(), PruningConfig(method="merge_experts", method_options={"num_experts": 1}), calibration=token_windows(2, 8))


def test_dominant_experts_count_every_top_k_selection_not_only_the_first():
    """Expert 2 is every token's first choice and expert 3 its second: with top-2 routing both are routed to by every
    token, so they are the two dominant experts (MC-SMoE's frequency counts all k selections)."""
    model = tiny_moe()
    method = ExpertMerging(get_adapter(model), 0.5, [], ExpertMergingOptions(), torch.device("cpu"))
    method.check()
    logits = torch.tensor([[0.0, 0.1, 5.0, 3.0]]).repeat(8, 1) + 0.01 * torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    groups = method.merge(model.model.layers[0], logits)
    assert sorted(group[0] for group in groups) == [2, 3]


def test_a_group_never_routed_to_is_the_plain_mean_of_its_members():
    model = tiny_moe()
    block = model.model.layers[0].block_sparse_moe
    experts = {name: w.detach().clone() for name, w in block.experts.named_parameters()}
    method = ExpertMerging(get_adapter(model), 0.5, [], ExpertMergingOptions(), torch.device("cpu"))
    merged = method._merged_expert(block, [2, 3], torch.tensor([5.0, 3.0, 0.0, 0.0], dtype=torch.float64))
    for name, weight in merged.named_parameters():
        torch.testing.assert_close(weight, 0.5 * experts[f"2.{name}"] + 0.5 * experts[f"3.{name}"])


def test_merging_exact_copies_under_a_router_that_does_not_renormalise_changes_nothing():
    """MC-SMoE points every member's router row at its merged expert, so merging an expert with an exact copy of
    itself is lossless. With only the dominant rows kept, a router that does not renormalise its top-k (Qwen2-MoE)
    took the softmax over half the rows: every routed weight doubled, until the kept experts were scaled back."""
    model = tiny_moe("qwen2_moe", num_experts_per_tok=1)
    layer = model.model.layers[0]
    block = layer.mlp
    with torch.no_grad():
        for copy, source in ((1, 0), (3, 2)):  # experts 1 and 3: exact copies of 0 and 2, router rows included
            block.experts[copy].load_state_dict(block.experts[source].state_dict())
            block.gate.weight[copy] = block.gate.weight[source]
    hidden = block_inputs(model, token_windows(2, 16))

    def routed() -> torch.Tensor:
        shared = torch.sigmoid(block.shared_expert_gate(hidden)) * block.shared_expert(hidden)
        return block(hidden.unsqueeze(0))[0][0] - shared

    with torch.no_grad():
        before = routed()
        logits = block.gate(hidden).float()
        logits[:, [1, 3]] -= 1e-4  # the copies' columns: the originals are the routed (dominant) ones
        method = ExpertMerging(get_adapter(model), 0.5, [], ExpertMergingOptions(), torch.device("cpu"))
        method.check()
        assert sorted(sorted(group) for group in method.merge(layer, logits)) == [[0, 1], [2, 3]]
        torch.testing.assert_close(routed(), before, rtol=1e-3, atol=1e-5)


def test_a_merge_stopped_part_way_is_said_to_have_changed_the_model(tmp_path, monkeypatch):
    """Merged weights were assigned to .data, which moves no version counter: a run stopped after the first group
    merged said "the model is as it was", and save_pruned wrote the half-merged model."""
    from optimum_prune import save_pruned

    model = tiny_moe()
    original, calls = ExpertMerging._merged_expert, []

    def interrupted(self, *args):
        calls.append(1)
        if len(calls) == 2:  # Ctrl-C while layer 0's second group merges
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(ExpertMerging, "_merged_expert", interrupted)
    with pytest.raises(KeyboardInterrupt) as stopped:
        prune(model, PruningConfig(method="merge_experts", sparsity=0.5), calibration=token_windows(4, 16))
    assert "stopped while changing the model" in " ".join(stopped.value.__notes__)
    with pytest.raises(ValueError, match="cannot save it"):
        save_pruned(model, tmp_path / "out")
