// CPU implementation of the dense skip-add, y = alpha * (x @ W^T) + branch, and its
// backward. A dense mapping is a GEMM, so both directions call the BLAS-backed ATen
// GEMMs, with the scale and the residual add folded into addmm's epilogue, into outputs
// whose pages are mapped beforehand (empty_prefaulted).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../checks.h"
#include "common.h"

namespace entskip::cpu {

at::Tensor alpha_grad(const at::Tensor& s, const at::Tensor& m, const at::Tensor& alpha) {
  return (s.to(at::kDouble) * m.to(at::kDouble)).sum().to(alpha.scalar_type()).reshape(alpha.sizes());
}

namespace {

// a * (m1 @ m2) with one rounding: the GEMM applies alpha (in float) before it rounds to a
// reduced-precision output. BLAS skips the product when alpha == 0, which would mask a
// NaN/Inf of the operands, so that case forms it explicitly (0 * NaN = NaN, as the reference).
at::Tensor scaled_mm(const at::Tensor& m1, const at::Tensor& m2, double a) {
  if (a == 0.0) return at::mm(m1, m2).mul_(a);
  at::Tensor out = empty_prefaulted({m1.size(0), m2.size(1)}, m1.options());
  return at::addmm_out(out, out, m1, m2, /*beta=*/0, /*alpha=*/a);  // beta = 0: out's contents are not read
}

void check_dense(const at::Tensor& x, const at::Tensor& weight) {
  check_float_matrix(x, "x");
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
  if (branch.has_value() && a != 0.0) {
    at::Tensor out = empty_prefaulted({x.size(0), weight.size(0)}, x.options());
    return at::addmm_out(out, *branch, x, weight.t(), /*beta=*/1, /*alpha=*/a);
  }
  at::Tensor y = scaled_mm(x, weight.t(), a);
  return branch.has_value() ? y.add_(*branch) : y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& alpha,
                                                                       std::array<bool, 3> output_mask) {
  check_dense(x, weight);
  check_alpha(alpha, x);
  check_same(grad, x, "grad", "x");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "grad must have shape [", x.size(0), ", ", weight.size(0), "], got ", grad.sizes());
  const double a = alpha_value(alpha);
  at::Tensor dx, dweight, dalpha;
  if (output_mask[0]) dx = scaled_mm(grad, weight, a);
  if (output_mask[1] || output_mask[2]) {
    // Reduced precisions accumulate the N-long reduction in float32.
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor s = at::mm(grad.t().to(acc), x.to(acc));
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
