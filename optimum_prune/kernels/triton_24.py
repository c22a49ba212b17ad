"""Triton kernel for y = x Wᵀ with W in the compressed 2:4 format of ``format.py``, plain (fp16 /
bf16 values) or quantized (int8 / int4 values with one scale per row and ``group_size`` columns).

Each program computes a BLOCK_M × BLOCK_N tile of y and walks the input dimension BLOCK_K dense
columns at a time. For every column k of the tile it loads the metadata nibble of k's group of
four and the stored value k maps to (the same few bytes serve the four columns of a group, so they
come from cache: DRAM reads the compressed size, 1.125 bytes per weight for 16-bit values, about
0.39 for int4), rebuilds the dense weight tile in registers (the value where k is one of the
group's two kept positions, else 0; dequantized with its scale) and multiplies with the x tile by
``tl.dot`` (tensor cores on a GPU). x is padded to BLOCK_M = 16 rows, ``tl.dot``'s minimum, so the
same kernel serves decode (M = 1) and prefill.

Status: the kernel's logic is tested on CPU in Triton's interpreter (``TRITON_INTERPRET=1``)
against ``decompress``; its speed on GPUs (against cuBLAS and cuSPARSELt, and the block sizes) has
not been measured yet — that needs a GPU session.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .format import Compressed24
from .linear import KERNEL_DTYPES

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64


@triton.jit
def _sparse24_matmul(
    x_ptr, values_ptr, metadata_ptr, scales_ptr, out_ptr, M, N, K,
    stride_xm, stride_values, stride_metadata, stride_scales, stride_om,
    BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        if BITS == 16:
            weight = tl.load(values_ptr + outputs[:, None] * stride_values + stored, mask=kept, other=0.0)
        else:
            if BITS == 8:
                q = tl.load(values_ptr + outputs[:, None] * stride_values + stored, mask=kept, other=0).to(tl.int32)
            else:  # two int4 values per byte, the lower nibble first, two's complement
                packed = tl.load(values_ptr + outputs[:, None] * stride_values + stored // 2, mask=kept, other=0).to(tl.int32)
                q = (packed >> ((stored % 2) * 4)) & 0xF
                q = tl.where(q > 7, q - 16, q)
            scale = tl.load(scales_ptr + outputs[:, None] * stride_scales + (columns // GROUP_SIZE)[None, :], mask=kept, other=0.0)
            weight = q.to(tl.float32) * scale.to(tl.float32)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + columns[None, :], mask=(rows < M)[:, None] & (columns < K)[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(weight.to(x.dtype)))
    tl.store(out_ptr + rows[:, None] * stride_om + outputs[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(rows < M)[:, None] & (outputs < N)[None, :])  # fmt: skip


def sparse24_matmul(inputs: torch.Tensor, compressed: Compressed24) -> torch.Tensor:
    """``inputs @ decompress(compressed).T`` for fp16 / bf16 ``inputs`` of shape ``[..., in]``."""
    if inputs.dtype not in KERNEL_DTYPES:
        raise ValueError(f"the 2:4 Triton kernel takes float16 or bfloat16 inputs, got {inputs.dtype}")
    if inputs.shape[-1] != compressed.in_features:
        raise ValueError(f"inputs have {inputs.shape[-1]} features, the 2:4 weight {compressed.in_features}")
    x = inputs.reshape(-1, compressed.in_features).contiguous()
    rows, outputs = x.shape[0], compressed.out_features
    out = torch.empty(rows, outputs, dtype=inputs.dtype, device=inputs.device)
    values, metadata = compressed.values.contiguous(), compressed.metadata.contiguous()
    scales = compressed.scales.contiguous() if compressed.scales is not None else values  # unused when BITS == 16
    grid = (triton.cdiv(rows, BLOCK_M), triton.cdiv(outputs, BLOCK_N))
    _sparse24_matmul[grid](
        x, values, metadata, scales, out, rows, outputs, compressed.in_features,
        x.stride(0), values.stride(0), metadata.stride(0), scales.stride(0), out.stride(0),
        BITS=compressed.bits or 16, GROUP_SIZE=compressed.group_size or 1, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return out.reshape(*inputs.shape[:-1], outputs)
