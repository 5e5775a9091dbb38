// Helpers shared by the CPU kernels of csrc/cpu/.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

namespace entskip::cpu {

// alpha as a finite double; a NaN or Inf skip weight is an error, never silently propagated.
inline double alpha_value(const at::Tensor& alpha) {
  TORCH_CHECK(alpha.device().is_cpu(), "alpha must be on the CPU for the CPU kernels, got ", alpha.device());
  const double a = alpha.item<double>();
  TORCH_CHECK(std::isfinite(a), "alpha must be finite, got ", a);
  return a;
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernels, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a strided (dense) tensor, got layout ", t.layout());
}

// <s, m> in float64, returned with alpha's dtype and shape: dalpha = <grad^T @ x, M>.
at::Tensor alpha_grad(const at::Tensor& s, const at::Tensor& m, const at::Tensor& alpha);

}  // namespace entskip::cpu
