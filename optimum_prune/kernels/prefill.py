"""``SparseLinear``'s prefill paths and the measured choice between them.

Above a few token rows a 2:4 matmul is bound by arithmetic, where cuBLAS's dense schedule is hard
to beat and sparse tensor cores can do better. Two paths:

- ``expand``: the dense weight rebuilt in one pass (``triton_24.sparse24_expand``), then cuBLAS —
  no memory beyond the compressed format, about dense speed at best;
- ``cusparselt``: cuSPARSELt's 2:4 matmul (``torch._cslt_sparse_mm``) on cuSPARSELt's own packed copy
  of the 16-bit weight (≈ 1.125 more bytes per weight; its layout is private, so it cannot share
  ours), built on the layer's first prefill. Measured on an H200 (``benchmarks/KERNELS.md``) it ran at
  1.1–1.8× of dense from 4,096 token rows on five of seven Llama-3 shapes, but below dense on the
  others and at fewer rows.

Which path wins depends on the GPU, the shape and the row count, so neither a constant nor the
H200's table decides: ``fastest`` times the candidates once per linear shape, dtype and row bucket
(the next power of two), as Triton's autotuner times its configs, and every later call of that
key takes the winner. Under ``torch.compile`` or CUDA-graph capture nothing is timed: a key seen
before keeps its winner, a new one takes the first candidate.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import torch

PREFILL_PATHS = ("expand", "cusparselt")
CUSPARSELT_ROW_MULTIPLE = 16  # token rows padded to a multiple of this, as benchmarked (16-bit operands need 8)
CUSPARSELT_DIM_MULTIPLE = 16  # cuSPARSELt's 16-bit 2:4 operands: both weight dimensions multiples of 16

Timer = Callable[[Callable[[], object]], float]
CHOICES: dict[tuple, str] = {}  # (out, in, dtype, row bucket) -> the path measured fastest
_ALGORITHMS: dict[tuple, int] = {}  # (out, in, dtype, row bucket) -> cuSPARSELt's searched algorithm


def row_bucket(rows: int) -> int:
    return 1 << max(rows - 1, 0).bit_length()


def fastest(key: tuple, candidates: dict[str, Callable[[], torch.Tensor]], timer: Timer | None = None) -> torch.Tensor:
    """Run the candidate measured fastest for ``key`` (timing each with ``timer`` the first time the key
    is seen) and return its result."""
    if key not in CHOICES:
        if _tracing_or_capturing():
            return next(iter(candidates.values()))()
        timer = timer or _cuda_timer
        CHOICES[key] = min(candidates, key=lambda name: timer(candidates[name]))
    return candidates[CHOICES[key]]()


def _tracing_or_capturing() -> bool:
    return torch.compiler.is_compiling() or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def _cuda_timer(call: Callable[[], object]) -> float:
    from triton.testing import do_bench

    return do_bench(call, warmup=5, rep=20)  # milliseconds; short: it runs once per shape and row bucket


@lru_cache(maxsize=1)
def cusparselt_available() -> bool:
    """cuSPARSELt in this torch build and sparse tensor cores (compute capability 8.0+) on the GPU."""
    return (
        torch.cuda.is_available() and torch.backends.cusparselt.is_available()
        and torch.cuda.get_device_capability() >= (8, 0)
    )  # fmt: skip


def cusparselt_fits(out_features: int, in_features: int) -> bool:
    return out_features % CUSPARSELT_DIM_MULTIPLE == 0 and in_features % CUSPARSELT_DIM_MULTIPLE == 0


class CusparseltWeight:
    """cuSPARSELt's packed copy of one 2:4 weight (16-bit, on the GPU) and its matmul."""

    def __init__(self, dense: torch.Tensor) -> None:
        self.packed = torch._cslt_compress(dense)
        self.out_features, self.in_features = dense.shape
        self.dtype, self.device = dense.dtype, dense.device

    def matches(self, inputs: torch.Tensor) -> bool:
        return inputs.dtype == self.dtype and inputs.device == self.device

    def num_bytes(self) -> int:
        return self.packed.numel() * self.packed.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ Wᵀ`` for ``x`` of shape [rows, in] (the caller adds any bias)."""
        rows = x.shape[0]
        padded_rows = math.ceil(rows / CUSPARSELT_ROW_MULTIPLE) * CUSPARSELT_ROW_MULTIPLE
        if padded_rows != rows:
            x = torch.cat([x, x.new_zeros(padded_rows - rows, x.shape[1])])
        key = (self.out_features, self.in_features, self.dtype, row_bucket(rows))
        if key not in _ALGORITHMS and not _tracing_or_capturing():
            _ALGORITHMS[key] = torch._cslt_sparse_mm_search(self.packed, x.T, transpose_result=True)
        return torch._cslt_sparse_mm(self.packed, x.T, transpose_result=True, alg_id=_ALGORITHMS.get(key, 0))[:rows]
