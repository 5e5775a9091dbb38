// CUDA kernels of the elementwise skips (identity and permutation), contract in launchers.h.
// A CUDA block is kThreads consecutive columns of `rows_per_block` consecutive rows: a
// thread walks one column down its rows, so the (optional) index entry it gathers through
// is loaded once, and a warp's reads and writes of a row are consecutive (the gathered
// read of a permutation excepted). dalpha partials: one per block, from a fixed-shape tree
// reduction in shared memory (deterministic).
#include "device_utils.cuh"

namespace entskip::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMinRows = 8;        // rows per block, at least
constexpr int64_t kMaxRowBlocks = 65535;  // gridDim.y

struct Plan {
  int64_t col_blocks, row_blocks, rows_per_block;
};

Plan plan(int64_t n, int64_t d) {
  Plan p{(d + kThreads - 1) / kThreads, 0, 0};
  p.row_blocks = std::min<int64_t>((n + kMinRows - 1) / kMinRows, kMaxRowBlocks);
  p.rows_per_block = p.row_blocks > 0 ? (n + p.row_blocks - 1) / p.row_blocks : 0;
  return p;
}

template <typename T, bool HAS_INDEX, bool HAS_BRANCH>
__global__ void __launch_bounds__(kThreads) forward_kernel(ElementwiseArgs p, int64_t rows_per_block) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (col >= p.d) return;
  const A a = load_alpha<A>(p.alpha, p.alpha_double);
  const int64_t src = HAS_INDEX ? checked(p.index[col], p.d) : col;
  const T* x = static_cast<const T*>(p.x);
  const T* b = static_cast<const T*>(p.branch);
  T* y = static_cast<T*>(p.out);
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t last = min(p.n, first + rows_per_block);
  for (int64_t r = first; r < last; ++r) {
    A v = a * widen<A>(x[r * p.stride_x + src]);
    if constexpr (HAS_BRANCH) v += widen<A>(b[r * p.stride_branch + col]);
    y[r * p.d + col] = narrow<T>(v);
  }
}

template <typename T, bool HAS_INDEX, bool DX, bool DA>
__global__ void __launch_bounds__(kThreads) backward_kernel(ElementwiseArgs p, int64_t rows_per_block) {
  using A = acc_t<T>;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  A sum = 0;
  if (col < p.d) {
    const A a = load_alpha<A>(p.alpha, p.alpha_double);
    const int64_t src = HAS_INDEX ? checked(p.index[col], p.d) : col;
    const T* g = static_cast<const T*>(p.grad);
    const T* x = static_cast<const T*>(p.x);
    T* dx = static_cast<T*>(p.out);
    const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_block;
    const int64_t last = min(p.n, first + rows_per_block);
    for (int64_t r = first; r < last; ++r) {
      const A gv = widen<A>(g[r * p.stride_grad + src]);
      if constexpr (DX) dx[r * p.d + col] = narrow<T>(a * gv);
      if constexpr (DA) sum += gv * widen<A>(x[r * p.stride_x + col]);
    }
  }
  if constexpr (DA) {
    __shared__ double part[kThreads];
    part[threadIdx.x] = static_cast<double>(sum);
    __syncthreads();
    for (int s = kThreads / 2; s > 0; s /= 2) {
      if (threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
      __syncthreads();
    }
    if (threadIdx.x == 0) static_cast<double*>(p.partials)[blockIdx.y * gridDim.x + blockIdx.x] = part[0];
  }
}

// Both kernels run on the same grid: plan.col_blocks x plan.row_blocks blocks of kThreads.
using Kernel = void (*)(ElementwiseArgs, int64_t);

void launch(Kernel kernel, const ElementwiseArgs& p, const Plan& plan, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.col_blocks), static_cast<unsigned>(plan.row_blocks));
  kernel<<<grid, kThreads, 0, stream>>>(p, plan.rows_per_block);
}

}  // namespace

int64_t elementwise_partials(int64_t n, int64_t d) {
  const Plan p = plan(n, d);
  return p.col_blocks * p.row_blocks;
}

const char* launch_elementwise_forward(const ElementwiseArgs& p, Scalar dtype, cudaStream_t stream) {
  const Plan pl = plan(p.n, p.d);
  if (pl.col_blocks == 0 || pl.row_blocks == 0) return nullptr;
  if (pl.col_blocks > 0x7fffffff) return "entskip CUDA elementwise skip: too many features";
  dispatch_scalar(dtype, [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    const bool index = p.index != nullptr, branch = p.branch != nullptr;
    if (index && branch) launch(forward_kernel<T, true, true>, p, pl, stream);
    else if (index) launch(forward_kernel<T, true, false>, p, pl, stream);
    else if (branch) launch(forward_kernel<T, false, true>, p, pl, stream);
    else launch(forward_kernel<T, false, false>, p, pl, stream);
  });
  return nullptr;
}

const char* launch_elementwise_backward(const ElementwiseArgs& p, Scalar dtype, cudaStream_t stream) {
  const Plan pl = plan(p.n, p.d);
  const bool dx = p.out != nullptr, da = p.partials != nullptr;
  if (pl.col_blocks == 0 || pl.row_blocks == 0 || !(dx || da)) return nullptr;
  if (pl.col_blocks > 0x7fffffff) return "entskip CUDA elementwise skip: too many features";
  dispatch_scalar(dtype, [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    const auto pick = [&](auto has_index) {
      constexpr bool I = decltype(has_index)::value;
      if (dx && da) launch(backward_kernel<T, I, true, true>, p, pl, stream);
      else if (dx) launch(backward_kernel<T, I, true, false>, p, pl, stream);
      else launch(backward_kernel<T, I, false, true>, p, pl, stream);
    };
    if (p.index != nullptr) pick(std::true_type{});
    else pick(std::false_type{});
  });
  return nullptr;
}

}  // namespace entskip::cuda
