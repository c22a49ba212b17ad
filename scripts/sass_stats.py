"""Compile the 2:4 decode kernel's autotuner candidates for a CUDA target without a GPU and print, per
value format and tile, the registers, spill stack and SASS instructions per weight in the kernel's
main loop — the static cost a GPU session then times. Uses whichever Triton is importable (put the
device's version first on PYTHONPATH to see what it builds: `pip install --target DIR triton==X`).
``--mma``: the same for the sparse tensor-core kernel's variants (``sparse24_mma.cu``, built by nvcc).

    python scripts/sass_stats.py               # sm_90 (Hopper)
    python scripts/sass_stats.py --arch 80     # another compute capability
    python scripts/sass_stats.py --mma         # the mma.sp kernel (needs nvcc)
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimum_prune.kernels.mma_24 import UNROLL, WINDOW_COLUMNS, _Variant, source  # noqa: E402
from optimum_prune.kernels.triton_24 import DECODE_CONFIGS, _sparse24_decode  # noqa: E402

# Pointer types of the decode kernel's tensors per value format: values as wider words, scales / zero-points.
WORDS = {16: "*i64", 8: "*i32", 4: "*i16"}
FORMATS = ((16, False), (8, False), (4, False), (4, True))
ADDRESS = re.compile(r"/\*([0-9a-f]{4,})\*/")


def compiled(bits: int, zero_points: bool, rows: int, config: triton.Config, arch: int):
    pointers = {"x_ptr": "*i32", "values_ptr": WORDS[bits], "metadata_ptr": "*u8", "scales_ptr": "*bf16" if bits != 16 else WORDS[bits],
                "zeros_ptr": "*i8" if zero_points else WORDS[bits], "out_ptr": "*bf16"}  # fmt: skip
    constants = {"BITS": bits, "GROUP_SIZE": 128 if bits != 16 else 1, "HAS_ZEROS": zero_points, "DTYPE": tl.bfloat16,
                 "ROWS": rows, "EVEN_K": True, **config.kwargs}  # fmt: skip
    signature = {name: pointers.get(name, "constexpr" if name in constants else "i32") for name in _sparse24_decode.arg_names}
    source = ASTSource(fn=_sparse24_decode, signature=signature, constexprs=constants)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def statistics(cubin: bytes, holding: str = "") -> tuple[str, int]:
    """(cuobjdump's resource line, instructions in a loop) of a cubin: the last backward branch's loop,
    or the largest loop whose body holds an instruction starting with ``holding``."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", file.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tools / "cuobjdump", "-sass", file.name], capture_output=True, text=True, check=True).stdout
    instructions = [(int(address.group(1), 16), line) for line in sass.splitlines() if (address := ADDRESS.search(line))]
    loop = 0
    for end, line in instructions:
        branch = re.search(r"BRA\s+0x([0-9a-f]+)", line)
        if branch and int(branch.group(1), 16) < end:
            start = int(branch.group(1), 16)
            body = [text for at, text in instructions if start <= at <= end]
            if not holding or any(re.search(rf"\s{holding}", text) for text in body):
                loop = max(loop, len(body)) if holding else len(body)
    resources = re.search(r"REG:\d+ STACK:\d+", usage)
    return resources.group(0) if resources else "?", loop


def mma_table(arch: int) -> None:
    """Per mma.sp variant (bf16): registers / stack and loop instructions per weight and thread."""
    print(f"nvcc, sm_{arch}, bf16")
    print("| values | 8-token tiles | warps | registers / stack | loop instructions per weight |")
    print("|---|---:|---:|---|---:|")
    for bits, zero_points in ((16, False), (8, False), (4, False), (4, True)):
        for tiles in (1, 2, 8):
            for warps in (4, 8):
                with tempfile.TemporaryDirectory() as folder:
                    text, cubin = Path(folder) / "kernel.cu", Path(folder) / "kernel.cubin"
                    text.write_text(source(_Variant(torch.bfloat16, bits, zero_points, tiles), warps))
                    subprocess.run(["nvcc", f"-arch=sm_{arch}", "-cubin", "-o", cubin, text], check=True)
                    resources, loop = statistics(cubin.read_bytes(), holding="HMMA")
                weights = UNROLL * WINDOW_COLUMNS[bits] * 16 / 32  # a trip: UNROLL windows of 16 rows, per thread
                name = {16: "16-bit", 8: "int8", 4: "int4"}[bits] + (" zp" if zero_points else "")
                print(f"| {name} | {tiles} | {warps} | {resources} | {loop / weights:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability × 10 (default 90: Hopper)")
    parser.add_argument("--rows", type=int, default=1, help="token rows (the kernel's ROWS, a power of 2)")
    parser.add_argument("--mma", action="store_true", help="the mma.sp kernel's variants instead (needs nvcc)")
    args = parser.parse_args()
    if args.mma:
        mma_table(args.arch)
        return
    print(f"Triton {triton.__version__}, sm_{args.arch}, {args.rows} token row(s)")
    print("| values | BLOCK_N | BLOCK_K | warps | stages | registers / stack | loop instructions per weight |")
    print("|---|---:|---:|---:|---:|---|---:|")
    for bits, zero_points in FORMATS:
        for config in DECODE_CONFIGS:
            kernel = compiled(bits, zero_points, args.rows, config, args.arch)
            resources, loop = statistics(kernel.asm["cubin"])
            weights = config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"] / (32 * config.num_warps)  # per thread per trip
            name = {16: "16-bit", 8: "int8", 4: "int4"}[bits] + (" zp" if zero_points else "")
            print(f"| {name} | {config.kwargs['BLOCK_N']} | {config.kwargs['BLOCK_K']} | {config.num_warps} | {config.num_stages} | "
                  f"{resources} | {loop / weights:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
