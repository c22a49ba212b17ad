"""Pruning × quantization study: sweep a grid, cache every point, draw the Pareto front (``optimum-prune study``)."""

from .grid import Protocol, StudyGrid, StudyPoint
from .outputs import plot_pareto, plot_redundancy, write_outputs
from .pareto import best_within, pareto_front
from .runner import StudyResults, StudyRow, run_study

__all__ = [
    "Protocol",
    "StudyGrid",
    "StudyPoint",
    "StudyResults",
    "StudyRow",
    "best_within",
    "pareto_front",
    "plot_pareto",
    "plot_redundancy",
    "run_study",
    "write_outputs",
]
