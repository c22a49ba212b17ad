import copy

import torch
import torch_pruning as tp

from optimum_prune.structure.counting import count_macs_per_token

from ..conftest import tiny_model


def test_macs_are_torch_prunings_count_without_copying_or_changing_the_model(monkeypatch):
    model = tiny_model()
    expected = tp.utils.count_ops_and_params(model, torch.zeros(1, 8, dtype=torch.long))[0] // 8
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
