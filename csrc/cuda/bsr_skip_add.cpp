// ATen glue of the CUDA BSR skip-add (kernels in bsr_block_row.cu and bsr_sampled.cu):
// argument checks, outputs, the current stream, launch checks. Registered as the CUDA
// implementations of entskip::_cuda_bsr_skip_add{,_backward} (schemas in csrc/ops.cpp):
//
//   forward  y  = alpha * (x @ M^T) + branch                 block-row kernel over crow/col
//   backward dx = alpha * (g @ M)                            block-row kernel over ccol/row/perm
//            S  = g^T @ x on M's blocks (split-N partials),  dvalues = alpha * S,  dalpha = <S, V>
//
// The layout's contents were validated once by the Python layer; these checks are the
// cheap ones (shapes, dtypes, devices, contiguity) and never copy indices to the host, so
// the ops do not synchronise and can be captured in a CUDA graph.
#include <torch/library.h>

#include "glue.h"

namespace entskip::cuda {
namespace {

BsrShape check_inputs(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                      const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm, const at::Tensor& alpha) {
  const BsrShape s = check_bsr(x, values, crow, col, ccol, row, perm);
  check_cuda(x, "x");
  check_cuda(values, "values");
  check_alpha(alpha, x);
  return s;
}

at::Tensor bsr_skip_add(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow, const at::Tensor& col,
                        const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm, const at::Tensor& alpha,
                        const c10::optional<at::Tensor>& branch) {
  const BsrShape s = check_inputs(x, values, crow, col, ccol, row, perm, alpha);
  check_branch(branch, x, s.nrows * s.block);
  if (branch.has_value()) check_cuda(*branch, "branch");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), s.nrows * s.block}, x.options());
  const at::Tensor a = kernel_alpha(alpha);
  const BlockRowArgs args{x.const_data_ptr(),
                          values.const_data_ptr(),
                          crow.const_data_ptr<int64_t>(),
                          col.const_data_ptr<int64_t>(),
                          nullptr,
                          a.const_data_ptr(),
                          a.scalar_type() == at::kDouble,
                          branch.has_value() ? branch->const_data_ptr() : nullptr,
                          out.mutable_data_ptr(),
                          x.size(0),
                          s.ncols,
                          s.nrows,
                          s.nnzb,
                          s.block};
  check_launch(launch_block_row(args, scalar_of(x), /*transposed=*/false, c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bsr_skip_add_backward(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
    const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row, const at::Tensor& perm,
    const at::Tensor& alpha, std::array<bool, 3> output_mask) {
  const BsrShape s = check_inputs(x, values, crow, col, ccol, row, perm, alpha);
  check_same(grad, x, "grad", "x");
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == x.size(0) && grad.size(1) == s.nrows * s.block,
              "grad must have shape [", x.size(0), ", ", s.nrows * s.block, "], got ", grad.sizes());
  check_cuda(grad, "grad");
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor a = kernel_alpha(alpha);
  const Scalar dtype = scalar_of(x);
  const int64_t n = x.size(0);
  at::Tensor dx, dvalues, dalpha;
  if (output_mask[0]) {
    // dx[:, j] = alpha * sum_{t in column j} g[:, row[t]] @ V_{perm[t]}: the transposed layout.
    dx = at::empty_like(x);
    const BlockRowArgs args{grad.const_data_ptr(),
                            values.const_data_ptr(),
                            ccol.const_data_ptr<int64_t>(),
                            row.const_data_ptr<int64_t>(),
                            perm.const_data_ptr<int64_t>(),
                            a.const_data_ptr(),
                            a.scalar_type() == at::kDouble,
                            nullptr,
                            dx.mutable_data_ptr(),
                            n,
                            s.nrows,
                            s.ncols,
                            s.nnzb,
                            s.block};
    check_launch(launch_block_row(args, dtype, /*transposed=*/true, stream));
  }
  if (output_mask[1] || output_mask[2]) {
    const SampledPlan plan = sampled_plan(n, s.nnzb, s.block, dtype);
    const at::Tensor partials = at::empty({plan.splits, s.nnzb, s.block, s.block}, x.options().dtype(acc_type(x)));
    const SampledArgs sampled{grad.const_data_ptr(),
                              x.const_data_ptr(),
                              crow.const_data_ptr<int64_t>(),
                              col.const_data_ptr<int64_t>(),
                              partials.mutable_data_ptr(),
                              n,
                              s.ncols,
                              s.nrows,
                              s.nnzb,
                              s.block,
                              plan.splits,
                              plan.chunk};
    check_launch(launch_sampled(sampled, dtype, stream));
    if (output_mask[1]) dvalues = at::empty_like(values);
    at::Tensor dalpha64 = output_mask[2] ? at::empty({}, x.options().dtype(at::kDouble)) : at::Tensor();
    const int64_t count = s.nnzb * s.block * s.block;
    const at::Tensor scratch = at::empty({finalize_scratch_doubles(count)}, x.options().dtype(at::kDouble));
    const FinalizeArgs finalize{partials.const_data_ptr(),
                                plan.splits,
                                count,
                                values.const_data_ptr(),
                                a.const_data_ptr(),
                                a.scalar_type() == at::kDouble,
                                dvalues.defined() ? dvalues.mutable_data_ptr() : nullptr,
                                dalpha64.defined() ? dalpha64.mutable_data_ptr<double>() : nullptr,
                                scratch.mutable_data_ptr<double>()};
    check_launch(launch_finalize(finalize, dtype, stream));
    if (output_mask[2]) dalpha = dalpha64.to(alpha.scalar_type()).reshape(alpha.sizes());
  }
  return {dx, dvalues, dalpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CUDA, m) {
  m.impl("_cuda_bsr_skip_add", &bsr_skip_add);
  m.impl("_cuda_bsr_skip_add_backward", &bsr_skip_add_backward);
}

}  // namespace entskip::cuda
