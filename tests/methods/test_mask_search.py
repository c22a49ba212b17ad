"""Kwon et al.'s mask search: Fisher of the masks, the budgeted search, rearrangement, least-squares tuning."""


import itertools

import pytest
import torch

from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.adapters import get_adapter
from optimum_prune.calibration import LayerInputs, capture_first_layer_inputs, feed_layer, run_layer
from optimum_prune.methods.mask_search import MaskSearch, MaskSearchOptions, mask_fisher, rearranged, search_counts
from optimum_prune.methods.units import output_projection

from ..conftest import LargestResult, assert_reloads_exactly, decoder_linear_parameters, output_errors, tiny_model, token_windows


def test_rearrangement_uses_the_interactions_between_masks():
    fisher = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.5]])
    assert sorted(rearranged(fisher.diagonal(), 2).tolist()) == [0, 1]  # the diagonal alone: the two least important
    assert 2 in rearranged(fisher, 2).tolist()  # {0, 2} or {1, 2}: 1 + 1.5 < 1 + 1 + 2 × 0.9


def test_search_removes_the_least_importance_that_meets_the_budget():
    # One attention component (2 removable units of cost 10) and one MLP component (4 removable, cost 3).
    importance = [torch.tensor([5.0, 0.5, 9.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 9.0])]
    counts = search_counts(importance, [10, 3], [2, 4], ["attention", "mlp"], budget=12)
    assert counts == [1, 1]  # head 0.5 + one channel (cost 13, loss 1.5) beats four channels (loss 4, cost 12)
    assert search_counts(importance, [10, 3], [2, 4], ["attention", "mlp"], budget=6) == [1, 0]  # overshoots, loses least
    cheap_channels = [importance[0], torch.tensor([0.25, 0.25, 0.25, 0.25, 9.0])]
    assert search_counts(cheap_channels, [10, 3], [2, 4], ["attention", "mlp"], budget=6) == [0, 2]
    with pytest.raises(ValueError, match="cannot be met"):
        search_counts(importance, [10, 3], [2, 4], ["attention", "mlp"], budget=100)


def test_mask_gradients_equal_the_weight_gradients_folded_per_unit():
    """∂L/∂m_u = Σ_{columns c of u} ⟨W[:, c], ∂L/∂W[:, c]⟩: scaling a unit's columns is its mask."""
    model, windows = tiny_model(), token_windows(samples=1)
    method = MaskSearch(get_adapter(model), 0.2, [], _options(), torch.device("cpu"))
    method.check()
    fisher = mask_fisher(method.adapter, method.units.components, windows, per_window=False)
    loss = model(input_ids=windows, labels=windows).loss
    loss.backward()
    layer = model.model.layers[1]
    attention = [f for c, f in zip(method.units.components, fisher) if c.layer == 1 and c.kind == "attention"][0]
    folded = (layer.self_attn.o_proj.weight * layer.self_attn.o_proj.weight.grad).sum(0).reshape(2, -1).sum(1)
    torch.testing.assert_close(attention, folded.square(), rtol=1e-4, atol=1e-10)
    mlp = [f for c, f in zip(method.units.components, fisher) if c.layer == 1 and c.kind == "mlp"][0]
    down = layer.mlp.down_proj
    torch.testing.assert_close(mlp, (down.weight * down.weight.grad).sum(0).square(), rtol=1e-4, atol=1e-10)


def test_rearrangement_holds_each_windows_gradients_not_a_fisher_block_per_layer():
    """A units × units block per layer held at once was 6 GiB per 70B layer (490 GiB): the per-window gradients G
    (windows × units) are kept instead, and GᵀG is the mean of g gᵀ, whose diagonal is the importance's Fisher."""
    model, windows = tiny_model(), token_windows(samples=3)
    method = MaskSearch(get_adapter(model), 0.2, [], _options(), torch.device("cpu"))
    method.check()
    squares = mask_fisher(method.adapter, method.units.components, windows, per_window=False)
    importance, gradients = method.unit_importance(windows)
    for component, g, square, score in zip(method.units.components, gradients, squares, importance):
        assert g.shape == (len(windows), component.removable + 1)
        torch.testing.assert_close((g.T @ g).diagonal().float(), square, rtol=1e-5, atol=0)
        torch.testing.assert_close(score, square / 2, rtol=1e-5, atol=0)


def _options(**overrides):
    from optimum_prune.methods.mask_search import MaskSearchOptions

    return MaskSearchOptions(**overrides)


def test_hits_the_budget_keeps_a_valid_gqa_layout_and_reloads(tmp_path):
    model = tiny_model()
    before = decoder_linear_parameters(model)
    report = prune(model, PruningConfig(method="mask_search", sparsity=0.2), calibration=token_windows())
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.2, abs=0.01)
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.out_features % attention.k_proj.out_features == 0
    assert report.removed and "removed Fisher importance (mlp)" in report.layer_scores
    save_pruned(model, tmp_path / "out")
    assert_reloads_exactly(model, tmp_path / "out")


def test_mask_tuning_brings_the_output_closer_to_the_dense_model():
    errors = output_errors("mask_search", 0.3, "tune")
    assert errors[True] < errors[False], errors


def test_bad_requests_name_the_field():
    with pytest.raises(ValueError, match="damping must be >= 0"):
        PruningConfig(method="mask_search", method_options={"damping": -1})
    with pytest.raises(ValueError, match="can remove at most"):
        prune(tiny_model(), PruningConfig(method="mask_search", sparsity=0.99), calibration=token_windows())


def test_rearrangement_ends_where_no_single_swap_lowers_the_objective():
    """The swap local search stops at a local optimum of m_Zᵀ I m_Z: no swap of a removed and a kept unit helps."""
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        x = torch.randn(12, 8, generator=generator, dtype=torch.float64)
        fisher = x.T @ x
        removed = rearranged(fisher, 3).tolist()
        objective = lambda z: float(fisher[z][:, z].sum())  # noqa: E731
        kept = sorted(set(range(8)) - set(removed))
        best_swap = min(objective(sorted(set(removed) - {i} | {j})) for i, j in itertools.product(removed, kept))
        assert objective(removed) <= best_swap + 1e-9, trial


def test_a_rearrangement_swap_builds_one_removed_by_kept_buffer():
    """Each swap built Z's columns (n × |Z|), its rows (|Z| × n) and three |Z| × (n − |Z|) temporaries: 6.5 GB
    per swap at 28,672 channels. The largest result is now the one |Z| × (n − |Z|) table of swap changes."""
    x = torch.randn(16, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    fisher, count = x.T @ x, 10
    with LargestResult() as probe:
        rearranged(fisher, count)
    assert probe.largest <= count * (40 - count) < 40 * count


@pytest.mark.parametrize("damping", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["attention", "mlp"])
def test_tuned_scales_are_the_least_squares_masks_of_the_kept_units(kind, damping):
    """min_m ‖Σ_u m_u X_u W_uᵀ − X Wᵀ‖² + λ‖m‖² over the sublayer's calibration inputs, λ = damping × the mean diagonal of the normal equations."""
    model, windows = tiny_model(), token_windows(samples=2)
    method = MaskSearch(get_adapter(model), 0.2, [], MaskSearchOptions(damping=damping), torch.device("cpu"))
    method.check()
    inputs = capture_first_layer_inputs(method.adapter, windows, torch.device("cpu"))
    inputs = LayerInputs(run_layer(method.adapter, model.model.layers[0], inputs), inputs.layer_kwargs)
    layer = model.model.layers[1]  # layer 0's two key/value groups happen to get almost the same scale
    component = next(c for c in method.units.components if c.layer == 1 and c.kind == kind)
    units = component.removable + 1
    component.scores = torch.ones(units)
    component.scores[[0, units // 2] if units > 2 else [0]] = 0  # unit 0 goes: kept units are not the first ones
    scales = method._tuned_scales(layer, component, inputs)
    consumer = output_projection(method.adapter, layer, component)
    captured = []
    handle = consumer.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach().double()))
    feed_layer(method.adapter, layer, inputs)
    handle.remove()
    x = torch.cat([c.reshape(-1, consumer.in_features) for c in captured])
    w = consumer.weight.detach().double()
    width = consumer.in_features // units
    kept = torch.nonzero(component.scores).flatten().tolist()
    features = torch.stack([(x[:, u * width:(u + 1) * width] @ w[:, u * width:(u + 1) * width].T).flatten() for u in kept], 1)
    gram = features.T @ features
    gram += damping * gram.diagonal().mean() * torch.eye(len(kept), dtype=gram.dtype)
    expected = torch.linalg.solve(gram, features.T @ (x @ w.T).flatten())
    torch.testing.assert_close(scales.double(), expected, rtol=1e-4, atol=1e-6)


def test_tuning_heads_builds_no_tensor_of_every_kept_units_output():
    """Stacking each kept head's output was [units, tokens, hidden] per batch (GiBs per attention layer of a 7B model);
    the normal equations need only XᵀX: nothing larger than a window's MLP activations is made."""
    model, windows = tiny_model(num_key_value_heads=4), token_windows(samples=2, seq_len=128)  # 4 heads, one unit each
    method = MaskSearch(get_adapter(model), 0.2, [], MaskSearchOptions(), torch.device("cpu"))
    method.check()
    inputs = capture_first_layer_inputs(method.adapter, windows, torch.device("cpu"))
    component = next(c for c in method.units.components if c.layer == 0 and c.kind == "attention")
    component.scores = torch.tensor([0.0, 1.0, 1.0, 1.0])
    with torch.no_grad(), LargestResult() as probe:
        method._tuned_scales(model.model.layers[0], component, inputs)
    assert probe.largest <= windows.shape[1] * model.config.intermediate_size, probe.largest  # one window's MLP activations


def test_the_search_keeps_one_unit_of_every_component():
    # the second component's units are all the cheapest: it keeps one (caps), the rest comes from the first
    counts = search_counts([torch.tensor([5.0, 6.0, 7.0]), torch.tensor([0.1, 0.2, 0.3])], [1, 1], [2, 2], ["mlp", "mlp"], budget=3)
    assert counts == [1, 2]


def test_a_component_whose_units_are_all_least_important_keeps_one():
    model = tiny_model()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e-4)
    prune(model, PruningConfig(method="mask_search", sparsity=0.4, method_options={"components": "mlp"}),
          calibration=token_windows(samples=2, seq_len=16))
    assert all(layer.mlp.down_proj.in_features >= 1 for layer in model.model.layers)
    assert model.model.layers[1].mlp.up_proj.out_features == 1


def test_round_to_leaves_mlp_widths_a_multiple_of_it():
    model = tiny_model()
    prune(model, PruningConfig(method="mask_search", sparsity=0.3, method_options={"round_to": 8}), calibration=token_windows())
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(width % 8 == 0 for width in widths) and sum(widths) < 3 * 128, widths
