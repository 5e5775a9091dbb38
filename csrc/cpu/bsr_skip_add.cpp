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
// kernels of features_first.h, dS by the sampled product (sampled_product.h) over the N * S positions
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
#include "sampled_product.h"
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
