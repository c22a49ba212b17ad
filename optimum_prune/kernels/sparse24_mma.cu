// y[M, N] = x[M, K] · W[N, K]ᵀ on sparse tensor cores (mma.sp m16n8k32, compute capability 8.0+) for
// a few token rows, with W in format.py's compressed 2:4 layout exactly as it is stored (no repacked
// copy): 16-bit values, or int8 / int4 codes with a 16-bit scale (and optionally an int8 zero-point)
// per row and group_size columns. mma_24.py compiles this text with NVRTC after defining
//   IS_BF16      1: bf16 inputs, values / scales and output; 0: fp16
//   BITS         16: values in that type; 8: int8 codes; 4: int4 codes, two's complement, one byte per
//                group of four (the first code in the lower nibble)
//   HAS_ZEROS    int8 / int4: value = (code - zero_point) · scale instead of code · scale
//   WARPS        warps per block; they split the block's input columns and add their sums at the end
//   TILES        8-token tiles (mma's N = 8), so up to 8 · TILES token rows
//   UNROLL       windows (below) whose weight loads are issued before the first of their mma's
//   ORDERED      1: mma.sp::ordered_metadata (PTX 8.5, CUDA 12.5+); 0: plain mma.sp, for older NVRTC
//
// A block computes 16 outputs (mma's M) for every token over the input-column range of its
// blockIdx.y (split-K; with gridDim.y > 1 it writes float32 partial sums that the caller adds).
//
// The unit is a "window" of STEPS mma k-steps (32 input columns each, 8 groups of four). In a window,
// lane (g, t) = (lane / 4, lane % 4) loads groups 2·STEPS·t … 2·STEPS·t + 2·STEPS − 1 of output rows g
// and g + 8 as one wide word each (16 bytes of 16-bit values or int8 codes, 8 of int4 codes), and each row's
// metadata for the whole window as one word (8 or 16 bytes). The mma's k order is free as long as A
// and B agree, so each k-step takes its groups from the lanes' words instead of the column order: in
// k-step s, the mma's logical group L (0 … 7) is the window's physical group
//     2·STEPS · (L % 4) + 2s + L / 4,
// which puts logical group t (A registers 0 / 1 of lane t) at the lane's group 2s and logical group
// 4 + t (A registers 2 / 3) at its group 2s + 1. B (x) is read at the same physical columns.
//
// Metadata (PTX's m16n8k32 16-bit layout): the lanes of a quad with t % 2 = h supply logical groups
// 4h … 4h + 3 of row g in bits 0–15 and of row g + 8 in bits 16–31; sparsity selector 0 takes them
// from lanes t = 0, 1, selector 1 from lanes 2, 3. Steps alternate the selector, so each lane builds
// the register of every other step only: lanes 0, 1 those of even steps, lanes 2, 3 those of odd
// ones. Our nibble (i0 | i1 << 2, i0 < i1) is the chunk encoding mma.sp reads, ordered as
// ::ordered_metadata requires.
//
// Codes become q − zero-point exactly, as 16-bit values: an int4 code by bit placement under a 16-bit
// exponent (MAGIC_VALUE + q + 8, the sign bit flipped) and one packed add; an int8 code under a
// float32 exponent (2^23 + q + 128), one add and a conversion per pair. A window's columns share one
// scale per row (group_size is a multiple of WINDOW_COLUMNS), so the mma's of a window sum into their
// own accumulators, which are scaled into the running ones after.

typedef unsigned int u32;
typedef unsigned short u16;

#define ROWS 16
#define TOKENS 8

#if BITS == 16
#define STEPS 2
typedef uint4 ValueWord;  // four groups: one u32 (two 16-bit values) each
typedef uint2 MetadataWord;
#elif BITS == 8
#define STEPS 4
typedef uint4 ValueWord;  // eight groups: two bytes (two int8 codes) each
typedef uint4 MetadataWord;
#elif BITS == 4
#define STEPS 4
typedef uint2 ValueWord;  // eight groups: one byte (two int4 codes, the first in the lower nibble) each
typedef uint4 MetadataWord;
#else
#error "BITS must be 16, 8 or 4"
#endif
#define QUANTIZED (BITS != 16)
#define WINDOW_COLUMNS (32 * STEPS)
// Blocks a processor must fit (a register cap for ptxas): two for a few tiles, so that more loads are
// in flight; one for many, whose accumulators need the registers.
#define MIN_BLOCKS (TILES <= 2 ? 2 : 1)

#if ORDERED
#define SPARSE_MMA "mma.sp::ordered_metadata"
#else
#define SPARSE_MMA "mma.sp"
#endif
#if IS_BF16
#define MMA SPARSE_MMA ".sync.aligned.m16n8k32.row.col.f32.bf16.bf16.f32 "
#define ADD2 "fma.rn.bf16x2 %0, %1, %3, %2;"  // a · 1 + b (%3: ones): exact here, and sm_80 has no bf16x2 add
#define CONVERT "cvt.rn.bf16.f32 %0, %1;"
#define CONVERT_PAIR "cvt.rn.bf16x2.f32 %0, %2, %1;"  // %1 to the low half
#define MAGIC 0x43004300u  // 128.0 in both halves: 0x4300 | u is 128 + u for u < 128
#define MAGIC_VALUE 128.0f
#define ONES 0x3F803F80u
#else
#define MMA SPARSE_MMA ".sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
#define ADD2 "add.rn.f16x2 %0, %1, %2;"  // (%3 unused)
#define CONVERT "cvt.rn.f16.f32 %0, %1;"
#define CONVERT_PAIR "cvt.rn.f16x2.f32 %0, %2, %1;"
#define MAGIC 0x64006400u  // 1024.0 in both halves: 0x6400 | u is 1024 + u for u < 1024
#define MAGIC_VALUE 1024.0f
#define ONES 0x3C003C00u
#endif

template <int SELECTOR>
__device__ __forceinline__ void mma_sp(float (&acc)[4], const u32 (&a)[4], const u32 (&b)[4], u32 metadata) {
  asm volatile(MMA "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, {%0, %1, %2, %3}, %12, %13;\n"
               : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                 "r"(metadata), "n"(SELECTOR));
}

__device__ __forceinline__ u32 permuted(u32 a, u32 b, u32 selector) {
  u32 d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

__device__ __forceinline__ u16 to_output(float value) {
  u16 bits;
  asm(CONVERT : "=h"(bits) : "f"(value));
  return bits;
}

// The four metadata bytes of one row that k-step s needs, in order: bytes STEPS·c + s (c = 0 … 3) of
// the window, which hold the positions of physical groups 2·STEPS·c + 2s (low nibble) and + 1
// (high). `selector` picks byte s (a prmt selector the lane computes once: s depends on the lane).
__device__ __forceinline__ u32 step_bytes(const MetadataWord& word, u32 selector) {
#if STEPS == 2
  return permuted(word.x, word.y, selector);
#else
  return permuted(permuted(word.x, word.y, selector), permuted(word.z, word.w, selector), 0x5410);
#endif
}

// The metadata register of a k-step from both rows' step bytes: nibble h of each byte, row g's four
// in bits 0–15 (the first in the lowest nibble), row g + 8's in bits 16–31.
__device__ __forceinline__ u32 step_metadata(u32 bytes0, u32 bytes1, int h) {
  const u32 nibbles0 = (bytes0 >> (4 * h)) & 0x0F0F0F0Fu, nibbles1 = (bytes1 >> (4 * h)) & 0x0F0F0F0Fu;
  // n | n >> 4 packs the nibbles of bytes 0, 1 into byte 0 and those of bytes 2, 3 into byte 2.
  return permuted(nibbles0 | (nibbles0 >> 4), nibbles1 | (nibbles1 >> 4), 0x6420);
}

__device__ __forceinline__ u32 component(const uint4& word, int i) {
  return i == 0 ? word.x : i == 1 ? word.y : i == 2 ? word.z : word.w;
}

__device__ __forceinline__ u32 component(const uint2& word, int i) { return i == 0 ? word.x : word.y; }

#if QUANTIZED
// What one packed add to a code placed under its exponent leaves q − zero-point: the placed value of
// code 0, plus the zero-point, negated (as a 16-bit pair for int4, a float32 for int8).
__device__ __forceinline__ u32 code_offset(float zero_point) {
#if BITS == 4
  const u32 half = to_output(-(MAGIC_VALUE + 8.0f + zero_point));
  return half | (half << 16);
#else
  return __float_as_uint(-(8388608.0f + 128.0f + zero_point));
#endif
}

__device__ __forceinline__ float scale_value(u16 bits) {
#if IS_BF16
  return __uint_as_float(static_cast<u32>(bits) << 16);
#else
  float value;
  asm("cvt.f32.f16 %0, %1;" : "=f"(value) : "h"(bits));
  return value;
#endif
}
#endif

// The two values of the lane's group j (0 … 2·STEPS − 1) of a window as a 16-bit pair, the first in
// the low half: as stored, or q − zero-point for codes (`offset` from code_offset).
__device__ __forceinline__ u32 group_values(const ValueWord& word, int j, u32 offset) {
#if BITS == 16
  return component(word, j);
#elif BITS == 8
  const u32 codes = component(word, j >> 1) ^ 0x80808080u;  // q + 128, unsigned
  const u32 first = 2 * (j & 1);  // the group's first byte; 0x7440 puts it under 2^23: bytes 0, 0, 0x4B from the magic
  const float low = __uint_as_float(permuted(codes, 0x4B000000u, first | 0x7440u)) + __uint_as_float(offset);
  const float high = __uint_as_float(permuted(codes, 0x4B000000u, (first + 1) | 0x7440u)) + __uint_as_float(offset);
  u32 pair;
  asm(CONVERT_PAIR : "=r"(pair) : "f"(low), "f"(high));
  return pair;
#else
  const u32 word_codes = component(word, j >> 2), byte = j & 3;
  // Each byte's first code from the word, its second from the word >> 4, into the low and high halves.
  const u32 codes = permuted(word_codes, word_codes >> 4, byte | ((4 + byte) << 8));
  u32 placed;  // (codes & 0x000F000F) ^ (MAGIC | 0x00080008): under the exponent, the sign bit flipped (q + 8)
  asm("lop3.b32 %0, %1, 0x000F000F, %2, 0x6A;" : "=r"(placed) : "r"(codes), "r"(MAGIC | 0x00080008u));
  u32 value;
  asm(ADD2 : "=r"(value) : "r"(placed), "r"(offset), "r"(ONES));
  return value;
#endif
}

__device__ __forceinline__ void zero(float (&sums)[TILES][4]) {
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile)
#pragma unroll
    for (int r = 0; r < 4; ++r) sums[tile][r] = 0.0f;
}

// One k-step of a window for every token tile. a: the step's A registers; selector: the sparsity
// selector (even steps 0, odd steps 1); x_at: the tiles' B pointers at this step.
template <int SELECTOR>
__device__ __forceinline__ void step(float (&acc)[TILES][4], const u32 (&a)[4], u32 metadata, const u32* const (&x_at)[TILES],
                                     int offset) {
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile) {
    const u32* at = x_at[tile] + offset;
    const u32 b[4] = {__ldg(at), __ldg(at + 8 * STEPS), __ldg(at + 2), __ldg(at + 8 * STEPS + 2)};
    mma_sp<SELECTOR>(acc[tile], a, b, metadata);
  }
}

// x: [M, K] 16-bit, read as u32 pairs; values: [N, K / 2] 16-bit values or int8 codes, or [N, K / 4]
// bytes of int4 codes;
// metadata: [N, K / 8] bytes; scales: [N, K / group_size] 16-bit, zero_points: the same in int8 (int4
// and int4 only; the values stand in otherwise, unread); out: [M, N] 16-bit when gridDim.y is 1, else
// [gridDim.y, M, N] float32 partial sums. K is a multiple of WINDOW_COLUMNS; group_size is
// 2^scale_shift, a multiple of WINDOW_COLUMNS (mma_24.py checks both).
//
// Output rows past N and token rows past M read the last real row instead: what they compute lands
// in outputs that are never written, and no load needs a bounds check.
extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
sparse24_mma(const u32* __restrict__ x, const ValueWord* __restrict__ values,
             const MetadataWord* __restrict__ metadata, const u16* __restrict__ scales,
             const signed char* __restrict__ zero_points, void* __restrict__ out, int M, int N, int K,
             int windows_per_split, int scale_shift) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, t = lane & 3, h = t & 1, odd = t >> 1;  // odd: this lane supplies odd steps' metadata
  const int rows[2] = {min(static_cast<int>(blockIdx.x) * ROWS + g, N - 1), min(static_cast<int>(blockIdx.x) * ROWS + g + 8, N - 1)};
  const int windows = K / WINDOW_COLUMNS;
  const int first = blockIdx.y * windows_per_split + warp;  // this warp's first window; then every WARPS-th
  const int last = min(windows, static_cast<int>(blockIdx.y) * windows_per_split + windows_per_split);

  // Every pointer starts at the warp's first window and advances by constants. Per row: one
  // ValueWord per lane and window, one MetadataWord per window. B register i of lane (g, t) holds
  // logical k = 2t + 8i, 2t + 8i + 1: logical group 2i + t / 2 at position 2 (t % 2), which is the
  // u32 of x at 4·STEPS·(t / 2) + t % 2 + 8·STEPS·(i % 2) + 2 (i / 2) in the window, plus 4s in k-step s.
  const ValueWord* value_at[2];
  const MetadataWord* metadata_at[2];
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    value_at[k] = values + static_cast<size_t>(rows[k]) * windows * 4 + 4 * first + t;
    metadata_at[k] = metadata + static_cast<size_t>(rows[k]) * windows + first;
  }
  const u32* x_at[TILES];
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile)
    x_at[tile] = x + static_cast<size_t>(min(tile * TOKENS + g, M - 1)) * (K / 2) + first * (WINDOW_COLUMNS / 2)
                 + 4 * STEPS * (t >> 1) + h;
  // The prmt selectors of this lane's metadata steps 2p + odd (p = 0 … STEPS / 2 − 1): bytes STEPS·c + s.
  u32 byte_selectors[STEPS / 2];
#pragma unroll
  for (int p = 0; p < STEPS / 2; ++p) {
    const u32 s = 2 * p + odd;
#if STEPS == 2
    byte_selectors[p] = s | ((2 + s) << 4) | ((4 + s) << 8) | ((6 + s) << 12);
#else
    byte_selectors[p] = s | ((4 + s) << 4);
#endif
  }
#if QUANTIZED
  const u16* scale_at[2];
#if HAS_ZEROS
  const signed char* zero_point_at[2];
#endif
  int column = first * WINDOW_COLUMNS;  // the warp's current window's first input column
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    scale_at[k] = scales + (static_cast<size_t>(rows[k]) * K >> scale_shift);
#if HAS_ZEROS
    zero_point_at[k] = zero_points + (static_cast<size_t>(rows[k]) * K >> scale_shift);
#endif
  }
#endif

  float acc[TILES][4];
  zero(acc);

  for (int window = first; window < last; window += WARPS * UNROLL) {
#if QUANTIZED
#pragma unroll
    for (int k = 0; k < 2; ++k) {  // opaque to ptxas, which would otherwise recompute these rows' addresses every window
      asm volatile("" : "+l"(scale_at[k]));
#if HAS_ZEROS
      asm volatile("" : "+l"(zero_point_at[k]));
#endif
    }
#endif
    ValueWord words[UNROLL][2];
    MetadataWord nibbles[UNROLL][2];
    u32 offsets[UNROLL][2];  // per row: code_offset (quantized values)
#if QUANTIZED
    float window_scales[UNROLL][2];
#endif
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {  // every weight load of the iteration first: many in flight
      if (window + u * WARPS < last) {
#pragma unroll
        for (int k = 0; k < 2; ++k) {
          words[u][k] = value_at[k][4 * WARPS * u];
          nibbles[u][k] = metadata_at[k][WARPS * u];
#if QUANTIZED
          const int group = (column + u * WARPS * WINDOW_COLUMNS) >> scale_shift;
          window_scales[u][k] = scale_value(__ldg(scale_at[k] + group));
          float zero_point = 0.0f;
#if HAS_ZEROS
          zero_point = static_cast<float>(__ldg(zero_point_at[k] + group));
#endif
          offsets[u][k] = code_offset(zero_point);
#else
          offsets[u][k] = 0;
#endif
        }
      }
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (window + u * WARPS >= last) break;  // the same for the whole warp: mma.sync stays converged
#if !QUANTIZED
      float (&sums)[TILES][4] = acc;
#else
      float sums[TILES][4];
      zero(sums);
#endif
      const int x_offset = u * WARPS * (WINDOW_COLUMNS / 2);
#pragma unroll
      for (int p = 0; p < STEPS / 2; ++p) {
        // One metadata register serves two steps: step 2p from lanes 0, 1, step 2p + 1 from lanes 2, 3.
        const u32 selected = step_metadata(step_bytes(nibbles[u][0], byte_selectors[p]),
                                           step_bytes(nibbles[u][1], byte_selectors[p]), h);
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int s = 2 * p + q;
          const u32 a[4] = {group_values(words[u][0], 2 * s, offsets[u][0]), group_values(words[u][1], 2 * s, offsets[u][1]),
                            group_values(words[u][0], 2 * s + 1, offsets[u][0]), group_values(words[u][1], 2 * s + 1, offsets[u][1])};
          if (q == 0)
            step<0>(sums, a, selected, x_at, x_offset + 4 * s);
          else
            step<1>(sums, a, selected, x_at, x_offset + 4 * s);
        }
      }
#if QUANTIZED
#pragma unroll
      for (int tile = 0; tile < TILES; ++tile)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[tile][r] += sums[tile][r] * window_scales[u][r >> 1];  // r ≥ 2: row g + 8
#endif
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      value_at[k] += 4 * WARPS * UNROLL;
      metadata_at[k] += WARPS * UNROLL;
    }
#pragma unroll
    for (int tile = 0; tile < TILES; ++tile) x_at[tile] += WARPS * UNROLL * (WINDOW_COLUMNS / 2);
#if QUANTIZED
    column += WARPS * UNROLL * WINDOW_COLUMNS;
#endif
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
