"""Triton kernels for y = x Wᵀ with W in the compressed 2:4 format of ``format.py``, plain (fp16 /
bf16 values) or quantized (int8 / int4 values with one scale per row and ``group_size`` columns, and
a zero-point beside each scale when the format has them).

Every kernel rebuilds tiles of the dense weight in registers from contiguous loads only: a
``BLOCK_N`` × ``BLOCK_K`` tile reads its rows' ``BLOCK_K / 2`` stored values (``BLOCK_K / 4``
bytes for int4: one byte is one group's pair) and one metadata nibble per group of four columns,
dequantizes the pairs, and spreads them to their columns with selects and ``tl.join`` — no gathers
(the first kernels of this file gathered a value per dense column and ran at 0.01–0.28× of cuBLAS
on an H200). Two uses of that tile:

- ``sparse24_fused``: ``tl.dot`` of each x tile with the rebuilt weight tile, accumulated in fp32.
  It reads the compressed weight once per ``BLOCK_M`` token rows, so it is the decode path (a few
  rows: bound by the weight bytes, 1.125 per weight for 16-bit values, ≈ 0.39 for int4, against 2
  dense). Block sizes are chosen by ``triton.autotune`` per token-row bucket and shape.
- ``sparse24_expand``: writes the dense weight, which ``F.linear`` (cuBLAS) then multiplies — the
  prefill path: at many rows the product is bound by arithmetic, the rebuild costs one pass over
  the weight, and cuBLAS's tensor-core schedule beats ours.

``sparse24_matmul`` picks between them by the number of token rows (``FUSED_MAX_ROWS``, measured
by ``benchmarks/kernels.py``).
"""

from __future__ import annotations

import os
from dataclasses import replace

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from .format import Compressed24
from .linear import KERNEL_DTYPES

FUSED_MAX_ROWS = 64  # token rows up to which sparse24_matmul takes the fused kernel (benchmarks/kernels.py)
EXPAND_BLOCK_N, EXPAND_BLOCK_K = 64, 128


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
        low, high = packed & 0xF, (packed >> 4) & 0xF
        kept_first, kept_second = tl.where(low > 7, low - 16, low), tl.where(high > 7, high - 16, high)
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
def _sparse24_fused(
    x_ptr, values_ptr, metadata_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, ROWS_BUCKET,
    stride_xm, stride_values, stride_metadata, stride_scales, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One BLOCK_M × BLOCK_N tile of y; ROWS_BUCKET only keys the autotuner's choice."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    outputs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        start = step * BLOCK_K
        columns = start + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + columns[None, :], mask=(rows < M)[:, None] & (columns < K)[None, :], other=0.0)
        weight = _weight_tile(values_ptr, metadata_ptr, scales_ptr, zeros_ptr, outputs, start, N, K, stride_values,
                              stride_metadata, stride_scales, x.dtype, BITS, GROUP_SIZE, HAS_ZEROS, BLOCK_N, BLOCK_K)  # fmt: skip
        acc = tl.dot(x, tl.trans(weight), acc)
    tl.store(out_ptr + rows[:, None] * stride_om + outputs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (outputs < N)[None, :])  # fmt: skip


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


def _config(block_m: int, block_n: int, block_k: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)


# Candidate block sizes per token-row bucket: decode wants many narrow programs streaming the weight
# (enough of them for every multiprocessor), larger buckets wider tiles that reuse each rebuilt weight tile.
FUSED_CONFIGS = {
    16: [_config(16, n, k, w, s) for n, k, w, s in ((16, 256, 4, 4), (32, 256, 4, 3), (32, 128, 4, 4), (64, 128, 4, 3), (16, 512, 4, 3))],
    64: [_config(m, n, k, w, s) for m, n, k, w, s in ((32, 32, 256, 4, 3), (64, 64, 128, 4, 3), (32, 64, 128, 4, 4), (64, 32, 256, 4, 3))],
    None: [_config(m, n, k, w, s) for m, n, k, w, s in ((128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 128, 8, 3))],
}
_TUNED = {
    bucket: triton.autotune(configs, key=["ROWS_BUCKET", "N", "K", "BITS", "GROUP_SIZE", "HAS_ZEROS"])(_sparse24_fused)
    for bucket, configs in FUSED_CONFIGS.items()
}


def sparse24_matmul(inputs: torch.Tensor, compressed: Compressed24) -> torch.Tensor:
    """``inputs @ decompress(compressed).T`` for fp16 / bf16 ``inputs`` of shape ``[..., in]``: the fused
    kernel for up to ``FUSED_MAX_ROWS`` token rows, the rebuilt dense weight through cuBLAS above."""
    rows = inputs.numel() // max(inputs.shape[-1], 1)
    if rows <= FUSED_MAX_ROWS:
        return sparse24_fused(inputs, compressed)
    return F.linear(inputs, sparse24_expand(compressed, inputs.dtype))


def sparse24_fused(inputs: torch.Tensor, compressed: Compressed24, config: dict[str, int] | None = None) -> torch.Tensor:
    """The fused kernel for any number of token rows. ``config``: BLOCK_M / BLOCK_N / BLOCK_K to use
    instead of the autotuner's choice (the tests pin them; Triton's interpreter cannot time configs)."""
    x, compressed, scales, zeros = _checked(inputs, compressed)
    rows, outputs = x.shape[0], compressed.out_features
    out = torch.empty(rows, outputs, dtype=inputs.dtype, device=inputs.device)
    bucket = next((limit for limit in FUSED_CONFIGS if limit is not None and rows <= limit), None)
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = FUSED_CONFIGS[bucket][0].kwargs
    kernel = _TUNED[bucket] if config is None else _sparse24_fused
    tile = config or {}

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(outputs, meta["BLOCK_N"])

    kernel[grid if config is None else grid(config)](
        x, compressed.values, compressed.metadata, scales, zeros, out, rows, outputs, compressed.in_features,
        triton.next_power_of_2(rows) if bucket is None else bucket,
        x.stride(0), compressed.values.stride(0), compressed.metadata.stride(0), scales.stride(0), out.stride(0),
        BITS=compressed.bits or 16, GROUP_SIZE=compressed.group_size or 1, HAS_ZEROS=compressed.zero_points is not None,
        **tile,
    )  # fmt: skip
    return out.reshape(*inputs.shape[:-1], outputs)


def sparse24_expand(compressed: Compressed24, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[out, in]`` weight in ``dtype`` (fp16 / bf16), rebuilt on the GPU in one pass."""
    values = compressed.values
    _, compressed, scales, zeros = _checked(torch.empty(0, compressed.in_features, dtype=dtype, device=values.device), compressed)
    outputs, columns = compressed.out_features, compressed.in_features
    dense = torch.empty(outputs, columns, dtype=dtype, device=values.device)
    _sparse24_expand[(triton.cdiv(outputs, EXPAND_BLOCK_N), triton.cdiv(columns, EXPAND_BLOCK_K))](
        compressed.values, compressed.metadata, scales, zeros, dense, outputs, columns,
        compressed.values.stride(0), compressed.metadata.stride(0), scales.stride(0), dense.stride(0),
        BITS=compressed.bits or 16, GROUP_SIZE=compressed.group_size or 1, HAS_ZEROS=compressed.zero_points is not None,
        BLOCK_N=EXPAND_BLOCK_N, BLOCK_K=EXPAND_BLOCK_K,
    )  # fmt: skip
    return dense


def _checked(
    inputs: torch.Tensor, compressed: Compressed24
) -> tuple[torch.Tensor, Compressed24, torch.Tensor, torch.Tensor]:
    """``inputs`` as contiguous ``[rows, in]``, ``compressed`` with contiguous tensors, and the scales and
    zero-points arguments (the values stand in, unread, for what the format lacks)."""
    if inputs.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the 2:4 Triton kernel takes float16 or bfloat16 inputs, got {inputs.dtype}")
    if inputs.shape[-1] != compressed.in_features:
        raise ValueError(f"inputs have {inputs.shape[-1]} features, the 2:4 weight {compressed.in_features}")
    scales, zeros = (None if t is None else t.contiguous() for t in (compressed.scales, compressed.zero_points))
    compressed = replace(
        compressed, values=compressed.values.contiguous(), metadata=compressed.metadata.contiguous(), scales=scales, zero_points=zeros
    )
    x = inputs.reshape(-1, compressed.in_features).contiguous()
    return x, compressed, compressed.values if scales is None else scales, compressed.values if zeros is None else zeros
