"""The 2:4 decode path on sparse tensor cores: ``sparse24_mma.cu`` (``mma.sp`` m16n8k32, compute
capability 8.0+), compiled for the GPU at hand on first use by NVRTC (``nvrtc.py``): nothing to
build at install time, nothing needed beyond a CUDA build of torch.

Why tensor cores for decode, which is bound by bytes rather than arithmetic: on CUDA cores every
kept value costs instructions (``triton_24``'s decode kernel compiles to 6–7 per weight, about
what the H200 can issue at its memory bandwidth), while one ``mma.sp`` consumes 512 weights of a
warp for up to 8 token rows, leaving the loop with little but 16- and 8-byte loads of the format
as stored (no repacked copy).

Each shape runs with the warps per block and split-K measured fastest for it (timed once per
output and input size, dtype and token-tile count through ``prefill.fastest``); with more than one
split the kernel writes float32 partial sums that are added here. The op is registered with
``torch.library``, so ``torch.compile`` (``generate()`` with a static cache) and CUDA graphs take it
whole.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import torch

from .format import Compressed24
from .nvrtc import Kernel, compile_cubin, nvrtc_available
from .prefill import fastest

MAX_ROWS = 64  # token rows: eight tiles of mma's N = 8
COLUMN_MULTIPLE = 64  # input features: a multiple of the kernel's unit (two k-steps)
ROWS_PER_BLOCK = 16  # mma's M
UNROLL = 2
_SOURCE = "sparse24_mma.cu"


@lru_cache(maxsize=1)
def mma_available() -> bool:
    """A GPU with sparse tensor cores (compute capability 8.0+) and NVRTC to compile the kernel."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0) and nvrtc_available()


def mma_fits(x: torch.Tensor, compressed: Compressed24) -> bool:
    """Whether the kernel takes ``x`` ([rows, in]): CUDA fp16 / bf16 in the weight's dtype with 16-bit
    values, at most ``MAX_ROWS`` rows, input features a multiple of 64, tensors aligned for 16-byte loads."""
    return (
        compressed.bits is None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
        and x.dtype == compressed.values.dtype and 0 < x.shape[0] <= MAX_ROWS
        and compressed.in_features % COLUMN_MULTIPLE == 0
        and compressed.values.is_contiguous() and compressed.values.data_ptr() % 16 == 0
        and compressed.metadata.is_contiguous() and compressed.metadata.data_ptr() % 8 == 0
    )  # fmt: skip


def sparse24_mma(inputs: torch.Tensor, compressed: Compressed24, config: tuple[int, int] | None = None) -> torch.Tensor:
    """``inputs @ decompress(compressed).T`` on sparse tensor cores for up to ``MAX_ROWS`` token rows.
    ``config``: (warps per block, K splits) instead of the measured choice (the tests pin each)."""
    x = inputs.reshape(-1, compressed.in_features).contiguous()
    if not mma_fits(x, compressed):
        raise ValueError(
            f"the mma.sp 2:4 kernel takes CUDA fp16 / bf16 inputs in the weight's dtype, at most {MAX_ROWS} token rows, "
            f"16-bit values and input features a multiple of {COLUMN_MULTIPLE}; got {inputs.dtype} inputs of shape "
            f"{tuple(inputs.shape)} for a {compressed.values.dtype} weight with {compressed.in_features} input features"
        )
    warps, splits = config or (0, 0)
    output = torch.ops.optimum_prune.sparse24_mma(x, compressed.values, compressed.metadata, warps, splits)
    return output.reshape(*inputs.shape[:-1], compressed.out_features)


@torch.library.custom_op("optimum_prune::sparse24_mma", mutates_args=())
def _sparse24_mma_op(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, warps: int, splits: int) -> torch.Tensor:
    """The launch (warps = 0: the measured choice), opaque to ``torch.compile``."""
    outputs, columns = values.shape[0], x.shape[1]
    tiles = _tiles(x.shape[0])
    with torch.cuda.device(x.device):
        if warps:
            return _launch(x, values, metadata, tiles, warps, splits)
        candidates = {
            f"{warps} warps, {splits} splits": (lambda warps=warps, splits=splits: _launch(x, values, metadata, tiles, warps, splits))
            for warps, splits in _configs(outputs, columns)
        }  # fmt: skip
        return fastest(("mma.sp", outputs, columns, x.dtype, tiles), candidates)


@_sparse24_mma_op.register_fake
def _(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, warps: int, splits: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], values.shape[0])


def _tiles(rows: int) -> int:
    """8-token tiles for ``rows``, rounded up to a power of two (fewer kernel variants to compile)."""
    return 1 << max(-(-rows // 8) - 1, 0).bit_length()


def _configs(outputs: int, columns: int) -> list[tuple[int, int]]:
    """(warps, splits) worth timing: 4 or 8 warps a block, K split so that the blocks cover the GPU's
    processors about once, twice or four times — but no split shorter than one unrolled step per warp."""
    blocks = -(-outputs // ROWS_PER_BLOCK)
    processors = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    pairs = columns // COLUMN_MULTIPLE
    configs = []
    for warps in (4, 8):
        most = max(pairs // (warps * UNROLL), 1)
        for waves in (1, 2, 4):
            splits = min(max(-(-waves * processors // blocks), 1), most)
            if (warps, splits) not in configs:
                configs.append((warps, splits))
    return configs


def _launch(x: torch.Tensor, values: torch.Tensor, metadata: torch.Tensor, tiles: int, warps: int, splits: int) -> torch.Tensor:
    rows, outputs, columns = x.shape[0], values.shape[0], x.shape[1]
    pairs = columns // COLUMN_MULTIPLE
    pairs_per_split = -(-pairs // splits)
    splits = -(-pairs // pairs_per_split)  # no empty split
    if splits == 1:
        out = torch.empty(rows, outputs, dtype=x.dtype, device=x.device)
    else:
        out = torch.empty(splits, rows, outputs, dtype=torch.float32, device=x.device)
    kernel = _kernel(x.dtype, warps, tiles, x.device.index)
    kernel((-(-outputs // ROWS_PER_BLOCK), splits, 1), (warps * 32, 1, 1), x, values, metadata, out, rows, outputs, columns, pairs_per_split)
    return out if splits == 1 else out.sum(0).to(x.dtype)


@lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, warps: int, tiles: int, device: int) -> Kernel:
    """The kernel variant compiled for, and loaded on, ``device`` (the current one), once."""
    return Kernel(compile_cubin(source(dtype, warps, tiles), "sparse24_mma", torch.cuda.get_device_capability(device)), "sparse24_mma")


def source(dtype: torch.dtype, warps: int, tiles: int) -> str:
    """The CUDA source of one kernel variant, as NVRTC compiles it."""
    defines = f"#define IS_BF16 {int(dtype == torch.bfloat16)}\n#define WARPS {warps}\n#define TILES {tiles}\n#define UNROLL {UNROLL}\n"
    return defines + resources.files(__package__).joinpath(_SOURCE).read_text()
