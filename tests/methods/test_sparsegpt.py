import pytest
import torch

from optimum_prune.methods.magnitude import MagnitudeOptions, MagnitudePruner
from optimum_prune.methods.sparsegpt import SparseGPTOptions, SparseGPTPruner
from optimum_prune.sparsity import NMPattern, conforms_to


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
