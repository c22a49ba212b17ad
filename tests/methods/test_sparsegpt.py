import logging

import pytest
import torch

from optimum_prune import PruningConfig, prune
from optimum_prune.methods.magnitude import MagnitudeOptions, MagnitudePruner
from optimum_prune.methods.sparsegpt import SparseGPTOptions, SparseGPTPruner
from optimum_prune.sparsity import NMPattern, conforms_to

from ..conftest import tiny_model, token_windows


def _correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    scales = torch.logspace(-1, 1, features)
    return torch.randn(tokens, features, generator=generator) @ mixing * scales


@pytest.mark.parametrize("target", [0.5, NMPattern(2, 4), 0.7])
def test_reconstruction_error_below_magnitude(target):
    torch.manual_seed(0)
    dense = torch.nn.Linear(64, 32, bias=False)
    X = _correlated_inputs(512, 64)
    reference = dense(X).detach()

    errors = {}
    for name, pruner_cls, options in (
        ("sparsegpt", SparseGPTPruner, SparseGPTOptions(block_size=16)),
        ("magnitude", MagnitudePruner, MagnitudeOptions()),
    ):
        linear = torch.nn.Linear(64, 32, bias=False)
        linear.load_state_dict(dense.state_dict())
        pruner = pruner_cls(linear, options)
        pruner.add_batch(X.reshape(4, 128, 64))
        pruner.prune(target)
        fraction = target.sparsity if isinstance(target, NMPattern) else target
        # SparseGPT picks its mask per 16-column block, so truncation may cost one weight per block.
        assert 0 <= int(linear.weight.numel() * fraction) - int((linear.weight == 0).sum()) <= 64 // 16
        if isinstance(target, NMPattern):
            assert conforms_to(linear.weight, target)
        errors[name] = (linear(X) - reference).norm().item()
    assert errors["sparsegpt"] < errors["magnitude"], errors


def test_nm_needs_block_multiple():
    linear = torch.nn.Linear(64, 8, bias=False)
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=6))
    pruner.add_batch(torch.randn(16, 64))
    with pytest.raises(ValueError, match="block_size \\(6\\) to be a multiple of 4"):
        pruner.prune(NMPattern(2, 4))


def test_dead_inputs_are_zeroed():
    """With nothing to prune by saliency, only the never-active input's column goes."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 4, bias=False)
    X = torch.randn(32, 8)
    X[:, 3] = 0  # a feature never active: its Hessian row is zero
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=4))
    pruner.add_batch(X)
    pruner.prune(0.0)
    zero = linear.weight == 0
    assert bool(zero[:, 3].all()) and not zero[:, [0, 1, 2, 4, 5, 6, 7]].any()


def _pruned_again(target, keep_zeros: bool, earlier: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(earlier zeros, weight, revived zeros counted) of a linear magnitude-pruned to ``earlier``, then pruned by
    SparseGPT to ``target``."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    MagnitudePruner(linear, MagnitudeOptions()).prune(earlier)
    zeros = linear.weight.detach() == 0
    pruner = SparseGPTPruner(linear, SparseGPTOptions(block_size=16, keep_zeros=keep_zeros))
    pruner.add_batch(_correlated_inputs(512, 64).reshape(4, 128, 64))
    pruner.prune(target)
    return zeros, linear.weight.detach(), pruner.revived_zeros


@pytest.mark.parametrize("target", [NMPattern(2, 4), 0.6, 0.3])
def test_keep_zeros_keeps_an_already_pruned_linear_s_zeros_pruned(target):
    zeros, weight, revived = _pruned_again(target, keep_zeros=True)
    assert (weight[zeros] == 0).all() and revived == 0
    if isinstance(target, NMPattern):
        assert conforms_to(weight, target)
    else:  # the target fraction at least, per 16-column block (one weight of rounding per block)
        assert int((weight == 0).sum()) >= int(weight.numel() * max(target, 0.5)) - 64 // 16


def test_without_keep_zeros_the_update_revives_earlier_zeros_and_counts_them():
    zeros, weight, revived = _pruned_again(NMPattern(2, 4), keep_zeros=False)
    assert revived == int((weight[zeros] != 0).sum()) > 0  # the paper's algorithm: the mask is chosen among all weights


def test_every_run_that_revives_zeros_says_so_once(caplog):
    """Python's warnings module showed the warning in the first run of a process only, and per linear there."""
    messages = []
    for seed in (0, 1):
        model = tiny_model(seed=seed)
        prune(model, PruningConfig(method="magnitude", sparsity=0.5))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="optimum_prune"):
            report = prune(model, PruningConfig(method="sparsegpt", sparsity="2:4"), calibration=token_windows(4, 32))
        messages.append([record.getMessage() for record in caplog.records if "keep_zeros" in record.getMessage()])
        assert len(report.revived_zeros) == len(report.linears)
        assert messages[-1] == [
            f"sparsegpt: the model was already sparse (pruned before, or a quantizer's exact zeros), and the update made "
            f"{sum(report.revived_zeros.values()):,} of its zeros non-zero again in {len(report.linears)} linears "
            "(PruningReport.revived_zeros); set method_options.keep_zeros=True to keep them pruned"
        ]


def test_a_dense_linear_with_a_few_exact_zeros_is_not_taken_for_a_pruned_one():
    assert _pruned_again(NMPattern(2, 4), keep_zeros=False, earlier=0.005)[2] == 0
