// y[M, N] = x[M, K] · W[N, K]ᵀ on sparse tensor cores (mma.sp m16n8k32, compute capability 8.0+) for
// a few token rows, with W in format.py's compressed 2:4 layout exactly as it is stored: no repacked
// copy. mma_24.py compiles this text with NVRTC after defining
//   IS_BF16      1: bf16 operands and output; 0: fp16
//   WARPS        warps per block; they split the block's input columns and add their sums at the end
//   TILES        8-token tiles (mma's N = 8), so up to 8 · TILES token rows
//   UNROLL       pairs (below) whose weight loads are issued before the first of their mma's
//
// A block computes 16 outputs (mma's M) for every token over the input-column range of its
// blockIdx.y (split-K; with gridDim.y > 1 it writes float32 partial sums that the caller adds).
//
// The unit is a "pair": 64 input columns, two mma k-steps of 32, sixteen groups of four. In a pair,
// lane (g, t) = (lane / 4, lane % 4) loads groups 4t … 4t + 3 of output rows g and g + 8 as one 16-byte
// word each (the two kept 16-bit values of a group are one 32-bit register), and the row's 16
// metadata nibbles as one 8-byte word. The mma's k order is free as long as A and B agree, so each
// k-step takes its groups from the lanes' words instead of the column order: in k-step q, the mma's
// logical group L (0 … 7) is the pair's physical group
//     4 · (L % 4) + 2q + L / 4,
// which puts logical group t (A register 0 / 1 of lane t) at word component 2q and logical group
// 4 + t (A register 2 / 3) at component 2q + 1. B (x) is read at the same physical columns, and the
// metadata register is rebuilt to match: lanes with t % 2 = h hold logical groups 4h … 4h + 3 of row
// g in bits 0–15 and of row g + 8 in bits 16–31 (PTX's m16n8k32 16-bit layout, sparsity selector 0).
// Our metadata nibble (i0 | i1 << 2, i0 < i1) is the chunk encoding mma.sp::ordered_metadata reads.

typedef unsigned int u32;
typedef unsigned short u16;

#define ROWS 16
#define TOKENS 8
#define PAIR_COLUMNS 64
#define PADDING_METADATA 0x44444444u  // positions 0 and 1 in every group: valid metadata for rows past N

__device__ __forceinline__ void mma_sp(float (&acc)[4], const u32 (&a)[4], const u32 (&b)[4], u32 metadata) {
#if IS_BF16
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
#else
  asm volatile("mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
#endif
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, 0x0;\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                 "r"(metadata));
}

// Sixteen metadata bits of one row for k-step q and half h: the nibbles of physical groups
// 2q + h + 4c (c = 0 … 3) of the pair, moved to bits 4c … 4c + 3. shift = 4 · (2q + h) ≤ 12, so each
// 32-bit half of the word can be shifted on its own.
__device__ __forceinline__ u32 metadata_bits(uint2 word, int shift) {
  const u32 low = word.x >> shift, high = word.y >> shift;
  return (low & 0xFu) | ((low >> 12) & 0xF0u) | ((high << 8) & 0xF00u) | ((high >> 4) & 0xF000u);
}

__device__ __forceinline__ u16 to_output(float value) {
  u16 bits;
#if IS_BF16
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(bits) : "f"(value));
#else
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(bits) : "f"(value));
#endif
  return bits;
}

// x: [M, K] 16-bit, read as u32 pairs; values: [N, K / 2] 16-bit, read as uint4 (four groups);
// metadata: [N, K / 8] bytes, read as uint2 (sixteen groups); out: [M, N] 16-bit when gridDim.y is 1,
// else [gridDim.y, M, N] float32 partial sums. K is a multiple of 64 (mma_24.py checks).
extern "C" __global__ void __launch_bounds__(WARPS * 32)
sparse24_mma(const u32* __restrict__ x, const uint4* __restrict__ values, const uint2* __restrict__ metadata,
             void* __restrict__ out, int M, int N, int K, int pairs_per_split) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3, h = t & 1;
  const int row0 = blockIdx.x * ROWS + g, row1 = row0 + 8;
  const bool live0 = row0 < N, live1 = row1 < N;
  const int pairs = K / PAIR_COLUMNS;
  const int first = blockIdx.y * pairs_per_split;
  const int last = min(pairs, first + pairs_per_split);
  const size_t values_per_row = K / 16, metadata_per_row = K / PAIR_COLUMNS, x_per_row = K / 2;

  // B register i of lane (g, t) holds logical k = 2t + 8i, 2t + 8i + 1: logical group 2i + t / 2 at
  // position 2 (t % 2), a u32 of x at this offset in the pair's 32 (plus 4q in k-step q).
  int x_offset[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int logical = 2 * i + (t >> 1);
    x_offset[i] = 8 * (logical & 3) + 2 * (logical >> 2) + h;
  }

  float acc[TILES][4];
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[tile][r] = 0.0f;

  for (int base = first + warp; base < last; base += WARPS * UNROLL) {
    uint4 words0[UNROLL], words1[UNROLL];
    uint2 nibbles0[UNROLL], nibbles1[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // every weight load of the iteration first: many in flight
      const int pair = base + u * WARPS;
      const bool inside = pair < last;
      words0[u] = inside && live0 ? values[row0 * values_per_row + 4 * pair + t] : make_uint4(0, 0, 0, 0);
      words1[u] = inside && live1 ? values[row1 * values_per_row + 4 * pair + t] : make_uint4(0, 0, 0, 0);
      nibbles0[u] = inside && live0 ? metadata[row0 * metadata_per_row + pair]
                                    : make_uint2(PADDING_METADATA, PADDING_METADATA);
      nibbles1[u] = inside && live1 ? metadata[row1 * metadata_per_row + pair]
                                    : make_uint2(PADDING_METADATA, PADDING_METADATA);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int pair = base + u * WARPS;
      if (pair >= last) break;  // the same for the whole warp: mma.sync stays converged
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const u32 a[4] = {q ? words0[u].z : words0[u].x, q ? words1[u].z : words1[u].x,
                          q ? words0[u].w : words0[u].y, q ? words1[u].w : words1[u].y};
        const int shift = 4 * (2 * q + h);
        const u32 selected = metadata_bits(nibbles0[u], shift) | (metadata_bits(nibbles1[u], shift) << 16);
#pragma unroll
        for (int tile = 0; tile < TILES; ++tile) {
          const int token = tile * TOKENS + g;
          const u32* row = x + token * x_per_row + pair * (PAIR_COLUMNS / 2) + 4 * q;
          u32 b[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) b[i] = token < M ? __ldg(row + x_offset[i]) : 0u;
          mma_sp(acc[tile], a, b, selected);
        }
      }
    }
  }

  // The warps' sums of the same outputs are added through shared memory.
  __shared__ float partial[WARPS][TILES * 4][32];
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile)
#pragma unroll
    for (int r = 0; r < 4; ++r) partial[warp][tile * 4 + r][lane] = acc[tile][r];
  __syncthreads();
  for (int item = threadIdx.x; item < TILES * 4 * 32; item += WARPS * 32) {
    const int owner = item & 31, r = (item >> 5) & 3, tile = item >> 7;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) sum += partial[w][item >> 5][owner];
    // Accumulator r of lane (g, t): output row g (+ 8 for r ≥ 2), token 2t + r % 2 of the tile.
    const int row = blockIdx.x * ROWS + (owner >> 2) + (r >= 2 ? 8 : 0);
    const int token = tile * TOKENS + 2 * (owner & 3) + (r & 1);
    if (row < N && token < M) {
      if (gridDim.y == 1)
        static_cast<u16*>(out)[static_cast<size_t>(token) * N + row] = to_output(sum);
      else
        static_cast<float*>(out)[(static_cast<size_t>(blockIdx.y) * M + token) * N + row] = sum;
    }
  }
}
