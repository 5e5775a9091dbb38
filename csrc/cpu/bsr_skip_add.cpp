// CPU implementation of the block-sparse (BSR) skip-add and its backward.
//
//   forward  y[:, i]  = alpha * sum_{k in row i} x[:, col[k]] @ V_k^T + branch[:, i]
//   backward dx[:, j] = alpha * sum_{t in col j} g[:, row[t]] @ V_{perm[t]}
//            dS_k     = g[:, row(k)]^T @ x[:, col[k]]          (b x b, only on M's blocks)
//            dV_k     = alpha * dS_k,   dalpha = sum_k <dS_k, V_k>
// where [:, i] is the i-th group of b features. Forward and dx are the same fused
// loop (block_row_product) over a compressed layout: for every tile of rows and
// every output block it accumulates the products of all the blocks of that row
// in a small accumulator, then applies alpha and the residual add and writes the
// output tile once. dS is reduced over N in a fixed order per block, so results
// are deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../checks.h"
#include "common.h"

namespace entskip::cpu {
namespace {

// Accumulator elements per work item: a tile of rows times one output block.
constexpr int64_t kTileElems = 2048;

// Checks a compressed index (ptr: n + 1 offsets into idx) before any kernel dereferences it.
void check_compressed(const at::Tensor& ptr, const at::Tensor& idx, int64_t bound, const char* ptr_name,
                      const char* idx_name) {
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t n = ptr.numel() - 1, nnz = idx.numel();
  TORCH_CHECK(p[0] == 0 && p[n] == nnz, ptr_name, " must start at 0 and end at ", nnz, ", got ", p[0], " and ", p[n]);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] <= p[i + 1], ptr_name, " must be non-decreasing, but entry ", i + 1, " < entry ", i);
  }
  const int64_t* q = idx.data_ptr<int64_t>();
  for (int64_t k = 0; k < nnz; ++k) {
    TORCH_CHECK(q[k] >= 0 && q[k] < bound, idx_name, "[", k, "] = ", q[k], " is out of range [0, ", bound, ")");
  }
}

void check_perm(const at::Tensor& perm) {
  const int64_t* p = perm.data_ptr<int64_t>();
  const int64_t n = perm.numel();
  for (int64_t t = 0; t < n; ++t) {
    TORCH_CHECK(p[t] >= 0 && p[t] < n, "perm[", t, "] = ", p[t], " is out of range [0, ", n, ")");
  }
}

// out[n, i*b : (i+1)*b] = alpha * sum_{t = ptr[i]}^{ptr[i+1]-1} a[n, idx[t]*b : +b] @ B[t] (+ branch[n, ...])
// a: (N, lda) row-major; B: (nnz, b, b) row-major in the accumulation type, B[t][c][j]
// maps input feature c of the block to output feature j; out, branch: (N, nrows * b).
template <typename scalar_t, typename acc_t>
void block_row_product(const scalar_t* a, int64_t lda, const acc_t* B, const int64_t* ptr, const int64_t* idx,
                       int64_t nrows, int64_t b, int64_t N, acc_t alpha, const scalar_t* branch, scalar_t* out) {
  const int64_t ldo = nrows * b;
  const int64_t tile = std::max<int64_t>(1, kTileElems / b);
  const int64_t ntiles = (N + tile - 1) / tile;
  at::parallel_for(0, ntiles * nrows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(tile * b);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w % nrows, n0 = (w / nrows) * tile, n1 = std::min(N, n0 + tile);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t t = ptr[i]; t < ptr[i + 1]; ++t) {
        const acc_t* Bt = B + t * b * b;
        const scalar_t* at = a + idx[t] * b;
        for (int64_t n = n0; n < n1; ++n) {
          acc_t* accn = acc.data() + (n - n0) * b;
          const scalar_t* an = at + n * lda;
          for (int64_t c = 0; c < b; ++c) {
            const acc_t av = static_cast<acc_t>(an[c]);
            const acc_t* Bc = Bt + c * b;
            for (int64_t j = 0; j < b; ++j) accn[j] += av * Bc[j];
          }
        }
      }
      for (int64_t n = n0; n < n1; ++n) {
        const acc_t* accn = acc.data() + (n - n0) * b;
        scalar_t* on = out + n * ldo + i * b;
        if (branch != nullptr) {
          const scalar_t* rn = branch + n * ldo + i * b;
          for (int64_t j = 0; j < b; ++j) on[j] = static_cast<scalar_t>(alpha * accn[j] + static_cast<acc_t>(rn[j]));
        } else {
          for (int64_t j = 0; j < b; ++j) on[j] = static_cast<scalar_t>(alpha * accn[j]);
        }
      }
    }
  });
}

// S[k] = g[:, row(k)*b : +b]^T @ x[:, col[k]*b : +b] for every block k of the forward layout.
template <typename scalar_t, typename acc_t>
void sampled_gradient(const scalar_t* g, int64_t ldg, const scalar_t* x, int64_t ldx, const int64_t* crow,
                      const int64_t* col, int64_t nrows, int64_t nnzb, int64_t b, int64_t N, acc_t* S) {
  std::vector<int64_t> row_of(nnzb);
  for (int64_t i = 0; i < nrows; ++i) std::fill(row_of.begin() + crow[i], row_of.begin() + crow[i + 1], i);
  at::parallel_for(0, nnzb, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> xn(b);
    for (int64_t k = begin; k < end; ++k) {
      acc_t* Sk = S + k * b * b;
      std::fill(Sk, Sk + b * b, acc_t(0));
      const scalar_t* gk = g + row_of[k] * b;
      const scalar_t* xk = x + col[k] * b;
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t c = 0; c < b; ++c) xn[c] = static_cast<acc_t>(xk[n * ldx + c]);
        for (int64_t r = 0; r < b; ++r) {
          const acc_t gv = static_cast<acc_t>(gk[n * ldg + r]);
          acc_t* Sr = Sk + r * b;
          for (int64_t c = 0; c < b; ++c) Sr[c] += gv * xn[c];
        }
      }
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                  const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm, const at::Tensor& alpha,
                  BsrShape* s) {
  *s = check_bsr(x, values, crow, col, ccol, row, perm);
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
  at::Tensor out = at::empty({x.size(0), s.nrows * s.block}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "entskip_bsr_skip_add_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // B[k][c][j] = V_k[j][c]: the forward multiplies by V_k^T.
    const at::Tensor B = values.transpose(1, 2).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    block_row_product<scalar_t, acc_t>(xc.const_data_ptr<scalar_t>(), xc.size(1), B.const_data_ptr<acc_t>(),
                                       crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(), s.nrows,
                                       s.block, x.size(0), static_cast<acc_t>(a),
                                       rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr,
                                       out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsr_skip_add_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
    const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm,
    const at::Tensor& alpha, std::array<bool, 3> output_mask) {
  BsrShape s;
  check_inputs(x, values, crow, col, ccol, row, perm, alpha, &s);
  check_same(grad, x, "grad", "x");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == s.nrows * s.block,
              "grad must have shape [", x.size(0), ", ", s.nrows * s.block, "], got ", grad.sizes());
  const double a = alpha_value(alpha);
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous();
  at::Tensor dx, dvalues, dalpha;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "entskip_bsr_skip_add_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    if (output_mask[0]) {
      check_compressed(ccol, row, s.nrows, "ccol_indices", "row_indices");
      check_perm(perm);
      // Transposed order: block t of column j is V_{perm[t]}, used untransposed.
      const at::Tensor B = values.index_select(0, perm).to(acc_type).contiguous();
      dx = at::empty_like(xc);
      block_row_product<scalar_t, acc_t>(gc.const_data_ptr<scalar_t>(), gc.size(1), B.const_data_ptr<acc_t>(),
                                         ccol.const_data_ptr<int64_t>(), row.const_data_ptr<int64_t>(), s.ncols,
                                         s.block, x.size(0), static_cast<acc_t>(a), nullptr,
                                         dx.mutable_data_ptr<scalar_t>());
    }
    if (output_mask[1] || output_mask[2]) {
      check_compressed(crow, col, s.ncols, "crow_indices", "col_indices");
      at::Tensor S = at::empty({s.nnzb, s.block, s.block}, x.options().dtype(acc_type));
      sampled_gradient<scalar_t, acc_t>(gc.const_data_ptr<scalar_t>(), gc.size(1), xc.const_data_ptr<scalar_t>(),
                                        xc.size(1), crow.const_data_ptr<int64_t>(), col.const_data_ptr<int64_t>(),
                                        s.nrows, s.nnzb, s.block, x.size(0), S.mutable_data_ptr<acc_t>());
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
