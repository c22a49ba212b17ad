"""Sparsity targets, mask selection and verification.

Masks are chosen by index (stable sort), never by a threshold, so a layer gets exactly the
requested number of zeros even when scores tie (pre-existing zeros in GGUF-dequantised
weights tie at score 0).
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Iterable, Union

import torch
from accelerate.utils import align_module_device

from .ignoring import as_patterns, is_ignored
from .quantized import dequantized_weight, is_linear
from .wrappers import ModelLike, transformers_model, unwrapped_modules

PRUNED_SHARE = 0.01
"""Share of exact zeros from which a linear counts as already pruned (a dense checkpoint has a few, e.g. ~0.03 %
in the 4-bit GGUF SmolLM2 dequantised)."""

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` non-zero weights in every group of ``m`` consecutive input weights of a row."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if any(isinstance(value, bool) or not isinstance(value, numbers.Integral) for value in (self.n, self.m)):
            raise TypeError(f"NMPattern takes whole numbers n and m, got NMPattern({self.n!r}, {self.m!r}); parse '2:4' with NMPattern.parse")
        _check_order(self.n, self.m, f"NMPattern({self.n}, {self.m})")

    @classmethod
    def parse(cls, text: str, field: str = "sparsity") -> "NMPattern":
        """``"N:M"`` as a pattern; another text is a ``ValueError`` naming ``field``."""
        match = _PATTERN.match(text)
        if not match:
            raise ValueError(f"{field} {text!r} is not an 'N:M' pattern such as '2:4' or '4:8'")
        n, m = int(match.group(1)), int(match.group(2))
        _check_order(n, m, f"{field} {text!r}")  # named as the field gave it
        return cls(n, m)

    def check_columns(self, in_features: int) -> None:
        """Refuse a linear whose inputs do not tile into groups of M."""
        if in_features % self.m:
            raise ValueError(f"in_features={in_features} is not a multiple of M={self.m} for the {self} pattern")

    @property
    def sparsity(self) -> float:
        """The fraction of weights the pattern removes: 1 − N/M."""
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def _check_order(n: int, m: int, given: str) -> None:
    if not 0 < n < m:
        raise ValueError(f"{given} needs 0 < N < M (N weights kept out of every M)")


SparsityTarget = Union[float, NMPattern]


def normalise_sparsity(value: object, field: str) -> float | str:
    """A float in [0, 1) or a canonical ``'N:M'`` string, else an error naming ``field``."""
    if isinstance(value, NMPattern):
        return str(value)
    if isinstance(value, str):
        try:
            value = float(value)  # "0.5", as command lines and quoted YAML values give it
        except ValueError:
            if not _PATTERN.match(value):
                raise ValueError(f"{field} {value!r} is neither a fraction in [0, 1) nor an 'N:M' pattern such as '2:4'") from None
            return str(NMPattern.parse(value, field))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's floats and integers too
        raise TypeError(f"{field} must be a float in [0, 1) or an 'N:M' string, got {value!r}")
    if not 0 <= value < 1:
        percent = f" (a percentage? {value:g} % is {value / 100:g})" if 1 < value < 100 else ""
        raise ValueError(f"{field} must be in [0, 1) (fraction of weights removed), got {value}{percent}")
    return float(value) + 0.0  # -0.0 (a "-0" on a command line) is 0.0


def whole_count(value: float) -> int:
    """⌊value⌋ of a count computed in floating point, whose rounding error can fall just below a whole number
    (100 × 0.29 = 28.999999999999996, 960 × (1 − 0.55) = 431.99999999999994). The tolerance is relative, at
    rounding-error size: rounding to 6 decimals also took real fractions up (1000 × 0.9999999996 pruned whole rows)."""
    return math.floor(value * (1 + 1e-12))


def nearest_count(value: float) -> int:
    """The whole number nearest ``value``, a count of units to keep computed in floating point; an exact half
    rounds up, keeping the larger count (``round`` rounds halves to even, so the direction followed the count:
    2.5 experts kept 2, 5.5 kept 6; and 15 × (1 − 0.9) is 1.4999999999999996, a half all the same)."""
    return whole_count(value + 0.5)


def prune_lowest(scores: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """Boolean mask (True = prune) of the ``sparsity`` fraction of lowest scores; equal scores go in order of
    position, as a stable sort orders them, and NaN scores count as the largest.

    ``per_row`` compares weights within each output row (Wanda's comparison group);
    otherwise across the whole matrix (layer-wise magnitude pruning).
    """
    rows = scores if per_row else scores.reshape(1, -1)
    count = whole_count(rows.shape[1] * sparsity)
    if not count:
        return torch.zeros_like(scores, dtype=torch.bool)
    # CUDA's kthvalue selects with one thread block per row (pytorch#75599): its sort is the fast one there.
    # benchmarks/selection.py measures both.
    return (lowest_by_sort if rows.is_cuda else lowest_by_threshold)(rows, count).view_as(scores)


def lowest_by_sort(rows: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` lowest of each row, as the first entries of a stable sort."""
    lowest = torch.argsort(rows, dim=1, stable=True)[:, :count]
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(1, lowest, True)


def lowest_by_threshold(rows: torch.Tensor, count: int) -> torch.Tensor:
    """``lowest_by_sort``'s mask from a k-th value cut: O(n) where the sort is O(n log n); on a CPU 3.6–4.8× less time
    over a whole matrix and 1.9–2.3× per row (benchmarks/SELECTION.md)."""
    nan = rows.isnan()
    has_nan = bool(nan.any())
    rows = torch.where(nan, math.inf, rows) if has_nan else rows
    threshold = rows.kthvalue(count, dim=1, keepdim=True).values
    below, ties = rows < threshold, rows == threshold
    room = count - below.sum(dim=1, keepdim=True)  # how many of the ties at the threshold go
    if not has_nan and int(ties.sum()) <= rows.numel() // 16:
        return _with_first_ties(below, ties, room.squeeze(1))
    chosen = below
    for group in (ties & ~nan, ties & nan):  # first ones first; NaN after +inf, as a sort puts them
        taken = group & (group.cumsum(dim=1) <= room)
        chosen, room = chosen | taken, room - taken.sum(dim=1, keepdim=True)
    return chosen


def _with_first_ties(chosen: torch.Tensor, ties: torch.Tensor, room: torch.Tensor) -> torch.Tensor:
    """``chosen`` plus each row's first ``room`` ties, found from the ties' indices: where they are few, this spares
    the whole-matrix cumulative sums of the general case (a third of magnitude's selection time on SmolLM2)."""
    row, column = ties.nonzero(as_tuple=True)  # row-major: by row, then by position
    per_row = torch.bincount(row, minlength=chosen.shape[0])
    rank = torch.arange(row.numel(), device=row.device) - (per_row.cumsum(0) - per_row)[row]
    taken = rank < room[row]
    chosen[row[taken], column[taken]] = True
    return chosen


def prune_lowest_nm(scores: torch.Tensor, pattern: NMPattern) -> torch.Tensor:
    """Boolean mask pruning the ``m - n`` lowest scores in each group of ``m`` input columns."""
    rows, cols = scores.shape
    pattern.check_columns(cols)
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    lowest = torch.argsort(groups, dim=2, stable=True)[:, :, : pattern.m - pattern.n]
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, lowest, True)
    return mask.reshape(rows, cols)


def select_mask(scores: torch.Tensor, target: SparsityTarget, per_row: bool) -> torch.Tensor:
    if isinstance(target, NMPattern):
        return prune_lowest_nm(scores, target)
    return prune_lowest(scores, target, per_row)


def conforms_to(weight: torch.Tensor, pattern: NMPattern) -> bool:
    rows, cols = weight.shape
    if cols % pattern.m:
        return False
    nonzero = (weight.reshape(rows, cols // pattern.m, pattern.m) != 0).sum(dim=2)
    return bool((nonzero <= pattern.n).all())


def verify_sparsity(
    model: ModelLike, pattern: str | NMPattern | None = None, ignore: str | Iterable[str] = ("lm_head",)
) -> dict:
    """Measured sparsity of every linear layer's weight, and N:M conformity when ``pattern`` is given.

    Zeros are counted as they are: weights that were already exactly zero before pruning
    count too. Weights accelerate offloaded (a ``device_map`` with ``"cpu"`` or ``"disk"`` entries) are read
    one linear at a time. Through a peft wrapper, the base model's linears are counted under their own names (the
    adapters' small linears are not the model's). Quantized weights (optimum-quanto, bitsandbytes 8-bit and 4-bit, GPTQ) are counted on
    their dequantized values, so a quantizer that moves zeros shows up here. Returns ``{"overall_sparsity", "pattern", "conforming", "layers": {name: ...}}``.
    """
    if pattern is not None and not isinstance(pattern, (str, NMPattern)):
        raise TypeError(f"pattern must be an 'N:M' string or an NMPattern (None: no conformity check), got {pattern!r}; "
                        "a fraction such as 0.5 has no pattern to check")
    nm = NMPattern.parse(pattern, "pattern") if isinstance(pattern, str) else pattern
    ignored = as_patterns(ignore, "verify_sparsity ignore")
    layers: dict[str, dict] = {}
    zeros = total = 0
    for name, module in unwrapped_modules(transformers_model(model)):
        if not is_linear(module) or is_ignored(name, ignored):
            continue
        with align_module_device(module):  # an offloaded weight, loaded by its accelerate hook meanwhile
            weight = dequantized_weight(module)
            layer_zeros = int((weight == 0).sum())
            entry = {"zeros": layer_zeros, "numel": weight.numel(), "sparsity": layer_zeros / weight.numel()}
            if nm is not None:
                entry["conforming"] = conforms_to(weight, nm)
        layers[name] = entry
        zeros += layer_zeros
        total += weight.numel()
    return {
        "overall_sparsity": zeros / total if total else 0.0,
        "pattern": str(nm) if nm else None,
        "conforming": all(e["conforming"] for e in layers.values()) if nm else None,
        "layers": layers,
    }
