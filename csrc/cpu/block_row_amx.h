// The block-row product of block_row_product.h for bfloat16 inputs on Intel AMX tiles
// (AMX-BF16: Sapphire Rapids and later):
//
//   out[:, i] = alpha * sum_{t in row i} a[:, idx[t]*B : +B] @ B_t (+ branch[:, i])
//
// One tdpbf16ps multiplies a 16 x 32 tile of bfloat16 inputs by a 32 x 16 tile of block
// entries into 16 x 16 float32 sums (products exact, sums in float32, as vdpbf16ps; inputs
// and results that are subnormal are taken as zero): 8192 multiply-adds an instruction,
// 16 times the AVX-512 dot products' rate. The input rows are read as tiles straight from
// `a` (any row stride, no packing); the blocks are bfloat16 pairs (bf16_pair_blocks), the
// layout a tile's second operand wants. Compiled for every x86-64 target (function target
// attributes) and taken at run time where the CPU has AMX-BF16 and Linux grants the tile
// state (arch_prctl), unless ENTSKIP_CPU_AMX=0 (amx_available()).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "amx_support.h"
#include "common.h"
#include "simd.h"

#if ENTSKIP_AMX
#include <immintrin.h>
#endif

namespace entskip::cpu {

// Bp[t][k][j] = (bf16(Bv[t][2k][j]), bf16(Bv[t][2k + 1][j])) for the nnz float32 B x B
// blocks Bv (B[t][c][j] maps input feature c to output feature j), the lower feature in
// the lower half of each 32-bit word: pairs of consecutive input features side by side.
template <int B>
std::vector<uint32_t> bf16_pair_blocks(const float* Bv, int64_t nnz) {
  constexpr int64_t kElems = int64_t{B} * B / 2;
  std::vector<uint32_t> Bp(nnz * kElems);
  const auto bits = [](float f) { return static_cast<uint32_t>(c10::BFloat16(f).x); };
  for (int64_t t = 0; t < nnz; ++t)
    for (int k = 0; k < B / 2; ++k)
      for (int j = 0; j < B; ++j) {
        const float* src = Bv + (t * B + 2 * k) * B + j;
        Bp[t * kElems + k * B + j] = bits(src[0]) | bits(src[B]) << 16;
      }
  return Bp;
}

#if ENTSKIP_AMX
namespace amx {

// The 64-byte tile configuration (palette 1).
struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// The tile registers of the B x B kernel. Tiles 0-3 accumulate a unit of 16 * R rows by
// the B columns of an output block: R = 64 / B groups of 16 rows by B / 16 groups of 16
// columns. A product takes K input features (32; 16 at B = 16). Inputs are 16 rows x K
// bfloat16, block tiles K / 2 pair rows x 16 columns:
//   B = 16: the block in tile 4, the four row groups' inputs alternating in tiles 5 and 6;
//   B = 32: the two row groups' inputs in tiles 4 and 5, the two column groups' block tiles
//           in 6 and 7;
//   B = 64: two steps of 32 input features, the inputs in tile 4, the four column groups'
//           block tiles in 5, 6, 7 and again 5.
template <int B>
struct Kernel {
  static_assert(B == 16 || B == 32 || B == 64, "AMX kernels for blocks of 16, 32 and 64");
  static constexpr int R = 64 / B;              // row groups of 16
  static constexpr int H = B / 16;              // column groups of 16
  static constexpr int K = B < 32 ? B : 32;     // input features per tile product
  static constexpr int64_t kRows = 16 * R;      // rows per unit
  static constexpr int64_t kPairRow = B * 4;    // bytes per pair row (k) of a block

  static TileConfig config() {
    TileConfig c;
    for (int r = 0; r < 8; ++r) {
      c.rows[r] = 16;
      c.colsb[r] = 64;
    }
    // Input tiles: 16 rows x K bfloat16. Block tiles: K / 2 pair rows x 16 words.
    const int in_first = B == 16 ? 5 : 4, in_last = B == 16 ? 6 : (B == 32 ? 5 : 4);
    for (int r = in_first; r <= in_last; ++r) c.colsb[r] = static_cast<uint16_t>(K * 2);
    for (int r = 4; r < 8; ++r)
      if (r < in_first || r > in_last) c.rows[r] = static_cast<uint8_t>(K / 2);
    return c;
  }

  // The 4 accumulators = the sums over blocks [t0, t1) for the 16 * R rows at `a` (row
  // stride lda elements).
  __attribute__((target("amx-tile,amx-bf16"))) static void products(const c10::BFloat16* a, int64_t lda,
                                                                      const uint32_t* Bp, const int64_t* idx,
                                                                      int64_t t0, int64_t t1) {
    const int64_t stride = lda * 2;
    asm volatile("" ::: "memory");  // tile loads are asm without a memory operand: inputs written before are visible
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t t = t0; t < t1; ++t) {
      const c10::BFloat16* at = a + idx[t] * B;
      const uint32_t* bt = Bp + t * (B * B / 2);
      if constexpr (B == 16) {
        _tile_loadd(4, bt, kPairRow);
        _tile_loadd(5, at, stride);
        _tile_dpbf16ps(0, 5, 4);
        _tile_loadd(6, at + 16 * lda, stride);
        _tile_dpbf16ps(1, 6, 4);
        _tile_loadd(5, at + 32 * lda, stride);
        _tile_dpbf16ps(2, 5, 4);
        _tile_loadd(6, at + 48 * lda, stride);
        _tile_dpbf16ps(3, 6, 4);
      } else if constexpr (B == 32) {
        _tile_loadd(4, at, stride);
        _tile_loadd(5, at + 16 * lda, stride);
        _tile_loadd(6, bt, kPairRow);
        _tile_loadd(7, bt + 16, kPairRow);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      } else {
        for (int s = 0; s < 2; ++s) {  // input features 32s .. 32s + 31: pair rows 16s .. 16s + 15
          const uint32_t* bs = bt + s * 16 * B;
          _tile_loadd(4, at + 32 * s, stride);
          _tile_loadd(5, bs, kPairRow);
          _tile_loadd(6, bs + 16, kPairRow);
          _tile_loadd(7, bs + 32, kPairRow);
          _tile_dpbf16ps(0, 4, 5);
          _tile_dpbf16ps(1, 4, 6);
          _tile_dpbf16ps(2, 4, 7);
          _tile_loadd(5, bs + 48, kPairRow);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
    }
  }

  // The accumulators to the 16 * R rows x B columns at sums (row stride lds floats):
  // accumulator c holds rows 16 g .. + 15, columns 16 h .. + 15, (g, h) = (c / H, c % H).
  __attribute__((target("amx-tile"))) static void store(float* sums, int64_t lds) {
    const int64_t stride = lds * 4;
    _tile_stored(0, sums + 16 * (0 / H) * lds + 16 * (0 % H), stride);
    _tile_stored(1, sums + 16 * (1 / H) * lds + 16 * (1 % H), stride);
    _tile_stored(2, sums + 16 * (2 / H) * lds + 16 * (2 % H), stride);
    _tile_stored(3, sums + 16 * (3 / H) * lds + 16 * (3 % H), stride);
  }
};

__attribute__((target("amx-tile"))) inline void load_config(const TileConfig& c) { _tile_loadconfig(&c); }
__attribute__((target("amx-tile"))) inline void release() { _tile_release(); }

// out[k] = alpha * sums[k] (+ branch[k]) for k < len (a multiple of 16).
inline void scale_add_row(const float* sums, float alpha, const c10::BFloat16* branch, c10::BFloat16* out,
                          int64_t len) {
  const simd::Vec<float> va = simd::broadcast(alpha);
  for (int64_t k = 0; k < len; k += 16) {
    simd::Vec<float> y = va * simd::load<float>(sums + k);
    if (branch != nullptr) y += simd::load<float>(branch + k);
    simd::store<float>(out + k, y);
  }
}

// The accumulators of sampled_block to (STORE) or from S (row stride ss bytes): B = 16 one
// tile; B = 32 rows 16 (c / 2) .. + 15 by columns 16 (c % 2) .. + 15 of tile c; B = 64 a
// pass's 16 rows by columns 16 c .. + 15.
template <int B, bool STORE>
__attribute__((target("amx-tile"))) inline void sampled_accumulators(float* S, int64_t ss) {
  constexpr int64_t o1 = 16, o2 = B == 32 ? 16 * B : 32, o3 = B == 32 ? 16 * B + 16 : 48;
  if constexpr (STORE) {
    _tile_stored(0, S, ss);
  } else {
    _tile_loadd(0, S, ss);
  }
  if constexpr (B == 16) return;
  if constexpr (STORE) {
    _tile_stored(1, S + o1, ss);
    _tile_stored(2, S + o2, ss);
    _tile_stored(3, S + o3, ss);
  } else {
    _tile_loadd(1, S + o1, ss);
    _tile_loadd(2, S + o2, ss);
    _tile_loadd(3, S + o3, ss);
  }
}

// S[m][c] += sum_{q < steps} g[q][m] . x[q][c] (m, c < B; S row-major, float32) on AMX tiles,
// where g and x are (steps, B) panels of bfloat16 pairs of consecutive positions (the panels
// of the sampled dM: word [q][f] = feature f at positions 2q and 2q + 1). A product takes 16
// pair rows: x's panel rows are its second operand as they are; its first, 16 features m by
// 32 positions, is the transpose of 16 x 16 words of g's panel, made first (gt). Pair rows
// from `steps` up to the next multiple of 16 count as zeros in both.
template <int B>
__attribute__((target("amx-tile,amx-bf16"))) void sampled_block(const uint32_t* g, const uint32_t* x, int64_t steps,
                                                                 float* S) {
  static_assert(B == 16 || B == 32 || B == 64, "AMX kernels for blocks of 16, 32 and 64");
  using Words = simd::U32x16;
  constexpr int kMaxSteps = 64;
  TORCH_CHECK(steps <= kMaxSteps, "sampled_block: at most ", kMaxSteps, " pair rows per call, got ", steps);
  const int64_t kpad = (steps + 15) / 16 * 16;
  alignas(64) uint32_t gt[B * kMaxSteps];  // gt[m * kpad + q] = g[q][m]
  for (int64_t q0 = 0; q0 < kpad; q0 += 16) {
    for (int m0 = 0; m0 < B; m0 += 16) {
      Words v[16];
      for (int q = 0; q < 16; ++q) v[q] = q0 + q < steps ? simd::load_bits<Words>(g + (q0 + q) * B + m0) : Words{};
      simd::transpose_rows(v);
      for (int m = 0; m < 16; ++m) simd::store_bits(gt + (m0 + m) * kpad + q0, v[m]);
    }
  }
  alignas(64) uint32_t x_tail[16 * B];  // the last, partial 16 pair rows of x, zero-padded
  const int64_t full = steps / 16 * 16;
  if (full < steps) {
    std::memset(x_tail, 0, sizeof(x_tail));
    std::memcpy(x_tail, x + full * B, (steps - full) * B * sizeof(uint32_t));
  }
  TileConfig config;
  for (int r = 0; r < 8; ++r) {
    config.rows[r] = 16;
    config.colsb[r] = 64;
  }
  _tile_loadconfig(&config);
  asm volatile("" ::: "memory");  // gt and x_tail are written before the tile loads read them
  const int64_t gs = kpad * 4, xs = B * 4, ss = B * 4;
  // Accumulators 0-3 hold S rows 16 p .. + 15 (passes p) and columns 16 h .. + 15: B = 16 one
  // tile, B = 32 the four (p, h) of its one pass, B = 64 the four h of each of four passes.
  constexpr int kPasses = B == 64 ? 4 : 1;
  for (int p = 0; p < kPasses; ++p) {
    float* Sp = S + 16 * p * B;
    sampled_accumulators<B, false>(Sp, ss);
    for (int64_t q0 = 0; q0 < kpad; q0 += 16) {
      const uint32_t* xq = q0 < full ? x + q0 * B : x_tail;
      const uint32_t* gq = gt + 16 * p * kpad + q0;
      if constexpr (B == 16) {
        _tile_loadd(4, gq, gs);
        _tile_loadd(6, xq, xs);
        _tile_dpbf16ps(0, 4, 6);
      } else if constexpr (B == 32) {
        _tile_loadd(4, gq, gs);
        _tile_loadd(5, gq + 16 * kpad, gs);
        _tile_loadd(6, xq, xs);
        _tile_loadd(7, xq + 16, xs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      } else {
        _tile_loadd(4, gq, gs);
        _tile_loadd(6, xq, xs);
        _tile_loadd(7, xq + 16, xs);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_loadd(6, xq + 32, xs);
        _tile_loadd(7, xq + 48, xs);
        _tile_dpbf16ps(2, 4, 6);
        _tile_dpbf16ps(3, 4, 7);
      }
    }
    sampled_accumulators<B, true>(Sp, ss);
  }
  _tile_release();
}

}  // namespace amx

// block_row_product for bfloat16 with B x B blocks on AMX tiles: Bp from bf16_pair_blocks,
// the other arguments as block_row_product_fixed. A thread owns a tile of rows at a time
// (their inputs stay in L2) and applies every output block row to it, unit by unit (16 * R
// rows, Kernel<B>), the block row's blocks staying in L1 across the units. The sums go to a
// per-thread float32 copy of the tile's output rows (in L2); then one pass over whole rows
// applies alpha and the branch and writes the output, reading and writing memory in order
// (written block column by block column, 2 KiB apart, the branch and output rows were
// demand misses the prefetchers do not follow). The last unit of a short tile computes from
// a zero-padded copy of its rows. Each output element is the sum of its blocks in order, so
// results do not depend on the thread count.
template <int B>
void block_row_product_amx(const c10::BFloat16* a, int64_t lda, const uint32_t* Bp, const int64_t* ptr,
                           const int64_t* idx, int64_t nrows, int64_t N, float alpha, const c10::BFloat16* branch,
                           c10::BFloat16* out) {
  using Kern = amx::Kernel<B>;
  constexpr int64_t unit = Kern::kRows;
  const int64_t ldo = nrows * B;
  if (N == 0 || ldo == 0) return;
  const int64_t row_bytes = std::max<int64_t>(lda * 2 + ldo * 4, 1);  // an input row and its sums
  const int64_t fit_units = std::max<int64_t>(1, (512 * 1024) / (unit * row_bytes));
  const int64_t parallel_units = (N + 4 * unit * at::get_num_threads() - 1) / (4 * unit * at::get_num_threads());
  const int64_t tile = unit * std::max<int64_t>(1, std::min(fit_units, parallel_units));
  const int64_t ntiles = (N + tile - 1) / tile;
  const amx::TileConfig config = Kern::config();
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(tile * ldo);
    std::vector<c10::BFloat16> padded;  // the zero-padded rows of a short last unit
    amx::load_config(config);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n0 = w * tile, rows = std::min(N, n0 + tile) - n0;
      const int64_t tail = rows % unit;
      if (tail != 0 && lda > 0) {
        padded.assign(unit * lda, c10::BFloat16(0.0f));
        std::memcpy(padded.data(), a + (n0 + rows - tail) * lda, tail * lda * sizeof(c10::BFloat16));
      }
      // The next tile's input rows, requested in even slices while this tile computes: tile
      // loads read 16 rows 64 bytes at a time, an access pattern the prefetchers do not follow.
      const char* next = reinterpret_cast<const char*>(a + (n0 + rows) * lda);
      const int64_t next_bytes = (w + 1 < end ? std::min(tile, N - n0 - rows) : 0) * lda * 2;
      const int64_t steps = nrows * ((rows + unit - 1) / unit);
      const int64_t slice = (next_bytes / 64 + steps - 1) / steps * 64;  // steps > 0: rows, nrows > 0
      int64_t ahead = 0;
      for (int64_t i = 0; i < nrows; ++i) {
        for (int64_t m = 0; m < rows; m += unit, ahead += slice) {
          for (int64_t e = ahead; e < std::min(ahead + slice, next_bytes); e += 64) __builtin_prefetch(next + e, 0, 2);
          Kern::products(m + unit <= rows ? a + (n0 + m) * lda : padded.data(), lda, Bp, idx, ptr[i], ptr[i + 1]);
          Kern::store(sums.data() + m * ldo + i * B, ldo);
        }
      }
      prefault_for_write(out + n0 * ldo, rows * ldo * static_cast<int64_t>(sizeof(c10::BFloat16)));
      for (int64_t m = 0; m < rows; ++m) {
        amx::scale_add_row(sums.data() + m * ldo, alpha, branch != nullptr ? branch + (n0 + m) * ldo : nullptr,
                           out + (n0 + m) * ldo, ldo);
      }
    }
    amx::release();
  });
}
#endif

}  // namespace entskip::cpu
