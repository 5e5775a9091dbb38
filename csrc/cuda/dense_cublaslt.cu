// Dense (e.g. orthogonal) skip mapping through cuBLASLt: the fastest correct path for a
// dense GEMM, so entskip calls cuBLASLt rather than shipping its own (the benchmark
// labels the dense "cuda" rows as cuBLASLt).
//
//   forward  y = alpha * (x @ W^T) + branch     one cublasLtMatmul: D = alpha A B + beta C
//            with C = branch, beta = 1 (0 without a branch) and D a fresh output, so the
//            residual add is cuBLASLt's epilogue and y is written once (torch.addmm would
//            first copy branch into the output).
//   dx       dx = alpha * (g @ W)               beta = 0
//   sampled  S  = g^T @ x                       float32 (float64) output; dW = alpha * S and
//            dalpha = <S, W> come from the shared finalize kernels (bsr_sampled.cu).
// alpha and beta live on the device (CUBLASLT_POINTER_MODE_DEVICE, written by
// gemm_scalars_kernel from the 0-d alpha tensor), so nothing synchronises and the calls can
// be captured in a CUDA graph. Device pointer mode leaves it to the chosen kernel whether
// C is read when *beta == 0, so a GEMM without a branch (dx, forward without a branch) never
// passes the uninitialised output as C: its C is a zero column (written by the same kernel
// as the scalars) broadcast with leading dimension 0 (cublasLtMatmul's out-of-place case),
// so D = alpha A B + 0 * 0 whether C is read or not. The sampled product has host scalars
// (beta exactly 0 on the host, BLAS's "C need not be valid" case) and writes its output in
// place. cuBLASLt is column-major: a row-major (r x c) matrix is passed as its
// column-major (c x r) transpose (see each call).
// Tensor cores: bf16/fp16 (fp32 accumulation), float32 only with TF32 allowed
// (torch.backends.cuda.matmul.allow_tf32), float64 in float64. Algorithms are chosen by
// cuBLASLt's heuristic once per shape/type/alignment and cached, so repeated calls use the
// same algorithm (bit-identical results).
#include <cublasLt.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "device_utils.cuh"

namespace entskip::cuda {
namespace {

// {alpha, beta} at the start of scalars; zero_words 16-byte zeros from kGemmZerosOffset on.
__global__ void gemm_scalars_kernel(const void* alpha, bool alpha_double, double beta, void* scalars,
                                    bool scalars_double, int64_t zero_words) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    const double a = load_alpha<double>(alpha, alpha_double);
    if (scalars_double) {
      static_cast<double*>(scalars)[0] = a;
      static_cast<double*>(scalars)[1] = beta;
    } else {
      static_cast<float*>(scalars)[0] = static_cast<float>(a);
      static_cast<float*>(scalars)[1] = static_cast<float>(beta);
    }
  }
  uint4* zeros = reinterpret_cast<uint4*>(static_cast<char*>(scalars) + kGemmZerosOffset);
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < zero_words;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    zeros[i] = make_uint4(0u, 0u, 0u, 0u);
  }
}

// One cuBLASLt handle per device, created on first use and kept for the process (as torch does).
cublasStatus_t current_handle(cublasLtHandle_t* handle) {
  static std::mutex mutex;
  static std::map<int, cublasLtHandle_t> handles;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return CUBLAS_STATUS_NOT_INITIALIZED;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it == handles.end()) {
    cublasLtHandle_t h = nullptr;
    const cublasStatus_t st = cublasLtCreate(&h);
    if (st != CUBLAS_STATUS_SUCCESS) return st;
    it = handles.emplace(device, h).first;
  }
  *handle = it->second;
  return CUBLAS_STATUS_SUCCESS;
}

struct Types {
  cudaDataType_t ab, cd, scale;
  cublasComputeType_t compute;
};

cudaDataType_t data_type(Scalar dtype) {
  switch (dtype) {
    case Scalar::kDouble: return CUDA_R_64F;
    case Scalar::kHalf: return CUDA_R_16F;
    case Scalar::kBFloat16: return CUDA_R_16BF;
    case Scalar::kFloat: break;
  }
  return CUDA_R_32F;
}

// Operands in dtype; the output in dtype, or in the accumulation type (acc_out).
Types types_of(Scalar dtype, bool acc_out, bool allow_tf32) {
  if (dtype == Scalar::kDouble) return {CUDA_R_64F, CUDA_R_64F, CUDA_R_64F, CUBLAS_COMPUTE_64F};
  const cublasComputeType_t compute =
      dtype == Scalar::kFloat && allow_tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  return {data_type(dtype), acc_out ? CUDA_R_32F : data_type(dtype), CUDA_R_32F, compute};
}

// Largest power of two up to 256 that divides the address (cuBLASLt's alignment preference).
uint32_t alignment(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && (a % align) != 0) align /= 2;
  return align;
}

// Column-major GEMM: D (m x n) = alpha * op(A) @ op(B) + beta * C, op(A) m x k, op(B) k x n;
// C has D's type and shape, with its own leading dimension (0: one column, broadcast).
struct Gemm {
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldc, ldd;
  const void *A, *B, *C;
  void* D;
  const void *alpha, *beta;
  bool device_scalars;
};

template <typename H, cublasStatus_t (*Destroy)(H)> struct Owned {
  H h = nullptr;
  ~Owned() {
    if (h != nullptr) Destroy(h);
  }
};

#define ENTSKIP_LT(call)                                 \
  do {                                                   \
    const cublasStatus_t status_ = (call);               \
    if (status_ != CUBLAS_STATUS_SUCCESS) return status_; \
  } while (0)

using AlgoKey = std::tuple<int, int, int, int, int, bool, bool, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                           int64_t, uint32_t, uint32_t, uint32_t, uint32_t, bool, size_t>;

cublasStatus_t run(const Gemm& g, const Types& t, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  cublasLtHandle_t handle = nullptr;
  ENTSKIP_LT(current_handle(&handle));
  Owned<cublasLtMatmulDesc_t, cublasLtMatmulDescDestroy> op;
  ENTSKIP_LT(cublasLtMatmulDescCreate(&op.h, t.compute, t.scale));
  const cublasOperation_t ta = g.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, tb = g.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cublasLtPointerMode_t mode = g.device_scalars ? CUBLASLT_POINTER_MODE_DEVICE : CUBLASLT_POINTER_MODE_HOST;
  ENTSKIP_LT(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
  ENTSKIP_LT(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
  ENTSKIP_LT(cublasLtMatmulDescSetAttribute(op.h, CUBLASLT_MATMUL_DESC_POINTER_MODE, &mode, sizeof(mode)));
  Owned<cublasLtMatrixLayout_t, cublasLtMatrixLayoutDestroy> a, b, c, d;
  ENTSKIP_LT(cublasLtMatrixLayoutCreate(&a.h, t.ab, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda));
  ENTSKIP_LT(cublasLtMatrixLayoutCreate(&b.h, t.ab, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb));
  ENTSKIP_LT(cublasLtMatrixLayoutCreate(&c.h, t.cd, g.m, g.n, g.ldc));
  ENTSKIP_LT(cublasLtMatrixLayoutCreate(&d.h, t.cd, g.m, g.n, g.ldd));

  int device = 0;
  cudaGetDevice(&device);
  const uint32_t align_a = alignment(g.A), align_b = alignment(g.B), align_c = alignment(g.C),
                 align_d = alignment(g.D);
  const AlgoKey key{device, static_cast<int>(t.ab), static_cast<int>(t.cd), static_cast<int>(t.scale),
                    static_cast<int>(t.compute), g.trans_a, g.trans_b, g.m, g.n, g.k, g.lda, g.ldb, g.ldc, g.ldd,
                    align_a, align_b, align_c, align_d, g.device_scalars, workspace_bytes};
  static std::mutex mutex;
  static std::map<AlgoKey, cublasLtMatmulAlgo_t> cache;
  cublasLtMatmulAlgo_t algo;
  bool found = false;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = cache.find(key);
    if (it != cache.end()) {
      algo = it->second;
      found = true;
    }
  }
  if (!found) {
    Owned<cublasLtMatmulPreference_t, cublasLtMatmulPreferenceDestroy> pref;
    ENTSKIP_LT(cublasLtMatmulPreferenceCreate(&pref.h));
    ENTSKIP_LT(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                    &workspace_bytes, sizeof(workspace_bytes)));
    ENTSKIP_LT(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align_a,
                                                    sizeof(align_a)));
    ENTSKIP_LT(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align_b,
                                                    sizeof(align_b)));
    ENTSKIP_LT(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align_c,
                                                    sizeof(align_c)));
    ENTSKIP_LT(cublasLtMatmulPreferenceSetAttribute(pref.h, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align_d,
                                                    sizeof(align_d)));
    cublasLtMatmulHeuristicResult_t result = {};
    int returned = 0;
    ENTSKIP_LT(cublasLtMatmulAlgoGetHeuristic(handle, op.h, a.h, b.h, c.h, d.h, pref.h, 1, &result, &returned));
    if (returned == 0) return CUBLAS_STATUS_NOT_SUPPORTED;
    algo = result.algo;
    std::lock_guard<std::mutex> lock(mutex);
    cache.emplace(key, algo);
  }
  return cublasLtMatmul(handle, op.h, g.alpha, g.A, a.h, g.B, b.h, g.beta, g.C, c.h, g.D, d.h, &algo, workspace,
                        workspace_bytes, stream);
}

}  // namespace

void launch_gemm_scalars(const void* alpha, bool alpha_double, double beta, void* scalars, bool scalars_double,
                         size_t zero_bytes, cudaStream_t stream) {
  const int64_t words = static_cast<int64_t>(zero_bytes / sizeof(uint4)), threads = 256;
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>((words + threads - 1) / threads, 1), 64);
  gemm_scalars_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads), 0, stream>>>(
      alpha, alpha_double, beta, scalars, scalars_double, words);
}

size_t dense_workspace_bytes() {
  // NVIDIA's recommendation for cuBLASLt: 32 MiB on Hopper, 4 MiB before.
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return size_t{4} << 20;
  }
  return major >= 9 ? size_t{32} << 20 : size_t{4} << 20;
}

// Device pointers to beta in the {alpha, beta} pair and to the zero column written by launch_gemm_scalars.
const void* beta_of(const DenseArgs& p, Scalar dtype) {
  return static_cast<const char*>(p.scalars) + (dtype == Scalar::kDouble ? sizeof(double) : sizeof(float));
}
const void* zeros_of(const DenseArgs& p) { return static_cast<const char*>(p.scalars) + kGemmZerosOffset; }

// y (n x d_out, row-major) is y^T (d_out x n, column-major, ld d_out)
//   = alpha * op(W-memory (d_in x d_out, ld d_in)) = W, transposed, @ x-memory (d_in x n, ld d_in) + beta * branch^T;
// without a branch C is the zero column (ld 0) and beta = 0.
int dense_forward(const DenseArgs& p, Scalar dtype, cudaStream_t stream) {
  const bool branch = p.branch != nullptr;
  const Gemm g{true, false, p.d_out, p.n, p.d_in, p.d_in, p.d_in, branch ? p.d_out : 0, p.d_out,
               p.weight, p.x, branch ? p.branch : zeros_of(p), p.out, p.scalars, beta_of(p, dtype), true};
  return run(g, types_of(dtype, false, p.allow_tf32), p.workspace, p.workspace_bytes, stream);
}

// dx (n x d_in) is dx^T (d_in x n, ld d_in) = alpha * W-memory (d_in x d_out, ld d_in) @ g-memory (d_out x n, ld d_out)
// + 0 * the zero column (ld 0).
int dense_dx(const DenseArgs& p, Scalar dtype, cudaStream_t stream) {
  const Gemm g{false, false, p.d_in, p.n, p.d_out, p.d_in, p.d_out, 0, p.d_in,
               p.weight, p.grad, zeros_of(p), p.out, p.scalars, beta_of(p, dtype), true};
  return run(g, types_of(dtype, false, p.allow_tf32), p.workspace, p.workspace_bytes, stream);
}

// S = g^T x (d_out x d_in, row-major) is S^T (d_in x d_out, ld d_in) = x-memory (d_in x n, ld d_in)
//   @ op(g-memory (d_out x n, ld d_out)) = g, transposed; in the accumulation type, alpha = 1, beta = 0 (host).
int dense_sampled(const DenseArgs& p, Scalar dtype, cudaStream_t stream) {
  static const float one_f = 1.f, zero_f = 0.f;
  static const double one_d = 1.0, zero_d = 0.0;
  const bool f64 = dtype == Scalar::kDouble;
  const Gemm g{false, true, p.d_in, p.d_out, p.n, p.d_in, p.d_out, p.d_in, p.d_in,
               p.x, p.grad, p.out, p.out,
               f64 ? static_cast<const void*>(&one_d) : &one_f, f64 ? static_cast<const void*>(&zero_d) : &zero_f,
               false};
  return run(g, types_of(dtype, true, p.allow_tf32), p.workspace, p.workspace_bytes, stream);
}

const char* dense_status_string(int status) { return cublasLtGetStatusString(static_cast<cublasStatus_t>(status)); }

}  // namespace entskip::cuda
