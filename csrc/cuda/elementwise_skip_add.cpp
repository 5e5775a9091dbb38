// ATen glue of the CUDA elementwise skips (kernels in elementwise_skip.cu): argument checks,
// the (rows, D) views the kernels read in place, outputs, and dalpha from the kernels'
// per-block partials summed in order (deterministic). Registered as the CUDA implementations
// of entskip::_cuda_{identity,permutation}_skip_add{,_backward} (schemas in csrc/ops.cpp).
// alpha stays on the device: no synchronisation, CUDA-graph capturable. The permutation's
// index and inverse are validated by the Python layer (entskip.gpu_dispatch.validate_permutation);
// the kernels check each index against D anyway (a broken one traps instead of reading out
// of bounds).
#include <torch/library.h>

#include "../rows.h"
#include "glue.h"

namespace entskip::cuda {
namespace {

void check_floating(const at::Tensor& x, const at::Tensor& alpha) {
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (the features)");
  TORCH_CHECK(x.is_cuda() && x.layout() == at::kStrided, "x must be a strided CUDA tensor, got ", x.device());
  (void)scalar_of(x);  // float32, float64, float16 or bfloat16
  check_alpha(alpha, x);
}

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_same(t, x, name, "x");
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
}

void check_permutation(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_index(t, name, x.size(-1), x);
}

at::Tensor run_forward(const at::Tensor& x, const c10::optional<at::Tensor>& index, const at::Tensor& alpha,
                       const c10::optional<at::Tensor>& branch) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const Rows xr = as_rows(x);
  const Rows br = branch.has_value() ? as_rows(*branch) : xr;
  const at::Tensor a = kernel_alpha(alpha);
  ElementwiseArgs args{};
  args.x = xr.t.const_data_ptr();
  args.branch = branch.has_value() ? br.t.const_data_ptr() : nullptr;
  args.index = index.has_value() ? index->const_data_ptr<int64_t>() : nullptr;
  args.alpha = a.const_data_ptr();
  args.alpha_double = a.scalar_type() == at::kDouble;
  args.out = y.mutable_data_ptr();
  args.n = xr.rows;
  args.d = xr.cols;
  args.stride_x = xr.stride;
  args.stride_branch = br.stride;
  check_launch(launch_elementwise_forward(args, scalar_of(x), c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<at::Tensor, at::Tensor> run_backward(const at::Tensor& grad, const at::Tensor& x,
                                                const c10::optional<at::Tensor>& inverse, const at::Tensor& alpha,
                                                std::array<bool, 2> output_mask) {
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                                 : at::Tensor();
  at::Tensor dalpha;
  const int64_t d = x.size(-1), n = d == 0 ? 0 : x.numel() / d;
  at::Tensor partials = at::zeros({output_mask[1] ? elementwise_partials(n, d) : 0}, x.options().dtype(at::kDouble));
  if (x.numel() > 0 && (output_mask[0] || output_mask[1])) {
    const Rows gr = as_rows(grad);
    const Rows xr = output_mask[1] ? as_rows(x) : gr;  // x is read only for dalpha
    const at::Tensor a = kernel_alpha(alpha);
    ElementwiseArgs args{};
    args.x = xr.t.const_data_ptr();
    args.grad = gr.t.const_data_ptr();
    args.index = inverse.has_value() ? inverse->const_data_ptr<int64_t>() : nullptr;
    args.alpha = a.const_data_ptr();
    args.alpha_double = a.scalar_type() == at::kDouble;
    args.out = output_mask[0] ? dx.mutable_data_ptr() : nullptr;
    args.partials = output_mask[1] ? partials.mutable_data_ptr() : nullptr;
    args.n = gr.rows;
    args.d = gr.cols;
    args.stride_x = xr.stride;
    args.stride_grad = gr.stride;
    check_launch(launch_elementwise_backward(args, scalar_of(x), c10::cuda::getCurrentCUDAStream()));
  }
  if (output_mask[1]) dalpha = partials.sum().to(alpha.scalar_type()).reshape(alpha.sizes());
  return {dx, dalpha};
}

at::Tensor identity_skip_add(const at::Tensor& x, const at::Tensor& alpha, const c10::optional<at::Tensor>& branch) {
  check_floating(x, alpha);
  if (branch.has_value()) check_like(*branch, x, "branch");
  return run_forward(x, c10::nullopt, alpha, branch);
}

std::tuple<at::Tensor, at::Tensor> identity_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& alpha, std::array<bool, 2> output_mask) {
  check_floating(x, alpha);
  check_like(grad, x, "grad");
  return run_backward(grad, x, c10::nullopt, alpha, output_mask);
}

at::Tensor permutation_skip_add(const at::Tensor& x, const at::Tensor& index, const at::Tensor& inverse,
                                const at::Tensor& alpha, const c10::optional<at::Tensor>& branch) {
  check_floating(x, alpha);
  check_permutation(index, "index", x);
  check_permutation(inverse, "inverse", x);
  if (branch.has_value()) check_like(*branch, x, "branch");
  return run_forward(x, index, alpha, branch);
}

std::tuple<at::Tensor, at::Tensor> permutation_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& index, const at::Tensor& inverse,
                                                                 const at::Tensor& alpha,
                                                                 std::array<bool, 2> output_mask) {
  check_floating(x, alpha);
  check_permutation(index, "index", x);
  check_permutation(inverse, "inverse", x);
  check_like(grad, x, "grad");
  return run_backward(grad, x, inverse, alpha, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CUDA, m) {
  m.impl("_cuda_identity_skip_add", &identity_skip_add);
  m.impl("_cuda_identity_skip_add_backward", &identity_skip_add_backward);
  m.impl("_cuda_permutation_skip_add", &permutation_skip_add);
  m.impl("_cuda_permutation_skip_add_backward", &permutation_skip_add_backward);
}

}  // namespace entskip::cuda
