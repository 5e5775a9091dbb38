// Schemas of the entskip custom ops, defined once. Implementations register per
// dispatch key in csrc/cpu/*.cpp (and csrc/cuda/*.cpp when built with CUDA).
//
// The BSR and dense ops take row-major activations in one of two formats: features last,
// x (N, D_in) with branch/grad/y (N, D_out), or features first, x (N, D_in, S) with
// branch/grad/y (N, D_out, S) (an NCHW map, S = H * W); dx has x's format. The CUDA C++
// ops (_cuda_*) take features last only. The Python layer (python/entskip/ops.py)
// flattens leading dims, makes inputs contiguous, validates layouts and registers
// autograd and fake kernels.
//
//   y = alpha * (x @ M^T) + branch                      (branch optional)
//   y[n] = alpha * (M @ x[n]) + branch[n]               (features first)
//
// Dense:  M = weight (D_out, D_in).
// BSR:    M has b x b blocks values[k] at block row i, block column col[k] for
//         crow[i] <= k < crow[i+1]; ccol/row/perm describe the same blocks in
//         column-major (transposed) order: block t of column j is values[perm[t]]
//         at block row row[t]. The backward walks the transposed order for dx.
//
// Backward ops return (dx, dM, dalpha), each undefined (None) when its entry of
// output_mask is false (features first: dx[n] = alpha * M^T @ grad[n], dM summed over n):
//   dx = alpha * (grad @ M),  dM = alpha * (grad^T @ x) on M's blocks,
//   dalpha = <grad^T @ x, M>  (float, shape of alpha).
#include <torch/library.h>

TORCH_LIBRARY(entskip, m) {
  m.def("dense_skip_add(Tensor x, Tensor weight, Tensor alpha, Tensor? branch) -> Tensor");
  m.def(
      "dense_skip_add_backward(Tensor grad, Tensor x, Tensor weight, Tensor alpha, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bsr_skip_add(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
      "Tensor ccol_indices, Tensor row_indices, Tensor perm, Tensor alpha, Tensor? branch) -> Tensor");
  m.def(
      "bsr_skip_add_backward(Tensor grad, Tensor x, Tensor values, Tensor crow_indices, "
      "Tensor col_indices, Tensor ccol_indices, Tensor row_indices, Tensor perm, Tensor alpha, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");

  // The CUDA C++ backend (csrc/cuda/): the same signatures and semantics as the four ops
  // above, with CUDA implementations only. The CUDA implementation of the public ops
  // (python/entskip/gpu_dispatch.py) calls these when the active backend is "cuda" and the
  // Triton kernels when it is "triton": one registration per dispatch key (docs/design.md, "Decisions and why").
  m.def("_cuda_dense_skip_add(Tensor x, Tensor weight, Tensor alpha, Tensor? branch) -> Tensor");
  m.def(
      "_cuda_dense_skip_add_backward(Tensor grad, Tensor x, Tensor weight, Tensor alpha, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def(
      "_cuda_bsr_skip_add(Tensor x, Tensor values, Tensor crow_indices, Tensor col_indices, "
      "Tensor ccol_indices, Tensor row_indices, Tensor perm, Tensor alpha, Tensor? branch) -> Tensor");
  m.def(
      "_cuda_bsr_skip_add_backward(Tensor grad, Tensor x, Tensor values, Tensor crow_indices, "
      "Tensor col_indices, Tensor ccol_indices, Tensor row_indices, Tensor perm, Tensor alpha, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

// Elementwise skips (csrc/cpu/identity_skip_add.cpp, csrc/cpu/permutation_skip_add.cpp):
// x, branch, grad of any shape (..., D), features last, any strides (the kernels read rows
// in place where the last dim is contiguous). Backward ops return (dx, dalpha), each
// undefined when its entry of output_mask is false; dbranch = grad needs no op.
//
// Identity:     y = alpha * x + branch;            dx = alpha * grad,  dalpha = sum(grad * x).
// Permutation:  y[..., i] = alpha * x[..., index[i]] + branch[..., i], with inverse[index[i]] = i;
//               dx[..., j] = alpha * grad[..., inverse[j]],  dalpha = sum_j grad[..., inverse[j]] * x[..., j].
//               With features_first, x is (N, D, S) (an NCHW map as (N, C, H * W)) and the
//               permutation acts on dim 1: y[n, i, s] = alpha * x[n, index[i], s] + branch[n, i, s].
// dalpha is a deterministic reduction (fixed chunks of the flattened input, float32
// accumulation, float64 for float64; the chunks' sums added in order in float64).
TORCH_LIBRARY_FRAGMENT(entskip, m) {
  m.def("identity_skip_add(Tensor x, Tensor alpha, Tensor? branch) -> Tensor");
  m.def("identity_skip_add_backward(Tensor grad, Tensor x, Tensor alpha, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def(
      "permutation_skip_add(Tensor x, Tensor index, Tensor inverse, Tensor alpha, Tensor? branch, "
      "bool features_first=False) -> Tensor");
  m.def(
      "permutation_skip_add_backward(Tensor grad, Tensor x, Tensor index, Tensor inverse, Tensor alpha, "
      "bool[2] output_mask, bool features_first=False) -> (Tensor, Tensor)");
  // The CUDA C++ backend of the two families (csrc/cuda/elementwise_skip.cu).
  m.def("_cuda_identity_skip_add(Tensor x, Tensor alpha, Tensor? branch) -> Tensor");
  m.def(
      "_cuda_identity_skip_add_backward(Tensor grad, Tensor x, Tensor alpha, bool[2] output_mask) -> (Tensor, Tensor)");
  m.def("_cuda_permutation_skip_add(Tensor x, Tensor index, Tensor inverse, Tensor alpha, Tensor? branch) -> Tensor");
  m.def(
      "_cuda_permutation_skip_add_backward(Tensor grad, Tensor x, Tensor index, Tensor inverse, Tensor alpha, "
      "bool[2] output_mask) -> (Tensor, Tensor)");
}
