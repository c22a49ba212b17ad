import copy

import pytest
import torch
from torch import nn

from optimum_prune import PruningConfig, prune, save_pruned
from optimum_prune.methods.low_rank import factorize
from optimum_prune.structure.modules import LowRankLinear

from ..conftest import assert_reloads_exactly, tiny_model, token_windows


def _weighted_error(factors: LowRankLinear, weight: torch.Tensor, row_weights: torch.Tensor) -> float:
    approximation = (factors.out_factor.weight @ factors.in_factor.weight).detach()
    return float((row_weights.unsqueeze(1) * (approximation - weight.detach()).square()).sum())


def test_full_rank_factors_reproduce_the_linear():
    linear = nn.Linear(12, 10).double()
    factors = factorize(linear, 10, row_weights=torch.rand(10, dtype=torch.float64) + 0.1)
    inputs = torch.randn(3, 12, dtype=torch.float64)
    torch.testing.assert_close(factors(inputs), linear(inputs))


def test_fisher_weighting_minimises_the_weighted_error():
    torch.manual_seed(0)
    linear = nn.Linear(16, 12, bias=False).double()
    row_weights = torch.rand(12, dtype=torch.float64) ** 4  # a few rows matter much more
    plain, weighted = factorize(linear, 4), factorize(linear, 4, row_weights)
    assert _weighted_error(weighted, linear.weight, row_weights) < _weighted_error(plain, linear.weight, row_weights)
    # and reaches the optimum (Eckart-Young on diag(√w)·W; weighting rows by w, not √w, only came close)
    optimum = torch.linalg.svdvals(row_weights.sqrt().unsqueeze(1) * linear.weight.detach())[4:].square().sum()
    assert _weighted_error(weighted, linear.weight, row_weights) == pytest.approx(float(optimum), rel=1e-9)


@pytest.mark.parametrize("weighting", ["fisher", "none"])
def test_low_rank_pruning_hits_the_ratio_and_reloads_exactly(weighting, tmp_path):
    model = tiny_model()
    config = PruningConfig(method="low_rank", sparsity=0.5, method_options={"weighting": weighting})
    calibration = token_windows() if weighting == "fisher" else None
    report = prune(model, config, calibration=calibration)

    factorised = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert len(factorised) == 7 * len(model.model.layers) and len(report.removed) == len(factorised)
    kept = sum(p.numel() for m in factorised for p in m.parameters())
    original = sum(m.in_features * m.out_features for m in factorised)
    assert 0.4 <= kept / original <= 0.5  # ranks round down to multiples of 8
    assert report.parameters_after < report.parameters_before
    shapes = model.config.quantization_config.layers
    assert shapes[0]["low_rank"]["self_attn.q_proj"] == factorised[0].rank
    assert_reloads_exactly(model, save_pruned(model, tmp_path / "low-rank", report=report))


def test_a_rank_budget_that_is_whole_in_exact_arithmetic_is_kept_whole():
    """A 160 × 160 linear at sparsity 0.9 has a budget of exactly 8 ranks, 7.999999999999998 in floating point:
    floored, round_to=8 refused it as less than one rank."""
    model = tiny_model(hidden_size=160, intermediate_size=160, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=1)
    prune(model, PruningConfig(method="low_rank", sparsity=0.9, method_options={"weighting": "none"}))
    assert {m.rank for m in model.modules() if isinstance(m, LowRankLinear)} == {8}


def test_fisher_weights_come_from_the_calibration_loss():
    dense = tiny_model()
    fisher, plain = copy.deepcopy(dense), copy.deepcopy(dense)
    prune(fisher, PruningConfig(method="low_rank", sparsity=0.5), calibration=token_windows())
    prune(plain, PruningConfig(method="low_rank", sparsity=0.5, method_options={"weighting": "none"}))
    first = [m.model.layers[0].mlp.down_proj.out_factor.weight for m in (fisher, plain)]
    assert first[0].shape == first[1].shape and not torch.allclose(first[0], first[1])


def test_ignored_linears_stay_dense_and_impossible_ranks_fail():
    model = tiny_model()
    prune(model, PruningConfig(method="low_rank", sparsity=0.3, ignore=["*.mlp.*"], method_options={"weighting": "none"}))
    assert isinstance(model.model.layers[0].mlp.gate_proj, nn.Linear)
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)
    with pytest.raises(ValueError, match="less than one rank of 64"):
        prune(tiny_model(), PruningConfig(method="low_rank", sparsity=0.5, method_options={"weighting": "none", "round_to": 64}))
    with pytest.raises(ValueError, match="weighting must be one of"):
        PruningConfig(method="low_rank", method_options={"weighting": "hessian"})
    with pytest.raises(ValueError, match="sparsity 0 factorises no parameter away"):  # it factorised every linear, lossily
        prune(tiny_model(), PruningConfig(method="low_rank", sparsity=0.0, method_options={"weighting": "none"}))


def test_fisher_rows_sum_each_windows_squared_gradient():
    from optimum_prune.calibration.gradients import fisher_rows

    model, windows = tiny_model(), token_windows(samples=3)
    linears = [model.model.layers[0].mlp.down_proj, model.model.layers[1].self_attn.q_proj]
    rows = fisher_rows(model, windows, linears)
    expected = [torch.zeros(linear.out_features, dtype=torch.float64) for linear in linears]
    for window in windows:
        loss = model(input_ids=window[None], labels=window[None]).loss
        for total, gradient in zip(expected, torch.autograd.grad(loss, [linear.weight for linear in linears])):
            total += gradient.double().square().sum(dim=1)
    for got, want in zip(rows, expected):
        torch.testing.assert_close(got, want)
    assert all(linear.weight.grad is None for linear in linears)


def test_all_zero_fisher_weights_fall_back_to_plain_svd():
    """A linear no calibration gradient reaches (all Fisher rows 0) is factorised as plain truncated SVD, not NaN."""
    torch.manual_seed(0)
    linear = nn.Linear(16, 12, bias=False).double()
    zero, plain = factorize(linear, 4, torch.zeros(12, dtype=torch.float64)), factorize(linear, 4)
    inputs = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(zero(inputs), plain(inputs))


@pytest.mark.parametrize("weighting", ["fisher", "none"])
def test_a_second_run_factorises_the_product_again_not_its_factors(weighting, tmp_path):
    """It nested factors of factors (four matmuls per projection), and on the tiny model refused every sparsity."""
    model = tiny_model(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=4, num_hidden_layers=2)
    calibration = token_windows() if weighting == "fisher" else None
    prune(model, PruningConfig(method="low_rank", sparsity=0.3, method_options={"weighting": "none"}))
    q_proj = model.model.layers[0].self_attn.q_proj
    first_rank, product = q_proj.rank, (q_proj.out_factor.weight @ q_proj.in_factor.weight).detach().double()
    config = PruningConfig(method="low_rank", sparsity=0.5, method_options={"weighting": weighting})
    report = prune(model, config, calibration=calibration)

    q_proj = model.model.layers[0].self_attn.q_proj
    assert [name for name, _ in q_proj.named_children()] == ["in_factor", "out_factor"]
    assert all(type(m.in_factor) is nn.Linear for m in model.modules() if isinstance(m, LowRankLinear))
    assert q_proj.rank == first_rank // 2 // 8 * 8  # half its parameters, rounded down
    assert f"kept rank {q_proj.rank} of {first_rank}" in " ".join(report.removed)
    if weighting == "none":  # the truncated SVD of the product
        again = (q_proj.out_factor.weight @ q_proj.in_factor.weight).detach().double()
        optimum = torch.linalg.svdvals(product)[q_proj.rank :].square().sum()
        assert float((again - product).square().sum()) == pytest.approx(float(optimum), rel=1e-4)
    assert_reloads_exactly(model, save_pruned(model, tmp_path / "twice", report=report))


def test_a_factorised_linear_at_round_to_says_no_sparsity_helps():
    """Rank 8 already, round_to 8: every sparsity > 0 leaves less than one rank of 8; 'lower the sparsity' misled."""
    model = tiny_model()
    prune(model, PruningConfig(method="low_rank", sparsity=0.3, method_options={"weighting": "none"}))
    assert model.model.layers[0].self_attn.k_proj.rank == 8
    with pytest.raises(ValueError, match=r"k_proj is factorised at rank 8 already.*lower round_to, or add .* to PruningConfig.ignore"):
        prune(model, PruningConfig(method="low_rank", sparsity=0.05, method_options={"weighting": "none"}))


def test_linears_quantized_but_not_yet_frozen_are_refused():
    """optimum-quanto's QLinear quantizes its float weight at each forward until freeze: its plain float factors
    dropped that quantization, and freeze then quantized nothing, without a word."""
    from optimum.quanto import QLinear, qint8, quantize

    model = tiny_model()
    quantize(model, weights=qint8)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj is a QLinear where low_rank factorises plain linears .*factorise before quantizing"):
        prune(model, PruningConfig(method="low_rank", sparsity=0.3), calibration=token_windows(4, 16))
    assert isinstance(model.model.layers[0].self_attn.q_proj, QLinear)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
