"""Sparsity schedules for pruning while training (``PruningCallback``): when to prune and to what.

``GradualSchedule`` follows the cubic schedule of Zhu & Gupta (2017), ``IterativeSchedule`` the prune-retrain
rounds of Han et al. (2015). Both are frozen dataclasses: a run resolves its open ends (``end_step=None``,
``retrain_steps=None``) against the Trainer's ``max_steps`` with ``resolved``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, replace

from .options import as_option_type
from .sparsity import NMPattern, SparsityTarget, normalise_sparsity

logger = logging.getLogger(__name__)
SCORES = ("magnitude", "wanda")


class _SparsitySchedule:
    """What ``PruningCallback`` asks a schedule: when to prune, to what, and how to score weights."""

    final_sparsity: float | str | NMPattern
    score: str

    def _check_target_and_score(self, steps: tuple[str, ...]) -> None:
        """The target normalised, the score known, and the ``steps`` fields whole numbers (``iterations=2.5`` was
        accepted and made fractional retraining steps; ``every="10"`` failed comparing str with int)."""
        name = type(self).__name__
        object.__setattr__(self, "final_sparsity", normalise_sparsity(self.final_sparsity, f"{name}.final_sparsity"))
        if self.score not in SCORES:
            raise ValueError(f"{name}.score {self.score!r} is not one of {', '.join(SCORES)}")
        optional = {spec.name for spec in dataclasses.fields(self) if spec.default is None}  # end_step, retrain_steps
        for field in steps:
            object.__setattr__(self, field, as_option_type(getattr(self, field), int, field in optional, f"{name}.{field}"))

    @property
    def final_target(self) -> SparsityTarget:
        return NMPattern.parse(self.final_sparsity) if isinstance(self.final_sparsity, str) else self.final_sparsity

    @property
    def final_fraction(self) -> float:
        final = self.final_target
        return final.sparsity if isinstance(final, NMPattern) else final

    def sparsity_at(self, step: int) -> float:
        raise NotImplementedError

    def last_pruning_step(self) -> int:
        """The step of the schedule's last pruning (resolved schedules)."""
        raise NotImplementedError

    def check_fits(self, max_steps: int) -> None:
        """Warn when a run of ``max_steps`` ends before the schedule does (it would stop short of its final sparsity,
        or prune at the run's last step, leaving nothing to retrain after it)."""
        name, last = type(self).__name__, self.last_pruning_step()
        if last > max_steps:
            steps = [step for step in range(max_steps + 1) if self.prunes_at(step)]  # the ones the run reaches
            reached = self.target_at(steps[-1]) if steps else 0.0
            logger.warning(
                "%s prunes until step %d, past the run's %d steps: the run ends at %s, not %s; end the schedule "
                "earlier or train longer", name, last, max_steps,
                f"sparsity {reached:.4g}" if isinstance(reached, float) else reached, self.final_sparsity,
            )  # fmt: skip
        elif last == max_steps:
            logger.warning(
                "%s's last pruning is at step %d, the run's last: no training step follows it to recover; end the "
                "schedule earlier or train longer", name, last,
            )  # fmt: skip

    def target_at(self, step: int) -> SparsityTarget:
        """The sparsity (or N:M pattern) to prune to at ``step``.

        For an N:M final target the schedule passes through the patterns with the same M
        (e.g. 4:4 → 3:4 → 2:4), ``N = M − ⌊s(t)·M⌋``.
        """
        sparsity = self.sparsity_at(step)
        final = self.final_target
        if isinstance(final, NMPattern):
            kept = max(final.n, final.m - math.floor(sparsity * final.m + 1e-9))
            return NMPattern(kept, final.m) if kept < final.m else 0.0
        return sparsity


@dataclass(frozen=True)
class GradualSchedule(_SparsitySchedule):
    """Cubic sparsity schedule (Zhu & Gupta 2017, Eq. 1) with pruning every ``every`` steps.

    s(t) = s_f + (s_i − s_f) · (1 − (t − start) / (end − start))³ for start ≤ t ≤ end.
    ``final_sparsity`` may be an ``'N:M'`` pattern (see ``target_at``). ``end_step=None``
    ends pruning after two thirds of the run, leaving the last third to recover.
    ``score`` is ``'magnitude'`` (|W| across each matrix) or ``'wanda'`` (|W| · ‖X_j‖₂ within each
    output row, X from the training batches).
    """

    final_sparsity: float | str | NMPattern
    initial_sparsity: float = 0.0
    start_step: int = 0
    end_step: int | None = None
    every: int = 100
    score: str = "magnitude"

    def __post_init__(self) -> None:
        self._check_target_and_score(("start_step", "end_step", "every"))
        if not 0.0 <= self.initial_sparsity <= self.final_fraction:
            raise ValueError(
                f"GradualSchedule.initial_sparsity {self.initial_sparsity} must be in [0, final sparsity {self.final_fraction}]"
            )
        if self.every <= 0 or self.start_step < 0:
            raise ValueError(f"GradualSchedule.every must be > 0 and start_step >= 0, got {self.every} and {self.start_step}")
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"GradualSchedule.end_step {self.end_step} must be after start_step {self.start_step}")

    def resolved(self, max_steps: int) -> "GradualSchedule":
        """This schedule with ``end_step`` filled in for a run of ``max_steps``."""
        if self.end_step is not None:
            return self
        return replace(self, end_step=max(self.start_step + 1, (2 * max_steps) // 3))

    @property
    def _end_step(self) -> int:
        if self.end_step is None:
            raise ValueError("GradualSchedule.end_step is unset; call resolved(max_steps) first")
        return self.end_step

    def sparsity_at(self, step: int) -> float:
        end_step = self._end_step
        if step <= self.start_step:
            return self.initial_sparsity
        progress = min(1.0, (step - self.start_step) / (end_step - self.start_step))
        return self.final_fraction + (self.initial_sparsity - self.final_fraction) * (1.0 - progress) ** 3

    def prunes_at(self, step: int) -> bool:
        end_step = self._end_step
        return self.start_step <= step <= end_step and ((step - self.start_step) % self.every == 0 or step == end_step)

    def last_pruning_step(self) -> int:
        return self._end_step


@dataclass(frozen=True)
class IterativeSchedule(_SparsitySchedule):
    """Iterative pruning and retraining (Han et al. 2015, "Learning both Weights and Connections", Sec. 3.3).

    ``iterations`` rounds, each pruning then retraining ``retrain_steps`` steps; every round
    removes the same fraction of the weights still left, so after round k (1-based) the sparsity is
    s_k = 1 − (1 − s_f)^{k/K}, and the last round's retraining is the final recovery. Han et al.
    prune below a per-layer threshold (a multiple of the layer's weight std) and retrain with the
    zeros frozen; here each round prunes every linear to s_k by magnitude (or the Wanda score), and
    ``PruningCallback`` freezes the zeros. ``retrain_steps=None`` splits the run after
    ``start_step`` into ``iterations`` equal rounds.
    """

    final_sparsity: float | str | NMPattern
    iterations: int = 4
    retrain_steps: int | None = None
    start_step: int = 0
    score: str = "magnitude"

    def __post_init__(self) -> None:
        self._check_target_and_score(("iterations", "retrain_steps", "start_step"))
        if self.iterations <= 0 or self.start_step < 0:
            raise ValueError(
                f"IterativeSchedule.iterations must be > 0 and start_step >= 0, got {self.iterations} and {self.start_step}"
            )
        if self.retrain_steps is not None and self.retrain_steps <= 0:
            raise ValueError(f"IterativeSchedule.retrain_steps must be > 0, got {self.retrain_steps}")

    def resolved(self, max_steps: int) -> "IterativeSchedule":
        """This schedule with ``retrain_steps`` filled in for a run of ``max_steps``."""
        if self.retrain_steps is not None:
            return self
        rounds = (max_steps - self.start_step) // self.iterations
        if rounds < 1:
            raise ValueError(
                f"IterativeSchedule: {max_steps} training steps leave no retraining between {self.iterations} "
                f"pruning rounds after step {self.start_step}; train longer or lower iterations"
            )
        return replace(self, retrain_steps=rounds)

    @property
    def _retrain_steps(self) -> int:
        if self.retrain_steps is None:
            raise ValueError("IterativeSchedule.retrain_steps is unset; call resolved(max_steps) first")
        return self.retrain_steps

    def _round(self, step: int) -> int:
        """Rounds started by ``step`` (0 before the first)."""
        retrain_steps = self._retrain_steps
        if step < self.start_step:
            return 0
        return min(self.iterations, (step - self.start_step) // retrain_steps + 1)

    def sparsity_at(self, step: int) -> float:
        return 1.0 - (1.0 - self.final_fraction) ** (self._round(step) / self.iterations)

    def prunes_at(self, step: int) -> bool:
        offset, retrain_steps = step - self.start_step, self._retrain_steps
        return offset >= 0 and offset % retrain_steps == 0 and offset // retrain_steps < self.iterations

    def last_pruning_step(self) -> int:
        return self.start_step + (self.iterations - 1) * self._retrain_steps
