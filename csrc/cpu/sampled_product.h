// The sampled product of the BSR backward, S[k] = sum_p g(p, row(k)*b : +b)^T x(p, col[k]*b : +b)
// for the b x b blocks k of a compressed layout, over positions p: the rows of features-last
// (N, D) matrices or the N * S (image, spatial position) pairs of features-first (N, D, S)
// maps (positions.h). dvalues and dalpha of the BSR op (bsr_skip_add.cpp), and the dense op's
// bfloat16 dW on NCHW maps over the layout of all of W's blocks (dense_skip_add.cpp).
// Register-blocked micro-kernels for b in {16, 32, 64} (widened float32/float64, AVX512-BF16
// pairs, AMX tiles for bfloat16), a plain loop for any other b; threads own disjoint ranges
// of blocks and sum positions in a fixed order (deterministic for any thread count).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "block_row_amx.h"
#include "block_row_product.h"
#include "common.h"
#include "positions.h"
#include "simd.h"

namespace entskip::cpu {

// S[m, :B] += sum_{n < rows} g[n, m] * x[n, :B] for m < MS (accumulators in registers);
// g and x are contiguous (rows, B) panels.
template <typename acc_t, int B, int MS>
ENTSKIP_MICRO_KERNEL void sampled_micro(const acc_t* g, const acc_t* x, int64_t rows, acc_t* S) {
  using V = simd::Vec<acc_t>;
  constexpr int W = Blocking<acc_t, B>::W, NV = Blocking<acc_t, B>::NV;
  V acc[MS][NV];
  for (int m = 0; m < MS; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = simd::load<acc_t>(S + m * B + v * W);
  for (int64_t n = 0; n < rows; ++n) {
    V xv[NV];
    for (int v = 0; v < NV; ++v) {
      xv[v] = simd::load<acc_t>(x + n * B + v * W);
      simd::keep_in_register(xv[v]);
    }
    simd::outer_product_step<MS, NV>(acc, g + n * B, xv);
  }
  for (int m = 0; m < MS; ++m)
    for (int v = 0; v < NV; ++v) simd::store<acc_t>(S + m * B + v * W, acc[m][v]);
}

// How sampled_blocks_fixed packs rows of g and x into panels for its micro-kernel.
// Widened: one panel row per row of N, B values in the accumulation type.
template <typename scalar_t, typename acc_t, int B>
struct SampledWidened {
  using panel_t = acc_t;
  static constexpr int kRowsPerStep = 1;  // rows of N per panel row
  static constexpr int MS = Blocking<acc_t, B>::MS;
  // dst[:B] = row0[:B] (row1 is unused).
  static void pack(panel_t* dst, const scalar_t* row0, const scalar_t* /*row1*/) {
    for (int v = 0; v < B; v += Blocking<acc_t, B>::W) simd::store<acc_t>(dst + v, simd::load<acc_t>(row0 + v));
  }
  static void micro(const panel_t* g, const panel_t* x, int64_t steps, acc_t* S) {
    sampled_micro<acc_t, B, MS>(g, x, steps, S);
  }
};

#if defined(__AVX512BF16__)
// S[m, :B] += sum_{q < steps} g[2q, m] * x[2q, :B] + g[2q + 1, m] * x[2q + 1, :B] for m < MS, with
// AVX512-BF16 dot products (see block_row_micro_bf16_pairs): g and x are (steps, B) panels of
// 32-bit words, each the bfloat16 pair of two consecutive rows of N.
template <int B, int MS>
ENTSKIP_MICRO_KERNEL void sampled_micro_bf16_pairs(const uint32_t* g, const uint32_t* x, int64_t steps, float* S) {
  constexpr int W = Blocking<float, B>::W, NV = Blocking<float, B>::NV;
  simd::Vec<float> acc[MS][NV];
  for (int m = 0; m < MS; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = simd::load<float>(S + m * B + v * W);
  for (int64_t q = 0; q < steps; ++q) {
    __m512bh xv[NV];
    for (int v = 0; v < NV; ++v) {
      xv[v] = (__m512bh)_mm512_loadu_si512(x + q * B + v * W);
      simd::keep_in_register(xv[v]);
    }
    for (int m = 0; m < MS; ++m) {
      const __m512bh gm = (__m512bh)_mm512_set1_epi32(static_cast<int>(g[q * B + m]));
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], gm, xv[v]);
    }
  }
  for (int m = 0; m < MS; ++m)
    for (int v = 0; v < NV; ++v) simd::store<float>(S + m * B + v * W, acc[m][v]);
}

// bfloat16 pairs: one panel row per two rows of N, word j = (row0[j], row1[j]), the first
// row in the lower half (row1 = nullptr, past the end of N, counts as zeros); the panels of
// the AVX512-BF16 and AMX micro-kernels.
template <int B>
struct SampledBf16PairPanels {
  using panel_t = uint32_t;
  static constexpr int kRowsPerStep = 2;
  static void pack(panel_t* dst, const c10::BFloat16* row0, const c10::BFloat16* row1) {
    using simd::U16x16, simd::U32x16;
    for (int v = 0; v < B; v += 16) {
      const U16x16 lo = simd::load_bits<U16x16>(row0 + v);
      const U16x16 hi = row1 != nullptr ? simd::load_bits<U16x16>(row1 + v) : U16x16{};
      simd::store_bits(dst + v, __builtin_convertvector(lo, U32x16) | __builtin_convertvector(hi, U32x16) << 16);
    }
  }
};

template <int B>
struct SampledBf16Pairs : SampledBf16PairPanels<B> {
  static constexpr int MS = Blocking<float, B>::MS;
  static void micro(const uint32_t* g, const uint32_t* x, int64_t steps, float* S) {
    sampled_micro_bf16_pairs<B, MS>(g, x, steps, S);
  }
};
#endif

#if ENTSKIP_AMX && defined(__AVX512BF16__)
// The same panels on AMX tiles (amx::sampled_block), one call per block and chunk.
template <int B>
struct SampledAmx : SampledBf16PairPanels<B> {
  static constexpr int MS = B;
  static void micro(const uint32_t* g, const uint32_t* x, int64_t steps, float* S) { amx::sampled_block<B>(g, x, steps, S); }
};
#endif

// Bytes of the packed panels of g and x that one chunk of N keeps in L2.
constexpr int64_t kSampledBytes = 512 * 1024;

// S[k] = sum_p g(p, row(k)*B : +B)^T x(p, col[k]*B : +B) over the positions p < P (rows of
// N, or the N * S positions of a features-first map; positions.h) for the blocks k in
// [begin, end), whose block rows are row_of[k]. Positions are walked in chunks. For each
// chunk the thread first packs the block columns of x and the block rows of g its blocks
// use into contiguous panels (Layout::pack with Ops::pack); then every block runs its
// MS-row strips of S over its two panels, which stay in L1.
template <typename scalar_t, typename acc_t, int B, typename Ops, typename Layout>
void sampled_blocks_fixed(const Layout& g, const Layout& x, const int64_t* row_of, const int64_t* col, int64_t begin,
                          int64_t end, int64_t P, acc_t* S) {
  using panel_t = typename Ops::panel_t;
  constexpr int MS = Ops::MS, step = Ops::kRowsPerStep;
  // The block columns of x used here (sorted) and the panel of each; the block rows of g
  // used here are the consecutive row_of[begin] .. row_of[end - 1].
  std::vector<int64_t> x_cols(col + begin, col + end);
  std::sort(x_cols.begin(), x_cols.end());
  x_cols.erase(std::unique(x_cols.begin(), x_cols.end()), x_cols.end());
  std::vector<int64_t> x_panel(end - begin);
  for (int64_t k = begin; k < end; ++k)
    x_panel[k - begin] = std::lower_bound(x_cols.begin(), x_cols.end(), col[k]) - x_cols.begin();
  const int64_t g_first = row_of[begin], g_count = row_of[end - 1] - g_first + 1;
  const int64_t x_count = static_cast<int64_t>(x_cols.size()), npanels = x_count + g_count;
  // Panel rows per chunk (each covers `step` positions).
  const int64_t chunk = std::clamp<int64_t>(kSampledBytes / (npanels * B * static_cast<int64_t>(sizeof(panel_t))), 8, 64);
  AlignedBuffer<panel_t> panels(npanels * chunk * B);
  panel_t* const xp = panels.data();
  panel_t* const gp = panels.data() + x_count * chunk * B;
  // The first feature of each panel: x's block columns, then g's block rows.
  std::vector<int64_t> f0s(npanels);
  for (int64_t j = 0; j < npanels; ++j) f0s[j] = (j < x_count ? x_cols[j] : g_first + j - x_count) * B;
  for (int64_t p0 = 0; p0 < P; p0 += chunk * step) {
    const int64_t steps = (std::min(P - p0, chunk * step) + step - 1) / step;
    x.template pack<Ops, B>(xp, chunk * B, f0s.data(), x_count, p0, steps, P);
    g.template pack<Ops, B>(gp, chunk * B, f0s.data() + x_count, g_count, p0, steps, P);
    for (int64_t k = begin; k < end; ++k) {
      const panel_t* gk = gp + (row_of[k] - g_first) * chunk * B;
      const panel_t* xk = xp + x_panel[k - begin] * chunk * B;
      acc_t* Sk = S + k * B * B;
      for (int r0 = 0; r0 < B; r0 += MS) Ops::micro(gk + r0, xk, steps, Sk + r0 * B);
    }
  }
}

// The same for any block size, without register blocking, over chunks of positions whose
// features of g and x stay in L2 while the thread's blocks pass over them.
constexpr int64_t kSampledChunk = 64;

template <typename scalar_t, typename acc_t, typename Layout>
void sampled_blocks_any(const Layout& g, const Layout& x, const int64_t* row_of, const int64_t* col, int64_t begin,
                        int64_t end, int64_t b, int64_t P, acc_t* S) {
  std::vector<acc_t> xn(b);
  const int64_t gs = g.feature_stride(), xs = x.feature_stride();
  for (int64_t p0 = 0; p0 < P; p0 += kSampledChunk) {
    const int64_t p1 = std::min(P, p0 + kSampledChunk);
    for (int64_t k = begin; k < end; ++k) {
      acc_t* Sk = S + k * b * b;
      for (int64_t p = p0; p < p1; ++p) {
        const scalar_t* gk = g.at(p, row_of[k] * b);
        const scalar_t* xk = x.at(p, col[k] * b);
        for (int64_t c = 0; c < b; ++c) xn[c] = static_cast<acc_t>(xk[c * xs]);
        for (int64_t r = 0; r < b; ++r) {
          const acc_t gv = static_cast<acc_t>(gk[r * gs]);
          acc_t* Sr = Sk + r * b;
          for (int64_t c = 0; c < b; ++c) Sr[c] += gv * xn[c];
        }
      }
    }
  }
}

// S[k] = sum_p g(p, row(k)*b : +b)^T x(p, col[k]*b : +b) for every block k of the forward
// layout, over the P positions of g and x (make_layout() builds a thread's Layout of each).
// Threads own disjoint ranges of blocks and walk the positions in chunks; every S[k] sums
// its positions in the same order whatever the thread count (deterministic).
template <typename scalar_t, typename acc_t, typename MakeLayouts>
void sampled_gradient(MakeLayouts&& make_layouts, const int64_t* crow, const int64_t* col, int64_t nrows, int64_t nnzb,
                      int64_t b, int64_t P, acc_t* S) {
  std::vector<int64_t> row_of(nnzb);
  for (int64_t i = 0; i < nrows; ++i) std::fill(row_of.begin() + crow[i], row_of.begin() + crow[i + 1], i);
  at::parallel_for(0, nnzb, 1, [&](int64_t begin, int64_t end) {
    std::fill(S + begin * b * b, S + end * b * b, acc_t(0));
    const auto [g, x] = make_layouts();
    const bool done = with_fixed_block(b, [&](auto block) {
      constexpr int kB = decltype(block)::value;
#if ENTSKIP_AMX && defined(__AVX512BF16__)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (amx_available()) {
          sampled_blocks_fixed<scalar_t, acc_t, kB, SampledAmx<kB>>(g, x, row_of.data(), col, begin, end, P, S);
          return;
        }
      }
#endif
#if defined(__AVX512BF16__)
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
        if (use_avx512_bf16()) {
          sampled_blocks_fixed<scalar_t, acc_t, kB, SampledBf16Pairs<kB>>(g, x, row_of.data(), col, begin, end, P, S);
          return;
        }
      }
#endif
      sampled_blocks_fixed<scalar_t, acc_t, kB, SampledWidened<scalar_t, acc_t, kB>>(g, x, row_of.data(), col, begin,
                                                                                     end, P, S);
    });
    if (!done) sampled_blocks_any<scalar_t, acc_t>(g, x, row_of.data(), col, begin, end, b, P, S);
  });
}

}  // namespace entskip::cpu
