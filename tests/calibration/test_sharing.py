"""One input statistic for linears that read the same tensor: which share, the split when their inputs part, and
results bit for bit those of a statistic per linear."""

from __future__ import annotations

import pytest
import torch

from optimum_prune.calibration import sharing
from optimum_prune.calibration.sharing import InputsChangedInPlace, SharedStatistics
from optimum_prune.methods.sparsegpt import InputHessian


def _fed(batches: list[dict[str, torch.Tensor]], names: list[str]) -> tuple[SharedStatistics, dict[str, InputHessian]]:
    """(the shared statistics, a statistic per linear) fed the same batches of inputs per linear."""
    shared = SharedStatistics({name: InputHessian(8, torch.device("cpu")) for name in names})
    alone = {name: InputHessian(8, torch.device("cpu")) for name in names}
    for batch in batches:
        for name, inputs in batch.items():
            shared.receive(name, inputs.detach())  # a new object per call, as the runner's hook passes them
            alone[name].add(inputs)
        shared.end_batch()
    return shared, alone


def _distinct(shared: SharedStatistics) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for name, statistics in shared.statistics.items():
        groups.setdefault(id(statistics), []).append(name)
    return sorted(groups.values())


def _assert_as_alone(shared: SharedStatistics, alone: dict[str, InputHessian]) -> None:
    for name, statistics in alone.items():
        assert torch.equal(shared.statistics[name].matrix, statistics.matrix), name
        assert shared.statistics[name].samples == statistics.samples, name


def test_linears_that_read_the_same_tensor_share_one_statistic():
    batches = []
    for seed in range(3):
        hidden, attended = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(seed)).unbind()
        batches.append({"q": hidden, "k": hidden, "v": hidden, "o": attended, "copy": hidden.clone()})
    shared, alone = _fed(batches, ["q", "k", "v", "o", "copy"])
    assert _distinct(shared) == [["copy"], ["o"], ["q", "k", "v"]]  # equal values in another tensor are not shared
    assert [shared.statistics[name].users for name in ("q", "o")] == [3, 1]
    _assert_as_alone(shared, alone)


def test_linears_whose_inputs_part_split_as_they_were_before_that_batch():
    first, second, other = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(0)).unbind()
    batches = [{"a": first, "b": first, "c": first}, {"a": second, "b": other, "c": second}, {"a": other, "b": other}]
    shared, alone = _fed(batches, ["a", "b", "c"])
    assert _distinct(shared) == [["a"], ["b"], ["c"]]  # b left in batch 2, c in batch 3 (fed nothing)
    _assert_as_alone(shared, alone)


def test_a_linear_first_fed_later_joins_only_linears_first_fed_with_it():
    """Unrouted experts are fed nothing until some batch: equal so far only to others that were fed nothing."""
    first, second = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(0)).unbind()
    batches = [{"early": first}, {"early": second, "late": second, "later": second}, {"early": first, "late": first, "later": first}]
    shared, alone = _fed(batches, ["early", "late", "later", "never"])
    assert _distinct(shared) == [["early"], ["late", "later"], ["never"]]
    _assert_as_alone(shared, alone)


def test_an_input_written_in_place_after_it_was_read_stops_the_batch():
    shared = SharedStatistics({"a": InputHessian(8, torch.device("cpu"))})
    hidden = torch.randn(4, 8)
    shared.receive("a", hidden.detach())
    hidden.mul_(2)
    with pytest.raises(InputsChangedInPlace, match="a's input was written in place"):
        shared.end_batch()


def test_each_statistic_is_summed_once_and_only_where_every_process_shares_it(monkeypatch):
    """Processes may group differently: here another one has v apart from q and k."""
    hidden = torch.randn(4, 8)
    shared, _ = _fed([{"q": hidden, "k": hidden, "v": hidden, "o": torch.randn(4, 8)}], ["q", "k", "v", "o"])
    before = shared.statistics["q"].matrix.clone()

    def other_process_has_v_apart(apart: torch.Tensor) -> None:
        apart[2, :] = apart[:, 2] = 1
        apart[2, 2] = 0

    monkeypatch.setattr(sharing, "all_reduce_sum", other_process_has_v_apart)
    summed = []
    monkeypatch.setattr(InputHessian, "synchronize", lambda self: summed.append(self))
    shared.synchronize()
    assert _distinct(shared) == [["o"], ["q", "k"], ["v"]]
    assert len(summed) == 3 and len({id(s) for s in summed}) == 3
    assert torch.equal(shared.statistics["v"].matrix, before) and torch.equal(shared.statistics["q"].matrix, before)


def test_the_last_user_consumes_the_hessian_the_others_copy_it():
    hessian = InputHessian(8, torch.device("cpu"))
    hessian.add(torch.randn(4, 8))
    hessian.users = 2
    copy = hessian.take()
    assert copy is not hessian.matrix and torch.equal(copy, hessian.matrix)
    last = hessian.matrix
    assert hessian.take() is last and hessian.matrix is None
