// CPU implementation of the dense skip-add, y = alpha * (x @ W^T) + branch, and its
// backward. A dense mapping is a GEMM; y and dx run whichever of two was faster on this
// CPU for the dtype (use_block_kernel):
//  - ATen's BLAS-backed GEMM, with the scale and the residual add folded into addmm's
//    epilogue, into outputs whose pages are mapped beforehand (empty_prefaulted);
//  - the block-row kernel of the BSR op over all the b x b blocks of W (float32 accumulation,
//    the residual add fused), where W is whole 16/32/64 blocks. It beats a BLAS whose
//    16-bit GEMM is slower than its float32 one (no AMX or AVX512-BF16), and one that
//    does not reach this CPU's float32 peak (MKL on AMD, e.g.).
// float64 always runs the GEMM. A 2-D dW is a GEMM over N in every case.
//
// x may also be features-first, (N, D_in, S) (an NCHW map, S = H * W), with branch, grad, y
// and dx in the same format: y[n] = alpha * W @ x[n] + branch[n], dx[n] = alpha * W^T @ g[n],
// dW = alpha * sum_n g[n] @ x[n]^T (accumulated in float32, float64 for float64). These run
// one ATen GEMM per image on views of the inputs, the images spread over the threads (one
// thread per GEMM; dW sums fixed groups of images, see image_sum_of_products), except for
// bfloat16 with W whole 16/32/64 blocks: dW then runs the BSR backward's sampled product over
// all of W's blocks (blockwise_sum_of_products) wherever bfloat16 products run on bfloat16
// hardware (AMX tiles or AVX512-BF16 dot products), and on AMX tiles y and dx run the
// features-first block kernel over them (block_kernel_mm).
#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../checks.h"
#include "block_row_product.h"
#include "common.h"
#include "features_first.h"
#include "positions.h"
#include "sampled_product.h"

namespace entskip::cpu {

at::Tensor alpha_grad(const at::Tensor& s, const at::Tensor& m, const at::Tensor& alpha) {
  return (s.to(at::kDouble) * m.to(at::kDouble)).sum().to(alpha.scalar_type()).reshape(alpha.sizes());
}

namespace {

// a * (m1 @ m2) with one rounding: the GEMM applies alpha (in float) before it rounds to a
// reduced-precision output. BLAS skips the product when alpha == 0, which would mask a
// NaN/Inf of the operands, so that case forms it explicitly (0 * NaN = NaN, as the reference).
// Written into out (a contiguous matrix or a view of one), with branch (if defined) added:
// out = a * (m1 @ m2) + branch.
void scaled_mm_into(at::Tensor out, const at::Tensor& m1, const at::Tensor& m2, double a, const at::Tensor& branch) {
  if (a == 0.0) {
    at::mm_out(out, m1, m2).mul_(a);
    if (branch.defined()) out.add_(branch);
  } else if (branch.defined()) {
    at::addmm_out(out, branch, m1, m2, /*beta=*/1, /*alpha=*/a);
  } else {
    at::addmm_out(out, out, m1, m2, /*beta=*/0, /*alpha=*/a);  // beta = 0: out's contents are not read
  }
}

// fn(begin, end) over [0, count) by at::parallel_for, the workers running with this thread's
// state (dispatch keys, grad mode), so that the ATen calls inside dispatch as they would
// here. A BLAS call inside runs single-threaded (a parallel region's nested calls do).
template <typename Fn>
void parallel_with_caller_state(int64_t count, Fn&& fn) {
  const at::ThreadLocalState state;
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard same(state);
    fn(begin, end);
  });
}

// y = a * (W @ x) + branch on x's format: x (rows, D_in) computes x @ W^T (mat = W^T, on the
// right); x (N, D_in, S) computes W @ x[n] per image (mat = W, on the left). out is a new
// tensor of features_shape(x, d_out), its pages mapped.
at::Tensor scaled_product(const at::Tensor& x, const at::Tensor& mat, double a, const at::Tensor& branch,
                          int64_t d_out) {
  at::Tensor out = empty_prefaulted(features_shape(x, d_out), x.options());
  if (x.dim() == 2) {
    scaled_mm_into(out, x, mat.t(), a, branch);
  } else {
    // Images in parallel, each GEMM on one thread.
    parallel_with_caller_state(x.size(0), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n)
        scaled_mm_into(out[n], mat, x[n], a, branch.defined() ? branch[n] : at::Tensor());
    });
  }
  return out;
}

// Bytes of the per-group partial sums of image_sum_of_products.
constexpr int64_t kGroupSumBytes = int64_t{64} << 20;

// sum_n g[n] @ x[n]^T for features-first g (N, D_out, S) and x (N, D_in, S), in dtype acc.
// The images are cut into G consecutive groups, G fixed by the shape (at most 8, and G
// partials of D_out x D_in within kGroupSumBytes): each group sums its images' GEMMs in
// order on one thread, the groups run in parallel, and their partials are added in group
// order, so the result does not depend on the thread count.
at::Tensor image_sum_of_products(const at::Tensor& g, const at::Tensor& x, at::ScalarType acc) {
  const int64_t n = x.size(0), d_out = g.size(1), d_in = x.size(1);
  const int64_t partial_bytes = std::max<int64_t>(d_out * d_in * at::elementSize(acc), 1);
  const int64_t groups = std::clamp<int64_t>(std::min<int64_t>(n, kGroupSumBytes / partial_bytes), 1, 8);
  const at::Tensor partials = at::zeros({groups, d_out, d_in}, x.options().dtype(acc));
  parallel_with_caller_state(groups, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      at::Tensor part = partials[k];
      for (int64_t i = k * n / groups; i < (k + 1) * n / groups; ++i) part.addmm_(g[i].to(acc), x[i].to(acc).t());
    }
  });
  at::Tensor s = partials[0].clone();
  for (int64_t k = 1; k < groups; ++k) s.add_(partials[k]);
  return s;
}

// sum_n g[n] @ x[n]^T for bfloat16 features-first g (N, D_out, S) and x (N, D_in, S), W whole
// b x b blocks: the BSR backward's sampled product (sampled_product.h) over the layout of all
// of W's blocks, reading the maps in place, float32 sums in a fixed order. On AMX tiles, and
// with AVX512-BF16 dot products, it takes about half the time of image_sum_of_products'
// float32 GEMMs on widened copies (32 x 512 x 14 x 14 on an AMD EPYC with AVX512-BF16: 10.0
// instead of 17.6 ms).
at::Tensor blockwise_sum_of_products(const at::Tensor& g_in, const at::Tensor& x_in, int64_t b) {
  const at::Tensor g = g_in.contiguous(), x = x_in.contiguous();
  const int64_t d_out = g.size(1), d_in = x.size(1), rows = d_out / b, cols = d_in / b, nnzb = rows * cols;
  std::vector<int64_t> crow(rows + 1), col(nnzb);
  for (int64_t i = 0; i <= rows; ++i) crow[i] = i * cols;
  for (int64_t k = 0; k < nnzb; ++k) col[k] = k % cols;
  at::Tensor S = at::empty({rows, cols, b, b}, x.options().dtype(at::kFloat));  // S[i][j][r][c] = s[i*b + r][j*b + c]
  const c10::BFloat16 *gp = g.const_data_ptr<c10::BFloat16>(), *xp = x.const_data_ptr<c10::BFloat16>();
  const int64_t sp = x.size(2);
  const auto layouts = [&] {
    return std::pair{SpatialPositions<c10::BFloat16>{gp, d_out, sp, {}}, SpatialPositions<c10::BFloat16>{xp, d_in, sp, {}}};
  };
  sampled_gradient<c10::BFloat16, float>(layouts, crow.data(), col.data(), rows, nnzb, b, x.size(0) * sp,
                                         S.mutable_data_ptr<float>());
  return S.permute({0, 2, 1, 3}).reshape({d_out, d_in});
}

// Whether bfloat16 products run on bfloat16 hardware here: AMX tiles, or AVX512-BF16 dot
// products (in builds for such CPUs, unless ENTSKIP_CPU_AVX512_BF16=0).
bool bfloat16_products_native() {
#if defined(__AVX512BF16__)
  if (use_avx512_bf16()) return true;
#endif
  return amx_available();
}

// The block for blockwise_sum_of_products: the largest of 64, 32, 16 that W (d_out x d_in)
// is whole blocks of, where bfloat16 products run natively (bfloat16_products_native); else 0.
int64_t blockwise_block(int64_t d_out, int64_t d_in) {
  if (!bfloat16_products_native()) return 0;
  for (const int64_t b : {64, 32, 16})
    if (d_out % b == 0 && d_in % b == 0) return b;
  return 0;
}

// The block size for which W (d_out x d_in) is whole blocks, 0 if none.
int64_t full_block(int64_t d_out, int64_t d_in) {
  for (const int64_t b : {32, 64, 16})
    if (d_out % b == 0 && d_in % b == 0) return b;
  return 0;
}

// out = alpha * (a @ W^T) (+ branch) when transpose is false, alpha * (a @ W) when true, by the
// block-row kernel over all the b x b blocks of W (row i, column j of blocks: W_ij):
//   y[:, i]  = alpha * sum_j x[:, j] @ W_ij^T + branch[:, i]     (forward)
//   dx[:, j] = alpha * sum_i g[:, i] @ W_ij                       (backward)
// A features-first a (N, D, S) runs the features-first kernel (ff_block_product):
// y[n][i] = alpha * sum_j W_ij @ x[n][j] + branch[n][i], dx[n][j] = alpha * sum_i W_ij^T @ g[n][i].
at::Tensor block_kernel_mm(const at::Tensor& a, const at::Tensor& weight, double alpha,
                           const c10::optional<at::Tensor>& branch, bool transpose, int64_t b) {
  const int64_t nr = weight.size(0) / b, nc = weight.size(1) / b;
  const int64_t nout = transpose ? nc : nr, nin = transpose ? nr : nc;
  // B[t][c][o] maps input feature c of block t to output feature o of its output block.
  const at::Tensor blocks = weight.reshape({nr, b, nc, b})
                                .permute(transpose ? at::IntArrayRef{2, 0, 1, 3} : at::IntArrayRef{0, 2, 3, 1})
                                .to(at::kFloat)
                                .contiguous();
  std::vector<int64_t> ptr(nout + 1), idx(nout * nin);
  for (int64_t o = 0; o <= nout; ++o) ptr[o] = o * nin;
  for (int64_t t = 0; t < nout * nin; ++t) idx[t] = t % nin;
  const at::Tensor ac = a.contiguous();
  const at::Tensor rc = branch.has_value() ? branch->contiguous() : at::Tensor();
  const bool ff = a.dim() == 3;
  at::Tensor out = ff ? empty_output({a.size(0), nout * b, a.size(2)}, a.options())
                      : empty_output({a.size(0), nout * b}, a.options());
  AT_DISPATCH_V2(a.scalar_type(), "entskip_dense_block_kernel_cpu", AT_WRAP([&] {
    const scalar_t* r = rc.defined() ? rc.const_data_ptr<scalar_t>() : nullptr;
    if (ff) {
      ff_block_product<scalar_t, float>(ac.const_data_ptr<scalar_t>(), ac.size(1), blocks.const_data_ptr<float>(),
                                        ptr.data(), idx.data(), nout, b, a.size(0), a.size(2),
                                        static_cast<float>(alpha), r, out.mutable_data_ptr<scalar_t>());
    } else {
      block_row_product<scalar_t, float>(ac.const_data_ptr<scalar_t>(), ac.size(1), blocks.const_data_ptr<float>(),
                                         ptr.data(), idx.data(), nout, b, a.size(0), static_cast<float>(alpha), r,
                                         out.mutable_data_ptr<scalar_t>());
    }
  }), at::kFloat, at::kBFloat16, at::kHalf);
  return out;
}

// Seconds of the faster of two calls of fn, after a warm-up call.
template <typename Fn>
double best_seconds(Fn&& fn) {
  fn();
  double best = 1e30;
  for (int rep = 0; rep < 2; ++rep) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  return best;
}

// Whether the block-row kernel beats ATen's GEMM for y = x @ W^T in dtype t on a 2048 x 1024
// x 1024 product, measured once per process and dtype (0.1-0.2 s in all; at 512 rows the block
// kernel's per-call cost, reordering W, still weighed enough to pick a GEMM that was slower at
// 8192 rows). The operands are constant (the user's random generator is not touched) and the
// products run below autocast and Python dispatch modes, whatever the caller has active.
bool block_kernel_is_faster(at::ScalarType t) {
  const c10::impl::ExcludeDispatchKeyGuard plain(
      c10::autocast_dispatch_keyset | c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot}));
  const at::Tensor x = at::full({2048, 1024}, 0.5, at::TensorOptions().dtype(t));
  const at::Tensor w = at::full({1024, 1024}, 0.25, at::TensorOptions().dtype(t));
  const double gemm = best_seconds([&] { return at::mm(x, w.t()); });
  const double blocks = best_seconds([&] { return block_kernel_mm(x, w, 1.0, c10::nullopt, false, 32); });
  return blocks < gemm;
}

// Whether the dense op runs y and dx on the block-row kernel rather than ATen's GEMM for
// inputs of dtype t: never for float64; for float32, bfloat16 and float16 as
// ENTSKIP_CPU_DENSE_KERNEL says ("blocks" or "gemm"), else as block_kernel_is_faster measured.
// The two paths round differently (float32 sums in another order), so where the measured
// rates are close, different processes may pick different paths: pin one for bitwise
// reproducibility across processes.
bool use_block_kernel(at::ScalarType t) {
  if (t != at::kFloat && t != at::kBFloat16 && t != at::kHalf) return false;
  if (const char* forced = std::getenv("ENTSKIP_CPU_DENSE_KERNEL")) {
    if (std::strcmp(forced, "blocks") == 0) return true;
    if (std::strcmp(forced, "gemm") == 0) return false;
    TORCH_CHECK(forced[0] == '\0', "ENTSKIP_CPU_DENSE_KERNEL must be 'gemm', 'blocks' or empty, got '", forced, "'");
  }
  if (t == at::kFloat) {
    static const bool f32 = block_kernel_is_faster(at::kFloat);  // measured when first needed, once
    return f32;
  }
  if (t == at::kBFloat16) {
    static const bool bf16 = block_kernel_is_faster(at::kBFloat16);
    return bf16;
  }
  static const bool f16 = block_kernel_is_faster(at::kHalf);
  return f16;
}

// The block size to run the block-row kernel with for these inputs, 0 for the GEMM. Features
// first (3-D x), only bfloat16 on AMX tiles (faster than a GEMM per image there).
int64_t block_kernel_block(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t b = full_block(weight.size(0), weight.size(1));
  if (x.dim() == 3) return b != 0 && x.scalar_type() == at::kBFloat16 && amx_available() ? b : 0;
  return b != 0 && use_block_kernel(x.scalar_type()) ? b : 0;
}

void check_dense(const at::Tensor& x, const at::Tensor& weight) {
  check_float_matrix(x, "x", /*three_d=*/true);
  check_cpu(x, "x");
  check_cpu(weight, "weight");
  check_same(weight, x, "weight", "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must have shape [D_out, ", x.size(1),
              "] to match x, got ", weight.sizes());
}

at::Tensor dense_skip_add(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                          const c10::optional<at::Tensor>& branch) {
  check_dense(x, weight);
  check_alpha(alpha, x);
  check_branch(branch, x, weight.size(0));
  const double a = alpha_value(alpha);
  if (const int64_t b = block_kernel_block(x, weight)) return block_kernel_mm(x, weight, a, branch, false, b);
  return scaled_product(x, weight, a, branch.has_value() ? *branch : at::Tensor(), weight.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& alpha,
                                                                       std::array<bool, 3> output_mask) {
  check_dense(x, weight);
  check_alpha(alpha, x);
  check_like_x(grad, x, weight.size(0), "grad");
  const double a = alpha_value(alpha);
  at::Tensor dx, dweight, dalpha;
  if (output_mask[0]) {
    const int64_t b = block_kernel_block(x, weight);
    // dx = a * g @ W (2-D), a * W^T @ g[n] (3-D): scaled_product with grad as the input and W^T as the mapping.
    dx = b != 0 ? block_kernel_mm(grad, weight, a, c10::nullopt, true, b)
                : scaled_product(grad, weight.t(), a, at::Tensor(), weight.size(1));
  }
  if (output_mask[1] || output_mask[2]) {
    // s = grad^T @ x, an N-long reduction accumulated in float32 (float64 for float64).
    // bfloat16 inputs, where ATen's bfloat16 GEMM beat the block kernel, use that GEMM
    // (float32 accumulation inside, s rounded to bfloat16 like torch's own bfloat16
    // autograd); other 16-bit inputs upcast to the float32 GEMM (a float16 s could overflow).
    // Features-first: s = sum_n grad[n] @ x[n]^T, accumulated GEMM by GEMM in float32 (float64),
    // or for bfloat16 on bfloat16 hardware by the sampled product over all of W's blocks.
    const auto t = x.scalar_type(), acc = t == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor s;
    if (x.dim() == 3) {
      const int64_t b = t == at::kBFloat16 ? blockwise_block(weight.size(0), weight.size(1)) : 0;
      s = b != 0 ? blockwise_sum_of_products(grad, x, b) : image_sum_of_products(grad, x, acc);
    } else {
      s = t == at::kBFloat16 && !use_block_kernel(t) ? at::mm(grad.t(), x) : at::mm(grad.t().to(acc), x.to(acc));
    }
    if (output_mask[1]) dweight = s.mul(a).to(weight.scalar_type());
    if (output_mask[2]) dalpha = alpha_grad(s, weight, alpha);
  }
  return {dx, dweight, dalpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CPU, m) {
  m.impl("dense_skip_add", &dense_skip_add);
  m.impl("dense_skip_add_backward", &dense_skip_add_backward);
}

}  // namespace entskip::cpu
