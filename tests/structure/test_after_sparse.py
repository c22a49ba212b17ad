"""Structured pruning of an already sparse model says when it undoes the earlier pruning: the recorded
history would otherwise imply that both steps still hold."""

import logging

import pytest

from optimum_prune import PruningConfig, prune, verify_sparsity

from ..conftest import tiny_model, token_windows

UNDONE = "undid the model's earlier unstructured pruning"


@pytest.mark.parametrize(
    "structured, lost",
    [
        ({"method": "slicegpt", "sparsity": 0.25}, "linear sparsity"),  # rotations fill every zero
        ({"method": "width", "sparsity": 0.25, "method_options": {"criterion": "magnitude_l1"}}, "the 2:4 pattern no longer holds"),
    ],
)
def test_structured_pruning_that_undoes_an_earlier_2_4_step_says_what_was_lost(structured, lost, caplog):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(**structured), calibration=token_windows())
    assert UNDONE in caplog.text and lost in caplog.text
    assert not verify_sparsity(model, "2:4")["conforming"]


def test_removing_layers_keeps_the_earlier_zeros_and_says_nothing(caplog):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="layers", method_options={"num_layers": 1}), calibration=token_windows())
    assert UNDONE not in caplog.text and verify_sparsity(model, "2:4")["conforming"]


def test_structured_pruning_of_a_dense_model_says_nothing(caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(tiny_model(), PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    assert UNDONE not in caplog.text
