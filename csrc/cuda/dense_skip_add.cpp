// ATen glue of the CUDA dense skip-add (cuBLASLt calls in dense_cublaslt.cu): argument
// checks, outputs, workspace, the current stream. Registered as the CUDA implementations
// of entskip::_cuda_dense_skip_add{,_backward} (schemas in csrc/ops.cpp):
//
//   forward  y  = alpha * (x @ W^T) + branch      one cuBLASLt GEMM, branch through its epilogue (beta = 1)
//   backward dx = alpha * (g @ W)                 one cuBLASLt GEMM
//            S  = g^T @ x (float32/64)            one cuBLASLt GEMM; dW = alpha * S and dalpha = <S, W>
//                                                 from the deterministic finalize kernels (bsr_sampled.cu)
//
// alpha stays on the device (cuBLASLt reads it through a device pointer): no synchronisation,
// CUDA-graph capturable. float32 uses TF32 only where torch allows it for cuBLAS
// (torch.backends.cuda.matmul.allow_tf32).
#include <ATen/Context.h>
#include <torch/library.h>

#include "glue.h"

namespace entskip::cuda {
namespace {

void check_dense(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha) {
  check_float_matrix(x, "x");
  check_same(weight, x, "weight", "x");
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), "weight must have shape [D_out, ", x.size(1),
              "] to match x, got ", weight.sizes());
  check_cuda(x, "x");
  check_cuda(weight, "weight");
  check_alpha(alpha, x);
}

// {alpha, beta} on the device, in cuBLASLt's scale type (float64 for float64, else float32),
// then (beta = 0: no branch) a zero column of `rows` output elements, cuBLASLt's C (launchers.h).
at::Tensor gemm_scalars(const at::Tensor& alpha, double beta, const at::Tensor& x, int64_t rows) {
  const at::Tensor a = kernel_alpha(alpha);
  const size_t zero_bytes = beta == 0.0 ? (static_cast<size_t>(rows) * x.element_size() + 15) / 16 * 16 : 0;
  at::Tensor scalars =
      at::empty({static_cast<int64_t>(kGemmZerosOffset + zero_bytes)}, x.options().dtype(at::kByte));
  launch_gemm_scalars(a.const_data_ptr(), a.scalar_type() == at::kDouble, beta, scalars.mutable_data_ptr(),
                      acc_type(x) == at::kDouble, zero_bytes, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return scalars;
}

using DenseCall = int (*)(const DenseArgs&, Scalar, cudaStream_t);

// Runs one cuBLASLt call with a workspace from the caching allocator (stream-ordered, so it
// may be released as soon as the call is queued).
void gemm(DenseCall call, DenseArgs args, const at::Tensor& x) {
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(dense_workspace_bytes())}, x.options().dtype(at::kByte));
  args.workspace = workspace.mutable_data_ptr();
  args.workspace_bytes = static_cast<size_t>(workspace.numel());
  args.allow_tf32 = at::globalContext().allowTF32CuBLAS();
  const int status = call(args, scalar_of(x), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == 0, "entskip CUDA dense skip-add: cuBLASLt failed: ", dense_status_string(status));
}

at::Tensor dense_skip_add(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha,
                          const c10::optional<at::Tensor>& branch) {
  check_dense(x, weight, alpha);
  check_branch(branch, x, weight.size(0));
  if (branch.has_value()) check_cuda(*branch, "branch");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  if (d_in == 0) return branch.has_value() ? branch->clone() : at::zeros({n, d_out}, x.options());  // empty product
  at::Tensor out = at::empty({n, d_out}, x.options());
  if (n == 0 || d_out == 0) return out;
  const at::Tensor scalars = gemm_scalars(alpha, branch.has_value() ? 1.0 : 0.0, x, d_out);
  DenseArgs args{};
  args.x = x.const_data_ptr();
  args.weight = weight.const_data_ptr();
  args.branch = branch.has_value() ? branch->const_data_ptr() : nullptr;
  args.out = out.mutable_data_ptr();
  args.scalars = scalars.const_data_ptr();
  args.n = n;
  args.d_in = d_in;
  args.d_out = d_out;
  gemm(&dense_forward, args, x);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dense_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                       const at::Tensor& weight,
                                                                       const at::Tensor& alpha,
                                                                       std::array<bool, 3> output_mask) {
  check_dense(x, weight, alpha);
  check_same(grad, x, "grad", "x");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == weight.size(0),
              "grad must have shape [", x.size(0), ", ", weight.size(0), "], got ", grad.sizes());
  check_cuda(grad, "grad");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0), d_in = x.size(1), d_out = weight.size(0);
  DenseArgs args{};
  args.x = x.const_data_ptr();
  args.weight = weight.const_data_ptr();
  args.grad = grad.const_data_ptr();
  args.n = n;
  args.d_in = d_in;
  args.d_out = d_out;
  at::Tensor dx, dweight, dalpha;
  if (output_mask[0]) {
    if (d_out == 0 || n == 0 || d_in == 0) {
      dx = at::zeros_like(x);
    } else {
      dx = at::empty_like(x);
      const at::Tensor scalars = gemm_scalars(alpha, 0.0, x, d_in);
      args.out = dx.mutable_data_ptr();
      args.scalars = scalars.const_data_ptr();
      gemm(&dense_dx, args, x);
    }
  }
  if (output_mask[1] || output_mask[2]) {
    at::Tensor s;
    if (n == 0 || d_in == 0 || d_out == 0) {
      s = at::zeros({d_out, d_in}, x.options().dtype(acc_type(x)));
    } else {
      s = at::empty({d_out, d_in}, x.options().dtype(acc_type(x)));
      args.out = s.mutable_data_ptr();
      gemm(&dense_sampled, args, x);
    }
    if (output_mask[1]) dweight = at::empty_like(weight);
    at::Tensor dalpha64 = output_mask[2] ? at::empty({}, x.options().dtype(at::kDouble)) : at::Tensor();
    const at::Tensor a = kernel_alpha(alpha);
    const at::Tensor scratch = at::empty({finalize_scratch_doubles(s.numel())}, x.options().dtype(at::kDouble));
    const FinalizeArgs finalize{s.const_data_ptr(),
                                1,
                                s.numel(),
                                weight.const_data_ptr(),
                                a.const_data_ptr(),
                                a.scalar_type() == at::kDouble,
                                dweight.defined() ? dweight.mutable_data_ptr() : nullptr,
                                dalpha64.defined() ? dalpha64.mutable_data_ptr<double>() : nullptr,
                                scratch.mutable_data_ptr<double>()};
    check_launch(launch_finalize(finalize, scalar_of(x), c10::cuda::getCurrentCUDAStream()));
    if (output_mask[2]) dalpha = dalpha64.to(alpha.scalar_type()).reshape(alpha.sizes());
  }
  return {dx, dweight, dalpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CUDA, m) {
  m.impl("_cuda_dense_skip_add", &dense_skip_add);
  m.impl("_cuda_dense_skip_add_backward", &dense_skip_add_backward);
}

}  // namespace entskip::cuda
