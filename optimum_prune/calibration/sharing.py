"""One statistic for the linears of a layer that read the same tensor.

In a Llama layer q/k/v_proj read one tensor and gate/up_proj another: a statistic that depends on the inputs
alone (SparseGPT's Hessian, in_features² floats) is then the same for each, and accumulating it once saves
memory and matmuls. Which linears share is decided from the tensors themselves, batch by batch, never from
module names: two inputs are the same tensor when they view the same memory the same way and neither was
written in between (``tensor_identity``), which the layer's forward decides — a hook that copies a module's inputs gives
each linear its own tensor and its own statistic, while the runner's scaling by routing weight gives an expert's
linears that read one tensor one scaled tensor (``ExpertRouting.scale``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Hashable, Self

import torch

from ..distributed import all_reduce_sum
from ..tensors import tensor_identity


class InputStatistics(ABC):
    """What a ``LayerPruner`` accumulates from its linear's inputs alone (not its weights or seed): linears fed the
    same tensors may hold one object (``LayerPruner.statistics``)."""

    # The pruners that read this object when they prune: all but the last must leave it as it is.
    users: int = 1

    @abstractmethod
    def add(self, inputs: torch.Tensor) -> None:
        """Accumulate one batch of inputs (``[..., in_features]``)."""

    @abstractmethod
    def synchronize(self) -> None:
        """Sum over all processes (multi-process calibration)."""

    @abstractmethod
    def clone(self) -> Self:
        """An independent copy, for a linear that stops sharing."""

    def release(self) -> bool:
        """One user is done reading: True for the last, which may then consume the statistic in place."""
        self.users -= 1
        return self.users == 0


class InputsChangedInPlace(RuntimeError):
    """A linear's input was written in place after the linear read it, before the batch ended: what it read is gone,
    so the statistics of that batch cannot be taken from it (the runner then feeds each linear on its own)."""


class SharedStatistics:
    """Feeds a layer's linears' ``InputStatistics`` batch by batch, one object for linears that received the same
    tensors (in the same order) in every batch so far.

    Copy on write: linears that shared so far and receive different tensors in a batch are split, each taking
    the statistic as it was before that batch. Since which linears receive what is known only when the batch
    ends, a batch's inputs are held until ``end_batch`` (at most one layer forward's), except for a linear already
    alone with its statistic, which is fed at once. Results are bit for bit those of separate statistics: every
    object sees exactly the tensors, in the order, that each of its linears received.
    """

    def __init__(self, statistics: dict[str, InputStatistics]) -> None:
        self.statistics = dict(statistics)
        self._fresh = set(statistics)  # fed nothing yet: may still join others first fed the same tensors
        self._alone: set[str] = set()  # fed, and nobody shares its statistic: fed at once
        self._pending: dict[str, list[tuple[torch.Tensor, Hashable]]] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.statistics

    def receive(self, name: str, inputs: torch.Tensor) -> None:
        if name in self._alone:
            self.statistics[name].add(inputs)
        else:
            self._pending.setdefault(name, []).append((inputs, tensor_identity(inputs)))

    def end_batch(self) -> None:
        """Regroup by what each linear received in the batch that just ran, then accumulate it once per group."""
        pending, self._pending = self._pending, {}
        for name, received in pending.items():
            for inputs, identity in received:
                if inputs._version != identity[-1]:
                    raise InputsChangedInPlace(f"{name}'s input was written in place after {name} read it")
        groups: dict[tuple[Hashable, ...], list[str]] = {}
        for name in self.statistics:
            if name in self._alone or (name in self._fresh and name not in pending):
                continue
            sequence = tuple(identity for _, identity in pending.get(name, ()))
            owner = "fresh" if name in self._fresh else id(self.statistics[name])
            groups.setdefault((owner, sequence), []).append(name)
        kept: set[int] = set()
        fed = []
        for (owner, _), names in groups.items():  # all copies first: each as it was before this batch
            statistics = self.statistics[names[0]]
            if owner != "fresh" and id(statistics) in kept:
                statistics = statistics.clone()
            kept.add(id(statistics))
            for name in names:
                self.statistics[name] = statistics
            self._fresh.difference_update(names)
            fed.append((statistics, pending.get(names[0], ())))
        for statistics, received in fed:
            for inputs, _ in received:
                statistics.add(inputs)
        self._update_users()

    def synchronize(self) -> None:
        """Sum each statistic over all processes once. Processes may have grouped differently (a split seen on
        one only): linears share from here on only where they share on every process, so that each reduces the
        same statistics in the same order."""
        names = list(self.statistics)
        apart = torch.tensor([[float(self.statistics[a] is not self.statistics[b]) for b in names] for a in names])
        all_reduce_sum(apart)
        kept: set[int] = set()
        for index, name in enumerate(names):
            group = (apart[index] == 0).nonzero().flatten().tolist()
            if group[0] != index:
                continue  # a later member of a group already regrouped
            statistics = self.statistics[name]
            if id(statistics) in kept:
                statistics = statistics.clone()
            kept.add(id(statistics))
            for member in group:
                self.statistics[names[member]] = statistics
        for statistics in {id(s): s for s in self.statistics.values()}.values():
            statistics.synchronize()
        self._update_users()

    def _update_users(self) -> None:
        users = Counter(id(statistics) for statistics in self.statistics.values())
        self._alone = set()
        for name, statistics in self.statistics.items():
            statistics.users = users[id(statistics)]
            if statistics.users == 1 and name not in self._fresh:
                self._alone.add(name)
