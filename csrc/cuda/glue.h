// Helpers shared by the ATen glue of the CUDA kernels (csrc/cuda/*.cpp): device and layout
// checks, the element type of a tensor, alpha in a type the kernels read, launch checks.
// Nothing here synchronises with the device (the ops can be captured in a CUDA graph).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../checks.h"
#include "launchers.h"

namespace entskip::cuda {

inline void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernels, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a strided (dense) tensor, got layout ", t.layout());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

inline Scalar scalar_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return Scalar::kFloat;
    case at::kDouble: return Scalar::kDouble;
    case at::kHalf: return Scalar::kHalf;
    case at::kBFloat16: return Scalar::kBFloat16;
    default: break;
  }
  TORCH_CHECK(false, "the CUDA kernels take float32, float64, bfloat16 or float16, got ", t.scalar_type());
}

// The accumulation dtype: float64 for float64, float32 otherwise.
inline at::ScalarType acc_type(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// alpha as the kernels read it, float32 or float64, still on the device (a reduced-precision
// alpha is widened by a device op, without a synchronisation).
inline at::Tensor kernel_alpha(const at::Tensor& alpha) {
  const auto st = alpha.scalar_type();
  return (st == at::kFloat || st == at::kDouble) ? alpha.contiguous() : alpha.to(at::kFloat);
}

// After a launcher: its own error message, then the CUDA launch status.
inline void check_launch(const char* error) {
  TORCH_CHECK(error == nullptr, error);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace entskip::cuda
