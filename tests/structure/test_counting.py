import copy

import pytest
import torch

from optimum_prune.structure.counting import count_macs_per_token

from ..conftest import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_macs_are_the_linears_in_times_out_without_copying_or_changing_the_model(monkeypatch, family):
    """Qwen2's attention biases: Torch-Pruning's hook adds one bias term per call, which came out as out / 8 per token."""
    model = tiny_model(family)
    expected = sum(linear.in_features * linear.out_features for linear in model.modules() if isinstance(linear, torch.nn.Linear))
    attributes = {module: dict(vars(module)) for module in model.modules()}
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    def refuse_copy(_obj, _memo=None):
        raise AssertionError("the counter copied the model")

    monkeypatch.setattr(copy, "deepcopy", refuse_copy)
    model.train()
    assert count_macs_per_token(model) == expected
    assert model.training
    for module in model.modules():  # no hook, handle or counter variable left behind
        assert vars(module).keys() == attributes[module].keys(), type(module).__name__
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(torch.equal(tensor, state[name]) for name, tensor in model.state_dict().items())


def test_counting_leaves_an_eval_model_in_eval_mode():
    """Counting runs a forward in eval mode and restores the caller's mode (eval here)."""
    model = tiny_model().eval()
    count_macs_per_token(model)
    assert not model.training and not any(module.training for module in model.modules())
