// Plain C++ interface between the ATen glue (csrc/cuda/*.cpp) and the CUDA kernels
// (csrc/cuda/*.cu). Only raw pointers, sizes and streams cross it, so the .cu files
// include nothing but CUDA headers and nvcc compiles them on a machine without torch.
//
// Every pointer is device memory on the current device; every matrix is row-major and
// contiguous. The glue has checked shapes, dtypes and devices; the layout (crow/col,
// ccol/row/perm) has been validated once per layout by the Python layer
// (entskip.gpu_dispatch.validate_layout). Launchers return without launching when there
// is nothing to do and leave launch errors to the caller's C10_CUDA_KERNEL_LAUNCH_CHECK;
// a kernel launcher returns nullptr, or a message when the problem cannot be launched.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace entskip::cuda {

// Element type of the activations, values and outputs.
enum class Scalar : int { kFloat, kDouble, kHalf, kBFloat16 };

// out[:, i*b : (i+1)*b] = alpha * sum_{t = ptr[i]}^{ptr[i+1]-1} a[:, idx[t]*b : +b] @ W_t + branch[:, i*b : +b]
// with W_t = values[t]^T (forward: ptr/idx = crow/col, perm = nullptr) or
//      W_t = values[perm[t]] (dx: ptr/idx = ccol/row, perm = perm, branch = nullptr).
struct BlockRowArgs {
  const void* a;          // (n, in_blocks * block): x (forward) or grad (dx)
  const void* values;     // (nnzb, block, block)
  const int64_t* ptr;     // (out_blocks + 1) compressed offsets
  const int64_t* idx;     // (nnzb) input block of every stored block, in compressed order
  const int64_t* perm;    // (nnzb) value index of every stored block, or nullptr (identity)
  const void* alpha;      // 0-d alpha on the device, float32 or float64 (alpha_double)
  bool alpha_double;
  const void* branch;     // (n, out_blocks * block) or nullptr
  void* out;              // (n, out_blocks * block)
  int64_t n, in_blocks, out_blocks, nnzb, block;
};

// The forward (transposed = false: W_t = values[t]^T) or dx (transposed = true) product.
const char* launch_block_row(const BlockRowArgs& args, Scalar dtype, bool transposed, cudaStream_t stream);

// S_k = grad[:, row(k)*b : +b]^T @ x[:, col[k]*b : +b] for every block k of the forward layout,
// as split partial sums over row chunks: partials[s][k] covers rows [s*chunk, min((s+1)*chunk, n)).
// partials is (splits, nnzb, block, block) in the accumulation type (float64 for float64, else float32).
struct SampledArgs {
  const void* grad;       // (n, out_blocks * block)
  const void* x;          // (n, in_blocks * block)
  const int64_t* crow;    // (out_blocks + 1)
  const int64_t* col;     // (nnzb)
  void* partials;
  int64_t n, in_blocks, out_blocks, nnzb, block;
  int64_t splits, chunk;  // from sampled_plan
};

struct SampledPlan {
  int64_t splits, chunk;
};
// How many row chunks the sampled product uses on the current device (deterministic in
// the sizes and the device): enough CTAs to fill the GPU a few times.
SampledPlan sampled_plan(int64_t n, int64_t nnzb, int64_t block, Scalar dtype);
const char* launch_sampled(const SampledArgs& args, Scalar dtype, cudaStream_t stream);

// Second stage of every sampled gradient (BSR and dense), in a fixed order (deterministic):
//   S[e] = sum_{s < splits} partials[s][e]                        (e < count)
//   dvalues[e] = alpha * S[e]  (if dvalues != nullptr, in the values' type)
//   dalpha = sum_e S[e] * values[e]  (if dalpha != nullptr; float64, a 0-d tensor)
// partials holds the accumulation type (float64 for float64, else float32).
// scratch must hold finalize_scratch_doubles(count) doubles.
struct FinalizeArgs {
  const void* partials;
  int64_t splits, count;
  const void* values;
  const void* alpha;
  bool alpha_double;
  void* dvalues;   // or nullptr
  double* dalpha;  // or nullptr
  double* scratch;
};
int64_t finalize_scratch_doubles(int64_t count);
const char* launch_finalize(const FinalizeArgs& args, Scalar dtype, cudaStream_t stream);

// Dense path through cuBLASLt (csrc/cuda/dense_cublaslt.cu). cuBLASLt's epilogue applies
// D = alpha * op(A) op(B) + beta * C with C = branch, so y is written once and never copied
// first (torch.addmm copies branch into the output before its GEMM). Returns a
// cublasStatus_t (0 = success); dense_status_string names it.
//
// dims: y (n, d_out) = alpha * x (n, d_in) @ weight (d_out, d_in)^T + branch.
//
// The device scalars of the forward and dx GEMMs (DenseArgs::scalars): {alpha, beta} in
// cuBLASLt's scale type at the start, then from byte kGemmZerosOffset zero_bytes zeros (a
// multiple of 16, at least one output column of the GEMM: d_out elements for the forward,
// d_in for dx): the C of a GEMM without a branch, so C is never the uninitialised output.
constexpr size_t kGemmZerosOffset = 256;
void launch_gemm_scalars(const void* alpha, bool alpha_double, double beta, void* scalars, bool scalars_double,
                         size_t zero_bytes, cudaStream_t stream);
size_t dense_workspace_bytes();
struct DenseArgs {
  const void* x;        // (n, d_in)                      forward, sampled
  const void* weight;   // (d_out, d_in)                  forward, dx
  const void* grad;     // (n, d_out)                     dx, sampled
  const void* branch;   // (n, d_out) or nullptr          forward
  void* out;            // forward (n, d_out); dx (n, d_in); sampled (d_out, d_in) in the accumulation type
  const void* scalars;  // device {alpha, beta} and zeros (launch_gemm_scalars; forward, dx)
  int64_t n, d_in, d_out;
  void* workspace;
  size_t workspace_bytes;
  bool allow_tf32;  // float32 only: TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32)
};
int dense_forward(const DenseArgs& args, Scalar dtype, cudaStream_t stream);  // y = alpha x W^T + branch
int dense_dx(const DenseArgs& args, Scalar dtype, cudaStream_t stream);       // dx = alpha g W
int dense_sampled(const DenseArgs& args, Scalar dtype, cudaStream_t stream);  // S = g^T x (accumulation type)
const char* dense_status_string(int status);

// Elementwise skips (csrc/cuda/elementwise_skip.cu) on (n, d) matrices with unit column
// stride and the given row strides; outputs are contiguous (n, d). index: the gather
// index of the forward (a permutation) or the inverse permutation of the backward, or
// nullptr for the identity. Each element is read and written once:
//   forward   out[r][c] = alpha * x[r][index[c]] + branch[r][c]        (branch optional)
//   backward  gv = grad[r][index[c]];  dx[r][c] = alpha * gv (if dx);
//             partials[block] = sum over the block's elements of gv * x[r][c] (if partials)
// The partials (elementwise_partials(n, d) doubles, one per CUDA block) are summed in
// order by the caller: dalpha is deterministic.
struct ElementwiseArgs {
  const void* x;
  const void* branch;   // or nullptr
  const void* grad;     // backward
  const int64_t* index; // or nullptr
  const void* alpha;
  bool alpha_double;
  void* out;            // y (forward) or dx (backward; nullptr when not needed)
  void* partials;       // backward dalpha partials, or nullptr
  int64_t n, d, stride_x, stride_branch, stride_grad;
};
int64_t elementwise_partials(int64_t n, int64_t d);
const char* launch_elementwise_forward(const ElementwiseArgs& args, Scalar dtype, cudaStream_t stream);
const char* launch_elementwise_backward(const ElementwiseArgs& args, Scalar dtype, cudaStream_t stream);

}  // namespace entskip::cuda
