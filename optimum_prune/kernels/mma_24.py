"""The 2:4 decode path on sparse tensor cores: ``sparse24_mma.cu`` (``mma.sp`` m16n8k32, compute
capability 8.0+), compiled for the GPU at hand on first use by NVRTC (``nvrtc.py``): nothing to
build at install time, nothing needed beyond a CUDA build of torch.

Why tensor cores for decode, which is bound by bytes rather than arithmetic: on CUDA cores every
kept value costs instructions (``triton_24``'s decode kernel compiles to 6–7 per weight, about
what the H200 can issue at its memory bandwidth; int4's 0.39 bytes per weight leave room for
fewer than 3), while one ``mma.sp`` consumes 512 weights of a warp for up to 8 token rows, leaving
the loop with wide loads of the format as stored (no repacked copy), the metadata's regrouping and,
for int8 / int4, turning codes into 16-bit values by bit placement and one add (the scale is
applied to each window's sums). Compiled for sm_90 (``scripts/sass_stats.py --mma``), the loop
takes 1.55 instructions per weight and thread for 16-bit values, 2.67 for int8 and 2.05 for int4
(2.27 with zero-points) at up to 8 token rows.

Each shape runs with the warps per block and split-K measured fastest for it (timed once per
output and input size, dtype and token-tile count through ``prefill.fastest``); with more than one
split the kernel writes float32 partial sums that are added here. The op is registered with
``torch.library``, so ``torch.compile`` (``generate()`` with a static cache) and CUDA graphs take it
whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import torch

from .format import Compressed24
from .nvrtc import Kernel, compile_cubin, nvrtc_available, version
from .prefill import fastest

MAX_ROWS = 64  # token rows: eight tiles of mma's N = 8
ROWS_PER_BLOCK = 16  # mma's M
UNROLL = 2
WINDOW_COLUMNS = {16: 64, 8: 128, 4: 128}  # input columns of the kernel's unit, by value bits
_SOURCE = "sparse24_mma.cu"


@lru_cache(maxsize=1)
def mma_available() -> bool:
    """A GPU with sparse tensor cores (compute capability 8.0+) and NVRTC to compile the kernel."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) and nvrtc_available()


def mma_fits(x: torch.Tensor, compressed: Compressed24) -> bool:
    """Whether the kernel takes ``x`` ([rows, in]): CUDA fp16 / bf16 in the weight's dtype (and its
    scales'), at most ``MAX_ROWS`` rows, 16-bit values or int8 / int4 codes with scale groups of a power
    of two ≥ 128 columns (one scale per row and window), input features a multiple of the kernel's
    window, tensors aligned for its wide loads (their offset into storage, which CUDA allocates
    aligned; no data pointer is read, so ``torch.compile`` traces this)."""
    bits = compressed.bits or 16
    if bits not in WINDOW_COLUMNS:
        return False
    tensors = [(compressed.values, 8 if bits == 4 else 16), (compressed.metadata, 8 if bits == 16 else 16)]
    if bits != 16:
        tensors += [(compressed.scales, 2)] + ([(compressed.zero_points, 1)] if compressed.zero_points is not None else [])
    scale_groups_fit = bits == 16 or (
        compressed.group_size % WINDOW_COLUMNS[bits] == 0 and compressed.group_size & (compressed.group_size - 1) == 0
        and compressed.scales.dtype == x.dtype
    )  # fmt: skip
    return (
        x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and x.dtype == compressed.dtype
        and 0 < x.shape[0] <= MAX_ROWS and compressed.in_features % WINDOW_COLUMNS[bits] == 0 and scale_groups_fit
        and all(t.is_contiguous() and t.storage_offset() * t.element_size() % alignment == 0 for t, alignment in tensors)
    )  # fmt: skip


def sparse24_mma(inputs: torch.Tensor, compressed: Compressed24, config: tuple[int, int] | None = None) -> torch.Tensor:
    """``inputs @ decompress(compressed).T`` on sparse tensor cores for up to ``MAX_ROWS`` token rows.
    ``config``: (warps per block, K splits) instead of the measured choice (the tests pin each)."""
    x = inputs.reshape(-1, compressed.in_features).contiguous()
    if not mma_fits(x, compressed):
        raise ValueError(
            f"the mma.sp 2:4 kernel takes CUDA fp16 / bf16 inputs in the weight's dtype, at most {MAX_ROWS} token rows, "
            "16-bit values (input features a multiple of 64) or int8 / int4 codes (a multiple of 128, scale groups of a "
            f"power of two ≥ 128 columns); got {inputs.dtype} inputs of shape {tuple(inputs.shape)} for a {compressed.dtype} "
            f"weight with {compressed.in_features} input features and {compressed.bits or 16}-bit values"
        )
    warps, splits = config or (0, 0)
    stand_in = compressed.values  # passed, unread, for the scales and zero-points a format lacks
    scales = stand_in if compressed.scales is None else compressed.scales
    zero_points = stand_in if compressed.zero_points is None else compressed.zero_points
    output = torch.ops.optimum_prune.sparse24_mma(
        x, compressed.values, compressed.metadata, scales, zero_points, compressed.bits or 16,
        compressed.zero_points is not None, (compressed.group_size or 1).bit_length() - 1, warps, splits,
    )  # fmt: skip
    return output.reshape(*inputs.shape[:-1], compressed.out_features)


@torch.library.custom_op("optimum_prune::sparse24_mma", mutates_args=())
def _sparse24_mma_op(
    x: torch.Tensor,
    values: torch.Tensor,
    metadata: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor,
    bits: int,
    has_zeros: bool,
    scale_shift: int,
    warps: int,
    splits: int,
) -> torch.Tensor:
    """The launch (warps = 0: the measured configuration), opaque to ``torch.compile``."""
    outputs, columns = metadata.shape[0], x.shape[1]
    variant = _Variant(x.dtype, bits, has_zeros, _tiles(x.shape[0]))
    tensors = (x, values, metadata, scales, zero_points)
    with torch.cuda.device(x.device):
        if warps:
            return _launch(variant, tensors, scale_shift, warps, splits)
        candidates = {
            f"{warps} warps, {splits} splits": (lambda warps=warps, splits=splits: _launch(variant, tensors, scale_shift, warps, splits))
            for warps, splits in _configs(outputs, columns // WINDOW_COLUMNS[bits])
        }  # fmt: skip
        return fastest(("mma.sp", outputs, columns, variant), candidates)


@_sparse24_mma_op.register_fake
def _(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, *options: object) -> torch.Tensor:
    return x.new_empty(x.shape[0], metadata.shape[0])


@dataclass(frozen=True)
class _Variant:
    """What the kernel is compiled for: input dtype, value bits (16, 8 or 4), zero-points, 8-token tiles."""

    dtype: torch.dtype
    bits: int
    has_zeros: bool
    tiles: int


def _tiles(rows: int) -> int:
    """8-token tiles for ``rows``, rounded up to a power of two (fewer kernel variants to compile)."""
    return 1 << max(-(-rows // 8) - 1, 0).bit_length()


def _configs(outputs: int, windows: int) -> list[tuple[int, int]]:
    """(warps, splits) worth timing: 4 or 8 warps a block, K split so that the blocks cover the GPU's
    processors about once, twice or four times — but no split shorter than one unrolled step per warp."""
    blocks = -(-outputs // ROWS_PER_BLOCK)
    processors = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    configs = []
    for warps in (4, 8):
        most = max(windows // (warps * UNROLL), 1)
        for waves in (1, 2, 4):
            splits = min(max(-(-waves * processors // blocks), 1), most)
            if (warps, splits) not in configs:
                configs.append((warps, splits))
    return configs


def _launch(variant: _Variant, tensors: tuple[torch.Tensor, ...], scale_shift: int, warps: int, splits: int) -> torch.Tensor:
    x, metadata = tensors[0], tensors[2]
    rows, outputs, columns = x.shape[0], metadata.shape[0], x.shape[1]
    windows = columns // WINDOW_COLUMNS[variant.bits]
    per_split = -(-windows // splits)
    splits = -(-windows // per_split)  # no empty split
    if splits == 1:
        out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(splits, rows, outputs, dtype=torch.float32, device=x.device)
    kernel = _kernel(variant, warps, x.device.index)
    kernel((-(-outputs // ROWS_PER_BLOCK), splits, 1), (warps * 32, 1, 1), *tensors, out, rows, outputs, columns, per_split, scale_shift)
    return out if splits == 1 else out.sum(0).to(x.dtype)


@lru_cache(maxsize=None)
def _kernel(variant: _Variant, warps: int, device: int) -> Kernel:
    """The kernel variant compiled for, and loaded on, ``device`` (the current one), once."""
    ordered = version() >= (12, 5)  # mma.sp::ordered_metadata needs PTX 8.5
    cubin = compile_cubin(source(variant, warps, ordered), "sparse24_mma", torch.cuda.get_device_capability(device))
    return Kernel(cubin, "sparse24_mma")


def source(variant: _Variant, warps: int, ordered: bool = True) -> str:
    """The CUDA source of one kernel variant, as NVRTC compiles it (``ordered``: with
    ``mma.sp::ordered_metadata``, which CUDA 12.5+ compiles)."""
    defines = {
        "IS_BF16": int(variant.dtype == torch.bfloat16), "BITS": variant.bits, "HAS_ZEROS": int(variant.has_zeros),
        "WARPS": warps, "TILES": variant.tiles, "UNROLL": UNROLL, "ORDERED": int(ordered),
    }  # fmt: skip
    return "".join(f"#define {name} {value}\n" for name, value in defines.items()) + resources.files(__package__).joinpath(_SOURCE).read_text(encoding="utf-8")
