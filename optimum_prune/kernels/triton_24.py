"""Triton kernels for y = x Wᵀ with W in the compressed 2:4 format of ``format.py``, plain (fp16 /
bf16 values) or quantized (int8 / int4 values with one scale per row and ``group_size`` columns, and
a zero-point beside each scale when the format has them). Decode and prefill are bound by different
things, so there are two:

- ``sparse24_decode`` (a few token rows: bound by the weight's bytes, 1.125 per weight for 16-bit
  values, ≈ 0.39 for int4, against 2 dense): CUDA cores, no weight rebuilt. Its unit is a pair of
  groups (eight columns): one metadata byte and the pair's four kept values read as one wider word
  (int64 / int32 / int16 for 16-bit / int8 / int4 values); x comes as int32 words of two entries. Each
  kept value meets the x entry its position names through two selects, products are summed per
  thread across the loop and reduced once at the end. Tiles are autotuned per shape.
- ``sparse24_expand`` + ``F.linear`` (more rows: bound by arithmetic): the dense weight rebuilt in
  one pass (tiles of it rebuilt in registers from contiguous loads by selects and ``tl.join``), then
  cuBLAS, whose tensor-core schedule no kernel here matches.

``sparse24_matmul`` picks by the number of token rows (``DECODE_ROWS``).

Measured on an H200 (``benchmarks/KERNELS.md``): the first kernels of this file, which gathered
one value per dense column, ran at 0.01–0.28× of dense cuBLAS; a fused kernel that rebuilt weight
tiles for ``tl.dot`` at 0.13–0.38× (206–255 registers, spills); expand + cuBLAS at 0.14–0.42× for
M ≤ 16 and 0.59–1.14× from M = 4096. The decode kernel above replaced the fused one after that run
and is not timed yet. Compiled offline for sm_90 with Triton 3.6 (``scripts/sass_stats.py``), its loop
takes 6.3–7.3 SASS instructions per weight for 16-bit values (9–14 for int8 / int4) in 31–168
registers with no spills, against 18–27 instructions in 168–247 registers for the fused kernel;
``DECODE_ROWS`` stays provisional until ``benchmarks/kernels.py`` measures it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from .format import Compressed24
from .linear import KERNEL_DTYPES

DECODE_MAX_ROWS = 4  # the decode kernel's selects grow with the token rows: it takes at most this many
DECODE_ROWS = 4  # token rows up to which sparse24_matmul takes the decode kernel (provisional: see the module docstring)
EXPAND_BLOCK_N, EXPAND_BLOCK_K = 64, 128
_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it once too, at import


@triton.jit
def _weight_tile(values_ptr, metadata_ptr, scales_ptr, zeros_ptr, outputs, start, N, K,
                 stride_values, stride_metadata, stride_scales, dtype: tl.constexpr,
                 BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """W[outputs, start : start + BLOCK_K] in ``dtype`` (0 outside W), rebuilt from the compressed format."""
    groups = start // 4 + tl.arange(0, BLOCK_K // 4)
    inside = (outputs < N)[:, None] & (groups < K // 4)[None, :]
    byte = tl.load(metadata_ptr + outputs[:, None] * stride_metadata + (groups // 2)[None, :], mask=inside, other=0)
    nibble = (byte.to(tl.int32) >> ((groups % 2) * 4)[None, :]) & 0xF  # the lower nibble is the earlier group
    first, second = nibble & 0x3, (nibble >> 2) & 0x3
    if BITS == 4:  # one byte per group: its first kept value in the lower nibble, two's complement
        packed = tl.load(values_ptr + outputs[:, None] * stride_values + groups[None, :], mask=inside, other=0).to(tl.int32)
        kept_first, kept_second = _signed(packed & 0xF, 4), _signed((packed >> 4) & 0xF, 4)
    else:  # the two kept values of each group side by side
        stored = start // 2 + tl.arange(0, BLOCK_K // 2)
        pairs = tl.load(values_ptr + outputs[:, None] * stride_values + stored[None, :],
                        mask=(outputs < N)[:, None] & (stored < K // 2)[None, :], other=0)  # fmt: skip
        kept_first, kept_second = tl.split(tl.reshape(pairs, (BLOCK_N, BLOCK_K // 4, 2)))
    if BITS != 16:
        if GROUP_SIZE % BLOCK_K == 0:  # the whole tile shares one scale per row
            scale_index = outputs[:, None] * stride_scales + start // GROUP_SIZE
            scale_mask = (outputs < N)[:, None]
        else:
            scale_index = outputs[:, None] * stride_scales + (groups * 4 // GROUP_SIZE)[None, :]
            scale_mask = inside
        kept_first, kept_second = kept_first.to(tl.int32), kept_second.to(tl.int32)
        if HAS_ZEROS:  # zero-points share the scales' layout
            zero_point = tl.load(zeros_ptr + scale_index, mask=scale_mask, other=0).to(tl.int32)
            kept_first, kept_second = kept_first - zero_point, kept_second - zero_point
        scale = tl.load(scales_ptr + scale_index, mask=scale_mask, other=0.0).to(tl.float32)
        kept_first, kept_second = kept_first.to(tl.float32) * scale, kept_second.to(tl.float32) * scale
    kept_first, kept_second = kept_first.to(dtype), kept_second.to(dtype)
    zero = tl.zeros_like(kept_first)
    column0 = tl.where(first == 0, kept_first, zero)  # positions are ordered: only the first kept value can sit at 0
    column1 = tl.where(first == 1, kept_first, tl.where(second == 1, kept_second, zero))
    column2 = tl.where(first == 2, kept_first, tl.where(second == 2, kept_second, zero))
    column3 = tl.where(second == 3, kept_second, zero)  # and only the second at 3
    # join(join(c0, c2), join(c1, c3))[n, g, i, j] is column 2i + j of group g: row-major, the dense order.
    return tl.reshape(tl.join(tl.join(column0, column2), tl.join(column1, column3)), (BLOCK_N, BLOCK_K))


@triton.jit
def _halves(words, dtype: tl.constexpr):
    """The two fp16 / bf16 values packed in each int32 of ``words`` (lower half first), as fp32."""
    low = (words & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
    high = ((words >> 16) & 0xFFFF).to(tl.uint16).to(dtype, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def _signed(code, bits: tl.constexpr):
    """A ``bits``-wide two's-complement field (already shifted down and masked) as int32."""
    return tl.where(code >= (1 << (bits - 1)), code - (1 << bits), code)


@triton.jit
def _picked(position, x0, x1, x2, x3, is_second: tl.constexpr):
    """The x entry at a kept value's position in its group: the first of two kept values sits at 0, 1 or 2,
    the second at 1, 2 or 3."""
    if is_second:
        return tl.where(position == 3, x3, tl.where(position == 2, x2, x1))
    return tl.where(position == 0, x0, tl.where(position == 1, x1, x2))


@triton.jit
def _sparse24_decode(
    x_ptr, values_ptr, metadata_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K,
    stride_xm, stride_values, stride_metadata, stride_scales, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, DTYPE: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    """BLOCK_N outputs of y for up to ROWS token rows, on CUDA cores. The unit is a pair of groups
    (eight columns): one metadata byte and, viewed as wider words by the caller, its four kept values
    in one load (int64 for 16-bit values, int32 for int8, int16 for int4); ``x`` comes as int32 words
    of two entries. Every kept value meets the x entry its position names, picked by two selects —
    nothing is gathered and no weight tile is rebuilt."""
    PAIRS: tl.constexpr = BLOCK_K // 8
    rows = tl.arange(0, ROWS)
    outputs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    pairs = tl.arange(0, PAIRS)
    live = outputs < N
    # One scale per row for the whole tile when tiles never straddle a scale group: scale the tile's sum.
    TILE_SCALE: tl.constexpr = BITS != 16 and GROUP_SIZE % BLOCK_K == 0
    acc = tl.zeros((ROWS, BLOCK_N, PAIRS), dtype=tl.float32)  # summed over pairs once, after the loop
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        pair = step * PAIRS + pairs
        if EVEN_K:  # no tile crosses the end of a row: only the output rows need a mask
            inside = live[:, None] & (pairs >= 0)[None, :]
            x_inside = (rows < M)[:, None] & (pairs >= 0)[None, :]
        else:
            inside = live[:, None] & (pair < K // 8)[None, :]
            x_inside = (rows < M)[:, None] & (pair < K // 8)[None, :]
        meta = tl.load(metadata_ptr + outputs[:, None] * stride_metadata + pair[None, :], mask=inside, other=0).to(tl.int32)
        words = tl.load(values_ptr + outputs[:, None] * stride_values + pair[None, :], mask=inside, other=0)
        if BITS == 16:  # four 16-bit values in an int64
            first_a, second_a = _halves(words.to(tl.int32), DTYPE)
            first_b, second_b = _halves((words >> 32).to(tl.int32), DTYPE)
        elif BITS == 8:  # four int8 codes in an int32
            codes = words.to(tl.int32)
            first_a, second_a = _signed(codes & 0xFF, 8), _signed((codes >> 8) & 0xFF, 8)
            first_b, second_b = _signed((codes >> 16) & 0xFF, 8), _signed((codes >> 24) & 0xFF, 8)
        else:  # four int4 codes in an int16
            codes = words.to(tl.int32)
            first_a, second_a = _signed(codes & 0xF, 4), _signed((codes >> 4) & 0xF, 4)
            first_b, second_b = _signed((codes >> 8) & 0xF, 4), _signed((codes >> 12) & 0xF, 4)
        if BITS != 16:
            if TILE_SCALE:
                scale_at = outputs[:, None] * stride_scales + step * BLOCK_K // GROUP_SIZE
                scale_inside = live[:, None]
            else:  # a pair of groups never straddles a scale group (GROUP_SIZE is a multiple of 8)
                scale_at = outputs[:, None] * stride_scales + (pair * 8 // GROUP_SIZE)[None, :]
                scale_inside = inside
            if HAS_ZEROS:  # zero-points share the scales' layout
                zero_point = tl.load(zeros_ptr + scale_at, mask=scale_inside, other=0).to(tl.int32)
                first_a, second_a, first_b, second_b = first_a - zero_point, second_a - zero_point, first_b - zero_point, second_b - zero_point
            first_a, second_a, first_b, second_b = first_a.to(tl.float32), second_a.to(tl.float32), first_b.to(tl.float32), second_b.to(tl.float32)
            if not TILE_SCALE:
                scale = tl.load(scales_ptr + scale_at, mask=scale_inside, other=0.0).to(tl.float32)
                first_a, second_a, first_b, second_b = first_a * scale, second_a * scale, first_b * scale, second_b * scale
        # x as int32 words, four (eight entries) per pair of groups, loaded together and split in registers
        at = x_ptr + rows[:, None, None] * stride_xm + (pair * 4)[None, :, None] + tl.arange(0, 4)[None, None, :]
        words = tl.load(at, mask=x_inside[:, :, None], other=0)
        low_words, high_words = tl.split(tl.reshape(words, (ROWS, PAIRS, 2, 2)))  # words 0, 2 and words 1, 3
        word0, word2 = tl.split(low_words)
        word1, word3 = tl.split(high_words)
        x0, x1 = _halves(word0[:, None, :], DTYPE)
        x2, x3 = _halves(word1[:, None, :], DTYPE)
        x4, x5 = _halves(word2[:, None, :], DTYPE)
        x6, x7 = _halves(word3[:, None, :], DTYPE)
        partial = (first_a[None, :, :] * _picked((meta & 0x3)[None, :, :], x0, x1, x2, x3, False)
                   + second_a[None, :, :] * _picked(((meta >> 2) & 0x3)[None, :, :], x0, x1, x2, x3, True)
                   + first_b[None, :, :] * _picked(((meta >> 4) & 0x3)[None, :, :], x4, x5, x6, x7, False)
                   + second_b[None, :, :] * _picked((meta >> 6)[None, :, :], x4, x5, x6, x7, True))  # fmt: skip
        if TILE_SCALE:
            scale = tl.load(scales_ptr + outputs * stride_scales + step * BLOCK_K // GROUP_SIZE, mask=live, other=0.0)
            partial = partial * scale.to(tl.float32)[None, :, None]
        acc += partial
    tl.store(out_ptr + rows[:, None] * stride_om + outputs[None, :], tl.sum(acc, axis=2).to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & live[None, :])  # fmt: skip


@triton.jit
def _sparse24_expand(
    values_ptr, metadata_ptr, scales_ptr, zeros_ptr, out_ptr, N, K,
    stride_values, stride_metadata, stride_scales, stride_out,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    outputs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    start = tl.program_id(1) * BLOCK_K
    columns = start + tl.arange(0, BLOCK_K)
    weight = _weight_tile(values_ptr, metadata_ptr, scales_ptr, zeros_ptr, outputs, start, N, K, stride_values,
                          stride_metadata, stride_scales, out_ptr.dtype.element_ty, BITS, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K)  # fmt: skip
    tl.store(out_ptr + outputs[:, None] * stride_out + columns[None, :], weight, mask=(outputs < N)[:, None] & (columns < K)[None, :])


def _decode_config(block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


# Candidate tiles of the decode kernel: narrow (many programs, for layers with few outputs) to wide (more
# pairs per thread, fewer loop trips). Each compiles with Triton 3.6 for sm_90 without spills (scripts/sass_stats.py).
DECODE_CONFIGS = [_decode_config(n, k, w, s) for n, k, w, s in ((4, 256, 2, 3), (8, 256, 4, 3), (16, 256, 4, 3), (32, 256, 4, 3),
                                                                  (16, 512, 4, 3), (8, 512, 4, 4))]  # fmt: skip
_EVEN_K = triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
_TUNED_DECODE = triton.autotune(DECODE_CONFIGS, key=["ROWS", "N", "K", "BITS", "GROUP_SIZE", "HAS_ZEROS", "DTYPE"])(_EVEN_K(_sparse24_decode))
_UNTUNED_DECODE = _EVEN_K(_sparse24_decode)
_WORDS = {None: torch.int64, 8: torch.int32, 4: torch.int16}  # four kept values (two groups) per word, by bits


def sparse24_matmul(inputs: torch.Tensor, compressed: Compressed24) -> torch.Tensor:
    """``inputs @ decompress(compressed).T`` for fp16 / bf16 ``inputs`` of shape ``[..., in]``: the decode
    kernel for up to ``DECODE_ROWS`` token rows, the rebuilt dense weight through cuBLAS above."""
    rows = inputs.numel() // max(inputs.shape[-1], 1)
    if rows == 0:  # e.g. an MoE expert no token was routed to
        return inputs.new_zeros(*inputs.shape[:-1], compressed.out_features)
    if rows <= DECODE_ROWS:
        return sparse24_decode(inputs, compressed)
    return F.linear(inputs, sparse24_expand(compressed, inputs.dtype))


def sparse24_decode(inputs: torch.Tensor, compressed: Compressed24, config: dict[str, int] | None = None) -> torch.Tensor:
    """The decode kernel, for up to ``DECODE_MAX_ROWS`` token rows. ``config``: BLOCK_N / BLOCK_K to use
    instead of the autotuner's choice (the tests pin them; Triton's interpreter cannot time configs)."""
    x, compressed, scales, zeros = _checked(inputs, compressed)
    rows, outputs = x.shape[0], compressed.out_features
    if rows > DECODE_MAX_ROWS:
        raise ValueError(f"the 2:4 decode kernel takes at most {DECODE_MAX_ROWS} token rows, got {rows} (use sparse24_matmul)")
    if config is None and INTERPRETED:
        config = DECODE_CONFIGS[0].kwargs
    out = torch.empty(rows, outputs, dtype=inputs.dtype, device=inputs.device)
    values = compressed.values.view(_WORDS[compressed.bits])
    words = x.view(torch.int32)  # two entries per word

    def grid(meta: dict) -> tuple[int]:
        return (triton.cdiv(outputs, meta["BLOCK_N"]),)

    kernel = _TUNED_DECODE if config is None else _UNTUNED_DECODE
    with _launching_on(inputs.device):
        kernel[grid](
            words, values, compressed.metadata, scales, zeros, out, rows, outputs, compressed.in_features,
            words.stride(0), values.stride(0), compressed.metadata.stride(0), scales.stride(0), out.stride(0),
            BITS=compressed.bits or 16, GROUP_SIZE=compressed.group_size or 1, HAS_ZEROS=compressed.zero_points is not None,
            DTYPE=_TRITON_DTYPES[inputs.dtype], ROWS=triton.next_power_of_2(rows), **(config or {}),
        )  # fmt: skip
    return out.reshape(*inputs.shape[:-1], outputs)


def sparse24_expand(compressed: Compressed24, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight in ``dtype`` (fp16 / bf16), rebuilt on the GPU in one pass."""
    values = compressed.values
    _, compressed, scales, zeros = _checked(torch.empty(0, compressed.in_features, dtype=dtype, device=values.device), compressed)
    outputs, columns = compressed.out_features, compressed.in_features
    dense = torch.empty(outputs, columns, dtype=dtype, device=values.device)
    with _launching_on(values.device):
        _sparse24_expand[(triton.cdiv(outputs, EXPAND_BLOCK_N), triton.cdiv(columns, EXPAND_BLOCK_K))](
            compressed.values, compressed.metadata, scales, zeros, dense, outputs, columns,
            compressed.values.stride(0), compressed.metadata.stride(0), scales.stride(0), dense.stride(0),
            BITS=compressed.bits or 16, GROUP_SIZE=compressed.group_size or 1, HAS_ZEROS=compressed.zero_points is not None,
            BLOCK_N=EXPAND_BLOCK_N, BLOCK_K=EXPAND_BLOCK_K,
        )  # fmt: skip
    return dense


def _launching_on(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and its stream: make that the tensors' GPU (a model
    spread over GPUs); nothing to do for the interpreter's CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _checked(
    inputs: torch.Tensor, compressed: Compressed24
) -> tuple[torch.Tensor, Compressed24, torch.Tensor, torch.Tensor]:
    """``inputs`` as contiguous ``[rows, in]``, ``compressed`` with contiguous tensors, and the scales and
    zero-points arguments (the values stand in, unread, for what the format lacks)."""
    if inputs.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the 2:4 Triton kernel takes float16 or bfloat16 inputs, got {inputs.dtype}")
    if inputs.shape[-1] != compressed.in_features:
        raise ValueError(f"inputs have {inputs.shape[-1]} features, the 2:4 weight {compressed.in_features}")
    if compressed.bits is None and compressed.values.dtype != inputs.dtype:  # the kernels reinterpret the values' bits
        raise ValueError(f"the 2:4 values are {compressed.values.dtype} and the inputs {inputs.dtype}: cast one to the other")
    scales, zeros = (None if t is None else t.contiguous() for t in (compressed.scales, compressed.zero_points))
    compressed = replace(
        compressed, values=compressed.values.contiguous(), metadata=compressed.metadata.contiguous(), scales=scales, zero_points=zeros
    )
    x = inputs.reshape(-1, compressed.in_features).contiguous()
    return x, compressed, compressed.values if scales is None else scales, compressed.values if zeros is None else zeros
