"""DeepSeek-V3 / GLM-4.5 adapter: sigmoid group-limited routing captured as the block applies it, group-preserving
expert removal that keeps the kept experts' routing, stock reloads, and clear refusals, on tiny random configs."""

from __future__ import annotations

import ast
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM, Glm4MoeConfig, Glm4MoeForCausalLM

from optimum_prune import PruningConfig, fold_experts, get_adapter, prune, skip_experts, verify_sparsity
from optimum_prune.adapters import UnsupportedArchitecture
from optimum_prune.adapters.moe import expert_tokens
from optimum_prune.expert_dropping import ExpertDroppingCallback
from optimum_prune.methods.experts import ExpertPruning, ExpertPruningOptions, experts_to_keep
from optimum_prune.saving import save_pruned

from ..conftest import token_windows

SHARED = dict(
    vocab_size=320, hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, intermediate_size=96,
    moe_intermediate_size=32, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=2, n_shared_experts=1,
    routed_scaling_factor=2.5, max_position_embeddings=128,
)  # fmt: skip
FAMILIES = {
    "deepseek_v3": (
        DeepseekV3Config, DeepseekV3ForCausalLM,
        dict(num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
    ),
    "deepseek_v3_q_lora": (  # queries through their own low-rank projection and norm
        DeepseekV3Config, DeepseekV3ForCausalLM,
        dict(num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
             n_routed_experts=16, n_group=4, topk_group=2),
    ),
    "glm4_moe": (Glm4MoeConfig, Glm4MoeForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
}  # fmt: skip


def tiny(family: str = "deepseek_v3", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny model whose routers carry a nonzero correction bias (a trained model's: it steers only the choice). It is
    positive, so every biased score is: transformers' router fills the groups it did not choose with 0, which beats a
    negative score of a chosen group, and which of those zeros wins is an index tie-break that removing experts changes."""
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**SHARED, **extra, **overrides})).eval()
    with torch.no_grad():
        for layer in model.model.layers[model.config.first_k_dense_replace :]:
            layer.mlp.gate.weight.normal_(0, 0.3)  # spread routing scores, so the choice depends on the tokens
            layer.mlp.gate.e_score_correction_bias.uniform_(0.0, 0.1)
    return model


def moe_layers(model) -> list[torch.nn.Module]:
    adapter = get_adapter(model)
    return [layer for layer in adapter.decoder_layers() if adapter.moe_block(layer) is not None]


def block_io(model, ids: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens entering ``block`` and what it returns, each [tokens, hidden]."""
    seen = {}

    def keep(_module, args, output):
        seen["input"], seen["output"] = args[0].reshape(-1, args[0].shape[-1]), output.reshape(-1, output.shape[-1])

    handle = block.register_forward_hook(keep)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return seen["input"], seen["output"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_captured_routing_weights_rebuild_the_block_output(family):
    """Σ expert outputs × the captured per-token weights + the shared experts is what the block computes: the weights
    are the ones it applies (sigmoid, grouped, renormalised, × routed_scaling_factor), in the order it hands tokens over."""
    model, ids = tiny(family), token_windows(4, 16)
    adapter = get_adapter(model)
    layer = moe_layers(model)[0]
    block = adapter.moe_block(layer)
    hidden = block_io(model, ids, block)[0]
    rebuilt = torch.zeros_like(hidden)
    handles = []
    with adapter.routed_tokens(layer) as routing:

        def add(expert, _args, output):
            first = expert.gate_proj
            weights = routing.scale(first, torch.ones(output.shape[0], 1)).squeeze(1)
            rebuilt.index_add_(0, routing.positions(first), output * weights.unsqueeze(1))

        handles = [expert.register_forward_hook(add) for expert in block.experts]
        _, output = block_io(model, ids, block)
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        rebuilt += block.shared_experts(hidden)
    torch.testing.assert_close(rebuilt, output, rtol=1e-5, atol=1e-6)


def test_the_block_hands_tokens_over_in_token_order_not_rank_by_rank():
    """Mixtral's order (rank by rank) would give an expert's tokens one another's weights here."""
    model, ids = tiny(), token_windows(4, 16)
    block = get_adapter(model).moe_block(moe_layers(model)[0])
    with torch.no_grad():
        selected, _ = block.gate(block_io(model, ids, block)[0])
    assert any(not torch.equal(expert_tokens(selected, e)[1], torch.where(selected == e)[0]) for e in range(8))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_route_reproduces_the_router(family):
    model, ids = tiny(family), token_windows(4, 16)
    adapter = get_adapter(model)
    block = adapter.moe_block(moe_layers(model)[0])
    hidden = block_io(model, ids, block)[0]
    with torch.no_grad():
        selected, weights = block.gate(hidden)
        our_weights, our_selected = adapter.route(block, adapter.router_logits(block, hidden))
    order, our_order = selected.argsort(-1), our_selected.argsort(-1)
    assert torch.equal(selected.gather(1, order), our_selected.gather(1, our_order))
    torch.testing.assert_close(weights.gather(1, order), our_weights.gather(1, our_order), rtol=0, atol=0)


def excluding(model, removed: dict[int, list[int]]):
    """A copy of the unpruned model whose routers leave ``removed`` experts (per layer index) out: their correction
    bias is -inf, so no group counts them and no token chooses them; the weights still come from the unbiased scores."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for index, experts in removed.items():
            model.model.layers[index].mlp.gate.e_score_correction_bias[experts] = float("-inf")
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize(
    "options",
    [{"criterion": "frequency"}, {"criterion": "reap"}, {"criterion": "reconstruction"}, {"criterion": "reconstruction", "max_subsets": 3}],
    ids=["frequency", "reap", "reconstruction", "greedy-reconstruction"],  # greedy: fewer subsets allowed than exist
)
def test_removing_experts_keeps_each_groups_size_and_the_kept_experts_routing(tmp_path, family, options):
    """The pruned model routes every token to the kept experts, with the weights, that the unpruned router chooses
    when the removed experts are left out; so its logits equal that model's, and it reloads from a stock config."""
    model, ids = tiny(family), token_windows(4, 16)
    dense = copy.deepcopy(model)
    before = [copy.deepcopy(layer.mlp.gate) for layer in moe_layers(model)]
    groups, total = model.config.n_group, model.config.n_routed_experts
    report = prune(model, PruningConfig(method="experts", sparsity=0.5, method_options=options), calibration=ids)
    removed = {}
    for entry, layer, gate in zip(report.removed, moe_layers(model), before):
        index = int(entry.split(":")[0].rsplit(".", 1)[1])
        removed[index] = [int(e) for e in entry.split("[")[1].rstrip("]").split(",")]
        kept = [e for e in range(total) if e not in removed[index]]
        assert [e // (total // groups) for e in kept] == sorted(list(range(groups)) * (total // 2 // groups))  # as many per group
        torch.testing.assert_close(layer.mlp.gate.weight, gate.weight[kept], rtol=0, atol=0)
        torch.testing.assert_close(layer.mlp.gate.e_score_correction_bias, gate.e_score_correction_bias[kept], rtol=0, atol=0)
        hidden = torch.randn(64, 64)
        with torch.no_grad():
            selected, weights = layer.mlp.gate(hidden)
            gate.e_score_correction_bias[removed[index]] = float("-inf")
            reference_selected, reference_weights = gate(hidden)
        original = torch.tensor(kept)[selected]
        order, reference_order = original.argsort(-1), reference_selected.argsort(-1)
        assert torch.equal(original.gather(1, order), reference_selected.gather(1, reference_order))
        torch.testing.assert_close(weights.gather(1, order), reference_weights.gather(1, reference_order))
    assert model.config.n_routed_experts == total // 2 and len(removed) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, excluding(dense, removed)(ids).logits, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "pruned")
    assert "quantization_config" not in (tmp_path / "pruned" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_reconstruction_scores_the_block_a_balanced_subset_leaves():
    """F_S, from the full block's expert outputs and ``route`` over the subset's router rows, is the pruned block."""
    model, ids = tiny(), token_windows(2, 8)
    adapter = get_adapter(model)
    layer = moe_layers(model)[0]
    block = adapter.moe_block(layer)
    hidden = block_io(model, ids, block)[0]
    method = ExpertPruning(adapter, 0.5, [], ExpertPruningOptions(), torch.device("cpu"))

    def routed_output():
        return block(hidden[None])[0] - block.shared_experts(hidden)

    with torch.no_grad():
        logits = adapter.router_logits(block, hidden)
        outputs = torch.stack([expert(hidden).float() for expert in block.experts])
        torch.testing.assert_close(method._mixture(block, logits, outputs, list(range(8))), routed_output(), rtol=1e-5, atol=1e-6)
        predicted = method._mixture(block, logits, outputs, [1, 2, 5, 7])
        adapter.keep_experts(layer, [1, 2, 5, 7])
        torch.testing.assert_close(predicted, routed_output(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_merging_keeps_as_many_dominant_experts_per_group_with_their_router_rows_and_reloads(tmp_path, family):
    """MC-SMoE within router groups: members join a dominant expert of their own group, whose router row and
    correction bias the merged expert takes; sigmoid weights need no rescaling for the rows removed."""
    model, ids = tiny(family), token_windows(4, 16)
    total, size = model.config.n_routed_experts, model.config.n_routed_experts // model.config.n_group
    gates = [copy.deepcopy(layer.mlp.gate) for layer in moe_layers(model)]
    downs = [[expert.down_proj.weight.clone() for expert in layer.mlp.experts] for layer in moe_layers(model)]
    report = prune(model, PruningConfig(method="merge_experts", sparsity=0.5), calibration=ids)
    for entry, layer, gate, down in zip(report.removed, moe_layers(model), gates, downs):
        groups = ast.literal_eval(entry.split("merged experts ")[1])
        dominant = [members[0] for members in groups]
        assert sorted(e for members in groups for e in members) == list(range(total))
        assert all(len({e // size for e in members}) == 1 for members in groups)  # within the dominant's router group
        assert [d // size for d in dominant] == sorted(list(range(model.config.n_group)) * (size // 2))
        torch.testing.assert_close(layer.mlp.gate.weight, gate.weight[dominant], rtol=0, atol=0)
        torch.testing.assert_close(layer.mlp.gate.e_score_correction_bias, gate.e_score_correction_bias[dominant], rtol=0, atol=0)
        for members, expert in zip(groups, layer.mlp.experts):  # no output rescaling: a frequency-weighted mean
            assert len(members) > 1 or torch.equal(expert.down_proj.weight, down[members[0]])
    model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize(
    "count, message",
    [(3, "keep a multiple of 2 with at least 2 per group"), (2, "keep a multiple of 2 with at least 2 per group")],
)
def test_counts_the_groups_cannot_take_are_refused(count, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        prune(model, PruningConfig(method="experts", method_options={"num_experts": count}), calibration=token_windows(2, 8))
    assert len(moe_layers(model)[0].mlp.experts) == 8
    adapter = get_adapter(model)
    with pytest.raises(ValueError, match=r"do not keep 2 of each router group"):
        adapter.keep_experts(moe_layers(model)[0], [0, 1, 2, 4])
    assert experts_to_keep(adapter, 0.5, 0) == 4


def test_counts_that_leave_the_chosen_groups_fewer_than_top_k_experts_are_refused():
    model = tiny(num_experts_per_tok=3)  # one of two groups chosen: 2 kept in it cannot give a top-3
    with pytest.raises(ValueError, match="chosen groups would hold 2 experts, fewer than the router's top-3"):
        prune(model, PruningConfig(method="experts", method_options={"num_experts": 4}), calibration=token_windows(2, 8))


def test_global_ranking_is_refused_for_grouped_routers():
    with pytest.raises(ValueError, match="ranking='global'.*groups"):
        prune(tiny(), PruningConfig(method="experts", method_options={"criterion": "frequency", "ranking": "global"}), calibration=token_windows(2, 8))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sparsity, extra", [("2:4", {}), (0.5, {"allocation": "owl"})])
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_methods_prune_every_linear_and_reload_exactly(tmp_path, family, sparsity, extra, method):
    model, ids = tiny(family), token_windows(4, 16)
    gates = [layer.mlp.gate.weight.clone() for layer in moe_layers(model)]
    prune(model, PruningConfig(method=method, sparsity=sparsity, num_calibration_samples=4, calibration_seq_len=16, **extra), calibration=ids)
    layers = verify_sparsity(model, ignore=("lm_head",))["layers"]
    attention = {"kv_a_proj_with_mqa", "kv_b_proj", "o_proj"} if family.startswith("deepseek") else {"k_proj", "v_proj", "o_proj"}
    assert attention <= {name.rsplit(".", 1)[1] for name in layers}
    if "allocation" in extra:  # OWL moves each layer's target around the mean
        assert verify_sparsity(model, ignore=("lm_head",))["overall_sparsity"] == pytest.approx(0.5, abs=0.01)
    else:
        assert all(entry["sparsity"] >= 0.45 for entry in layers.values()), layers
    assert all(torch.equal(layer.mlp.gate.weight, gate) for layer, gate in zip(moe_layers(model), gates))  # routers stay dense
    save_pruned(model, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_mpoe_factorises_the_experts_and_reloads_exactly(tmp_path, family):
    model, ids = tiny(family), token_windows(2, 8)
    prune(model, PruningConfig(method="mpoe", sparsity=0.3))
    model.save_pretrained(tmp_path / "mpoe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mpoe").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_layer_shapes_are_the_stock_ones_without_reading_key_value_projections(family):
    model = tiny(family)
    adapter = get_adapter(model)
    for index, layer in enumerate(adapter.decoder_layers()):
        shape = adapter.layer_shape(layer)
        assert shape == adapter.stock_shape(model.config, index)
        assert shape.num_experts == (None if index == 0 else model.config.n_routed_experts) and shape.num_attention_heads == 4


@pytest.mark.parametrize("method", ["width", "slicegpt", "layers", "sublayers", "kcm", "ziplm", "kprune", "mask_search", "llm_surgeon_structured"])
def test_dense_structured_methods_are_refused(method):
    model = tiny()
    with pytest.raises(UnsupportedArchitecture, match=r"DeepseekV3Adapter \(DeepseekV3ForCausalLM\) cannot apply this structured method"):
        prune(model, PruningConfig(method=method, sparsity=0.5), calibration=token_windows(2, 8))


def test_methods_written_for_softmax_routers_are_refused():
    model = tiny()
    message = r"is written for softmax top-k routers.*DeepseekV3ForCausalLM's router chooses by grouped sigmoid scores"
    with pytest.raises(UnsupportedArchitecture, match=message):
        skip_experts(model, beta=0.5)
    with pytest.raises(UnsupportedArchitecture, match=message):
        fold_experts(model)
    with pytest.raises(UnsupportedArchitecture, match=message):
        ExpertDroppingCallback().on_train_begin(None, None, None, model=model)
    assert all(len(layer.mlp.experts) == 8 for layer in moe_layers(model))


def test_router_pruning_is_refused_for_a_router_that_is_no_linear():
    with pytest.raises(UnsupportedArchitecture, match=r"moe_options.prune_router.*DeepseekV3ForCausalLM"):
        prune(tiny(), PruningConfig(method="magnitude", sparsity=0.5, moe_options={"prune_router": True}))


def test_a_block_ignore_keeps_gives_per_layer_counts_that_reload(tmp_path):
    """The checkpoint's config keeps 8 experts (the kept block's); the pruned block is rebuilt with 2 of each group."""
    model, ids = tiny(), token_windows(4, 16)
    prune(model, PruningConfig(method="experts", sparsity=0.5, ignore=["model.layers.2.mlp"]), calibration=ids)
    assert [len(layer.mlp.experts) for layer in moe_layers(model)] == [4, 8]
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert [len(layer.mlp.experts) for layer in moe_layers(reloaded)] == [4, 8]
    assert [layer.mlp.gate.n_routed_experts for layer in moe_layers(reloaded)] == [4, 8]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_global_ranking_keeps_every_layer_a_count_a_single_group_router_can_take(tmp_path):
    """GLM-4.5-Air style (n_group=1): global ranking is allowed, but its floor was top-k (1 here) while the router
    scores its group by its best two; a layer ranked down to one expert was refused after earlier layers were cut."""
    model, ids = tiny("glm4_moe", seed=1, n_group=1, topk_group=1, num_experts_per_tok=1, num_hidden_layers=6), token_windows(4, 16)
    config = PruningConfig(method="experts", sparsity=0.7, method_options={"criterion": "frequency", "ranking": "global"})
    prune(model, config, calibration=ids)
    counts = [len(layer.mlp.experts) for layer in moe_layers(model)]
    per_layer = model.config.n_routed_experts
    assert min(counts) >= 2 and sum(counts) == round(0.3 * per_layer * len(counts)), counts  # the nearest count overall
    save_pruned(model, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert [len(layer.mlp.experts) for layer in moe_layers(reloaded)] == counts
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
