// Features-first kernels: activations (N, D, S) row-major, the features along dim 1 and
// S positions (H * W of an NCHW map) contiguous. Per image the skip is a left product,
//
//   out[n] = alpha * M @ a[n] (+ branch[n])      out[n]: (D_out, S), a[n]: (D_in, S)
//
// over a compressed layout of b x b blocks (forward: M's rows; dx: M^T through the transposed
// layout), and the sampled gradient
//
//   S_k = sum_n g[n][rows of block row i] @ x[n][rows of block column j]^T      (b x b)
//
// for every stored block k = (i, j), a reduction over n and S. The S positions are the SIMD
// dimension: the kernels read x, branch and grad in place (no transposes). The block-row
// product packs a tile of S columns of every input row (widened to the accumulation type,
// zero-padded to whole vectors) into a per-thread buffer that stays in L2 and runs
// MR x (NV vectors) register tiles over it; any b works (the blocks' output rows are
// zero-padded to whole micro-tiles). The sampled product sums fixed chunks of N and of S in
// a fixed order, so every result is independent of the thread count.
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

// The first n (0 < n <= W) elements at p as a vector, the rest zero.
template <typename acc_t, typename scalar_t>
inline simd::Vec<acc_t> load_first(const scalar_t* p, int64_t n) {
  constexpr int W = simd::Simd<acc_t>::W;
  if (n >= W) return simd::load<acc_t>(p);
  scalar_t buf[W] = {};
  std::memcpy(buf, p, n * sizeof(scalar_t));
  return simd::load<acc_t>(buf);
}

// Stores the first n (0 < n <= W) lanes of v at p; writes nothing past p + n.
template <typename acc_t, typename scalar_t>
inline void store_first(scalar_t* p, const simd::Vec<acc_t>& v, int64_t n) {
  constexpr int W = simd::Simd<acc_t>::W;
  if (n >= W) return simd::store<acc_t>(p, v);
  scalar_t buf[W];
  simd::store<acc_t>(buf, v);
  std::memcpy(p, buf, n * sizeof(scalar_t));
}

// Register tile of the features-first block-row product: MR output rows x NV vectors of S.
template <typename acc_t>
struct FfBlocking {
  static constexpr int W = simd::Simd<acc_t>::W;
  static constexpr int MR = 8, NV = 3;  // 24 accumulators of 32 registers
};

// out[m][:cols] = alpha * sum_{t in [t0, t1)} sum_k Bp[t][k][o0 + m] * P[idx[t] * b + k][:cols]
// (+ branch[m][:cols]) for m < rows (<= MR), cols <= NV * W; rows of out and branch are ldo
// apart. P: packed input rows (ldp apart, zero past the valid columns); Bp: (nnz, b, rpad)
// blocks, Bp[t][k][o] mapping input feature k of block t to output feature o (zero for o >= b).
// Never inlined (see block_row_micro): every element is computed by the same code.
template <typename scalar_t, typename acc_t, int MR, int NV>
ENTSKIP_MICRO_KERNEL void ff_micro(const acc_t* P, int64_t ldp, const acc_t* Bp, int64_t b, int64_t rpad,
                                   const int64_t* idx, int64_t t0, int64_t t1, int64_t o0, acc_t alpha,
                                   const scalar_t* branch, scalar_t* out, int64_t ldo, int64_t rows, int64_t cols) {
  using V = simd::Vec<acc_t>;
  constexpr int W = simd::Simd<acc_t>::W;
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NV; ++v) acc[m][v] = V{};
  for (int64_t t = t0; t < t1; ++t) {
    const acc_t* Bt = Bp + t * b * rpad + o0;
    const acc_t* Pt = P + idx[t] * b * ldp;
    for (int64_t k = 0; k < b; ++k) {
      V xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = simd::load<acc_t>(Pt + k * ldp + v * W);
      simd::outer_product_step<MR, NV>(acc, Bt + k * rpad, xv);
    }
  }
  const V va = simd::broadcast(alpha);
  for (int64_t m = 0; m < rows; ++m) {
    for (int v = 0; v < NV && v * W < cols; ++v) {
      const int64_t n = std::min<int64_t>(W, cols - v * W);
      V y = va * acc[m][v];
      if (branch != nullptr) y += load_first<acc_t>(branch + m * ldo + v * W, n);
      store_first<acc_t>(out + m * ldo + v * W, y, n);
    }
  }
}

// ff_micro with NV = nv (1 <= nv <= FfBlocking::NV) vectors: the last chunk of a tile.
template <typename scalar_t, typename acc_t, int NV = FfBlocking<acc_t>::NV>
inline void ff_micro_nv(int64_t nv, const acc_t* P, int64_t ldp, const acc_t* Bp, int64_t b, int64_t rpad,
                        const int64_t* idx, int64_t t0, int64_t t1, int64_t o0, acc_t alpha, const scalar_t* branch,
                        scalar_t* out, int64_t ldo, int64_t rows, int64_t cols) {
  if constexpr (NV > 1) {
    if (nv < NV)
      return ff_micro_nv<scalar_t, acc_t, NV - 1>(nv, P, ldp, Bp, b, rpad, idx, t0, t1, o0, alpha, branch, out, ldo,
                                                  rows, cols);
  }
  ff_micro<scalar_t, acc_t, FfBlocking<acc_t>::MR, NV>(P, ldp, Bp, b, rpad, idx, t0, t1, o0, alpha, branch, out, ldo,
                                                        rows, cols);
}

// out[n][i*b : +b][:] = alpha * sum_{t = ptr[i]}^{ptr[i+1]-1} B[t]^T @ a[n][idx[t]*b : +b][:]
// (+ branch[n][i*b : +b][:]) for n < N, block rows i < nrows: a (N, d_a, S), out and branch
// (N, nrows * b, S), all contiguous; B (nnz, b, b) in acc_t with B[t][k][o] mapping input
// feature k of block t to output feature o (the convention of block_row_product).
//
// Work items are (image, tile of S columns, group of block rows): each packs its tile of
// a[n] (all d_a rows, widened, zero-padded to whole vectors) into a per-thread buffer and
// writes every output element of its rows and columns once. Groups split the block rows
// only when images x tiles leave threads idle (N = 1, small S).
template <typename scalar_t, typename acc_t>
void ff_block_product(const scalar_t* a, int64_t d_a, const acc_t* B, const int64_t* ptr, const int64_t* idx,
                      int64_t nrows, int64_t b, int64_t N, int64_t S, acc_t alpha, const scalar_t* branch,
                      scalar_t* out) {
  constexpr int W = FfBlocking<acc_t>::W, MR = FfBlocking<acc_t>::MR, CW = FfBlocking<acc_t>::NV * W;
  if (N == 0 || S == 0 || nrows == 0) return;
  const int64_t rpad = (b + MR - 1) / MR * MR, nnz = ptr[nrows];
  std::vector<acc_t> Bp(nnz * b * rpad, acc_t(0));
  for (int64_t t = 0; t < nnz; ++t)
    for (int64_t k = 0; k < b; ++k) std::copy_n(B + (t * b + k) * b, b, Bp.data() + (t * b + k) * rpad);
  // Tile columns: whole chunks of CW, as many as fit the L2 budget, no more than S needs.
  const int64_t fit = kTileBytes / (std::max<int64_t>(d_a, 1) * static_cast<int64_t>(sizeof(acc_t)));
  const int64_t tile = std::clamp<int64_t>(fit / CW, 1, (S + CW - 1) / CW) * CW;
  const int64_t ntiles = (S + tile - 1) / tile, spatial = N * ntiles;
  const int64_t groups = std::clamp<int64_t>((4 * at::get_num_threads() + spatial - 1) / spatial, 1, nrows);
  const int64_t d_out = nrows * b;
  at::parallel_for(0, spatial * groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> P(std::max<int64_t>(d_a, 1) * tile);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t n = w / (ntiles * groups), s0 = (w / groups) % ntiles * tile, g = w % groups;
      const int64_t cols = std::min(S - s0, tile), padded = (cols + W - 1) / W * W;
      const scalar_t* an = a + n * d_a * S + s0;
      for (int64_t r = 0; r < d_a; ++r) {
        acc_t* Pr = P.data() + r * tile;
        for (int64_t c = 0; c < padded; c += W) simd::store<acc_t>(Pr + c, load_first<acc_t>(an + r * S + c, cols - c));
      }
      for (int64_t i = g * nrows / groups; i < (g + 1) * nrows / groups; ++i) {
        for (int64_t o0 = 0; o0 < b; o0 += MR) {
          const int64_t first = n * d_out * S + (i * b + o0) * S + s0;
          for (int64_t c0 = 0; c0 < cols; c0 += CW) {
            const int64_t cc = std::min<int64_t>(CW, cols - c0);
            ff_micro_nv<scalar_t, acc_t>((cc + W - 1) / W, P.data() + c0, tile, Bp.data(), b, rpad, idx, ptr[i],
                                         ptr[i + 1], o0, alpha, branch != nullptr ? branch + first + c0 : nullptr,
                                         out + first + c0, S, std::min<int64_t>(MR, b - o0), cc);
          }
        }
      }
    }
  });
}

// Register tile of the sampled product: R rows of g x R rows of x, vectors along S.
constexpr int kFfSampledTile = 4;

// acc[r * R + c] += sum_{i < images} sum_{s < len} g[r][i * g_image + s] * x[c][i * x_image + s]
// (lane-wise: vectors along s) for r, c < R = kFfSampledTile, rows given by pointers into the
// first image. The accumulators live in memory between calls and in registers within one.
template <typename scalar_t, typename acc_t>
ENTSKIP_MICRO_KERNEL void ff_sampled_micro(const scalar_t* const* g, const scalar_t* const* x, int64_t g_image,
                                           int64_t x_image, int64_t images, int64_t len, simd::Vec<acc_t>* acc) {
  using V = simd::Vec<acc_t>;
  constexpr int W = simd::Simd<acc_t>::W, R = kFfSampledTile;
  V a[R][R];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < R; ++c) a[r][c] = acc[r * R + c];
  for (int64_t i = 0; i < images; ++i) {
    for (int64_t s = 0; s < len; s += W) {
      V gv[R], xv[R];
      for (int r = 0; r < R; ++r) gv[r] = load_first<acc_t>(g[r] + i * g_image + s, len - s);
      for (int c = 0; c < R; ++c) xv[c] = load_first<acc_t>(x[c] + i * x_image + s, len - s);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < R; ++c) a[r][c] += gv[r] * xv[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < R; ++c) acc[r * R + c] = a[r][c];
}

// Images per chunk of the sampled reduction and positions per pass over S: fixed, so the
// partial sums (and their order) do not depend on the thread count.
constexpr int64_t kFfSampledImages = 4, kFfSampledPositions = 512;

// Sk[k][r][c] = sum_n sum_s g[n][row(k)*b + r][s] * x[n][col[k]*b + c][s] for every block k of
// the layout (crow, col): g (N, nrows * b, S), x (N, ncols * b, S), contiguous; Sk (nnzb, b, b).
// Work items are (chunk of kFfSampledImages images, block). An item keeps one vector
// accumulator per entry of its block (lanes: positions), walks S in passes of
// kFfSampledPositions (its rows of g and x for the chunk stay in L2) and R x R tiles of the
// block within each, and adds the lanes up once at the end; the items' partials are added
// in chunk order.
template <typename scalar_t, typename acc_t>
void ff_sampled_gradient(const scalar_t* g, const scalar_t* x, const int64_t* crow, const int64_t* col,
                         int64_t nrows, int64_t ncols, int64_t nnzb, int64_t b, int64_t N, int64_t S, acc_t* Sk) {
  using V = simd::Vec<acc_t>;
  constexpr int R = kFfSampledTile, W = simd::Simd<acc_t>::W;
  const int64_t bb = b * b, chunks = (N + kFfSampledImages - 1) / kFfSampledImages, tiles = (b + R - 1) / R;
  std::vector<int64_t> row_of(nnzb);
  for (int64_t i = 0; i < nrows; ++i) std::fill(row_of.begin() + crow[i], row_of.begin() + crow[i + 1], i);
  std::vector<acc_t> partial(chunks * nnzb * bb, acc_t(0));
  at::parallel_for(0, chunks * nnzb, 1, [&](int64_t begin, int64_t end) {
    const scalar_t *gr[R], *xr[R];
    std::vector<V> acc(tiles * tiles * R * R);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t chunk = w / nnzb, k = w % nnzb, n0 = chunk * kFfSampledImages;
      const int64_t images = std::min(N, n0 + kFfSampledImages) - n0;
      std::fill(acc.begin(), acc.end(), V{});
      const scalar_t* gk = g + (n0 * nrows + row_of[k]) * b * S;
      const scalar_t* xk = x + (n0 * ncols + col[k]) * b * S;
      for (int64_t s0 = 0; s0 < S; s0 += kFfSampledPositions) {
        const int64_t len = std::min(kFfSampledPositions, S - s0);
        for (int64_t t = 0; t < tiles; ++t) {
          // Rows past b repeat the last row; their results are dropped.
          for (int q = 0; q < R; ++q) gr[q] = gk + std::min<int64_t>(t * R + q, b - 1) * S + s0;
          for (int64_t u = 0; u < tiles; ++u) {
            for (int q = 0; q < R; ++q) xr[q] = xk + std::min<int64_t>(u * R + q, b - 1) * S + s0;
            ff_sampled_micro<scalar_t, acc_t>(gr, xr, nrows * b * S, ncols * b * S, images, len,
                                              acc.data() + (t * tiles + u) * R * R);
          }
        }
      }
      acc_t* out = partial.data() + w * bb;
      for (int64_t r = 0; r < b; ++r)
        for (int64_t c = 0; c < b; ++c) {
          const V& v = acc[((r / R) * tiles + c / R) * R * R + (r % R) * R + c % R];
          acc_t sum = 0;
          for (int l = 0; l < W; ++l) sum += v[l];
          out[r * b + c] = sum;
        }
    }
  });
  at::parallel_for(0, nnzb * bb, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t e = begin; e < end; ++e) {
      acc_t sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * nnzb * bb + e];
      Sk[e] = sum;
    }
  });
}

}  // namespace entskip::cpu
