"""The package ships ``py.typed``: its public annotations are a promise that users' type checkers hold it to."""

import typing

import pytest

from optimum_prune import (
    PERPConfig,
    GradualSchedule,
    IterativeSchedule,
    NMPattern,
    PruningCallback,
    PruningConfig,
    register_adapter,
    register_allocation,
    register_method,
    save_pruned,
    sparsify,
    verify_sparsity,
)
from optimum_prune.methods import register_model_method, register_structured_method


@pytest.mark.parametrize(
    "register", [register_adapter, register_method, register_structured_method, register_model_method, register_allocation]
)
def test_registering_decorators_give_back_the_class_they_are_given(register):
    """They were typed as giving the base class (or any adapter factory): pyright then saw every registered class,
    LlamaAdapter included, as the base, and a user's subclass of it as an error."""
    (argument,), result = typing.get_args(typing.get_type_hints(register)["return"])
    assert isinstance(result, typing.TypeVar) and argument is result


def test_from_pretrained_is_a_config_unless_the_unused_arguments_are_asked_for():
    """Typed as the union of both returns, ``config = PruningConfig.from_pretrained(path)`` (the README's) failed checks."""
    returns = [typing.get_type_hints(overload)["return"] for overload in typing.get_overloads(PruningConfig.from_pretrained.__func__)]
    assert returns[0] is PruningConfig and typing.get_origin(returns[1]) is tuple


def test_the_quanto_wrapper_the_readme_passes_is_a_model_argument():
    quanto = pytest.importorskip("optimum.quanto")
    for function in (verify_sparsity, sparsify):
        hints = typing.get_type_hints(function, localns={"QuantizedTransformersModel": quanto.QuantizedTransformersModel})
        assert quanto.QuantizedTransformersModel in typing.get_args(hints["model"]), function.__name__


def test_values_the_readme_documents_are_in_the_annotations():
    assert str in typing.get_args(typing.get_type_hints(PERPConfig)["target_modules"])  # "q_proj,v_proj"
    for config in (PruningConfig, GradualSchedule, IterativeSchedule):
        field = "sparsity" if config is PruningConfig else "final_sparsity"
        assert NMPattern in typing.get_args(typing.get_type_hints(config)[field]), config.__name__
    assert float in typing.get_args(typing.get_type_hints(save_pruned)["max_shard_size"])  # 1e5
    assert type(None) in typing.get_args(typing.get_type_hints(PruningCallback.on_train_begin)["model"])
