"""The Pareto front of quality vs size, and which point wins under each size budget (both minimised)."""

from __future__ import annotations

import math
from typing import Callable, Sequence, TypeVar

Row = TypeVar("Row")


def _finite(rows: Sequence[Row], loss: Callable[[Row], float]) -> list[Row]:
    """The rows a choice may fall on: a diverged model's NaN (or infinite) perplexity compares false with
    everything (NaN was never dominated) or, at the lowest cost, stays on the front."""
    return [row for row in rows if math.isfinite(loss(row))]


def pareto_front(rows: Sequence[Row], cost: Callable[[Row], float], loss: Callable[[Row], float]) -> list[Row]:
    """The rows of finite loss no other row dominates (no larger cost and no larger loss, smaller in one), by cost.

    Rows with identical cost and loss are all kept: neither dominates the other.
    """
    rows = _finite(rows, loss)
    front = [
        row for row in rows
        if not any(
            cost(other) <= cost(row) and loss(other) <= loss(row) and (cost(other) < cost(row) or loss(other) < loss(row))
            for other in rows
        )
    ]
    return sorted(front, key=lambda row: (cost(row), loss(row)))


def best_within(rows: Sequence[Row], cost: Callable[[Row], float], loss: Callable[[Row], float], budget: float) -> Row | None:
    """The lowest-loss row whose cost fits ``budget`` (the cheaper one on a tie), or None if none fits."""
    fitting = [row for row in _finite(rows, loss) if cost(row) <= budget]
    return min(fitting, key=lambda row: (loss(row), cost(row)), default=None)
