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


def test_counting_in_two_threads_counts_each_model_exactly_and_restores_torch_pruning(monkeypatch):
    """Each count set torch-pruning's global module table and put back what it found: a count that found another's
    entries left them installed, and one whose table was put back under it hooked its linears with torch-pruning's own
    counter (a bias term per call: 131120 MACs for 131072)."""
    import threading
    import time

    from torch_pruning.utils import op_counter

    from optimum_prune.structure import counting

    first, second = tiny_model(), tiny_model(seed=1)
    alone = {id(model): counting.count_macs_per_token(model) for model in (first, second)}
    first_forward, second_hooks = threading.Event(), threading.Event()

    def paused(*_args) -> None:
        first_forward.wait(10)

    first.register_forward_pre_hook(paused)
    add_hooks = op_counter.add_flops_counting_methods

    def slow_for_the_second(model):
        if model is second:
            second_hooks.wait(10)  # its table set, its hooks not yet added
        return add_hooks(model)

    monkeypatch.setattr(op_counter, "add_flops_counting_methods", slow_for_the_second)
    counted = {}
    threads = [threading.Thread(target=lambda m=m: counted.update({id(m): counting.count_macs_per_token(m)})) for m in (first, second)]
    threads[0].start()
    time.sleep(0.2)
    threads[1].start()
    time.sleep(0.2)
    first_forward.set()  # the first count ends, putting its table back, while the second waits
    threads[0].join()
    second_hooks.set()
    threads[1].join()
    assert counted == alone
    assert op_counter.CUSTOM_MODULES_MAPPING == {}
