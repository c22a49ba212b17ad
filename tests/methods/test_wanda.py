import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.methods.wanda import WandaOptions, WandaPruner

from ..conftest import tiny_model, token_windows


def test_scores_equal_direct_computation():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    batches = [torch.randn(2, 5, 16) for _ in range(3)]
    pruner = WandaPruner(linear, WandaOptions())
    for batch in batches:
        pruner.add_batch(batch)
    X = torch.cat([b.reshape(-1, 16) for b in batches])  # all calibration tokens × features
    expected = linear.weight.abs() * X.norm(p=2, dim=0)  # |W_ij| · ‖X_j‖₂
    torch.testing.assert_close(pruner.scores(), expected)


def test_prunes_lowest_scores_per_output_row():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    inputs = torch.randn(64, 16) * torch.linspace(0.1, 3, 16)
    pruner = WandaPruner(linear, WandaOptions())
    pruner.add_batch(inputs)
    scores = pruner.scores()
    pruner.prune(0.5)
    kept = linear.weight != 0
    assert kept.sum(dim=1).tolist() == [8] * 8
    for row in range(8):  # every pruned score is below every kept score of the row
        assert scores[row][~kept[row]].max() <= scores[row][kept[row]].min()


def test_layer_comparison_group_cuts_the_whole_matrix_once():
    """comparison_group='layer' (ignored by a per-row cut, no test failed): one threshold over all the scores."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8, bias=False)
    with torch.no_grad():
        linear.weight *= torch.linspace(0.2, 2, 8)[:, None]  # rows of unequal scale: unequal zeros per row
    pruner = WandaPruner(linear, WandaOptions(comparison_group="layer"))
    pruner.add_batch(torch.randn(64, 16) * torch.linspace(0.1, 3, 16))
    scores = pruner.scores()
    pruner.prune(0.5)
    kept = linear.weight != 0
    assert int((~kept).sum()) == 64 and len(set(kept.sum(dim=1).tolist())) > 1
    assert scores[~kept].max() <= scores[kept].min()


def test_wanda_exact_sparsity_on_model():
    # 0.3 of 64 (or 128) inputs per row is 19.2 (38.4): exactly 19 (38) weights go, i.e. 0.296875.
    for sparsity, expected in ((0.5, 0.5), ("2:4", 0.5), ("4:8", 0.5), (0.3, 0.296875)):
        model = tiny_model()
        report = prune(model, PruningConfig(method="wanda", sparsity=sparsity), calibration=token_windows())
        assert [row.sparsity for row in report.linears] == [expected] * 21


def test_a_target_below_the_zeros_the_model_holds_is_said_to_prune_nothing(caplog):
    """Wanda 0.6 then 0.3 left the weights bit-identical and recorded a second step, without a word."""
    import logging
    import re

    model = tiny_model()
    prune(model, PruningConfig(method="wanda", sparsity=0.6), calibration=token_windows())
    before = {name: weight.clone() for name, weight in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="wanda", sparsity=0.3), calibration=token_windows())
    assert all(torch.equal(weight, before[name]) for name, weight in model.state_dict().items())
    assert re.search(r"sparsity 30.00%: the linears it prunes already held 59.\d\d% zeros, which are kept: it removed no further weight", caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="wanda", sparsity=0.7), calibration=token_windows())
    assert "removed no further weight" not in caplog.text


def test_a_step_that_still_removes_weights_is_not_said_to_remove_none(caplog):
    """Magnitude's zeros are uneven across rows (a row held 31 %, another 66 %): Wanda at the same 50 % removed 1682
    weights from the emptier rows, while the warning said it removed none."""
    import logging

    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5))
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="wanda", sparsity=0.5), calibration=token_windows())
    assert sum(int((p == 0).sum()) for p in model.parameters()) > zeros
    assert "no further weight" not in caplog.text


def test_a_target_below_one_weight_a_row_is_said_to_round_to_none(caplog):
    """0.5 % of 64 inputs is no weight a row: the warning spoke of zeros the dense model held and kept (0.00 %)."""
    import logging

    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(tiny_model(), PruningConfig(method="wanda", sparsity=0.005), calibration=token_windows())
    assert "sparsity 0.50% removed no weight of the linears it prunes: it rounds to none in each row" in caplog.text
    assert "already held" not in caplog.text

