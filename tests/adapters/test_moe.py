"""MoE adapter: router-aware calibration statistics and unstructured pruning of experts, on tiny
random configs of the real transformers classes (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch.nn import functional as F
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from optimum_prune import PruningConfig, get_adapter, prune, verify_sparsity
from optimum_prune.calibration import feeding_inputs
from optimum_prune.sparsity import select_mask
from optimum_prune.statistics import ColumnNorms

from ..conftest import token_windows

SHAPE = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
FAMILIES = {
    "mixtral": (MixtralConfig, MixtralForCausalLM, dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (
        Qwen2MoeConfig,
        Qwen2MoeForCausalLM,
        dict(moe_intermediate_size=96, shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False),
    ),
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM, dict(moe_intermediate_size=96, num_experts=4, num_experts_per_tok=2, head_dim=16)),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM, dict(intermediate_size=96, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": (  # layer 0 dense; multi-head latent attention; one router group (grouped routing: test_deepseek.py)
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        dict(
            num_hidden_layers=3, first_k_dense_replace=1, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=48,
            n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=2, routed_scaling_factor=2.5, q_lora_rank=None,
            kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        ),
    ),
}
# Families whose router module returns logits that a softmax top-k routes: what merging, skipping and folding need.
SOFTMAX_ROUTED = [family for family in FAMILIES if family != "deepseek_v3"]


def tiny_moe(family: str = "mixtral", seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**SHAPE, **extra, **overrides})).eval()


def first_moe_layer(adapter) -> torch.nn.Module:
    return next(layer for layer in adapter.decoder_layers() if adapter.moe_block(layer) is not None)


def block_inputs(model, windows: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the first MoE block, flattened to [tokens, hidden]."""
    adapter = get_adapter(model)
    block = adapter.moe_block(first_moe_layer(adapter))
    seen = []
    handle = block.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat(seen)


def direct_expert_norms(model, windows: torch.Tensor, expert: int, weighted: bool = True) -> torch.Tensor:
    """‖r·X‖₂ (``weighted``) or ‖X‖₂ per input feature of the first MoE layer's expert ``expert`` over its routed
    tokens, from scratch (DeepSeek-V3's router module returns the selected experts and their weights itself)."""
    adapter = get_adapter(model)
    block = adapter.moe_block(first_moe_layer(adapter))
    hidden = block_inputs(model, windows)
    with torch.no_grad():
        routed = block.gate(hidden)
    if isinstance(routed, tuple):
        selected, weights = routed
    else:
        weights, selected = torch.topk(F.softmax(routed.float(), dim=-1), block.top_k, dim=-1)
        if getattr(block, "norm_topk_prob", True):
            weights = weights / weights.sum(-1, keepdim=True)
    chosen = (selected == expert)
    routed = chosen.any(-1)
    token_weight = (weights * chosen).sum(-1)[routed] if weighted else torch.ones(int(routed.sum()))
    return (hidden[routed] * token_weight.unsqueeze(1)).square().sum(0).sqrt()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routed_statistics_equal_a_direct_per_expert_computation(family):
    model, windows = tiny_moe(family), token_windows(samples=4, seq_len=16)
    adapter = get_adapter(model)
    layer = first_moe_layer(adapter)
    experts = adapter.experts(layer)
    first_linears = {f"expert{i}": next(m for m in expert.modules() if isinstance(m, torch.nn.Linear)) for i, expert in enumerate(experts)}
    norms = {name: ColumnNorms(64, torch.device("cpu")) for name in first_linears}
    with adapter.routed_tokens(layer) as routing, torch.no_grad():
        with feeding_inputs(first_linears, lambda name, x: norms[name].add(routing.scale(first_linears[name], x))):
            model(windows)
    for index in range(len(experts)):
        assert torch.allclose(norms[f"expert{index}"].norms(), direct_expert_norms(model, windows, index), atol=1e-5), index


def test_the_shared_experts_statistics_are_weighted_by_its_gate():
    """Qwen2-MoE scales the shared expert's output by sigmoid(shared_expert_gate(x)) per token."""
    model, windows = tiny_moe("qwen2_moe"), token_windows(samples=4, seq_len=16)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers()[0]
    block = adapter.moe_block(layer)
    linears = {"gate_proj": block.shared_expert.gate_proj}
    norms = ColumnNorms(64, torch.device("cpu"))
    with adapter.routed_tokens(layer) as routing, torch.no_grad():
        with feeding_inputs(linears, lambda name, x: norms.add(routing.scale(linears[name], x))):
            model(windows)
    with torch.no_grad():
        hidden = block_inputs(model, windows)
        direct = (hidden * torch.sigmoid(block.shared_expert_gate(hidden))).square().sum(0).sqrt()
    torch.testing.assert_close(norms.norms(), direct, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_routers_stay_dense_and_experts_are_pruned(family):
    model = tiny_moe(family)
    prune(model, PruningConfig(method="wanda", sparsity="2:4", num_calibration_samples=4, calibration_seq_len=16), calibration=token_windows(4, 16))
    layers = verify_sparsity(model, pattern="2:4")["layers"]
    routers = {name for name in layers if name.endswith(".gate") or name.endswith("shared_expert_gate")}
    assert all(layers[name]["sparsity"] == 0 for name in routers)
    # DeepSeek-V3's router holds a weight parameter, no linear: it is left out, dense
    assert routers or all(float((layer.mlp.gate.weight == 0).float().mean()) < 0.1 for layer in model.model.layers[1:])
    experts = [name for name in layers if ".experts." in name]
    assert experts and all(layers[name]["conforming"] and layers[name]["sparsity"] >= 0.5 for name in experts)


@pytest.mark.parametrize("method", ["width", "slicegpt", "layers"])
def test_dense_structured_methods_are_refused_naming_the_expert_methods(method):
    model = tiny_moe()
    with pytest.raises(ValueError, match=r"MoEAdapter \(MixtralForCausalLM\) cannot apply this structured method.*'merge_experts'"):
        prune(model, PruningConfig(method=method, sparsity=0.5), calibration=token_windows(4, 16))


def test_expert_methods_on_a_dense_model_say_it_has_no_experts():
    from ..conftest import tiny_model

    with pytest.raises(ValueError, match="LlamaForCausalLM has no mixture-of-experts layers"):
        prune(tiny_model(), PruningConfig(method="experts", sparsity=0.5), calibration=token_windows(4, 16))


def test_moe_options_on_a_dense_model_are_refused_not_recorded():
    from ..conftest import tiny_model

    model = tiny_model()
    with pytest.raises(ValueError, match=r"PruningConfig.moe_options \{.*'prune_router': True.*\} tell how to prune mixture-of-experts layers, and LlamaForCausalLM has none"):
        prune(model, PruningConfig(method="wanda", moe_options={"prune_router": True}), calibration=token_windows(4, 16))
    assert not hasattr(model.config, "pruning_config")


def test_wanda_on_an_expert_uses_only_its_routed_weighted_tokens():
    model, windows = tiny_moe(), token_windows(samples=4, seq_len=16)
    w1 = model.model.layers[0].block_sparse_moe.experts[1].w1
    expected = select_mask(w1.weight.detach().abs() * direct_expert_norms(model, windows, 1), 0.5, per_row=True)
    prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=windows)
    assert torch.equal(w1.weight.detach() == 0, expected)


def test_unweighted_statistics_option():
    model, windows = tiny_moe(), token_windows(samples=4, seq_len=16)
    w1 = model.model.layers[0].block_sparse_moe.experts[1].w1
    expected = select_mask(w1.weight.detach().abs() * direct_expert_norms(model, windows, 1, weighted=False), 0.5, per_row=True)
    weighted = select_mask(w1.weight.detach().abs() * direct_expert_norms(model, windows, 1), 0.5, per_row=True)
    prune(model, PruningConfig(method="wanda", sparsity=0.5, moe_options={"routing_weighted": False}), calibration=windows)
    assert torch.equal(w1.weight.detach() == 0, expected) and not torch.equal(expected, weighted)


@pytest.mark.parametrize("policy", ["magnitude", "dense"])
def test_experts_without_calibration_tokens_are_reported_and_handled(policy, caplog):
    model = tiny_moe(num_local_experts=8)
    windows = token_windows(samples=1, seq_len=2)  # 2 tokens × top-2: at most 4 of 8 experts routed per layer
    config = PruningConfig(method="sparsegpt", sparsity=0.5, moe_options={"unrouted_experts": policy})
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        report = prune(model, config, calibration=windows)
    warnings = [record.getMessage() for record in caplog.records if "received no calibration token" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"{len(report.unrouted)} expert linears")  # one for the run, not one per layer
    assert len(report.unrouted) >= 2 * 4 * 3  # ≥ 4 experts × 3 linears × 2 layers
    experts = {name.rsplit(".", 1)[0] for name in report.unrouted}
    assert len(report.unrouted) == 3 * len(experts)  # an expert without tokens is reported with all its linears
    assert "got no calibration token" in str(report)
    for name in report.unrouted:
        sparsity = verify_sparsity(model)["layers"][name]["sparsity"]
        assert sparsity == (pytest.approx(0.5, abs=0.01) if policy == "magnitude" else 0.0), name
    # The report counts every targeted linear as it is (left dense ones were missing: it said 50 % for fewer weights)
    measured = verify_sparsity(model, ignore=("lm_head", "*.gate"))
    assert {linear.name for linear in report.linears} == set(measured["layers"])
    assert report.overall_sparsity == pytest.approx(measured["overall_sparsity"])


def test_router_pruning_is_opt_in():
    model = tiny_moe()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5, moe_options={"prune_router": True}))
    assert verify_sparsity(model)["layers"]["model.layers.0.block_sparse_moe.gate"]["sparsity"] == pytest.approx(0.5)


def test_owl_allocation_and_stock_reload(tmp_path):
    model = tiny_moe()
    prune(model, PruningConfig(method="wanda", sparsity=0.6, allocation="owl"), calibration=token_windows(4, 16))
    model.save_pretrained(tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    ids = token_windows(1, 8)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    assert reloaded.config.pruning_config["allocation"] == "owl"


def test_bad_moe_option_names_the_field():
    with pytest.raises(ValueError, match="PruningConfig.moe_options.*unrouted_experts"):
        PruningConfig(moe_options={"unrouted_experts": "drop"})


def routed_counts(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Tokens each expert of each layer is chosen for, counted from the routers' own decisions."""
    adapter = get_adapter(model)
    counts, handles = [], []
    for layer in adapter.decoder_layers():
        block = adapter.moe_block(layer)
        count = torch.zeros(len(block.experts), dtype=torch.long)
        counts.append(count)

        def record(_module, _args, logits, block=block, count=count):
            count += torch.bincount(adapter.route(block, logits)[1].reshape(-1), minlength=len(count))

        handles.append(block.gate.register_forward_hook(record))
    with torch.no_grad():
        for window in windows:
            model(window[None])
    for handle in handles:
        handle.remove()
    return counts


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_router_hints_give_busier_experts_lower_sparsity_at_the_same_total(family):
    model = tiny_moe(family)
    windows = token_windows(8, 16)
    counts = routed_counts(model, windows)
    config = PruningConfig(method="wanda", sparsity=0.5, moe_options={"expert_sparsity": "load", "expert_deviation": 0.2})
    report = prune(model, config, calibration=windows)
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    targets = {r.name: r.target_sparsity for r in report.linears}
    measured = verify_sparsity(model)["layers"]
    for layer, count in zip(adapter.decoder_layers(), counts):
        first_linears = [next(m for m in e.modules() if isinstance(m, torch.nn.Linear)) for e in adapter.experts(layer)]
        expert_targets = [targets[names[id(linear)]] for linear in first_linears]
        assert sum(expert_targets) / len(expert_targets) == pytest.approx(0.5)  # the experts' mean is the layer's target
        assert min(expert_targets) == pytest.approx(0.3) and max(expert_targets) == pytest.approx(0.7)
        busiest, idlest = int(count.argmax()), int(count.argmin())
        assert expert_targets[busiest] < expert_targets[idlest]
        for linear, target in zip(first_linears, expert_targets):
            assert measured[names[id(linear)]]["sparsity"] == pytest.approx(target, abs=0.02)


def test_router_hints_give_experts_of_equal_load_the_same_sparsity():
    """Experts no calibration token reached got different targets, decided by their index alone."""
    model = tiny_moe(num_local_experts=6)
    windows = torch.full((4, 16), 7)  # one token: each layer routes it to its top-2 experts only
    config = PruningConfig(method="wanda", sparsity=0.5, moe_options={"expert_sparsity": "load", "expert_deviation": 0.2, "unrouted_experts": "magnitude"})
    targets = {r.name: r.target_sparsity for r in prune(model, config, calibration=windows).linears}
    counts = routed_counts(tiny_moe(num_local_experts=6), windows)
    for index, count in enumerate(counts):
        experts = [targets[f"model.layers.{index}.block_sparse_moe.experts.{e}.w1"] for e in range(6)]
        unrouted = [target for target, tokens in zip(experts, count) if tokens == 0]
        assert len(unrouted) == 4 and len(set(unrouted)) == 1, experts
        assert sum(experts) / 6 == pytest.approx(0.5)


def test_router_hints_refuse_what_they_cannot_do():
    for moe_options in ({"expert_sparsity": "load"}, {"routing_weighted": False}, {"unrouted_experts": "dense"}):  # the last two were ignored
        with pytest.raises(ValueError, match="reads the routing of calibration tokens; method 'magnitude' takes none"):  # when the config is made
            PruningConfig(method="magnitude", sparsity=0.5, moe_options=moe_options)
    with pytest.raises(ValueError, match="cannot be combined with the N:M pattern '2:4'; use a float sparsity"):
        PruningConfig(method="wanda", sparsity="2:4", moe_options={"expert_sparsity": "load"})
    with pytest.raises(ValueError, match="expert_deviation"):
        prune(tiny_moe(), PruningConfig(method="wanda", sparsity=0.9, moe_options={"expert_sparsity": "load"}), calibration=token_windows(2, 8))


def test_router_hints_refuse_layer_targets_an_allocation_moves_out_of_their_room():
    """OWL moves layer targets by up to its max_deviation: ±λ around them was clamped, so the experts' mean missed the target."""
    model = tiny_moe()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    config = PruningConfig(
        method="wanda", sparsity=0.5, allocation="owl", allocation_options={"outlier_threshold": 2.0, "max_deviation": 0.3},
        moe_options={"expert_sparsity": "load", "expert_deviation": 0.4},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"layer \d's sparsity from allocation 'owl' 0\.\d+ ± expert_deviation 0.4 leaves \[0, 0.99\]"):
        prune(model, config, calibration=token_windows(4, 16))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


def test_router_hints_on_a_pruned_model_pruned_again_keep_its_zeros():
    """The targets lowered to keep the layers' existing zeros were checked for room for ±λ: pruning again with the
    same config, or a model pruned to 0.6, stopped on an error no expert_deviation could pass."""
    config = PruningConfig(
        method="wanda", sparsity=0.5, allocation="owl", allocation_options={"outlier_threshold": 2.0, "max_deviation": 0.1},
        moe_options={"expert_sparsity": "load", "expert_deviation": 0.2},
    )  # fmt: skip
    windows = token_windows(8, 16)
    model = tiny_moe()
    first = prune(model, config, calibration=windows).overall_sparsity
    assert prune(model, config, calibration=windows).overall_sparsity == pytest.approx(first, abs=1e-3)
    model = tiny_moe()
    prune(model, PruningConfig(method="magnitude", sparsity=0.6))
    assert prune(model, config, calibration=windows).overall_sparsity == pytest.approx(0.6, abs=1e-3)


@pytest.mark.parametrize("first, second, deviation", [(0.5, 0.55, 0.2), (0.4, 0.5, 0.3)])
def test_router_hints_on_a_pruned_model_pruned_again_end_at_the_target(first, second, deviation):
    """The experts' ±λ spread is set while pruning, after the layer's target was lowered for its zeros; experts taken
    to target + λ·… kept more zeros than that lowering counted on: 0.584 for 0.55, 0.537 for 0.5. As pruned from
    dense (per-row rounding leaves Wanda at 0.545 and 0.494 there)."""
    windows = token_windows(8, 16)
    hints = PruningConfig(method="wanda", sparsity=second, moe_options={"expert_sparsity": "load", "expert_deviation": deviation})
    from_dense = prune(tiny_moe(), hints, calibration=windows).overall_sparsity
    model = tiny_moe()
    prune(model, PruningConfig(method="wanda", sparsity=first), calibration=windows)
    assert prune(model, hints, calibration=windows).overall_sparsity == pytest.approx(from_dense, abs=3e-3)


def test_stock_shapes_follow_decoder_sparse_step():
    """Qwen2-MoE with decoder_sparse_step=2: layer 0 is dense, layer 1 sparse; the stock shapes match the built layers."""
    model = tiny_moe("qwen2_moe", decoder_sparse_step=2, intermediate_size=80)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers()
    assert adapter.moe_block(layers[0]) is None and adapter.moe_block(layers[1]) is not None
    for index, layer in enumerate(layers):
        assert adapter.stock_shape(model.config, index) == adapter.layer_shape(layer)


def test_router_hints_refuse_a_target_below_expert_deviation():
    """target − λ < 0 would give the idlest experts a negative sparsity: the experts' mean misses the target."""
    config = PruningConfig(method="wanda", sparsity=0.1, moe_options={"expert_sparsity": "load", "expert_deviation": 0.2})
    with pytest.raises(ValueError, match=r"0\.1 ± expert_deviation 0\.2 leaves \[0, 0\.99\]"):
        prune(tiny_moe(), config, calibration=token_windows(2, 8))
