"""Structured pruning of an already sparse model says when it undoes the earlier pruning: the recorded
history would otherwise imply that both steps still hold."""

import logging

import pytest

from optimum_prune import PruningConfig, prune, verify_sparsity

from ..adapters.test_moe import tiny_moe
from ..conftest import tiny_model, token_windows

UNDONE = "undid the model's earlier unstructured pruning"


@pytest.mark.parametrize(
    "structured, lost",
    [
        ({"method": "slicegpt", "sparsity": 0.25}, "lost most of their zeros"),  # rotations fill every zero
        ({"method": "low_rank", "sparsity": 0.25}, "replaced by dense linears"),  # factors in place of the projections
        ({"method": "width", "sparsity": 0.25, "method_options": {"criterion": "magnitude_l1"}}, "no longer 2:4"),
    ],
)
def test_structured_pruning_that_undoes_an_earlier_2_4_step_says_what_was_lost(structured, lost, caplog):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(**structured), calibration=token_windows())
    assert UNDONE in caplog.text and lost in caplog.text
    assert not verify_sparsity(model, "2:4")["conforming"]


def test_merging_experts_of_a_2_4_moe_says_the_pattern_is_gone_although_its_routers_were_never_2_4(caplog):
    model = tiny_moe()
    prune(model, PruningConfig(method="wanda", sparsity="2:4"), calibration=token_windows(4, 16))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="merge_experts", method_options={"num_experts": 2}), calibration=token_windows(4, 16))
    assert UNDONE in caplog.text and "no longer 2:4" in caplog.text


def test_removing_layers_or_the_sparsest_experts_keeps_what_is_left_and_says_nothing(caplog):
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    moe = tiny_moe()  # the least-routed experts pruned hardest, then removed: the rest keep their zeros
    load = {"expert_sparsity": "load", "expert_deviation": 0.2}
    prune(moe, PruningConfig(method="wanda", sparsity=0.5, moe_options=load), calibration=token_windows(8, 16))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="layers", method_options={"num_layers": 1}), calibration=token_windows())
        prune(moe, PruningConfig(method="experts", method_options={"criterion": "frequency", "num_experts": 2}), calibration=token_windows(8, 16))
    assert UNDONE not in caplog.text and verify_sparsity(model, "2:4")["conforming"]


def test_structured_pruning_of_a_model_pruned_only_structurally_says_nothing(caplog):
    model = tiny_model()
    prune(model, PruningConfig(method="layers", method_options={"num_layers": 1}), calibration=token_windows())
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="slicegpt", sparsity=0.25), calibration=token_windows())
    assert UNDONE not in caplog.text


UNDONE = "undid the model's earlier unstructured pruning"


def test_low_rank_after_a_partly_ignored_sparse_step_says_the_linears_became_dense(caplog):
    """The earlier step kept the o_proj dense (ignore): the other linears' zeros still count as earlier pruning."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.5, ignore=["*.o_proj"]))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="low_rank", sparsity=0.25), calibration=token_windows())
    assert UNDONE in caplog.text and "replaced by dense linears" in caplog.text


def test_the_latest_unstructured_step_gives_the_pattern_that_is_checked(caplog):
    """Magnitude 30 %, then 2:4: width then breaks the 2:4 groups of the last step, which is what must be said."""
    model = tiny_model()
    prune(model, PruningConfig(method="magnitude", sparsity=0.3))
    prune(model, PruningConfig(method="magnitude", sparsity="2:4"))
    with caplog.at_level(logging.WARNING, logger="optimum_prune"):
        prune(model, PruningConfig(method="width", sparsity=0.25, method_options={"criterion": "magnitude_l1"}))
    assert UNDONE in caplog.text and "no longer 2:4" in caplog.text
