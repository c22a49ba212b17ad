"""Check on a GPU, one launch per case, the mma.sp m16n8k32 (bf16) register layouts that
``optimum_prune/kernels/sparse24_mma.cu`` is built on, so that a failing kernel test can be traced
to the assumption that broke in seconds of device time:

- A's kept values, B and C / D as PTX documents them for this shape;
- the metadata register: lanes with t % 2 = h hold row g's positions of logical groups 4h … 4h + 3
  in bits 0–15 and row g + 8's in bits 16–31 ("rows": what the kernel assumes), against the
  other reading, lane h holding row g + 8h's groups 0–3 and 4–7 in its two halves ("halves");
- the sparsity selector: 0 takes the metadata from lanes t = 0, 1 of each quad, 1 from lanes 2, 3
  (the kernel alternates them); the lanes not selected hold other, valid metadata, so a case
  passes only if they are ignored.

The host packs every lane's registers from a random 2:4 A (16 × 32) and B (32 × 8); the kernel only
loads them, runs one mma and stores D. Each case prints whether D equals A @ B.

    python scripts/mma_probe.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from optimum_prune.kernels.nvrtc import Kernel, compile_cubin, version  # noqa: E402

KERNEL = r"""
extern "C" __global__ void probe(const unsigned* a, const unsigned* b, const unsigned* e, float* d) {
  const int lane = threadIdx.x;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  unsigned ra[4], rb[4];
  for (int i = 0; i < 4; ++i) ra[i] = a[lane * 4 + i], rb[i] = b[lane * 4 + i];
  asm volatile(MMA ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, SELECTOR;\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(ra[0]), "r"(ra[1]), "r"(ra[2]), "r"(ra[3]), "r"(rb[0]), "r"(rb[1]), "r"(rb[2]), "r"(rb[3]), "r"(e[lane]));
  for (int i = 0; i < 4; ++i) d[lane * 4 + i] = acc[i];
}
"""


def pairs(low: torch.Tensor, high: torch.Tensor) -> int:
    """Two bf16 scalars as one 32-bit register, the first in the low half."""
    bits = torch.stack([low, high]).to(torch.bfloat16).view(torch.int16).to(torch.int32) & 0xFFFF
    return int(bits[0] | (bits[1] << 16))


def metadata_bits(positions: torch.Tensor, row: int, chunks: range) -> int:
    """16 bits: the two kept positions of each of four chunks of a row, the first chunk lowest."""
    return sum((int(positions[row, c, 0]) | int(positions[row, c, 1]) << 2) << (4 * i) for i, c in enumerate(chunks))


def registers(dense: torch.Tensor, b: torch.Tensor, layout: str, selector: int) -> tuple[list[int], list[int], list[int]]:
    """Every lane's A, B and metadata registers under ``layout`` ("rows" or "halves") and ``selector``."""
    positions = (dense.reshape(16, 8, 4) != 0).int().argsort(dim=-1, descending=True, stable=True)[..., :2].sort(-1).values
    kept = dense.reshape(16, 8, 4).gather(-1, positions).reshape(16, 16)
    a, b_registers, e = [], [], []
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        h = t & 1
        a += [pairs(kept[g, 2 * t], kept[g, 2 * t + 1]), pairs(kept[g + 8, 2 * t], kept[g + 8, 2 * t + 1]),
              pairs(kept[g, 8 + 2 * t], kept[g, 9 + 2 * t]), pairs(kept[g + 8, 8 + 2 * t], kept[g + 8, 9 + 2 * t])]  # fmt: skip
        b_registers += [pairs(b[2 * t + 8 * i, g], b[2 * t + 8 * i + 1, g]) for i in range(4)]
        if t >> 1 != selector:
            e.append(0x44444444 if t & 1 else 0x99999999)  # valid positions, but the wrong ones: must be ignored
        elif layout == "rows":
            e.append(metadata_bits(positions, g, range(4 * h, 4 * h + 4)) | metadata_bits(positions, g + 8, range(4 * h, 4 * h + 4)) << 16)
        else:
            row = g + 8 * h
            e.append(metadata_bits(positions, row, range(0, 4)) | metadata_bits(positions, row, range(4, 8)) << 16)
    return a, b_registers, e


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("scripts/mma_probe.py runs mma.sp: it needs a CUDA GPU")
    generator = torch.Generator().manual_seed(0)
    dense = torch.randn(16, 8, 4, generator=generator)
    keep = torch.rand(16, 8, 4, generator=generator).argsort(-1)[..., :2]
    dense = (dense * torch.zeros_like(dense).scatter_(-1, keep, 1.0)).reshape(16, 32).bfloat16().float()
    b = torch.randn(32, 8, generator=generator).bfloat16().float()
    reference = dense @ b
    capability = torch.cuda.get_device_capability()
    instruction = "mma.sp::ordered_metadata" if version() >= (12, 5) else "mma.sp"
    print(f"{torch.cuda.get_device_name()}, NVRTC {version()}, {instruction}")
    for layout, selector in (("rows", 0), ("rows", 1), ("halves", 0), ("halves", 1)):
        source = f'#define MMA "{instruction}"\n#define SELECTOR {selector}\n' + KERNEL
        kernel = Kernel(compile_cubin(source, "probe", capability), "probe")
        a, b_registers, e = (torch.tensor(values, dtype=torch.int64).to(torch.int32).cuda() for values in registers(dense, b, layout, selector))
        d = torch.full((32, 4), float("nan"), device="cuda")
        kernel((1, 1, 1), (32, 1, 1), a, b_registers, e, d)
        torch.cuda.synchronize()
        result = torch.empty(16, 8)
        for lane, (c0, c1, c2, c3) in enumerate(d.cpu().tolist()):
            g, t = lane >> 2, lane & 3
            result[g, 2 * t], result[g, 2 * t + 1], result[g + 8, 2 * t], result[g + 8, 2 * t + 1] = c0, c1, c2, c3
        error = float((result - reference).abs().max() / reference.abs().max())
        print(f"metadata {layout:6} selector {selector}: {'holds' if error < 1e-5 else 'does not hold'} (relative error {error:.1e})")


if __name__ == "__main__":
    main()
