"""KCM: the representative rank (R2), the data-driven rank (D2), their R2D2 product, masking and tuning."""

import copy

import pytest
import torch

from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.adapters import get_adapter
from optimum_prune.methods.kcm import KCMOptions, KernelizedConvexMasking, representative_rank

from ..conftest import assert_reloads_exactly, decoder_linear_parameters, output_errors, tiny_model, token_windows


def test_units_the_others_cannot_express_rank_highest():
    cluster = torch.tensor([[1.0, 0.0], [1.1, 0.0], [1.0, 0.1], [1.1, 0.1], [1.05, 0.05]])
    units = torch.cat([cluster, torch.tensor([[-1.0, 2.0]])])  # one unit far from the rest
    scores = representative_rank(units, kernel_width=0.0, tolerance=1e-2, max_iterations=100)
    assert int(scores.argmax()) == 5
    assert float(scores[:5].max()) < float(scores[5])


def test_any_finite_kernel_width_gives_scores():
    """A very wide kernel is all ones (every unit alike); squaring the width itself overflowed past 1e154."""
    units = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    wide = representative_rank(units, kernel_width=1e200, tolerance=1e-2, max_iterations=100)
    torch.testing.assert_close(wide, representative_rank(units, kernel_width=1e30, tolerance=1e-2, max_iterations=100))


def test_the_early_stop_is_what_makes_r2_a_ranking():
    """Run to convergence the self-expression is the trivial C = I: every unit scores 1."""
    units = torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    early = representative_rank(units, 0.0, tolerance=1e-2, max_iterations=1000)
    converged = representative_rank(units, 0.0, tolerance=1e-12, max_iterations=5000)
    torch.testing.assert_close(converged, torch.ones(12), atol=1e-2, rtol=0)
    assert float(early.max() - early.min()) > 0.05


def test_d2_is_the_norm_of_each_unit_input_to_the_output_projection():
    model, windows = tiny_model(), token_windows()
    method = KernelizedConvexMasking(get_adapter(model), 0.2, [], KCMOptions(), torch.device("cpu"))
    method.check()
    norms = method._activation_norms(windows)
    squares: dict[str, torch.Tensor] = {}
    layer = model.model.layers[1]
    handles = [
        module.register_forward_pre_hook(lambda _m, args, name=name: squares.__setitem__(name, squares.get(name, 0) + args[0].square().sum((0, 1))))
        for name, module in (("attention", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj))
    ]
    with torch.no_grad():
        model(input_ids=windows)
    for handle in handles:
        handle.remove()
    for component, measured in zip(method.units.components, norms):
        if component.layer == 1:
            torch.testing.assert_close(measured, squares[component.kind].sqrt(), rtol=1e-4, atol=1e-6)


def test_r2d2_is_the_product_of_the_per_layer_normalised_scores_or_their_ranks():
    model, windows = tiny_model(), token_windows()
    scores = {}
    for combine in ("product", "rank"):
        method = KernelizedConvexMasking(get_adapter(model), 0.2, [], KCMOptions(combine=combine), torch.device("cpu"))
        method.check()
        importance, blocks = method.unit_importance(windows)
        assert all(i is b and i.dim() == 1 for i, b in zip(importance, blocks))  # no Fisher block: nothing to rearrange
        scores[combine] = importance
    # Reference from the definitions: R2 from the output projection's columns, D2 from their input norms,
    # each averaged over a unit's columns and min-max normalised; ranks 0…n−1 scaled to [0, 1].
    normalised = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
    ranks = lambda x: torch.argsort(torch.argsort(x, stable=True)).float() / (len(x) - 1)  # noqa: E731
    norms = method._activation_norms(windows)
    for index, component in enumerate(method.units.components):
        layer = model.model.layers[component.layer]
        weight = (layer.self_attn.o_proj if component.kind == "attention" else layer.mlp.down_proj).weight.detach()
        width = weight.shape[1] // len(scores["rank"][index])
        r2 = normalised(representative_rank(weight.T, 0.0, 1e-2, 100).reshape(-1, width).mean(1))
        d2 = normalised(norms[index].reshape(-1, width).mean(1))
        torch.testing.assert_close(scores["product"][index], r2 * d2)
        torch.testing.assert_close(scores["rank"][index], (ranks(r2) + ranks(d2)) / 2)


def test_gradient_free_budget_met_gqa_layout_kept_and_reloads(tmp_path):
    model = tiny_model()
    before = decoder_linear_parameters(model)
    report = prune(model, PruningConfig(method="kcm", sparsity=0.2), calibration=token_windows())
    assert all(p.grad is None for p in model.parameters())
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.2, abs=0.01)
    for layer in model.model.layers:
        attention = layer.self_attn
        assert attention.q_proj.out_features % attention.k_proj.out_features == 0
    assert "removed R2D2 importance (mlp)" in report.layer_scores
    assert len({layer.mlp.down_proj.in_features for layer in model.model.layers}) == 1  # allocation='layer': same-shaped layers lose alike
    save_pruned(model, tmp_path / "out")
    assert_reloads_exactly(model, tmp_path / "out")


def test_global_allocation_runs_kwon_search_over_r2d2(monkeypatch):
    from optimum_prune.methods import mask_search

    searched, search = [], mask_search.search_counts
    monkeypatch.setattr(mask_search, "search_counts", lambda *args: searched.append(args) or search(*args))
    model = tiny_model()
    before = decoder_linear_parameters(model)
    prune(model, PruningConfig(method="kcm", sparsity=0.2, method_options={"allocation": "global"}), calibration=token_windows())
    assert 1 - decoder_linear_parameters(model) / before == pytest.approx(0.2, abs=0.01)
    assert searched


def test_a_layer_that_would_lose_every_unit_is_refused_before_any_change():
    model = tiny_model()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="allocation='layer' would remove every head of a group .* use allocation='global'"):
        prune(model, PruningConfig(method="kcm", sparsity=0.75), calibration=token_windows())  # round(0.75 × 2 groups) = 2
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_without_tuning_the_result_equals_the_dense_model_with_the_removed_units_zeroed():
    dense, windows = tiny_model(), token_windows()
    model = copy.deepcopy(dense)
    prune(model, PruningConfig(method="kcm", sparsity=0.3, method_options={"tune": False, "components": "mlp"}), calibration=windows)
    for pruned, original in zip(model.model.layers, dense.model.layers):
        kept = [int(torch.nonzero((original.mlp.up_proj.weight == row).all(1))[0]) for row in pruned.mlp.up_proj.weight]
        removed = sorted(set(range(original.mlp.up_proj.out_features)) - set(kept))
        assert removed and len(kept) == pruned.mlp.up_proj.out_features
        with torch.no_grad():
            original.mlp.down_proj.weight[:, removed] = 0
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=windows).logits, dense(input_ids=windows).logits, rtol=1e-4, atol=1e-5)


def test_mask_tuning_brings_the_output_closer_to_the_dense_model():
    errors = output_errors("kcm", 0.3, "tune")
    assert errors[True] < errors[False], errors


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="combine"):
        PruningConfig(method="kcm", method_options={"combine": "sum"})
    with pytest.raises(ValueError, match="tolerance must be > 0"):
        PruningConfig(method="kcm", method_options={"tolerance": 0})
    with pytest.raises(ValueError, match="kernel_width must be >= 0"):
        PruningConfig(method="kcm", method_options={"kernel_width": -1.0})


def _r2_written_out(units: torch.Tensor, sigma: float, tolerance: float = 1e-2, steps: int = 100) -> torch.Tensor:
    """C ← C ⊙ √(K ⊘ KC) from C = 1/n with K = exp(−d²/σ²), stopped once Σ|C' − C| / Σ|C| < tolerance: diag(C)."""
    n = len(units)
    kernel = torch.exp(-torch.cdist(units, units).square() / sigma**2)
    c = torch.full((n, n), 1.0 / n, dtype=units.dtype)
    for _ in range(steps):
        updated = c * torch.sqrt(kernel / (kernel @ c))
        done = float((updated - c).abs().sum() / c.abs().sum()) < tolerance
        c = updated
        if done:
            break
    return c.diagonal()


def test_r2_follows_its_definition_step_by_step():
    """The kernel width defaults to the median off-diagonal distance; an explicit one replaces it."""
    n = 10
    units = torch.randn(n, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    median = torch.cdist(units, units)[~torch.eye(n, dtype=torch.bool)].median()
    torch.testing.assert_close(representative_rank(units, 0.0, 1e-2, 100), _r2_written_out(units, float(median)))
    torch.testing.assert_close(representative_rank(units, 0.7, 1e-2, 100), _r2_written_out(units, 0.7))


def test_dead_channels_go_before_live_ones_whatever_their_positions():
    """Dead channels (zero down_proj columns) all score R2 0: ranked by position they were not all taken before
    live ones, and which channels went followed the channel order."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, :64] = 0
    dense, windows = copy.deepcopy(model), token_windows(samples=4, seq_len=32)
    prune(model, PruningConfig(method="kcm", sparsity=0.1, method_options={"components": "mlp", "tune": False}), calibration=windows)
    with torch.no_grad():
        torch.testing.assert_close(model(windows).logits, dense(windows).logits)


def test_a_single_dead_output_channel_goes_before_every_live_one():
    """One zero down_proj column: its R2 is not 0 (and D2 reads the inputs, not the weight), so it ranked up to 22nd of
    128 and stayed while live channels went; a unit adding nothing goes first."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 5] = 0
    method = KernelizedConvexMasking(get_adapter(model), 0.1, [], KCMOptions(components="mlp", tune=False), torch.device("cpu"))
    method.check()
    importance, _ = method.unit_importance(token_windows(samples=4, seq_len=32))
    for scores in importance:
        assert float(scores[5]) < float(torch.cat([scores[:5], scores[6:]]).min())


def test_product_r2d2_falls_back_to_d2_where_every_unit_has_the_same_r2():
    """Identical down_proj columns: R2 is the same for every channel, normalised to all ones, so the product is D2's order."""
    model, windows = tiny_model(), token_windows()
    with torch.no_grad():
        down = model.model.layers[0].mlp.down_proj.weight
        down.copy_(down[:, :1].expand_as(down))
    method = KernelizedConvexMasking(get_adapter(model), 0.2, [], KCMOptions(components="mlp", combine="product"), torch.device("cpu"))
    method.check()
    importance, _ = method.unit_importance(windows)
    first = next(i for i, c in enumerate(method.units.components) if c.layer == 0)
    assert float(importance[first].max()) == 1.0 and float(importance[first].max() - importance[first].min()) > 0.5


@pytest.mark.parametrize("allocation", ["layer", "global"])
def test_round_to_leaves_mlp_widths_a_multiple_of_it(allocation):
    model = tiny_model()
    options = {"allocation": allocation, "round_to": 8}
    prune(model, PruningConfig(method="kcm", sparsity=0.3, method_options=options), calibration=token_windows())
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert all(width % 8 == 0 for width in widths) and sum(widths) < 3 * 128, widths
