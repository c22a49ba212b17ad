"""Phi-3's fused projections: unstructured and N:M pruning and whole-layer removal apply, the rest is refused.

The unstructured method matrix runs Phi-3 with the other families (tests/adapters/test_adapters.py)."""

import copy

import pytest
import torch

from optimum_prune import PruningConfig, prune, save_pruned

from ..conftest import assert_reloads_exactly, assert_stock_reload_matches, tiny_model, token_windows


@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_allocations_spread_the_target_over_fused_layers(allocation):
    model = tiny_model("phi3", num_hidden_layers=4)
    report = prune(model, PruningConfig(method="wanda", sparsity=0.5, allocation=allocation), calibration=token_windows())
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)
    assert len({round(target, 6) for target, _ in report.layer_sparsities().values()}) > 1


@pytest.mark.parametrize("options", [{}, {"criterion": "angular"}, {"merge": True}])
def test_removed_layers_reload_with_stock_transformers(options, tmp_path):
    model = tiny_model("phi3", num_hidden_layers=5)
    prune(model, PruningConfig(method="layers", sparsity=0.4, method_options=options), calibration=token_windows())
    assert model.config.num_hidden_layers == 3
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    output = save_pruned(model, tmp_path / "shallow")
    assert_stock_reload_matches(model, output, token_windows(samples=2, seq_len=12, seed=3), tmp_path)


def test_low_rank_factors_reload(tmp_path):
    """The checkpoint records the factors' ranks; reloading it asked the adapter to reshape its layers, which it refused."""
    model = tiny_model("phi3")
    prune(model, PruningConfig(method="low_rank", sparsity=0.25), calibration=token_windows())
    assert type(model.model.layers[0].self_attn.qkv_proj).__name__ == "LowRankLinear"
    assert_reloads_exactly(model, save_pruned(model, tmp_path / "factored"))


@pytest.mark.parametrize(
    "config",
    [
        PruningConfig(method="width", sparsity=0.25),
        PruningConfig(method="slicegpt", sparsity=0.25),
        PruningConfig(method="sublayers", sparsity=0.2),
        PruningConfig(method="layers", sparsity=0.4, method_options={"reroute": True}),
    ],
    ids=lambda config: config.method + (" reroute" if config.method_options.get("reroute") else ""),
)
def test_other_structured_pruning_is_refused_naming_the_fused_projections(config):
    model = tiny_model("phi3")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"fuses its projections \(self_attn.qkv_proj, mlp.gate_up_proj\).*method 'layers', without reroute"):
        prune(model, config, calibration=token_windows())
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize(
    "family, config",
    [
        ("phi3", PruningConfig(method="layers", sparsity=0.25, method_options={"criterion": "perplexity"})),
        ("phi3", PruningConfig(method="layers", sparsity=0.25, method_options={"criterion": "taylor"})),
        ("llama", PruningConfig(method="kprune", sparsity=0.2)),
    ],
    ids=["perplexity", "taylor", "kprune"],
)
def test_loss_criteria_on_a_bare_decoder_say_what_they_need(family, config):
    """Phi3Model (as LlamaModel) has no LM head: the criteria failed with an AttributeError on the output's loss or logits."""
    decoder = tiny_model(family, num_hidden_layers=4).model
    with pytest.raises(ValueError, match=f"{type(decoder).__name__} computes no language-model (loss|logits) .* AutoModelForCausalLM"):
        prune(decoder, config, calibration=token_windows())
