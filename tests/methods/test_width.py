import copy

import pytest
import torch

from optimum_prune import PruningConfig, prune, save_pruned, verify_sparsity
from optimum_prune.methods.width import CRITERIA

from ..conftest import (
    assert_reloads_exactly, assert_stock_reload_matches, decoder_linear_parameters, kept_rows, tiny_model, token_windows, zeroed_reference,
)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "granite", "stablelm"])
@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c != "flap"])
@pytest.mark.parametrize("head_mode", ["query", "kv_group"])
def test_output_equals_dense_with_removed_units_zeroed(family, criterion, head_mode):
    kv_heads = 4 if head_mode == "kv_group" else 2  # a group is then a quarter of the attention
    dense = tiny_model(family, num_attention_heads=8, num_key_value_heads=kv_heads)
    model = copy.deepcopy(dense)
    config = PruningConfig(method="width", sparsity=0.25, method_options={"criterion": criterion, "head_mode": head_mode})
    report = prune(model, config, calibration=token_windows())

    for shape, layer in zip(report.shapes, model.model.layers):
        assert shape.num_attention_heads % shape.num_key_value_heads == 0  # valid GQA
        assert layer.self_attn.num_key_value_groups == shape.num_attention_heads // shape.num_key_value_heads
        assert shape.num_attention_heads < 8 and shape.intermediate_size < 128
        assert shape.num_key_value_heads == (3 if head_mode == "kv_group" else 2)
    assert report.parameters_after < report.parameters_before
    assert report.macs_per_token_after < report.macs_per_token_before
    ids = token_windows(samples=2, seq_len=16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, zeroed_reference(dense, model)(ids).logits, rtol=1e-4, atol=1e-5)


def test_random_control_needs_no_calibration_and_is_reproducible():
    config = PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "random"})
    first, second, magnitude = tiny_model(), tiny_model(), tiny_model()
    for model in (first, second):
        prune(model, config)
    prune(magnitude, PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "magnitude_l2"}))
    kept = [m.model.layers[0].mlp.gate_proj.weight for m in (first, second, magnitude)]
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])
    redrawn = tiny_model()  # PruningConfig.seed redraws the control (it was fixed at 0)
    prune(redrawn, PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "random"}, seed=1))
    assert not torch.equal(redrawn.model.layers[0].mlp.gate_proj.weight, kept[0])


@pytest.mark.parametrize("criterion", ["magnitude_l1", "magnitude_l2"])
def test_magnitude_removes_the_smallest_channels(criterion):
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:  # channel 5 made 1000× smaller than the rest
            layer.mlp.gate_proj.weight[5] *= 1e-3
            layer.mlp.up_proj.weight[5] *= 1e-3
            layer.mlp.down_proj.weight[:, 5] *= 1e-3
    prune(model, PruningConfig(method="width", sparsity=0.02, method_options={"criterion": criterion, "components": "mlp"}))
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.out_features < 128
        assert float(layer.mlp.gate_proj.weight.norm(dim=1).min()) > 1e-2  # the small channel is gone


def _inputs_of(linear: torch.nn.Module, model: torch.nn.Module, windows: torch.Tensor) -> torch.Tensor:
    """What ``linear`` receives while ``model`` runs ``windows``: one float64 row per token."""
    seen = []
    handle = linear.register_forward_pre_hook(lambda _module, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(windows)
    handle.remove()
    return torch.cat(seen).double()


@pytest.mark.parametrize("criterion", ["magnitude_l1", "magnitude_l2", "wanda_sp", "flap"])
def test_mlp_channels_go_by_their_criterions_score(criterion):
    """The criteria's formulas, computed here by hand over gate/up rows and down_proj columns (and down_proj's
    inputs): an l1 scored as l2, or Wanda-sp / FLAP without their activation statistics, passed every test."""
    windows = token_windows()
    dense = tiny_model(num_hidden_layers=1)
    with torch.no_grad():  # a few channels with outsized consumer weights: l1 and l2 rank them differently
        dense.model.layers[0].mlp.down_proj.weight[:, ::7] *= 3
    mlp = dense.model.layers[0].mlp
    inputs = _inputs_of(mlp.down_proj, dense, windows)
    gate, up, down = (linear.weight.detach().double() for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    scores = {
        "magnitude_l1": gate.abs().sum(1) + up.abs().sum(1) + down.abs().sum(0),
        "magnitude_l2": gate.square().sum(1) + up.square().sum(1) + down.square().sum(0),
        "wanda_sp": (down.abs() * inputs.norm(dim=0)).sum(0),  # Σ_i |W_ij|·‖X_j‖
        "flap": inputs.var(dim=0) * down.square().sum(0),  # fluctuation of X_j times ‖W_:j‖²
    }[criterion]
    model = copy.deepcopy(dense)
    prune(model, PruningConfig(method="width", sparsity=0.2, method_options={"criterion": criterion, "components": "mlp"}), calibration=windows)
    kept = kept_rows(mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight)
    removed = sorted(set(range(mlp.gate_proj.out_features)) - set(kept))
    assert removed and removed == sorted(torch.argsort(scores)[: len(removed)].tolist())


@pytest.mark.parametrize("head_mode", ["query", "kv_group"])
def test_the_weakest_head_or_key_value_group_goes(head_mode):
    """Head tests checked shapes, counts and outputs, which hold whichever heads go: keeping the strongest passed."""
    model = tiny_model(num_attention_heads=8, num_key_value_heads=2 if head_mode == "query" else 4)
    attention = model.model.layers[0].self_attn
    size = attention.head_dim
    weak = slice(size, 2 * size) if head_mode == "query" else slice(0, 2 * size)  # query head 1, or group 0's two heads
    with torch.no_grad():
        attention.q_proj.weight[weak] *= 1e-3
        attention.o_proj.weight[:, weak] *= 1e-3
        if head_mode == "kv_group":
            attention.k_proj.weight[:size] *= 1e-3
            attention.v_proj.weight[:size] *= 1e-3
    options = {"criterion": "magnitude_l2", "components": "attention", "head_mode": head_mode}
    prune(model, PruningConfig(method="width", sparsity=0.05, method_options=options))
    heads = model.model.layers[0].self_attn.q_proj.weight.detach().reshape(-1, size, attention.q_proj.in_features)
    assert len(heads) < 8 and float(heads.norm(dim=(1, 2)).min()) > 1e-2  # the weak one is gone


def test_layer_ranking_is_uniform_and_hits_the_parameter_ratio():
    model = tiny_model(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, intermediate_size=256)
    linears = lambda: decoder_linear_parameters(model)  # noqa: E731
    before = linears()
    report = prune(model, PruningConfig(method="width", sparsity=0.3, method_options={"criterion": "magnitude_l2"}))
    assert len(set(report.shapes)) == 1
    assert model.config.num_attention_heads == report.shapes[0].num_attention_heads
    assert model.config.intermediate_size == report.shapes[0].intermediate_size
    assert not hasattr(model.config, "quantization_config")
    assert 1 - linears() / before == pytest.approx(0.3, abs=0.01)


def test_global_ranking_gives_per_layer_widths_within_budget():
    model = tiny_model(num_hidden_layers=4, intermediate_size=256)
    before = decoder_linear_parameters(model)
    report = prune(model, PruningConfig(method="width", sparsity=0.2, method_options={"criterion": "wanda_sp", "ranking": "global"}), calibration=token_windows())
    assert len({s.intermediate_size for s in report.shapes}) > 1
    assert all(s.intermediate_size >= 1 and s.num_attention_heads >= 2 for s in report.shapes)
    assert model.config.quantization_config.layers[0]["intermediate_size"] == report.shapes[0].intermediate_size
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.2, abs=0.01)


def test_flap_compensation_of_the_mlp_is_the_removed_channels_mean_contribution():
    """FLAP's down_proj bias is W_down[:, J] · E[x_J] over the removed channels J (as the attention test checks for
    heads); a bias only nearer the mean output let a halved bias pass."""
    windows = token_windows()
    dense = tiny_model(num_hidden_layers=1, intermediate_size=256)
    mlp = dense.model.layers[0].mlp
    mean = _inputs_of(mlp.down_proj, dense, windows).mean(0)
    model = copy.deepcopy(dense)
    prune(model, PruningConfig(method="width", sparsity=0.3, method_options={"criterion": "flap", "components": "mlp"}), calibration=windows)
    kept = kept_rows(mlp.gate_proj.weight, model.model.layers[0].mlp.gate_proj.weight)
    removed = sorted(set(range(mlp.gate_proj.out_features)) - set(kept))
    expected = mlp.down_proj.weight.detach().double()[:, removed] @ mean[removed]
    torch.testing.assert_close(model.model.layers[0].mlp.down_proj.bias.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("family", "stock"), [("llama", True), ("qwen3", False), ("mistral", False)])
def test_flap_biases_a_config_flag_can_describe_keep_uniform_widths_a_stock_checkpoint(family, stock, tmp_path):
    """Llama's attention_bias / mlp_bias give every projection of a sublayer a bias: with zero ones beside FLAP's,
    the config describes the layer. Qwen 3 has the attention flag only, Mistral neither: their shapes are recorded."""
    model = tiny_model(family)
    prune(model, PruningConfig(method="width", sparsity=0.3, method_options={"head_mode": "kv_group"}), calibration=token_windows())
    layers = model.model.layers
    assert all(layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None for layer in layers)
    flagged = [name for name in ("attention_bias", "mlp_bias") if getattr(model.config, name, False)]
    assert flagged == {"llama": ["attention_bias", "mlp_bias"], "qwen3": ["attention_bias"], "mistral": []}[family]
    assert all(layer.self_attn.q_proj.bias is not None for layer in layers) == ("attention_bias" in flagged)
    if flagged:  # the biases beside FLAP's change nothing
        assert not layers[0].self_attn.k_proj.bias.any() and not layers[0].self_attn.v_proj.bias.any()
    assert (getattr(model.config, "quantization_config", None) is None) == stock
    if stock:
        assert_stock_reload_matches(model, save_pruned(model, tmp_path / "flap"), token_windows(2, 12, seed=3), tmp_path)


def test_flap_on_per_layer_widths_adds_no_zero_biases():
    """The shapes are recorded anyway: zero biases beside FLAP's would only take room."""
    model = tiny_model()
    config = PruningConfig(method="width", sparsity=0.3, method_options={"head_mode": "kv_group", "ranking": "global"})
    prune(model, config, calibration=token_windows())
    assert getattr(model.config, "quantization_config", None) is not None
    assert not model.config.attention_bias and not model.config.mlp_bias
    assert all(layer.self_attn.q_proj.bias is None and layer.mlp.gate_proj.bias is None for layer in model.model.layers)


def test_ignored_components_keep_their_width():
    model = tiny_model()
    prune(model, PruningConfig(method="width", sparsity=0.1, ignore=["model.layers.0.*"], method_options={"criterion": "magnitude_l1", "ranking": "global"}))
    assert model.model.layers[0].mlp.gate_proj.out_features == 128
    assert model.model.layers[0].self_attn.q_proj.out_features == 64


@pytest.mark.parametrize(
    "options, sparsity, message",
    [
        ({"components": "attention", "head_mode": "kv_group"}, 0.5, "components='attention', removing whole key/value groups, can remove at most"),
        ({"components": "mlp"}, 0.9, "one channel per layer"),
        ({"components": "attention"}, 0.2, "keeping one head per group"),
    ],
)
def test_impossible_requests_fail_before_any_change(options, sparsity, message):
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        prune(model, PruningConfig(method="width", sparsity=sparsity, method_options={"criterion": "magnitude_l1", **options}))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_structured_methods_reject_nm_and_owl():
    with pytest.raises(ValueError, match="N:M patterns apply to unstructured"):
        PruningConfig(method="width", sparsity="2:4")
    with pytest.raises(ValueError, match="allocation 'owl' applies to unstructured"):
        PruningConfig(method="layers", sparsity=0.2, allocation="owl")
    with pytest.raises(ValueError, match="criterion must be one of"):
        PruningConfig(method="width", method_options={"criterion": "l0"})


def test_without_gqa_query_mode_removes_heads_with_their_keys_and_values():
    """One query head per key/value head: each head is its own group, so 'query' must remove groups
    (before, it removed no head and gave the whole budget to the MLP)."""
    model = tiny_model(num_attention_heads=4, num_key_value_heads=4)
    report = prune(model, PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "magnitude_l2"}))
    for shape in report.shapes:
        assert shape.num_attention_heads == shape.num_key_value_heads == 3
    assert model.model.layers[0].self_attn.k_proj.out_features == 3 * 16


def test_global_ranking_standardises_each_layers_scores_as_flap_does():
    """FLAP standardises scores per layer and structure before ranking across layers: a layer whose
    raw scores are all small (here its MLP output scaled down 100×) is not stripped for it."""
    model = tiny_model(num_hidden_layers=3, intermediate_size=128)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(0.01)
    config = PruningConfig(method="width", sparsity=0.2, method_options={"criterion": "flap", "ranking": "global"})
    report = prune(model, config, calibration=token_windows())
    widths = [shape.intermediate_size for shape in report.shapes]
    assert min(widths) >= 64 and max(widths) - min(widths) <= 48, widths


def test_a_factorised_model_is_refused_naming_the_order_that_works():
    """It failed with "'LowRankLinear' object has no attribute 'weight'"."""
    model = tiny_model()
    prune(model, PruningConfig(method="low_rank", sparsity=0.3, method_options={"weighting": "none"}))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj was factorised by low_rank: .* prune widths first, then low_rank"):
        prune(model, PruningConfig(method="width", sparsity=0.1, method_options={"criterion": "magnitude_l1"}))


def test_flap_activation_variance_is_exact_for_features_whose_mean_dwarfs_their_spread():
    """Σx² − (Σx)²/n in float32 cancelled catastrophically: 0.8 % off at mean 30, spread 0.1."""
    from optimum_prune.statistics import ColumnMoments

    generator = torch.Generator().manual_seed(0)
    means, spreads = torch.tensor([0.0, 30.0, 100.0]), torch.tensor([1.0, 0.1, 0.5])
    moments, batches = ColumnMoments(3, torch.device("cpu")), []
    for _ in range(64):
        batch = means + spreads * torch.randn(1, 2048, 3, generator=generator)
        moments.add(batch)
        batches.append(batch.double())
    expected = torch.cat(batches).reshape(-1, 3).var(dim=0)
    torch.testing.assert_close(moments.variance().double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(moments.mean().double(), torch.cat(batches).reshape(-1, 3).mean(dim=0), rtol=1e-6, atol=0)


def test_global_kv_group_scores_do_not_depend_on_a_layers_weight_scale():
    """Key / value channel scores entered the group scores raw beside standardised query ones: a layer whose
    attention weights were 3× larger escaped pruning."""
    removed = []
    for scale in (1.0, 3.0):
        model = tiny_model(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(model.model.layers[1].self_attn, name).weight.mul_(scale)
        options = {"criterion": "magnitude_l2", "components": "attention", "head_mode": "kv_group", "ranking": "global"}
        removed.append(sorted(prune(model, PruningConfig(method="width", sparsity=0.17, method_options=options)).removed))
    assert removed[0] == removed[1] and any("model.layers.1 " in entry for entry in removed[0])


def test_per_layer_kv_head_counts_generate_alike_with_static_dynamic_and_no_cache():
    """transformers' static cache sizes each layer from its first key states, so non-uniform KV counts fit it."""
    model = tiny_model()
    options = {"head_mode": "kv_group", "ranking": "global", "components": "attention", "criterion": "wanda_sp"}
    prune(model, PruningConfig(method="width", sparsity=0.1, method_options=options), calibration=token_windows())
    assert len({layer.self_attn.k_proj.out_features for layer in model.model.layers}) > 1
    ids = token_windows(samples=2, seq_len=8, seed=3)
    outputs = [
        model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, **cache)
        for cache in ({}, {"cache_implementation": "static"}, {"use_cache": False})
    ]
    assert all(torch.equal(output, outputs[0]) for output in outputs[1:])


def test_flap_compensation_adds_to_an_existing_output_bias():
    """Llama with mlp_bias: down_proj already has a bias, which FLAP's compensation must add to, not replace."""
    windows = token_windows()
    models = [tiny_model(num_hidden_layers=1, intermediate_size=256, mlp_bias=True) for _ in range(2)]
    existing = torch.linspace(-1, 1, 64)
    with torch.no_grad():
        models[0].model.layers[0].mlp.down_proj.bias.copy_(existing)  # the one layer's statistics do not see it
        models[1].model.layers[0].mlp.down_proj.bias.zero_()
    config = PruningConfig(method="width", sparsity=0.3, method_options={"criterion": "flap", "components": "mlp"})
    for model in models:
        prune(model, config, calibration=windows)
    biased, unbiased = (model.model.layers[0].mlp.down_proj for model in models)
    assert torch.equal(biased.weight, unbiased.weight)
    torch.testing.assert_close(biased.bias - unbiased.bias, existing)


def test_layer_ranking_of_key_value_groups_hits_the_parameter_ratio():
    """A key/value group's unit counts its query heads, o_proj columns and its key and value rows."""
    model = tiny_model(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    before = decoder_linear_parameters(model)
    options = {"criterion": "magnitude_l2", "head_mode": "kv_group"}
    report = prune(model, PruningConfig(method="width", sparsity=0.3, method_options=options))
    assert all(shape.num_key_value_heads == 3 for shape in report.shapes)
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.3, abs=0.004)


def test_flap_compensates_removed_heads_with_their_own_o_proj_columns():
    """FLAP's attention bias is W_o[:, J] · E[x_J] over the removed heads' head_dim-wide column blocks J."""
    windows = token_windows()
    dense = tiny_model(num_hidden_layers=1, num_attention_heads=8, num_key_value_heads=2)
    attention = dense.model.layers[0].self_attn
    mean = _inputs_of(attention.o_proj, dense, windows).mean(0)
    model = copy.deepcopy(dense)
    options = {"criterion": "flap", "components": "attention", "head_mode": "query"}
    prune(model, PruningConfig(method="width", sparsity=0.1, method_options=options), calibration=windows)
    query = model.model.layers[0].self_attn.q_proj.weight
    kept = [next(i for i in range(attention.q_proj.out_features) if torch.equal(attention.q_proj.weight[i], row)) for row in query]
    removed = sorted(set(range(attention.q_proj.out_features)) - set(kept))
    assert removed and removed != list(range(len(removed)))  # not only the first head: its columns are 0..head_dim-1
    expected = attention.o_proj.weight.detach().double()[:, removed] @ mean[removed]
    torch.testing.assert_close(model.model.layers[0].self_attn.o_proj.bias.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("criterion", ["flap", "wanda_sp", "taylor"])
def test_global_ranking_removes_a_dead_sublayers_units_first(criterion):
    """A layer whose MLP outputs nothing scores 0 everywhere: standardised, it sat mid-ranked, and live channels
    of other layers went while it kept all of its own."""
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    dense, windows = copy.deepcopy(model), token_windows(samples=4, seq_len=32)
    options = {"criterion": criterion, "ranking": "global", "components": "mlp"}
    prune(model, PruningConfig(method="width", sparsity=0.1, method_options=options), calibration=windows)
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == [128, 70, 128]
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, dense(windows).logits)


@pytest.mark.parametrize(("sparsity", "components"), [(0.05, "attention"), (0.15, "attention"), (0.45, "all")])
def test_global_ranking_stops_closest_to_the_budget(sparsity, components):
    """The greedy walk took units until the budget was met, so a last key/value group (here 1/48 of the decoder's
    linears) overshot by up to a whole unit: 0.05 gave 0.0625 and 0.45 gave 0.470. FLAP stops where the removed
    parameters are closest to the budget: within half a unit."""
    model = tiny_model(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4)
    before = decoder_linear_parameters(model)
    attention = model.model.layers[0].self_attn
    group = sum(getattr(attention, f"{name}_proj").weight.numel() for name in "qkvo") / 4  # one of the 4 key/value groups
    options = {"criterion": "magnitude_l2", "components": components, "head_mode": "kv_group", "ranking": "global"}
    prune(model, PruningConfig(method="width", sparsity=sparsity, method_options=options))
    removed = before - decoder_linear_parameters(model)
    assert abs(removed - sparsity * before) <= group / 2, (removed, sparsity * before)


def test_layer_ranking_removes_the_rounded_share_of_key_value_groups():
    """Attention first: round(0.4 · 4 groups) = round(1.6) = 2 groups go, the MLP makes up the rest of the 40 %."""
    model = tiny_model(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4)
    before = decoder_linear_parameters(model)
    options = {"criterion": "magnitude_l2", "head_mode": "kv_group"}
    report = prune(model, PruningConfig(method="width", sparsity=0.4, method_options=options))
    assert all(shape.num_key_value_heads == 2 and shape.num_attention_heads == 4 for shape in report.shapes)
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.4, abs=0.004)


@pytest.mark.parametrize("ranking", ["layer", "global"])
def test_round_to_leaves_mlp_widths_an_n_m_step_tiles(ranking, tmp_path):
    """README: structured, then N:M, in that order. The down projections' inputs must be whole groups of M."""
    model = tiny_model()
    config = PruningConfig(method="width", sparsity=0.3, method_options={"ranking": ranking, "round_to": 8})
    prune(model, config, calibration=token_windows())
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(width % 8 == 0 and width < 128 for width in widths), widths
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows())
    assert verify_sparsity(model, "2:4")["conforming"]
    assert_reloads_exactly(model, save_pruned(model, tmp_path / "width_2_4"))


def test_n_m_after_width_names_the_step_and_the_remedies():
    model = tiny_model()
    prune(model, PruningConfig(method="width", sparsity=0.3, method_options={"ranking": "global"}), calibration=token_windows())
    assert any(layer.mlp.down_proj.in_features % 4 for layer in model.model.layers)  # round_to=1, as recipes before it
    with pytest.raises(ValueError, match=r"recorded 'width' step .* PruningConfig.method_options.round_to=4 .* add '\*.down_proj' to PruningConfig.ignore"):
        prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows())
    del model.config.pruning_config["method_options"]["round_to"]  # as a version before the option recorded it
    with pytest.raises(ValueError, match=r"recorded 'width' step \(sparsity 0.3, round_to=1\) chose this width: run it again with PruningConfig.method_options.round_to=4"):
        prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows())


def test_n_m_after_attention_only_width_pruning_does_not_blame_that_step_for_the_mlp_width():
    """The model's own MLP width (130) refuses 2:4; a width step that removed heads only did not choose it."""
    model = tiny_model(intermediate_size=130)
    prune(model, PruningConfig(method="width", sparsity=0.1, method_options={"components": "attention"}), calibration=token_windows())
    assert [layer.mlp.down_proj.in_features for layer in model.model.layers] == [130] * len(model.model.layers)
    with pytest.raises(ValueError, match=r"down_proj") as refused:
        prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows())
    assert "round_to" not in str(refused.value) and "chose this width" not in str(refused.value)
    assert str(refused.value).endswith("leave these linears dense: add '*.down_proj' to PruningConfig.ignore")  # was no way out


def test_round_to_above_the_narrowest_mlp_is_refused():
    with pytest.raises(ValueError, match="round_to"):
        prune(tiny_model(), PruningConfig(method="width", sparsity=0.3, method_options={"criterion": "magnitude_l1", "round_to": 256}))


@pytest.mark.parametrize(
    "method, options, sparsity, unit",
    [
        ("width", {"components": "attention", "head_mode": "kv_group"}, 0.1, "key/value group"),
        ("kcm", {"components": "attention"}, 0.1, "key/value group"),
        ("width", {}, 0.002, "MLP channel"),
        ("width", {"ranking": "global"}, 0.0005, "MLP channel"),
    ],
)
def test_a_budget_that_rounds_to_no_unit_is_refused(method, options, sparsity, unit):
    """A key/value group of head_dim 24 is 21 % of a layer: 10 % rounded to none, and the run recorded a step that
    changed nothing (parameters 129408 -> 129408), without a word."""
    model = tiny_model(head_dim=24)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=rf"^PruningConfig.sparsity {sparsity} rounds to no unit to remove: the smallest step, one {unit}, holds"):
        prune(model, PruningConfig(method=method, sparsity=sparsity, method_options=options), calibration=token_windows(4, 16))
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert getattr(model.config, "pruning_config", None) is None


def test_a_round_to_that_rounds_the_budget_away_is_named():
    """10 % of the MLP is about 13 channels, which round_to=64 rounds to none: the error blamed the sparsity alone."""
    with pytest.raises(ValueError, match=r"the smallest step, 64 MLP channels \(PruningConfig.method_options.round_to\), holds 33.3% .*lower PruningConfig.method_options.round_to"):
        prune(tiny_model(), PruningConfig(method="width", sparsity=0.1, method_options={"components": "mlp", "round_to": 64}), calibration=token_windows(4, 16))

