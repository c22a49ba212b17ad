"""How ``prune_lowest`` picks the lowest scores: a k-th value cut against a stable sort, side by side on
each device here — the measurement behind its choice (the cut on a CPU, the sort on CUDA).

Both give the same mask (checked on every shape before timing). Shapes: Llama-3-8B's MLP ``down_proj``
(4,096 × 14,336) and its attention ``o_proj`` (4,096 × 4,096), ranked over the whole matrix (magnitude's
layer comparison group) and per output row (Wanda's), and SparseGPT's 4,096 × 128 column blocks, at 50 %.
Each cell is the median of the timed calls (after one warm-up): process CPU time on the CPU (the work, whatever
else loads the machine), wall time with synchronisation on CUDA; the ratio is sort / cut (> 1: the cut is faster).

    python benchmarks/selection.py            # writes benchmarks/SELECTION.md
    python benchmarks/selection.py --quick    # quarter-size shapes, three repeats
"""

from __future__ import annotations

import statistics
import time

import torch

from common import quick_or_full, table_header
from optimum_prune.atomic_files import write_text_atomic
from optimum_prune.sparsity import lowest_by_sort, lowest_by_threshold, whole_count

SHAPES = {"down_proj": (4096, 14336), "o_proj": (4096, 4096), "SparseGPT block": (4096, 128)}


def seconds(select, rows: torch.Tensor, count: int, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up (CUDA kernels, allocator)
        clock = time.perf_counter if rows.is_cuda else time.process_time
        if rows.is_cuda:
            torch.cuda.synchronize()
        started = clock()
        select(rows, count)
        if rows.is_cuda:
            torch.cuda.synchronize()
        times.append(clock() - started)
    return statistics.median(times[1:])


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "SELECTION", "quarter-size shapes, three repeats")
    repeats, scale = (3, 4) if quick else (5, 1)
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    lines = table_header(
        "Selecting the lowest scores: k-th value cut vs stable sort",
        f"python benchmarks/selection.py{' --quick' if quick else ''}",
        f"float32 scores, 50 % selected, median of {repeats} calls (process CPU time of {torch.get_num_threads()} CPU threads; "
        f"wall time on CUDA); devices: {', '.join(devices)}"
        + (f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else "") + ".",
    )
    lines += ["| device | shape | compared | sort (ms) | cut (ms) | sort / cut |", "|---|---|---|---:|---:|---:|"]
    generator = torch.Generator().manual_seed(0)
    for device in devices:
        for name, (rows_count, columns) in SHAPES.items():
            scores = torch.rand(rows_count // scale, max(columns // scale, 128), generator=generator).to(device)
            for compared, rows in (("whole matrix", scores.reshape(1, -1)), ("per row", scores)):
                count = whole_count(rows.shape[1] * 0.5)
                assert torch.equal(lowest_by_sort(rows, count), lowest_by_threshold(rows, count)), (device, name, compared)
                sort, cut = (seconds(select, rows, count, repeats) for select in (lowest_by_sort, lowest_by_threshold))
                lines.append(f"| {device} | {name} {tuple(scores.shape)} | {compared} | {sort * 1e3:.1f} | {cut * 1e3:.1f} | {sort / cut:.2f} |")
                print(lines[-1], flush=True)
    write_text_atomic(output, "\n".join(lines) + "\n")
    print(f"-> {output}")


if __name__ == "__main__":
    main()
