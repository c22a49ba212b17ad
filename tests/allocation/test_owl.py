import pytest
import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.allocation import shifted_for_existing_zeros
from optimum_prune.allocation.owl import OWLAllocation, OWLOptions
from optimum_prune.statistics import ColumnNorms

from ..conftest import tiny_model, token_windows


def _observe(allocation: OWLAllocation, index: int, outlier_columns: int) -> None:
    weight = torch.ones(16, 64)
    norms = ColumnNorms(64, torch.device("cpu"))
    activations = torch.ones(10, 64)
    activations[:, :outlier_columns] = 100.0  # features with huge activations make outlier scores
    norms.add(activations)
    allocation.observe(index, {"w": weight}, {"w": norms})


def test_ratios_average_to_target_and_follow_outliers():
    allocation = OWLAllocation(OWLOptions(outlier_threshold=5.0, max_deviation=0.08))
    for index, outliers in enumerate([0, 1, 2, 4]):
        _observe(allocation, index, outliers)
    sparsities = allocation.allocate(0.7, [100] * 4)
    assert sum(sparsities) / 4 == pytest.approx(0.7, abs=1e-12)
    assert sparsities == sorted(sparsities, reverse=True)  # more outliers → denser layer
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)  # spread is 2λ
    # linear in the outlier ratios (0, 1, 2, 4 columns: 0, ¼, ½, 1 of the 2λ range), not spread evenly by rank
    assert sparsities == pytest.approx([0.77, 0.73, 0.69, 0.61], abs=1e-12)


def test_outliers_are_measured_against_the_whole_layers_mean():
    """OWL's layerwise outlier ratio (a mean per linear passed every test): the larger-scaled of two linears is all outliers."""
    allocation = OWLAllocation(OWLOptions(outlier_threshold=1.5))
    norms = ColumnNorms(64, torch.device("cpu"))
    norms.add(torch.ones(10, 64))
    allocation.observe(0, {"small": torch.ones(16, 64), "large": 10 * torch.ones(16, 64)}, {"small": norms, "large": norms})
    assert allocation.outlier_ratios[0] == 0.5


def test_owl_on_model_averages_to_target():
    model = tiny_model(num_hidden_layers=4)
    report = prune(model, PruningConfig(method="wanda", sparsity=0.6, allocation="owl"), calibration=token_windows())
    targets = [target for target, _ in report.layer_sparsities().values()]
    assert sum(targets) / len(targets) == pytest.approx(0.6)
    assert len(set(round(t, 6) for t in targets)) > 1
    assert report.overall_sparsity == pytest.approx(0.6, abs=0.01)


@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_a_layer_ignore_keeps_whole_takes_no_share_of_the_allocation(allocation):
    model = tiny_model(num_hidden_layers=4)
    config = PruningConfig(method="wanda", sparsity=0.6, allocation=allocation, ignore=["model.layers.0.*"])
    report = prune(model, config, calibration=token_windows())
    targets = report.layer_sparsities()
    assert len(targets) == 3 and sum(target for target, _ in targets.values()) / 3 == pytest.approx(0.6)
    assert len({round(target, 6) for target, _ in targets.values()}) > 1
    assert bool((model.model.layers[0].mlp.up_proj.weight != 0).all())


def test_owl_refuses_impossible_spread():
    allocation = OWLAllocation(OWLOptions(max_deviation=0.3))
    for index, outliers in enumerate([0, 8]):
        _observe(allocation, index, outliers)
    with pytest.raises(ValueError, match="lower PruningConfig.allocation_options.max_deviation"):
        allocation.allocate(0.9, [100] * 2)


def test_layers_of_unequal_size_share_the_target_by_their_weights():
    allocation = OWLAllocation(OWLOptions(outlier_threshold=5.0, max_deviation=0.08))
    for index, outliers in enumerate([0, 1, 2, 4]):
        _observe(allocation, index, outliers)
    sizes = [100, 300, 100, 50]
    sparsities = allocation.allocate(0.7, sizes)
    assert sum(s * n for s, n in zip(sparsities, sizes)) / sum(sizes) == pytest.approx(0.7, abs=1e-12)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)


@pytest.mark.parametrize("allocation", ["owl", "sensitivity"])
def test_after_structured_pruning_the_model_reaches_the_target(allocation):
    """Layers without their MLP hold a third of the others' weights: the unweighted layer mean missed the target."""
    model = tiny_model(num_hidden_layers=4)
    windows = token_windows()
    prune(model, PruningConfig(method="sublayers", sparsity=0.25, method_options={"sublayers": "mlp"}), calibration=windows)
    report = prune(model, PruningConfig(method="wanda", sparsity=0.5, allocation=allocation), calibration=windows)
    sizes = [sum(m.weight.numel() for m in layer.modules() if isinstance(m, torch.nn.Linear)) for layer in model.model.layers]
    assert len(set(sizes)) > 1
    targets = [target for target, _ in report.layer_sparsities().values()]
    assert sum(t * n for t, n in zip(targets, sizes)) / sum(sizes) == pytest.approx(0.5, abs=1e-9)  # was 0.48
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.01)  # each row rounds its count of zeros down


def test_a_data_free_method_prunes_each_layer_to_its_allocated_target():
    """magnitude reads no calibration, OWL does: each layer must be pruned to OWL's target, not the global one."""
    model = tiny_model(num_hidden_layers=4)
    report = prune(model, PruningConfig(method="magnitude", sparsity=0.6, allocation="owl"), calibration=token_windows())
    layers = list(report.layer_sparsities().values())
    assert len({round(target, 6) for target, _ in layers}) > 1
    assert sum(target for target, _ in layers) / 4 == pytest.approx(0.6)
    for target, measured in layers:
        assert measured == pytest.approx(target, abs=0.01)


def _layer_zero_shares(model) -> list[float]:
    weights = [[m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)] for layer in model.model.layers]
    return [sum(int((w == 0).sum()) for w in layer) / sum(w.numel() for w in layer) for layer in weights]


@pytest.mark.parametrize("first,then", [("wanda", "wanda"), ("magnitude", "magnitude"), ("magnitude", "wanda")])
def test_an_already_pruned_model_pruned_again_stays_at_the_target(first, then):
    """OWL's layer targets below a layer's existing zeros cannot be met (zeros are not revived): a comparison group
    past its share keeps it and the others give way, so the weighted mean stays at the target. Pruning an OWL result
    again ended at 55.3 % (Wanda twice) / 55.6 % (magnitude twice) for 50 %; raising a layer's target to its zero
    share still pruned rows below it that Wanda ranks within (magnitude's rows are uneven: 52.1 %)."""
    model, windows = tiny_model(), token_windows()
    prune(model, PruningConfig(method=first, sparsity=0.5, allocation="owl"), calibration=windows)
    before = _layer_zero_shares(model)
    report = prune(model, PruningConfig(method=then, sparsity=0.5, allocation="owl"), calibration=windows)
    assert report.overall_sparsity == pytest.approx(0.5, abs=0.005)
    assert max(_layer_zero_shares(model)[i] - share for i, share in enumerate(before) if share > 0.5) < 1e-3  # kept


def _groups(*fractions: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(fractions, dtype=torch.float64), torch.ones(len(fractions), dtype=torch.float64)


def test_layers_end_at_the_target_on_average_with_groups_past_their_share_kept():
    # Layer 0's one group holds 55 % zeros: it ends there, and one shift of 0.05 brings the mean back to 0.525.
    shifted = shifted_for_existing_zeros([0.4, 0.5, 0.6], [_groups(0.55), _groups(0.0), _groups(0.0)], [1, 1, 2], 0.525)
    assert shifted == pytest.approx([0.35, 0.45, 0.55], abs=1e-9)
    # Per group: a row at 80 % keeps it, the other row goes to the layer's target t, so the layer ends at (0.8 + t) / 2.
    shifted = shifted_for_existing_zeros([0.5, 0.5], [_groups(0.8, 0.0), _groups(0.0, 0.0)], [1, 1], 0.5)
    assert ((0.8 + shifted[0]) / 2 + shifted[1]) / 2 == pytest.approx(0.5)
    assert shifted_for_existing_zeros([0.5, 0.5], [_groups(0.7), _groups(0.6)], [1, 1], 0.5) == [0.0, 0.0]  # past it alone
    assert shifted_for_existing_zeros([0.3, 0.5], [_groups(0.001), _groups(0.0)], [1, 1], 0.4) == [0.3, 0.5]  # dense


def test_the_report_says_why_a_layer_target_is_below_the_allocation():
    """A layer whose existing zeros pass its share showed a target far below what it ends at, or "target 0.00 %",
    with no word why: the report and the log say the targets were lowered."""
    model, windows = tiny_model(), token_windows()
    for layer in model.model.layers[:2]:  # two of the three layers hold ~90 % zeros: nothing is left to prune
        for linear in (m for m in layer.modules() if isinstance(m, torch.nn.Linear)):
            linear.weight.data[:, : int(0.9 * linear.in_features)] = 0
    report = prune(model, PruningConfig(method="wanda", sparsity=0.5, allocation="owl"), calibration=windows)
    assert [target for target, _ in report.layer_sparsities().values()] == [0.0, 0.0, 0.0]
    (note,) = report.notes
    assert "already holds zeros past some layers' shares" in note and "layer(s) 0, 1, 2 only keep the zeros they had" in note
    assert note in str(report)
