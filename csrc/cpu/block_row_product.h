// The fused block-row product behind the CPU skip-adds (forward and dx of the BSR op,
// and the reduced-precision dense op; bfloat16 on AMX tiles in block_row_amx.h):
//
//   out[:, i] = alpha * sum_{t in row i} a[:, idx[t]] @ B[t] (+ branch[:, i])
//
// over a compressed layout of b x b blocks: for every tile of rows and every output
// block it accumulates the products of all the blocks of that row in registers, then
// applies alpha and the residual add and writes the output once.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "block_row_amx.h"
#include "common.h"
#include "simd.h"

#if defined(__AVX512BF16__)
#include <immintrin.h>
#endif

namespace entskip::cpu {

#if defined(__GNUC__)
#define ENTSKIP_MICRO_KERNEL __attribute__((noinline))
#else
#define ENTSKIP_MICRO_KERNEL
#endif

// Bytes of packed input rows a work item aims to keep in L2.
constexpr int64_t kTileBytes = 256 * 1024;

// Input rows of at most kInPlaceRowBytes, with all the blocks within kInPlaceBlockBytes (in
// L1 throughout), are read in place rather than packed (see block_row_product_fixed).
constexpr int64_t kInPlaceRowBytes = 256;
constexpr int64_t kInPlaceBlockBytes = 16 * 1024;

// Block sizes with register-blocked micro-kernels (multiples of the SIMD width).
template <typename acc_t, int B>
struct Blocking {
  static constexpr int W = simd::Simd<acc_t>::W;
  static constexpr int NV = B / W;  // vectors per block row
  static_assert(B % W == 0, "block size must be a multiple of the SIMD width");
  // Output rows per micro-tile: MR x NV accumulators stay in registers (<= 24 of 32).
  static constexpr int MR = std::max(1, std::min(12, 24 / NV));
  // Rows of a work item come in units that are whole W x W transposes and whole micro-tiles.
  static constexpr int64_t kUnit = std::lcm(W, MR);
  // Rows of S per strip in the sampled product: MS x NV accumulators (<= 16).
  static constexpr int MS = std::max(1, std::min(B, 16 / NV));
};

// P[col][n] = a[n][col] (widened to acc_t) for n < rows, 0 for rows <= n < padded (a multiple
// of W, at most ldp): the transpose of a tile of `rows` rows of a (N, lda) matrix, with leading
// dimension ldp. lda is a multiple of W; W x W sub-blocks are transposed in registers.
template <typename scalar_t, typename acc_t>
void pack_transposed(const scalar_t* a, int64_t lda, int64_t rows, int64_t padded, acc_t* P, int64_t ldp) {
  using V = simd::Vec<acc_t>;
  constexpr int W = simd::Simd<acc_t>::W;
  for (int64_t n0 = 0; n0 < padded; n0 += W) {
    for (int64_t c0 = 0; c0 < lda; c0 += W) {
      V v[W];
      for (int i = 0; i < W; ++i) v[i] = n0 + i < rows ? simd::load<acc_t>(a + (n0 + i) * lda + c0) : V{};
      simd::transpose<acc_t>(v);
      for (int i = 0; i < W; ++i) simd::store<acc_t>(P + (c0 + i) * ldp + n0, v[i]);
    }
  }
}

// Requests the branch (to read) and output (to write, unless streamed) elements [0, cols)
// of `rows` rows ldo apart, touched only by an epilogue: asked for before the products, their
// cache misses overlap the arithmetic instead of stalling the epilogue's loads and stores.
// Output rows that the epilogue streams are not requested. branch may be null.
template <typename scalar_t>
inline void prefetch_rows(const scalar_t* branch, const scalar_t* out, int64_t ldo, int64_t rows, int64_t cols,
                          bool stream) {
  constexpr int64_t kLine = 64;
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t e = 0; e < cols * static_cast<int64_t>(sizeof(scalar_t)); e += kLine) {
      if (branch != nullptr) __builtin_prefetch(reinterpret_cast<const char*>(branch + m * ldo) + e, 0);
      if (!stream) __builtin_prefetch(reinterpret_cast<const char*>(out + m * ldo) + e, 1);
    }
  }
}

// out[m, :B] = alpha * acc[m] (+ branch[m, :B]) for m < min(rows, MR): the epilogue of a
// micro-tile; with stream, the output is written by non-temporal stores (simd::stream).
template <typename scalar_t, typename acc_t, int B, int MR>
inline void store_micro_tile(const simd::Vec<acc_t> (&acc)[MR][B / simd::Simd<acc_t>::W], acc_t alpha,
                             const scalar_t* branch, int64_t ldo, scalar_t* out, int64_t rows, bool stream) {
  using V = simd::Vec<acc_t>;
  constexpr int W = simd::Simd<acc_t>::W, NV = B / W;
  const V va = simd::broadcast(alpha);
  for (int m = 0; m < MR; ++m) {
    if (m >= rows) break;
    for (int v = 0; v < NV; ++v) {
      V y = va * acc[m][v];
      if (branch != nullptr) y += simd::load<acc_t>(branch + m * ldo + v * W);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        if (stream) {
          simd::stream<acc_t>(out + m * ldo + v * W, y);
          continue;
        }
      }
      simd::store<acc_t>(out + m * ldo + v * W, y);
    }
  }
}

// Where a micro-kernel finds A[m, col], input feature col of row m of its micro-tile: in the
// packed transpose of the tile's rows, P[col * ld + m] (the MR values broadcast at each step
// adjacent), or, kInPlace, in the rows themselves, P[m * ld + col].
template <bool kInPlace>
constexpr int64_t col_stride(int64_t ld) { return kInPlace ? 1 : ld; }
template <bool kInPlace>
constexpr int64_t row_stride(int64_t ld) { return kInPlace ? ld : 1; }

// out[m, :B] = alpha * sum_{t in [t0, t1)} A[m, idx[t]*B : +B] @ Bv[t] (+ branch[m, :B]) for m < min(rows, MR),
// with A[m, col] in P as col_stride/row_stride say. All MR x B accumulators stay in registers
// across every block of the row; rows from `rows` to MR - 1 (zero padding) are computed, not
// stored.
//
// Micro-kernels are never inlined (ENTSKIP_MICRO_KERNEL): the compiler may contract a * b + c
// into an FMA differently in each inlined copy, and at::parallel_for has two call sites (a
// serial one for one thread, an OpenMP one), so inlined copies made results depend on the
// thread count in the last bit. One out-of-line copy computes every row the same way.
template <typename scalar_t, typename acc_t, int B, int MR, bool kInPlace>
ENTSKIP_MICRO_KERNEL void block_row_micro(const acc_t* P, int64_t ld, const acc_t* Bv, const int64_t* idx, int64_t t0,
                                          int64_t t1, acc_t alpha, const scalar_t* branch, int64_t ldo, scalar_t* out,
                                          int64_t rows, bool stream) {
  using V = simd::Vec<acc_t>;
  constexpr int W = Blocking<acc_t, B>::W, NV = Blocking<acc_t, B>::NV;
  prefetch_rows(branch, out, ldo, std::min<int64_t>(rows, MR), B, stream);  // the epilogue's rows
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  for (int64_t t = t0; t < t1; ++t) {
    const acc_t* Bt = Bv + t * B * B;
    const acc_t* At = P + idx[t] * B * col_stride<kInPlace>(ld);
    for (int c = 0; c < B; ++c) {
      V bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = simd::load<acc_t>(Bt + c * B + v * W);
      simd::outer_product_step<MR, NV>(acc, At + c * col_stride<kInPlace>(ld), bv, row_stride<kInPlace>(ld));
    }
  }
  store_micro_tile<scalar_t, acc_t, B, MR>(acc, alpha, branch, ldo, out, rows, stream);
}

#if defined(__AVX512BF16__)
// The same product for bfloat16 inputs with AVX512-BF16 dot products: each vdpbf16ps adds,
// in float32, the products of two consecutive input features (exact: a product of two
// bfloat16 fits a float32), so one instruction does the work of two float32 FMAs.
// Operands are bfloat16 pairs held in 32-bit words: word k of row m of P (placed as in
// block_row_micro) holds (A[m, 2k], A[m, 2k + 1]) (the rows taken as 32-bit words), and
// Bp[t][k][j] holds (B_t[2k][j], B_t[2k + 1][j]), the lower feature in the lower half.
template <int B, int MR, bool kInPlace>
ENTSKIP_MICRO_KERNEL void block_row_micro_bf16_pairs(const float* P, int64_t ld, const uint32_t* Bp,
                                                     const int64_t* idx, int64_t t0, int64_t t1, float alpha,
                                                     const c10::BFloat16* branch, int64_t ldo, c10::BFloat16* out,
                                                     int64_t rows, bool stream) {
  constexpr int W = Blocking<float, B>::W, NV = Blocking<float, B>::NV, H = B / 2;
  prefetch_rows(branch, out, ldo, std::min<int64_t>(rows, MR), B, stream);  // the epilogue's rows
  simd::Vec<float> acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = simd::Vec<float>{};
  for (int64_t t = t0; t < t1; ++t) {
    const uint32_t* Bt = Bp + t * H * B;
    const float* At = P + idx[t] * H * col_stride<kInPlace>(ld);
    for (int k = 0; k < H; ++k) {
      __m512bh bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(Bt + k * B + v * W);
      for (int m = 0; m < MR; ++m) {
        // A word of P by memcpy: read in place, a row of an odd bfloat16 offset is not
        // 4-byte aligned.
        float word;
        std::memcpy(&word, At + k * col_stride<kInPlace>(ld) + m * row_stride<kInPlace>(ld), sizeof(word));
        const __m512bh am = (__m512bh)_mm512_set1_ps(word);
        for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], am, bv[v]);
      }
    }
  }
  store_micro_tile<c10::BFloat16, float, B, MR>(acc, alpha, branch, ldo, out, rows, stream);
}
#endif

// How block_row_product_fixed stores a tile of input rows and the blocks for its micro-kernel.
// Widened: P[col][n] = a[n][col] and B[t][c][j], both in the accumulation type; rows already
// in the accumulation type can be read in place (kInPlace, rows()).
template <typename scalar_t, typename acc_t, int B>
struct WidenedOperands {
  using packed_t = acc_t;
  using block_t = acc_t;
  static constexpr bool kInPlace = std::is_same_v<scalar_t, acc_t>;
  static const packed_t* rows(const scalar_t* a) { return reinterpret_cast<const packed_t*>(a); }
  static constexpr int MR = Blocking<acc_t, B>::MR;
  static constexpr int64_t kUnit = Blocking<acc_t, B>::kUnit;
  static constexpr int64_t kBlockElems = int64_t{B} * B;  // block_t per block
  static int64_t packed_cols(int64_t lda) { return lda; }
  static void pack(const scalar_t* a, int64_t lda, int64_t rows, int64_t padded, packed_t* P, int64_t ldp) {
    pack_transposed<scalar_t, acc_t>(a, lda, rows, padded, P, ldp);
  }
  template <bool kRowsInPlace>
  static void micro(const packed_t* P, int64_t ld, const block_t* Bv, const int64_t* idx, int64_t t0, int64_t t1,
                    acc_t alpha, const scalar_t* branch, int64_t ldo, scalar_t* out, int64_t rows, bool stream) {
    block_row_micro<scalar_t, acc_t, B, MR, kRowsInPlace>(P, ld, Bv, idx, t0, t1, alpha, branch, ldo, out, rows,
                                                          stream);
  }
};

#if defined(__AVX512BF16__)
// bfloat16 pairs for block_row_micro_bf16_pairs: the tile packed as the transpose of its rows
// taken as 32-bit words (the bits are moved, never converted; lda / 2 words per row must be
// whole SIMD vectors: lda a multiple of 32), or the rows read in place as words; the blocks
// as pairs of feature rows.
template <int B>
struct Bf16PairOperands {
  static_assert(B % 16 == 0, "a block row must be whole vectors of float32 accumulators");
  static bool fits(int64_t lda) { return lda % 32 == 0; }
  using packed_t = float;  // bit patterns of bfloat16 pairs
  using block_t = uint32_t;
  static constexpr bool kInPlace = true;
  static const packed_t* rows(const c10::BFloat16* a) { return reinterpret_cast<const packed_t*>(a); }
  static constexpr int MR = Blocking<float, B>::MR;
  static constexpr int64_t kUnit = Blocking<float, B>::kUnit;
  static constexpr int64_t kBlockElems = int64_t{B} * B / 2;
  static int64_t packed_cols(int64_t lda) { return lda / 2; }
  static void pack(const c10::BFloat16* a, int64_t lda, int64_t rows, int64_t padded, packed_t* P, int64_t ldp) {
    pack_transposed<float, float>(reinterpret_cast<const float*>(a), lda / 2, rows, padded, P, ldp);
  }
  template <bool kRowsInPlace>
  static void micro(const packed_t* P, int64_t ld, const block_t* Bp, const int64_t* idx, int64_t t0, int64_t t1,
                    float alpha, const c10::BFloat16* branch, int64_t ldo, c10::BFloat16* out, int64_t rows,
                    bool stream) {
    block_row_micro_bf16_pairs<B, MR, kRowsInPlace>(P, ld, Bp, idx, t0, t1, alpha, branch, ldo, out, rows, stream);
  }
};
#endif

// out[n, i*b : (i+1)*b] = alpha * sum_{t = ptr[i]}^{ptr[i+1]-1} a[n, idx[t]*b : +b] @ B[t] (+ branch[n, ...])
// a: (N, lda) row-major; Bv: the nnz blocks in Ops' format (B[t][c][j] maps input feature c of
// the block to output feature j); out, branch: (N, nrows * b).
//
// A thread owns a tile of rows at a time: it packs the tile's input rows, transposed (Ops::pack),
// into a per-thread buffer that stays in L2, then applies every output block row from there,
// reading the branch and writing each output element once. Memory sees each input, branch and
// output row once. The tile's output rows are mapped (prefault_for_write) before they are written.
//
// Narrow rows with few blocks (kInPlaceRowBytes, kInPlaceBlockBytes: 64 channels at block 16,
// e.g.) are not packed where Ops can read them in place: there each input row feeds only a few
// output blocks, too few to repay its transpose. The micro-tiles then take every block row in
// turn, their output rows written whole while they are in cache (bfloat16 32 x 64 x 56 x 56
// channels_last at density 1/4: 3.4 ms packed, 2.1 ms in place).
template <typename scalar_t, typename acc_t, int B, typename Ops>
void block_row_product_fixed(const scalar_t* a, int64_t lda, const typename Ops::block_t* Bv, const int64_t* ptr,
                             const int64_t* idx, int64_t nrows, int64_t N, acc_t alpha, const scalar_t* branch,
                             scalar_t* out) {
  using packed_t = typename Ops::packed_t;
  constexpr int MR = Ops::MR;
  constexpr int64_t unit = Ops::kUnit, block_bytes = Ops::kBlockElems * sizeof(typename Ops::block_t);
  const int64_t ldo = nrows * B, cols = Ops::packed_cols(lda);
  // A large float32/float64 output is fresh memory, not in any cache: it is streamed to
  // memory in whole lines rather than read for ownership line by line and then written (the
  // float32 forward at N=8192, D=1024, density 1/8: best 16.4-16.7 ms instead of 17.8-18.4). A
  // small one is written through the cache, where its consumer will find it; a 16-bit one
  // fills half a line per store, where streaming did not help. Rows must be 64-byte aligned.
  const bool stream = simd::kStreams && std::is_same_v<scalar_t, acc_t> &&
                      N * ldo * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes &&
                      reinterpret_cast<uintptr_t>(out) % 64 == 0 && ldo * sizeof(scalar_t) % 64 == 0;
  // Tiles fit the L2 budget and are small enough to give every thread several.
  const int64_t fit_units = kTileBytes / (unit * std::max<int64_t>(cols, 1) * static_cast<int64_t>(sizeof(packed_t)));
  const int64_t parallel_units = (N + 4 * unit * at::get_num_threads() - 1) / (4 * unit * at::get_num_threads());
  const int64_t tile = unit * std::max<int64_t>(1, std::min(fit_units, parallel_units));
  const int64_t ntiles = (N + tile - 1) / tile;
  const bool in_place = Ops::kInPlace && lda * static_cast<int64_t>(sizeof(scalar_t)) <= kInPlaceRowBytes &&
                        ptr[nrows] * block_bytes <= kInPlaceBlockBytes;
  at::parallel_for(0, ntiles, 1, [&](int64_t begin, int64_t end) {
    // The packed tile; read in place, the zero-padded copy of a last, partial micro-tile.
    AlignedBuffer<packed_t> packed((in_place ? MR : tile) * cols);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n0 = w * tile, rows = std::min(N, n0 + tile) - n0;
      prefault_for_write(out + n0 * ldo, rows * ldo * static_cast<int64_t>(sizeof(scalar_t)));
      if constexpr (Ops::kInPlace) {
        if (in_place) {
          // Whole micro-tiles in place; the last, partial one from a zero-padded copy.
          const packed_t* in = Ops::rows(a + n0 * lda);
          const int64_t whole = rows / MR * MR;
          for (int64_t m = 0; m < rows; m += MR) {
            const packed_t* at = in + m * cols;
            if (m == whole) {
              std::fill(packed.data(), packed.data() + MR * cols, packed_t(0));
              std::copy(at, at + (rows - m) * cols, packed.data());
              at = packed.data();
            }
            for (int64_t i = 0; i < nrows; ++i) {
              const int64_t first = (n0 + m) * ldo + i * B;
              Ops::template micro<true>(at, cols, Bv, idx, ptr[i], ptr[i + 1], alpha,
                                        branch != nullptr ? branch + first : nullptr, ldo, out + first, rows - m,
                                        stream);
            }
          }
          continue;
        }
      }
      const int64_t padded = (rows + unit - 1) / unit * unit;  // whole micro-tiles, whole transposes
      Ops::pack(a + n0 * lda, lda, rows, padded, packed.data(), tile);
      for (int64_t i = 0; i < nrows; ++i) {
        // The blocks of the next block row, in slices, one per micro-tile of this row: with
        // many blocks they do not stay in L2 from one tile of rows to the next.
        const int64_t next_first = i + 1 < nrows ? ptr[i + 1] : ptr[0];
        const char* next = reinterpret_cast<const char*>(Bv + next_first * Ops::kBlockElems);
        const int64_t next_bytes = ((i + 1 < nrows ? ptr[i + 2] : ptr[1]) - next_first) * block_bytes;
        const int64_t slice = (next_bytes + (rows + MR - 1) / MR - 1) / ((rows + MR - 1) / MR);
        for (int64_t m = 0, p = 0; m < rows; m += MR, p += slice) {
          for (int64_t e = p; e < std::min(p + slice, next_bytes); e += 64) __builtin_prefetch(next + e, 0);
          const int64_t first = (n0 + m) * ldo + i * B;
          Ops::template micro<false>(packed.data() + m, tile, Bv, idx, ptr[i], ptr[i + 1], alpha,
                                     branch != nullptr ? branch + first : nullptr, ldo, out + first, rows - m, stream);
        }
      }
    }
    if (stream) simd::stream_fence();  // the streamed rows are visible before the region ends
  });
}

// The same product for any block size, without register blocking.
template <typename scalar_t, typename acc_t>
void block_row_product_any(const scalar_t* a, int64_t lda, const acc_t* B, const int64_t* ptr, const int64_t* idx,
                           int64_t nrows, int64_t b, int64_t N, acc_t alpha, const scalar_t* branch, scalar_t* out) {
  const int64_t ldo = nrows * b;
  const int64_t tile = std::max<int64_t>(1, kTileBytes / (std::max<int64_t>(lda, 1) * static_cast<int64_t>(sizeof(scalar_t))));
  const int64_t ntiles = (N + tile - 1) / tile;
  at::parallel_for(0, ntiles * nrows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(b);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w % nrows, n0 = (w / nrows) * tile, n1 = std::min(N, n0 + tile);
      for (int64_t n = n0; n < n1; ++n) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) {
          const acc_t* Bt = B + t * b * b;
          const scalar_t* an = a + n * lda + idx[t] * b;
          for (int64_t c = 0; c < b; ++c) {
            const acc_t av = static_cast<acc_t>(an[c]);
            for (int64_t j = 0; j < b; ++j) acc[j] += av * Bt[c * b + j];
          }
        }
        scalar_t* on = out + n * ldo + i * b;
        const scalar_t* rn = branch ? branch + n * ldo + i * b : nullptr;
        for (int64_t j = 0; j < b; ++j) {
          on[j] = static_cast<scalar_t>(alpha * acc[j] + (rn ? static_cast<acc_t>(rn[j]) : acc_t(0)));
        }
      }
    }
  });
}

// Calls fn(std::integral_constant<int, B>{}) if b is a block size with micro-kernels
// (16, 32, 64: multiples of every SIMD width used); returns whether it did.
template <typename Fn>
bool with_fixed_block(int64_t b, Fn&& fn) {
  switch (b) {
    case 16: fn(std::integral_constant<int, 16>{}); return true;
    case 32: fn(std::integral_constant<int, 32>{}); return true;
    case 64: fn(std::integral_constant<int, 64>{}); return true;
    default: return false;
  }
}

template <typename scalar_t, typename acc_t>
void block_row_product(const scalar_t* a, int64_t lda, const acc_t* B, const int64_t* ptr, const int64_t* idx,
                       int64_t nrows, int64_t b, int64_t N, acc_t alpha, const scalar_t* branch, scalar_t* out) {
  const bool done = with_fixed_block(b, [&](auto block) {
    constexpr int kB = decltype(block)::value;
#if ENTSKIP_AMX
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (amx_available()) {
        const std::vector<uint32_t> pairs = bf16_pair_blocks<kB>(B, ptr[nrows]);
        block_row_product_amx<kB>(a, lda, pairs.data(), ptr, idx, nrows, N, alpha, branch, out);
        return;
      }
    }
#endif
#if defined(__AVX512BF16__)
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      using Ops = Bf16PairOperands<kB>;
      if (use_avx512_bf16() && Ops::fits(lda)) {
        const std::vector<uint32_t> pairs = bf16_pair_blocks<kB>(B, ptr[nrows]);
        block_row_product_fixed<scalar_t, acc_t, kB, Ops>(a, lda, pairs.data(), ptr, idx, nrows, N, alpha, branch,
                                                          out);
        return;
      }
    }
#endif
    using Ops = WidenedOperands<scalar_t, acc_t, kB>;
    block_row_product_fixed<scalar_t, acc_t, kB, Ops>(a, lda, B, ptr, idx, nrows, N, alpha, branch, out);
  });
  if (!done) block_row_product_any<scalar_t, acc_t>(a, lda, B, ptr, idx, nrows, b, N, alpha, branch, out);
}

}  // namespace entskip::cpu
