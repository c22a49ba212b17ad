"""2:4 linear layers on a CUDA GPU: dense cuBLAS against every sparse path, side by side, per
token count M — the measurements ``SparseLinear``'s dispatch thresholds are to come from.

For each Llama-3-8B linear shape and each M, one bf16 2:4 weight (random, the two largest of
every four kept) is timed as

- ``dense``: ``F.linear`` on the same weight stored densely (cuBLAS), the reference for every ratio;
- ``triton``, ``triton int8``, ``triton int4``: ``optimum_prune``'s kernel on the compressed format
  (16-bit values; int8 / int4 values with group-128 scales);
- ``semi-structured``: ``torch.sparse.to_sparse_semi_structured`` + ``F.linear`` (what PyTorch offers);
- ``cuSPARSELt``: ``torch._cslt_sparse_mm`` with the algorithm chosen by ``torch._cslt_sparse_mm_search``
  for this shape (inputs padded to 16 rows outside the timed call).

Each cell is dense time / path time (> 1: faster than dense), median of ``triton.testing.do_bench``;
a path that fails for a shape shows why. Every path's output is checked against the dense product
first (quantized paths against their own dequantized weight). The bytes ceiling of decode is dense
bytes / compressed bytes (1.78× for 16-bit values, ≈ 5× for int4 with fp32 scales).

    python benchmarks/kernels.py            # writes benchmarks/KERNELS.md
    python benchmarks/kernels.py --quick    # two shapes, four token counts
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch.nn import functional as F

from common import quick_or_full, table_header
from optimum_prune.kernels import compress, decompress
from optimum_prune.sparsity import NMPattern, prune_lowest_nm

SHAPES = {  # (out, in) of Llama-3-8B's linears
    "q_proj / o_proj": (4096, 4096),
    "k_proj / v_proj": (1024, 4096),
    "gate_proj / up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 8192)
QUICK_SHAPES, QUICK_TOKENS = ("q_proj / o_proj", "gate_proj / up_proj"), (1, 16, 256, 4096)
PATHS = ("triton", "triton int8", "triton int4", "semi-structured", "cuSPARSELt")


def weight_24(out_features: int, in_features: int) -> torch.Tensor:
    weight = torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16)
    weight[prune_lowest_nm(weight.float().abs(), NMPattern(2, 4))] = 0
    return weight


def sparse_paths(weight: torch.Tensor) -> dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]]:
    """Per path: (the call on inputs [M, in], the dense weight it must reproduce)."""
    from optimum_prune.kernels.triton_24 import sparse24_matmul

    paths = {}
    for name, bits in (("triton", None), ("triton int8", 8), ("triton int4", 4)):
        compressed = compress(weight, bits=bits, group_size=128)
        paths[name] = (lambda x, c=compressed: sparse24_matmul(x, c)), decompress(compressed).to(weight.dtype)
    semi = torch.sparse.to_sparse_semi_structured(weight)
    paths["semi-structured"] = (lambda x: F.linear(x, semi)), weight
    packed = torch._cslt_compress(weight)
    algorithms: dict[int, int] = {}

    def cusparselt(x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows not in algorithms:
            algorithms[rows] = torch._cslt_sparse_mm_search(packed, x.T, transpose_result=True)
        return torch._cslt_sparse_mm(packed, x.T, transpose_result=True, alg_id=algorithms[rows])

    paths["cuSPARSELt"] = cusparselt, weight
    return paths


def padded(x: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    rows = -(-x.shape[0] // multiple) * multiple
    return x if rows == x.shape[0] else torch.cat([x, x.new_zeros(rows - x.shape[0], x.shape[1])])


def measure(shapes: list[str], tokens: tuple[int, ...]) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for shape in shapes:
        out_features, in_features = SHAPES[shape]
        weight = weight_24(out_features, in_features)
        try:
            paths = sparse_paths(weight)
        except RuntimeError as error:  # e.g. a torch build without cuSPARSELt
            raise SystemExit(f"cannot build the sparse paths for {shape}: {error}") from None
        for m in tokens:
            x = torch.randn(m, in_features, device="cuda", dtype=torch.bfloat16)
            dense_ms = do_bench(lambda: F.linear(x, weight))
            row = {"shape": shape, "tokens": m, "dense_ms": dense_ms}
            for name, (call, reference) in paths.items():
                inputs = padded(x) if name == "cuSPARSELt" else x
                try:
                    result = call(inputs)[:m]
                    expected = F.linear(x, reference)
                    error = float((result.float() - expected.float()).norm() / expected.float().norm())
                    if error > 2e-2:
                        row[name] = f"wrong (relative error {error:.1e})"
                        continue
                    row[name] = dense_ms / do_bench(lambda: call(inputs))
                except (RuntimeError, ValueError) as failure:
                    row[name] = f"fails: {str(failure).splitlines()[0][:60]}"
            rows.append(row)
            print(row, flush=True)
    return rows


def crossover(rows: list[dict], shape: str) -> str:
    """The smallest M from which cuSPARSELt beats the Triton kernel (the dispatch threshold), if any."""
    for row in rows:
        if row["shape"] == shape and all(isinstance(row[p], float) for p in ("triton", "cuSPARSELt")):
            if row["cuSPARSELt"] > row["triton"]:
                return str(row["tokens"])
    return "never"


def cell(value: float | str) -> str:
    return f"{value:.2f}×" if isinstance(value, float) else value


def markdown(rows: list[dict], command: str) -> str:
    lines = table_header(
        "2:4 linear layers on a GPU: speed-up over dense cuBLAS (bf16)", command,
        "Each cell: dense `F.linear` time / the path's time for the same 2:4 weight and M input tokens "
        "(median of `triton.testing.do_bench`); every path's output is first checked against the dense product. "
        f"Device: {torch.cuda.get_device_name()}.",
    )  # fmt: skip
    lines += ["| shape (out × in) | M | dense (ms) | " + " | ".join(PATHS) + " |", "|---|---:|---:|" + "---:|" * len(PATHS)]
    for row in rows:
        out_features, in_features = SHAPES[row["shape"]]
        lines.append(
            f"| {row['shape']} ({out_features} × {in_features}) | {row['tokens']} | {row['dense_ms']:.4f} | "
            + " | ".join(cell(row[p]) for p in PATHS) + " |"
        )
    lines += ["", "Smallest M from which cuSPARSELt is faster than the Triton kernel:", ""]
    lines += [f"- {shape}: {crossover(rows, shape)}" for shape in dict.fromkeys(row["shape"] for row in rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    quick, output = quick_or_full(__doc__.splitlines()[0], "KERNELS", "two shapes and four token counts")
    if not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py times GPU kernels: it needs a CUDA device (none is available here)")
    shapes, tokens = (list(QUICK_SHAPES), QUICK_TOKENS) if quick else (list(SHAPES), TOKENS)
    table = markdown(measure(shapes, tokens), "python benchmarks/kernels.py" + (" --quick" if quick else ""))
    output.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
