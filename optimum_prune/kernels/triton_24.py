"""Triton kernels for y = x Wᵀ with W in the compressed 2:4 format of ``format.py``, plain (fp16 /
bf16 values) or quantized (int8 / int4 values with one scale per row and ``group_size`` columns, and
a zero-point beside each scale when the format has them).

Two kernels, because decode and prefill are bound by different things:

- ``sparse24_tiles`` (prefill): each program computes a BLOCK_M × BLOCK_N tile of y and walks the
  input dimension BLOCK_K dense columns at a time. For every column k of the tile it loads the
  metadata nibble of k's group and the stored value k maps to, rebuilds the dense weight tile in
  registers (dequantized with its scale) and multiplies with the x tile by ``tl.dot`` (tensor
  cores on a GPU). x is padded to BLOCK_M = 16 rows, ``tl.dot``'s minimum.
- ``sparse24_gemv`` (decode, a few token rows): bandwidth-bound, so it reads each stored value
  once, contiguously along its row (1.125 bytes per weight for 16-bit values, about 0.39 for
  int4), turns each value's metadata into its dense column and gathers those columns of x (a few
  rows: they stay in cache), accumulating on CUDA cores without padding M. Narrow layers (few
  output rows for the GPU's multiprocessors) split the input dimension across programs, which add
  their partial sums atomically in fp32.

``sparse24_matmul`` picks between them by the number of token rows (``GEMV_ROWS``).

Status: both kernels' logic is tested on CPU in Triton's interpreter (``TRITON_INTERPRET=1``)
against ``decompress``; their speed on GPUs (against cuBLAS and cuSPARSELt), their block sizes
and ``GEMV_ROWS`` have not been measured yet — ``benchmarks/kernels.py`` measures them in a GPU
session. ``GEMV_ROWS`` is provisional until then: below it the tiled kernel wastes most of its
16-row ``tl.dot`` and reads each metadata byte once per column it serves.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .format import Compressed24
from .linear import KERNEL_DTYPES

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64
GEMV_ROWS = 4  # token rows up to which sparse24_matmul takes the decode kernel (provisional: see the module docstring)
GEMV_MAX_ROWS = 16  # the decode kernel holds rows × GEMV_BLOCK_N × block values in registers
GEMV_BLOCK_N = 32


@triton.jit
def _kept_weights(values_ptr, scales_ptr, zeros_ptr, outputs, stored, columns, kept, stride_values, stride_scales,
                  BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr):  # fmt: skip
    """fp32 values of W at (``outputs``, ``columns``), the ``stored``-th kept values of their rows (0 where not ``kept``)."""
    if BITS == 16:
        return tl.load(values_ptr + outputs[:, None] * stride_values + stored, mask=kept, other=0.0).to(tl.float32)
    if BITS == 8:
        q = tl.load(values_ptr + outputs[:, None] * stride_values + stored, mask=kept, other=0).to(tl.int32)
    else:  # two int4 values per byte, the lower nibble first, two's complement
        packed = tl.load(values_ptr + outputs[:, None] * stride_values + stored // 2, mask=kept, other=0).to(tl.int32)
        q = (packed >> ((stored % 2) * 4)) & 0xF
        q = tl.where(q > 7, q - 16, q)
    group = outputs[:, None] * stride_scales + columns // GROUP_SIZE  # zero-points share the scales' layout
    if HAS_ZEROS:
        q -= tl.load(zeros_ptr + group, mask=kept, other=0).to(tl.int32)
    scale = tl.load(scales_ptr + group, mask=kept, other=0.0)
    return q.to(tl.float32) * scale.to(tl.float32)


@triton.jit
def _sparse24_tiles(
    x_ptr, values_ptr, metadata_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K,
    stride_xm, stride_values, stride_metadata, stride_scales, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    outputs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        columns = start + tl.arange(0, BLOCK_K)
        inside = (outputs < N)[:, None] & (columns < K)[None, :]
        group = columns // 4
        byte = tl.load(metadata_ptr + outputs[:, None] * stride_metadata + (columns // 8)[None, :], mask=inside, other=0).to(tl.int32)
        nibble = (byte >> ((group % 2) * 4)[None, :]) & 0xF  # the lower nibble is the earlier group
        first, second = nibble & 0x3, (nibble >> 2) & 0x3
        position = (columns % 4)[None, :]
        kept = inside & ((position == first) | (position == second))
        stored = (group * 2)[None, :] + tl.where(position == first, 0, 1)  # index among the row's kept values
        weight = _kept_weights(values_ptr, scales_ptr, zeros_ptr, outputs, stored, columns[None, :], kept, stride_values,
                               stride_scales, BITS, GROUP_SIZE, HAS_ZEROS)  # fmt: skip
        x = tl.load(x_ptr + rows[:, None] * stride_xm + columns[None, :], mask=(rows < M)[:, None] & (columns < K)[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(weight.to(x.dtype)))
    tl.store(out_ptr + rows[:, None] * stride_om + outputs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (outputs < N)[None, :])  # fmt: skip


@triton.jit
def _sparse24_gemv(
    x_ptr, values_ptr, metadata_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, stored_per_split,
    stride_xm, stride_values, stride_metadata, stride_scales, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZEROS: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    ATOMIC: tl.constexpr,
):  # fmt: skip
    rows = tl.arange(0, ROWS)
    outputs = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    first_stored = tl.program_id(1) * stored_per_split
    end = tl.minimum(first_stored + stored_per_split, K // 2)
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for start in range(first_stored, end, BLOCK_J):
        stored = start + tl.arange(0, BLOCK_J)  # index among a row's kept values: two per group of four columns
        kept = (outputs < N)[:, None] & (stored < end)[None, :]
        group = stored // 2
        byte = tl.load(metadata_ptr + outputs[:, None] * stride_metadata + (stored // 4)[None, :], mask=kept, other=0).to(tl.int32)
        nibble = (byte >> ((group % 2) * 4)[None, :]) & 0xF
        position = tl.where((stored % 2 == 0)[None, :], nibble & 0x3, (nibble >> 2) & 0x3)
        columns = (group * 4)[None, :] + position
        weight = _kept_weights(values_ptr, scales_ptr, zeros_ptr, outputs, stored[None, :], columns, kept, stride_values,
                               stride_scales, BITS, GROUP_SIZE, HAS_ZEROS)  # fmt: skip
        x = tl.load(x_ptr + rows[:, None, None] * stride_xm + columns[None, :, :], mask=(rows < M)[:, None, None] & kept[None, :, :], other=0.0)
        acc += tl.sum(x.to(tl.float32) * weight[None, :, :], axis=2)
    targets = out_ptr + rows[:, None] * stride_om + outputs[None, :]
    inside = (rows < M)[:, None] & (outputs < N)[None, :]
    if ATOMIC:
        tl.atomic_add(targets, acc, mask=inside)
    else:
        tl.store(targets, acc.to(out_ptr.dtype.element_ty), mask=inside)


def sparse24_matmul(inputs: torch.Tensor, compressed: Compressed24) -> torch.Tensor:
    """``inputs @ decompress(compressed).T`` for fp16 / bf16 ``inputs`` of shape ``[..., in]``: the
    decode kernel for up to ``GEMV_ROWS`` token rows, the tiled kernel above."""
    rows = inputs.numel() // max(inputs.shape[-1], 1)
    return sparse24_gemv(inputs, compressed) if rows <= GEMV_ROWS else sparse24_tiles(inputs, compressed)


def sparse24_tiles(inputs: torch.Tensor, compressed: Compressed24) -> torch.Tensor:
    """The tiled (``tl.dot``) kernel: ``inputs @ decompress(compressed).T`` for any number of token rows."""
    x, compressed, scales, zeros = _checked(inputs, compressed)
    rows, outputs = x.shape[0], compressed.out_features
    out = torch.empty(rows, outputs, dtype=inputs.dtype, device=inputs.device)
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(outputs, BLOCK_N))
    _sparse24_tiles[grid](
        x, compressed.values, compressed.metadata, scales, zeros, out, rows, outputs, compressed.in_features,
        x.stride(0), compressed.values.stride(0), compressed.metadata.stride(0), scales.stride(0), out.stride(0),
        BITS=compressed.bits or 16, GROUP_SIZE=compressed.group_size or 1, HAS_ZEROS=compressed.zero_points is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out.reshape(*inputs.shape[:-1], outputs)


def sparse24_gemv(inputs: torch.Tensor, compressed: Compressed24, split_k: int | None = None) -> torch.Tensor:
    """The decode kernel: ``inputs @ decompress(compressed).T`` for up to ``GEMV_MAX_ROWS`` token rows.

    ``split_k`` programs share each block of output rows (None: enough for two programs per
    multiprocessor on a GPU, one on the CPU interpreter); with more than one they add fp32 partial sums.
    """
    x, compressed, scales, zeros = _checked(inputs, compressed)
    rows, outputs = x.shape[0], compressed.out_features
    if rows > GEMV_MAX_ROWS:
        raise ValueError(f"the 2:4 decode kernel takes at most {GEMV_MAX_ROWS} token rows, got {rows} (use sparse24_tiles)")
    padded_rows = triton.next_power_of_2(max(rows, 1))
    block_j = max(16, 256 // padded_rows)  # rows × block values per program stay within the registers
    blocks = triton.cdiv(outputs, GEMV_BLOCK_N)
    stored = compressed.in_features // 2
    if split_k is None:
        processors = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = max(1, min(triton.cdiv(2 * processors, blocks), triton.cdiv(stored, block_j)))
    stored_per_split = triton.cdiv(triton.cdiv(stored, split_k), block_j) * block_j
    split_k = triton.cdiv(stored, stored_per_split)
    atomic = split_k > 1
    out = (torch.zeros if atomic else torch.empty)(rows, outputs, dtype=torch.float32 if atomic else inputs.dtype, device=inputs.device)
    _sparse24_gemv[(blocks, split_k)](
        x, compressed.values, compressed.metadata, scales, zeros, out, rows, outputs, compressed.in_features, stored_per_split,
        x.stride(0), compressed.values.stride(0), compressed.metadata.stride(0), scales.stride(0), out.stride(0),
        BITS=compressed.bits or 16, GROUP_SIZE=compressed.group_size or 1, HAS_ZEROS=compressed.zero_points is not None,
        ROWS=padded_rows, BLOCK_N=GEMV_BLOCK_N,
        BLOCK_J=block_j, ATOMIC=atomic,
    )  # fmt: skip
    return out.to(inputs.dtype).reshape(*inputs.shape[:-1], outputs)


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
