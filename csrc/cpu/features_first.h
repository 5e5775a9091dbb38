// Features-first kernels: activations (N, D, S) row-major, the features along dim 1 and
// S positions (H * W of an NCHW map) contiguous. Per image the skip is a left product,
//
//   out[n] = alpha * M @ a[n] (+ branch[n])      out[n]: (D_out, S), a[n]: (D_in, S)
//
// over a compressed layout of b x b blocks (forward: M's rows; dx: M^T through the transposed
// layout). The S positions are the SIMD dimension: the kernel reads x and branch in place
// (no transposes). (The sampled gradient of a features-first map is the features-last
// kernel of bsr_skip_add.cpp reading its panels through positions.h.) The block-row
// product packs a tile of S columns of every input row (widened to the accumulation type,
// zero-padded to whole vectors) into a per-thread buffer that stays in L2 and runs
// MR x (NV vectors) register tiles over it; any b works (the blocks' output rows are
// zero-padded to whole micro-tiles).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "block_row_product.h"
#include "common.h"
#include "simd.h"

namespace entskip::cpu {

// Positions per tile of the features-first products (a multiple of the chunk width cw):
// as many as fit kTileBytes at column_bytes a position (all packed input rows), but never
// fewer than kMinTileColumns (or S): shorter row pieces (48 positions, 192 bytes of a
// float32 row of a 14 x 14 map at 1024 channels) straddle cache lines that the next tile
// reads again and defeat the prefetchers. The S positions are then split into tiles of
// equal width (no short last tile).
constexpr int64_t kMinTileColumns = 256;
inline int64_t ff_tile_columns(int64_t S, int64_t column_bytes, int64_t cw) {
  const int64_t fit = std::max(kTileBytes / std::max<int64_t>(column_bytes, 1), kMinTileColumns);
  const int64_t ntiles = std::max<int64_t>(1, (S + fit - 1) / fit);
  const int64_t per = (S + ntiles - 1) / ntiles;
  return (per + cw - 1) / cw * cw;
}

#if defined(__AVX512BW__)
// The byte mask of the first n elements of type T (n * sizeof(T) < 64: a partial vector).
template <typename T>
inline uint64_t first_bytes(int64_t n) {
  return (uint64_t(1) << (n * sizeof(T))) - 1;
}
#endif

// The first n (0 < n <= W) elements at p as a vector, the rest zero; reads nothing past
// p + n (an AVX-512 masked load where the build has one: the tails of S = H * W rows, 4 of
// the 196 positions of a 14 x 14 map, would otherwise each take a variable-length memcpy).
template <typename acc_t, typename scalar_t>
inline simd::Vec<acc_t> load_first(const scalar_t* p, int64_t n) {
  constexpr int W = simd::Simd<acc_t>::W;
  if (n >= W) return simd::load<acc_t>(p);
  alignas(64) scalar_t buf[W];
#if defined(__AVX512BW__)
  static_assert(W * sizeof(scalar_t) == 32 || W * sizeof(scalar_t) == 64, "a vector of storage is 32 or 64 bytes");
  const uint64_t mask = first_bytes<scalar_t>(n);
  if constexpr (W * sizeof(scalar_t) == 64) {
    _mm512_store_si512(buf, _mm512_maskz_loadu_epi8(mask, p));
  } else {
    _mm256_store_si256(reinterpret_cast<__m256i*>(buf), _mm256_maskz_loadu_epi8(static_cast<uint32_t>(mask), p));
  }
#else
  std::memset(buf, 0, sizeof(buf));
  std::memcpy(buf, p, n * sizeof(scalar_t));
#endif
  return simd::load<acc_t>(buf);
}

// Stores the first n (0 < n <= W) lanes of v at p; writes nothing past p + n (a masked
// store where the build has one, as load_first).
template <typename acc_t, typename scalar_t>
inline void store_first(scalar_t* p, const simd::Vec<acc_t>& v, int64_t n) {
  constexpr int W = simd::Simd<acc_t>::W;
  if (n >= W) return simd::store<acc_t>(p, v);
  alignas(64) scalar_t buf[W];
  simd::store<acc_t>(buf, v);
#if defined(__AVX512BW__)
  const uint64_t mask = first_bytes<scalar_t>(n);
  if constexpr (W * sizeof(scalar_t) == 64) {
    _mm512_mask_storeu_epi8(p, mask, _mm512_load_si512(buf));
  } else {
    _mm256_mask_storeu_epi8(p, static_cast<uint32_t>(mask), _mm256_load_si256(reinterpret_cast<const __m256i*>(buf)));
  }
#else
  std::memcpy(p, buf, n * sizeof(scalar_t));
#endif
}

// Register tile of the features-first block-row product: MR output rows x NV vectors of S.
template <typename acc_t>
struct FfBlocking {
  static constexpr int W = simd::Simd<acc_t>::W;
  static constexpr int MR = 8, NV = 3;  // 24 accumulators of 32 registers
};

// How ff_block_product packs its input tile and multiplies by the blocks. FfWidened: in the
// accumulation type, one packed row per input feature, Bp (nnz, b, rpad) with Bp[t][k][o]
// mapping input feature k of block t to output feature o (zero for o >= b).
template <typename scalar_t, typename acc_t>
struct FfWidened {
  using packed_t = acc_t;
  using block_t = acc_t;
  static constexpr int kPair = 1;  // input features per packed row
  static bool fits(int64_t /*b*/) { return true; }
  // dst[:padded] = row0[:cols] widened, zero from cols on (row1 unused).
  static void pack(packed_t* dst, const scalar_t* row0, const scalar_t* /*row1*/, int64_t cols, int64_t padded) {
    constexpr int W = simd::Simd<acc_t>::W;
    for (int64_t c = 0; c < padded; c += W) simd::store<acc_t>(dst + c, load_first<acc_t>(row0 + c, cols - c));
  }
  static block_t block(const acc_t* Bk, int64_t /*b*/, int64_t o) { return Bk[o]; }
  static simd::Vec<acc_t> load(const packed_t* p) { return simd::load<acc_t>(p); }
  template <int MR, int NV>
  static void step(simd::Vec<acc_t> (&acc)[MR][NV], const block_t* Bk, const simd::Vec<acc_t> (&xv)[NV]) {
    simd::outer_product_step<MR, NV>(acc, Bk, xv);
  }
};

#if defined(__AVX512BF16__)
// bfloat16 with AVX512-BF16 dot products (vdpbf16ps, as block_row_micro_bf16_pairs): packed
// row q holds 32-bit words (a[2q][s], a[2q + 1][s]) and Bp[t][q][o] the pair (B[t][2q][o],
// B[t][2q + 1][o]), so one instruction applies two input features. Needs an even b.
struct FfBf16Pairs {
  using packed_t = uint32_t;
  using block_t = uint32_t;
  static constexpr int kPair = 2;
  static bool fits(int64_t b) { return b % 2 == 0; }
  static void pack(packed_t* dst, const c10::BFloat16* row0, const c10::BFloat16* row1, int64_t cols,
                   int64_t padded) {
    using simd::U16x16, simd::U32x16;
    for (int64_t c = 0; c < padded; c += 16) {  // masked loads: nothing read past cols
      const __mmask16 m = cols - c >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (cols - c)) - 1);
      const U16x16 lo = (U16x16)_mm256_maskz_loadu_epi16(m, row0 + c), hi = (U16x16)_mm256_maskz_loadu_epi16(m, row1 + c);
      simd::store_bits(dst + c, __builtin_convertvector(lo, U32x16) | __builtin_convertvector(hi, U32x16) << 16);
    }
  }
  static block_t block(const float* Bk, int64_t b, int64_t o) {
    const auto bits = [](float f) { return static_cast<uint32_t>(c10::BFloat16(f).x); };
    return bits(Bk[o]) | bits(Bk[b + o]) << 16;
  }
  static simd::Vec<float> load(const packed_t* p) {
    simd::Vec<float> v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  template <int MR, int NV>
  static void step(simd::Vec<float> (&acc)[MR][NV], const block_t* Bk, const simd::Vec<float> (&xv)[NV]) {
    for (int m = 0; m < MR; ++m) {
      const __m512bh bm = (__m512bh)_mm512_set1_epi32(static_cast<int>(Bk[m]));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], bm, (__m512bh)xv[v]);
    }
  }
};
#endif

// out[m][:cols] = alpha * sum_{t in [t0, t1)} sum_{q < kb} Ops::step(Bp[t][q][o0 + m],
// P[idx[t] * kb + q][:cols]) (+ branch[m][:cols]) for m < rows (<= MR), cols <= NV * W: kb =
// b / Ops::kPair packed rows per block; rows of out and branch are ldo apart. P: packed input
// rows (ldp apart, zero past the valid columns); Bp: (nnz, kb, rpad) in Ops' format. With
// stream (no narrowing, out's whole vectors 64-byte aligned), whole vectors are streamed.
// Never inlined (see block_row_micro): every element is computed by the same code.
template <typename scalar_t, typename acc_t, typename Ops, int MR, int NV>
ENTSKIP_MICRO_KERNEL void ff_micro(const typename Ops::packed_t* P, int64_t ldp, const typename Ops::block_t* Bp,
                                   int64_t kb, int64_t rpad, const int64_t* idx, int64_t t0, int64_t t1, int64_t o0,
                                   acc_t alpha, const scalar_t* branch, scalar_t* out, int64_t ldo, int64_t rows,
                                   int64_t cols, bool stream) {
  using V = simd::Vec<acc_t>;
  constexpr int W = simd::Simd<acc_t>::W;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  for (int64_t t = t0; t < t1; ++t) {
    const typename Ops::block_t* Bt = Bp + t * kb * rpad + o0;
    const typename Ops::packed_t* Pt = P + idx[t] * kb * ldp;
    for (int64_t q = 0; q < kb; ++q) {
      V xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = Ops::load(Pt + q * ldp + v * W);
      Ops::template step<MR, NV>(acc, Bt + q * rpad, xv);
    }
  }
  const V va = simd::broadcast(alpha);
  for (int64_t m = 0; m < rows; ++m) {
    for (int v = 0; v < NV && v * W < cols; ++v) {
      const int64_t n = std::min<int64_t>(W, cols - v * W);
      V y = va * acc[m][v];
      if (branch != nullptr) y += load_first<acc_t>(branch + m * ldo + v * W, n);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (stream && n == W) {
          simd::stream<acc_t>(out + m * ldo + v * W, y);
          continue;
        }
      }
      store_first<acc_t>(out + m * ldo + v * W, y, n);
    }
  }
}

// ff_micro with NV = nv (1 <= nv <= FfBlocking::NV) vectors: the last chunk of a tile.
template <typename scalar_t, typename acc_t, typename Ops, int NV = FfBlocking<acc_t>::NV>
inline void ff_micro_nv(int64_t nv, const typename Ops::packed_t* P, int64_t ldp, const typename Ops::block_t* Bp,
                        int64_t kb, int64_t rpad, const int64_t* idx, int64_t t0, int64_t t1, int64_t o0, acc_t alpha,
                        const scalar_t* branch, scalar_t* out, int64_t ldo, int64_t rows, int64_t cols,
                        bool stream) {
  if constexpr (NV > 1) {
    if (nv < NV)
      return ff_micro_nv<scalar_t, acc_t, Ops, NV - 1>(nv, P, ldp, Bp, kb, rpad, idx, t0, t1, o0, alpha, branch, out,
                                                       ldo, rows, cols, stream);
  }
  ff_micro<scalar_t, acc_t, Ops, FfBlocking<acc_t>::MR, NV>(P, ldp, Bp, kb, rpad, idx, t0, t1, o0, alpha, branch, out,
                                                             ldo, rows, cols, stream);
}

// ff_block_product with the packing and products of Ops (FfWidened, FfBf16Pairs).
template <typename scalar_t, typename acc_t, typename Ops>
void ff_block_product_with(const scalar_t* a, int64_t d_a, const acc_t* B, const int64_t* ptr, const int64_t* idx,
                           int64_t nrows, int64_t b, int64_t N, int64_t S, acc_t alpha, const scalar_t* branch,
                           scalar_t* out) {
  using packed_t = typename Ops::packed_t;
  constexpr int W = FfBlocking<acc_t>::W, MR = FfBlocking<acc_t>::MR, CW = FfBlocking<acc_t>::NV * W;
  constexpr int pair = Ops::kPair;
  const int64_t rpad = (b + MR - 1) / MR * MR, nnz = ptr[nrows], kb = b / pair, prows = d_a / pair;
  std::vector<typename Ops::block_t> Bp(nnz * kb * rpad, typename Ops::block_t(0));
  for (int64_t t = 0; t < nnz; ++t)
    for (int64_t q = 0; q < kb; ++q)
      for (int64_t o = 0; o < b; ++o) Bp[(t * kb + q) * rpad + o] = Ops::block(B + (t * b + q * pair) * b, b, o);
  // Tile columns: whole chunks of CW (ff_tile_columns: the L2 budget, at least 256, equal tiles).
  const int64_t tile = ff_tile_columns(S, prows * static_cast<int64_t>(sizeof(packed_t)), CW);
  const int64_t ntiles = (S + tile - 1) / tile, spatial = N * ntiles;
  const int64_t groups = std::clamp<int64_t>((4 * at::get_num_threads() + spatial - 1) / spatial, 1, nrows);
  const int64_t d_out = nrows * b;
  // A large float32/float64 output whose rows are whole 64-byte lines is streamed to memory
  // (whole vectors by non-temporal stores, as in block_row_product_fixed; the float32
  // 32 x 64 x 56 x 56 forward at density 1/4: 5.6 ms through the cache, 4.0 ms streamed).
  const bool stream = simd::kStreams && std::is_same_v<scalar_t, acc_t> &&
                      N * d_out * S * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && S * sizeof(scalar_t) % 64 == 0;
  at::parallel_for(0, spatial * groups, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<packed_t> P(prows * tile);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = w / (ntiles * groups), s0 = (w / groups) % ntiles * tile, g = w % groups;
      const int64_t cols = std::min(S - s0, tile), padded = (cols + W - 1) / W * W;
      const scalar_t* an = a + n * d_a * S + s0;
      for (int64_t r = 0; r < prows; ++r)
        Ops::pack(P.data() + r * tile, an + r * pair * S, an + (r * pair + pair - 1) * S, cols, padded);
      for (int64_t i = g * nrows / groups; i < (g + 1) * nrows / groups; ++i) {
        for (int64_t c0 = 0; c0 < cols; c0 += CW) {  // the row's packed inputs at c0 stay in L1 over o0
          const int64_t cc = std::min<int64_t>(CW, cols - c0);
          for (int64_t o0 = 0; o0 < b; o0 += MR) {
            const int64_t first = n * d_out * S + (i * b + o0) * S + s0;
            if (c0 + CW < cols)  // the next chunk's epilogue rows, a whole chunk's products ahead
              prefetch_rows(branch != nullptr ? branch + first + c0 + CW : nullptr, out + first + c0 + CW, S,
                            std::min<int64_t>(MR, b - o0), std::min<int64_t>(CW, cols - c0 - CW), stream);
            ff_micro_nv<scalar_t, acc_t, Ops>((cc + W - 1) / W, P.data() + c0, tile, Bp.data(), kb, rpad, idx, ptr[i],
                                              ptr[i + 1], o0, alpha, branch != nullptr ? branch + first + c0 : nullptr,
                                              out + first + c0, S, std::min<int64_t>(MR, b - o0), cc, stream);
          }
        }
      }
    }
    if (stream) simd::stream_fence();  // the streamed rows are visible before the region ends
  });
}

#if ENTSKIP_AMX && defined(__AVX512BF16__)
// The features-first product on AMX tiles (bfloat16, b = B in {16, 32, 64}): accumulators 0-2
// hold 16 output features x 48 positions; a product takes K input features (32; 16 at B =
// 16): the block's 16 x K entries (At[t][o][k], bfloat16 rows, tile 3) times K / 2 packed
// pair rows of the input tile (FfBf16Pairs' packing: a tile's second operand as it is;
// tiles 5-7, 16 positions each).
template <int B>
struct FfAmx {
  static constexpr int K = B < 32 ? B : 32;
  static constexpr int64_t kCols = 48;  // positions per unit: FfBlocking<float>'s chunk

  static amx::TileConfig config() {
    amx::TileConfig c;
    for (int r = 0; r < 8; ++r) {
      c.rows[r] = r >= 5 ? K / 2 : 16;
      c.colsb[r] = r == 3 ? K * 2 : 64;
    }
    return c;
  }

  // sums[m][c] (m < 16, c < 16 * NT, row stride 48) = sum over blocks [t0, t1) of
  // At[t][o0 + m][:] . the input features idx[t] * B .. + B at positions c of P (pair rows ldp
  // words apart): NT (1 to 3) tiles of 16 positions, fewer for a short last unit.
  template <int NT>
  __attribute__((target("amx-tile,amx-bf16"))) static void products(const uint32_t* P, int64_t ldp,
                                                                      const c10::BFloat16* At, const int64_t* idx,
                                                                      int64_t t0, int64_t t1, int64_t o0,
                                                                      float* sums) {
    static_assert(NT >= 1 && NT <= 3, "1 to 3 tiles of positions");
    asm volatile("" ::: "memory");  // P is written before the tile loads read it
    const int64_t ps = ldp * 4;
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (NT > 2) _tile_zero(2);
    for (int64_t t = t0; t < t1; ++t) {
      const uint32_t* Pt = P + idx[t] * (B / 2) * ldp;
      const c10::BFloat16* at = At + (t * B + o0) * B;
      for (int k0 = 0; k0 < B; k0 += K) {
        const uint32_t* Pk = Pt + (k0 / 2) * ldp;
        _tile_loadd(3, at + k0, B * 2);
        _tile_loadd(5, Pk, ps);
        if constexpr (NT > 1) _tile_loadd(6, Pk + 16, ps);
        if constexpr (NT > 2) _tile_loadd(7, Pk + 32, ps);
        _tile_dpbf16ps(0, 3, 5);
        if constexpr (NT > 1) _tile_dpbf16ps(1, 3, 6);
        if constexpr (NT > 2) _tile_dpbf16ps(2, 3, 7);
      }
    }
    _tile_stored(0, sums, kCols * 4);
    if constexpr (NT > 1) _tile_stored(1, sums + 16, kCols * 4);
    if constexpr (NT > 2) _tile_stored(2, sums + 32, kCols * 4);
  }

  // products<NT> with NT = ceil(cols / 16) tiles (cols <= 48).
  static void products_for(int64_t cols, const uint32_t* P, int64_t ldp, const c10::BFloat16* At, const int64_t* idx,
                           int64_t t0, int64_t t1, int64_t o0, float* sums) {
    if (cols > 32) return products<3>(P, ldp, At, idx, t0, t1, o0, sums);
    if (cols > 16) return products<2>(P, ldp, At, idx, t0, t1, o0, sums);
    products<1>(P, ldp, At, idx, t0, t1, o0, sums);
  }
};

// ff_block_product for bfloat16 on AMX tiles, with the work items of ff_block_product_with
// (image, tile of S columns, group of block rows) and its packing (FfBf16Pairs), in units
// of 16 output features by 48 positions.
template <int B>
void ff_block_product_amx(const c10::BFloat16* a, int64_t d_a, const float* Bv, const int64_t* ptr,
                          const int64_t* idx, int64_t nrows, int64_t N, int64_t S, float alpha,
                          const c10::BFloat16* branch, c10::BFloat16* out) {
  using Kern = FfAmx<B>;
  constexpr int64_t CW = Kern::kCols;
  const int64_t nnz = ptr[nrows], prows = d_a / 2, d_out = nrows * B;
  std::vector<c10::BFloat16> At(nnz * B * B);  // At[t][o][k] = Bv[t][k][o]
  for (int64_t t = 0; t < nnz; ++t)
    for (int64_t k = 0; k < B; ++k)
      for (int64_t o = 0; o < B; ++o) At[(t * B + o) * B + k] = c10::BFloat16(Bv[(t * B + k) * B + o]);
  const int64_t tile = ff_tile_columns(S, prows * 4, CW);
  const int64_t ntiles = (S + tile - 1) / tile, spatial = N * ntiles;
  const int64_t groups = std::clamp<int64_t>((4 * at::get_num_threads() + spatial - 1) / spatial, 1, nrows);
  const amx::TileConfig config = Kern::config();
  const simd::Vec<float> va = simd::broadcast(alpha);
  // out[o + m * S + c] = alpha * sums[m * CW + c] (+ branch) for m < 16, c < cc: a unit's results.
  const auto finish = [&](int64_t o, int64_t cc, const float* sums) {
    for (int64_t m = 0; m < 16; ++m) {
      for (int64_t c = 0; c < cc; c += 16) {
        const int64_t nn = std::min<int64_t>(16, cc - c), e = o + m * S + c;
        simd::Vec<float> y = va * simd::load<float>(sums + m * CW + c);
        if (branch != nullptr) y += load_first<float>(branch + e, nn);
        store_first<float>(out + e, y, nn);
      }
    }
  };
  at::parallel_for(0, spatial * groups, 1, [&](int64_t begin, int64_t end) {
    AlignedBuffer<uint32_t> P(prows * tile);
    // Two units in flight: a unit's results are written out while the tiles compute the
    // next one's (its sums were stored a whole product earlier).
    alignas(64) float sums[2][16 * CW];
    int64_t pending_o = -1, pending_cc = 0;
    int cur = 0;
    amx::load_config(config);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = w / (ntiles * groups), s0 = (w / groups) % ntiles * tile, g = w % groups;
      const int64_t cols = std::min(S - s0, tile), padded = (cols + 15) / 16 * 16;
      const c10::BFloat16* an = a + n * d_a * S + s0;
      for (int64_t r = 0; r < prows; ++r) FfBf16Pairs::pack(P.data() + r * tile, an + 2 * r * S, an + (2 * r + 1) * S, cols, padded);
      for (int64_t i = g * nrows / groups; i < (g + 1) * nrows / groups; ++i) {
        for (int64_t c0 = 0; c0 < cols; c0 += CW) {
          for (int64_t o0 = 0; o0 < B; o0 += 16) {
            // ceil(cc / 16) tiles of positions: packed words up to `padded`, all written.
            const int64_t cc = std::min<int64_t>(CW, cols - c0);
            Kern::products_for(cc, P.data() + c0, tile, At.data(), idx, ptr[i], ptr[i + 1], o0, sums[cur]);
            if (pending_o >= 0) finish(pending_o, pending_cc, sums[cur ^ 1]);
            pending_o = n * d_out * S + (i * B + o0) * S + s0 + c0;
            pending_cc = cc;
            cur ^= 1;
          }
        }
      }
    }
    if (pending_o >= 0) finish(pending_o, pending_cc, sums[cur ^ 1]);
    amx::release();
  });
}
#endif

// out[n][i*b : +b][:] = alpha * sum_{t = ptr[i]}^{ptr[i+1]-1} B[t]^T @ a[n][idx[t]*b : +b][:]
// (+ branch[n][i*b : +b][:]) for n < N, block rows i < nrows: a (N, d_a, S), out and branch
// (N, nrows * b, S), all contiguous; B (nnz, b, b) in acc_t with B[t][k][o] mapping input
// feature k of block t to output feature o (the convention of block_row_product).
//
// Work items are (image, tile of S columns, group of block rows): each packs its tile of
// a[n] (all d_a rows, widened or as bfloat16 pairs, zero-padded to whole vectors) into a
// per-thread buffer and writes every output element of its rows and columns once. Groups
// split the block rows only when images x tiles leave threads idle (N = 1, small S).
template <typename scalar_t, typename acc_t>
void ff_block_product(const scalar_t* a, int64_t d_a, const acc_t* B, const int64_t* ptr, const int64_t* idx,
                      int64_t nrows, int64_t b, int64_t N, int64_t S, acc_t alpha, const scalar_t* branch,
                      scalar_t* out) {
  if (N == 0 || S == 0 || nrows == 0) return;
#if ENTSKIP_AMX && defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (amx_available() && with_fixed_block(b, [&](auto block) {
          ff_block_product_amx<decltype(block)::value>(a, d_a, B, ptr, idx, nrows, N, S, alpha, branch, out);
        })) {
      return;
    }
  }
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    if (use_avx512_bf16() && FfBf16Pairs::fits(b)) {
      return ff_block_product_with<scalar_t, acc_t, FfBf16Pairs>(a, d_a, B, ptr, idx, nrows, b, N, S, alpha, branch,
                                                                 out);
    }
  }
#endif
  ff_block_product_with<scalar_t, acc_t, FfWidened<scalar_t, acc_t>>(a, d_a, B, ptr, idx, nrows, b, N, S, alpha,
                                                                     branch, out);
}

}  // namespace entskip::cpu
