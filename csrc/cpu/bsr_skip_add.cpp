// CPU implementation of the block-sparse (BSR) skip-add and its backward.
//
//   forward  y[:, i]  = alpha * sum_{k in row i} x[:, col[k]] @ V_k^T + branch[:, i]
//   backward dx[:, j] = alpha * sum_{t in col j} g[:, row[t]] @ V_{perm[t]}
//            dS_k     = g[:, row(k)]^T @ x[:, col[k]]          (b x b, only on M's blocks)
//            dV_k     = alpha * dS_k,   dalpha = sum_k <dS_k, V_k>
// where [:, i] is the i-th group of b features. Forward and dx are the same fused
// loop (block_row_product.h) over a compressed layout. dS is reduced over N in a
// fixed order per block, so results are deterministic for any thread count.
//
// x may also be features-first, (N, D_in, S) (an NCHW map with S = H * W), with branch,
// grad, y and dx in the same format: per image y[n][i] = alpha * sum_k V_k @ x[n][col[k]] +
// branch[n][i] ([i]: the i-th group of b rows), dx[n][j] = alpha * sum_t V_{perm[t]}^T @
// g[n][row[t]], dS_k = sum_n g[n][row(k)] @ x[n][col[k]]^T: the forward and dx by the
// kernels of features_first.h, dS by the sampled kernel below over the N * S positions
// (positions.h), all reading the maps in place.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../checks.h"
#include "block_row_product.h"
#include "common.h"
#include "features_first.h"
#include "positions.h"
#include "simd.h"

namespace entskip::cpu {
namespace {

// Checks a compressed index (ptr: n + 1 offsets into idx) before any kernel dereferences
// it: offsets from 0 to nnz, non-decreasing, indices in [0, bound) and strictly
// increasing within each segment (sorted, no duplicates). Every offset is checked before
// the first read of idx: a middle offset past nnz must not make the check read idx out of
// bounds (ptr's length is check_bsr's).
void check_compressed(const at::Tensor& ptr, const at::Tensor& idx, int64_t bound, const char* ptr_name,
                      const char* idx_name) {
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t n = ptr.numel() - 1, nnz = idx.numel();
  TORCH_CHECK(p[0] == 0 && p[n] == nnz, ptr_name, " must start at 0 and end at ", nnz, ", got ", p[0], " and ", p[n]);
  // Non-decreasing from 0 to nnz: every offset lies in [0, nnz].
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(p[i] <= p[i + 1], ptr_name, " must be non-decreasing, but entry ", i + 1, " (", p[i + 1],
                ") < entry ", i, " (", p[i], ")");
  const int64_t* q = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t k = p[i]; k < p[i + 1]; ++k) {
      TORCH_CHECK(q[k] >= 0 && q[k] < bound, idx_name, "[", k, "] = ", q[k], " is out of range [0, ", bound, ")");
      TORCH_CHECK(k == p[i] || q[k] > q[k - 1], idx_name, " must be strictly increasing within segment ", i,
                  " of ", ptr_name, " (sorted, no duplicates)");
    }
  }
}

// Checks that (ccol, row, perm) list exactly the blocks of (crow, col) column by column:
// perm is a permutation and block perm[t] of column j sits at block row row[t], column j.
// Both compressed indices must have passed check_compressed.
void check_transpose(const at::Tensor& crow, const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row,
                     const at::Tensor& perm) {
  const int64_t *cr = crow.data_ptr<int64_t>(), *co = col.data_ptr<int64_t>(), *cc = ccol.data_ptr<int64_t>();
  const int64_t *ro = row.data_ptr<int64_t>(), *pe = perm.data_ptr<int64_t>();
  const int64_t nrows = crow.numel() - 1, ncols = ccol.numel() - 1, nnz = perm.numel();
  std::vector<int64_t> row_of(nnz);
  for (int64_t i = 0; i < nrows; ++i) std::fill(row_of.begin() + cr[i], row_of.begin() + cr[i + 1], i);
  std::vector<bool> seen(nnz, false);
  for (int64_t j = 0; j < ncols; ++j) {
    for (int64_t t = cc[j]; t < cc[j + 1]; ++t) {
      const int64_t k = pe[t];
      TORCH_CHECK(k >= 0 && k < nnz, "perm[", t, "] = ", k, " is out of range [0, ", nnz, ")");
      TORCH_CHECK(!seen[k], "perm is not a permutation: block ", k, " appears twice");
      seen[k] = true;
      TORCH_CHECK(co[k] == j && row_of[k] == ro[t], "ccol_indices/row_indices/perm do not describe the transpose of "
                  "crow_indices/col_indices (entry ", t, ")");
    }
  }
}

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

// out = alpha * (a's rows through the blocks B) (+ branch): block_row_product for a 2-D
// (rows, D) a, ff_block_product for a 3-D (N, D, S) one; a, branch (if defined) and out are
// contiguous, out in a's format with nrows * b features.
template <typename scalar_t, typename acc_t>
void block_product(const at::Tensor& a, const at::Tensor& B, const at::Tensor& ptr, const at::Tensor& idx,
                   int64_t nrows, int64_t b, double alpha, const at::Tensor& branch, at::Tensor& out) {
  const scalar_t* r = branch.defined() ? branch.const_data_ptr<scalar_t>() : nullptr;
  if (a.dim() == 3) {
    ff_block_product<scalar_t, acc_t>(a.const_data_ptr<scalar_t>(), a.size(1), B.const_data_ptr<acc_t>(),
                                      ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(), nrows, b, a.size(0),
                                      a.size(2), static_cast<acc_t>(alpha), r, out.mutable_data_ptr<scalar_t>());
  } else {
    block_row_product<scalar_t, acc_t>(a.const_data_ptr<scalar_t>(), a.size(1), B.const_data_ptr<acc_t>(),
                                       ptr.const_data_ptr<int64_t>(), idx.const_data_ptr<int64_t>(), nrows, b,
                                       a.size(0), static_cast<acc_t>(alpha), r, out.mutable_data_ptr<scalar_t>());
  }
}

void check_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                  const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm, const at::Tensor& alpha,
                  BsrShape* s) {
  *s = check_bsr(x, values, crow, col, ccol, row, perm, /*features_first=*/true);
  check_cpu(x, "x");
  check_cpu(values, "values");
  check_alpha(alpha, x);
}

at::Tensor bsr_skip_add(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm, const at::Tensor& alpha,
                        const c10::optional<at::Tensor>& branch) {
  BsrShape s;
  check_inputs(x, values, crow, col, ccol, row, perm, alpha, &s);
  check_branch(branch, x, s.nrows * s.block);
  check_compressed(crow, col, s.ncols, "crow_indices", "col_indices");
  const double a = alpha_value(alpha);
  const at::Tensor xc = x.contiguous();
  const at::Tensor rc = branch.has_value() ? branch->contiguous() : at::Tensor();
  at::Tensor out = empty_output(features_shape(x, s.nrows * s.block), x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "entskip_bsr_skip_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // B[k][c][j] = V_k[j][c]: the forward multiplies by V_k^T.
    const at::Tensor B = values.transpose(1, 2).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    block_product<scalar_t, acc_t>(xc, B, crow, col, s.nrows, s.block, a, rc, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsr_skip_add_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
    const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm,
    const at::Tensor& alpha, std::array<bool, 3> output_mask) {
  BsrShape s;
  check_inputs(x, values, crow, col, ccol, row, perm, alpha, &s);
  check_like_x(grad, x, s.nrows * s.block, "grad");
  check_compressed(crow, col, s.ncols, "crow_indices", "col_indices");
  const double a = alpha_value(alpha);
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous();
  at::Tensor dx, dvalues, dalpha;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "entskip_bsr_skip_add_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    if (output_mask[0]) {
      check_compressed(ccol, row, s.nrows, "ccol_indices", "row_indices");
      check_transpose(crow, col, ccol, row, perm);
      // Transposed order: block t of column j is V_{perm[t]}, used untransposed.
      const at::Tensor B = values.index_select(0, perm).to(acc_type).contiguous();
      dx = empty_output(xc.sizes(), xc.options());
      block_product<scalar_t, acc_t>(gc, B, ccol, row, s.ncols, s.block, a, at::Tensor(), dx);
    }
    if (output_mask[1] || output_mask[2]) {
      at::Tensor S = at::empty({s.nnzb, s.block, s.block}, x.options().dtype(acc_type));
      const scalar_t *gp = gc.const_data_ptr<scalar_t>(), *xp = xc.const_data_ptr<scalar_t>();
      const int64_t* cp = crow.const_data_ptr<int64_t>();
      const int64_t* colp = col.const_data_ptr<int64_t>();
      if (x.dim() == 3) {
        const int64_t n = x.size(0), sp = x.size(2);
        const auto layouts = [&] {
          return std::pair{SpatialPositions<scalar_t>{gp, gc.size(1), sp, {}}, SpatialPositions<scalar_t>{xp, xc.size(1), sp, {}}};
        };
        sampled_gradient<scalar_t, acc_t>(layouts, cp, colp, s.nrows, s.nnzb, s.block, n * sp, S.mutable_data_ptr<acc_t>());
      } else {
        const auto layouts = [&] {
          return std::pair{RowPositions<scalar_t>{gp, gc.size(1)}, RowPositions<scalar_t>{xp, xc.size(1)}};
        };
        sampled_gradient<scalar_t, acc_t>(layouts, cp, colp, s.nrows, s.nnzb, s.block, x.size(0),
                                          S.mutable_data_ptr<acc_t>());
      }
      if (output_mask[1]) dvalues = S.mul(a).to(values.scalar_type());
      if (output_mask[2]) dalpha = alpha_grad(S, values, alpha);
    }
  });
  return {dx, dvalues, dalpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CPU, m) {
  m.impl("bsr_skip_add", &bsr_skip_add);
  m.impl("bsr_skip_add_backward", &bsr_skip_add_backward);
}

}  // namespace entskip::cpu
