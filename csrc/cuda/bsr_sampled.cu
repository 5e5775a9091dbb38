// Sampled gradient of the skip mapping and its deterministic reduction.
//
//   S_k      = g[:, row(k)]^T @ x[:, col[k]]        (b x b, only on M's stored blocks k)
//   dV_k     = alpha * S_k,    dalpha = sum_k <S_k, V_k>
// where [:, i] is the i-th group of b features and row(k) the block row of block k.
//
// Stage 1 (sampled_kernel, block sizes 16/32/64): a split-N grid, one CTA per (block k,
// chunk s of rows); the CTA streams BN-row tiles of g[:, row(k)] and x[:, col[k]] through
// shared memory with a cp.async multistage pipeline (zero-filled rows past the chunk) and
// writes its b x b partial sum to partials[s][k] in the accumulation type:
//   - bfloat16/float16: mma.sync.m16n8k16 (fp32 accumulators), both operands k-major in
//     shared memory and loaded with ldmatrix.trans; warps split the b x b tile (b = 32, 64)
//     or the rows of the tile (b = 16, summed in a fixed order at the end).
//   - float32/float64: SIMT FMA in the input's precision.
// sampled_generic_kernel covers every other block size and unaligned inputs (scalar).
//
// Stage 2 (finalize_kernel + dalpha_kernel, also used by the dense backward): sums the
// partials over s in a fixed order, writes dV = alpha * S in the values' type and reduces
// <S, V> in float64, per CTA then in one CTA, both in a fixed order: bit-identical results
// from run to run, no atomics.
#include <algorithm>
#include <type_traits>

#include "device_utils.cuh"

namespace entskip::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T, int B> struct SampledTile {
  using A = acc_t<T>;
  static constexpr int PK = kPack<T>;
  // Rows of N per pipeline stage: about 4 KiB of each operand, 16 to 64 rows.
  static constexpr int BN_RAW = 4096 / (B * static_cast<int>(sizeof(T)));
  static constexpr int BN = BN_RAW < 16 ? 16 : (BN_RAW > 64 ? 64 : BN_RAW);
  static constexpr int LD = B + PK;  // operand tile row stride (one packet of padding)
  static constexpr int STAGE_ELEMS = 2 * BN * LD;  // g tile then x tile, both [row of N][feature]
  static constexpr int STAGE_BYTES = STAGE_ELEMS * static_cast<int>(sizeof(T));
  static constexpr int STAGES = 3 * STAGE_BYTES <= 40 * 1024 ? 3 : 2;
  // Warps splitting the reduction over rows (tensor cores, b = 16: one 16 x 16 tile per warp).
  static constexpr int WARPS_K = kTensorCore<T> && B == 16 ? 4 : 1;
  static constexpr int LDR = B + 16 / static_cast<int>(sizeof(A));
  static constexpr int RED_BYTES = WARPS_K * B * LDR * static_cast<int>(sizeof(A));
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  static constexpr int SMEM_BYTES = PIPE_BYTES > RED_BYTES ? PIPE_BYTES : RED_BYTES;
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory limit");
};

// Tensor cores: warp (wk, wm, wn) owns S rows [wm * WM, +WM) x columns [wn * WN, +WN) over the
// 16-row k-steps ks = wk (mod WARPS_K) of every stage.
template <typename T, int B> struct TensorCoreSampledMath {
  using Tile = SampledTile<T, B>;
  static constexpr int WARPS_K = Tile::WARPS_K;
  static constexpr int WARPS_MN = kThreads / 32 / WARPS_K;
  static constexpr int WARPS_M = WARPS_MN >= 2 ? 2 : 1, WARPS_N = WARPS_MN / WARPS_M;
  static constexpr int WM = B / WARPS_M, WN = B / WARPS_N;
  static constexpr int MT = WM / 16, NT = WN / 8;
  static_assert(WM % 16 == 0 && WN % 16 == 0 && Tile::BN % 16 == 0, "m16n8k16 tiles");
  float acc[MT][NT][4];

  __device__ __forceinline__ void zero() { zero_array(acc); }

  __device__ __forceinline__ void step(const T* Gs, const T* Xs, int tid) {
    const int warp = tid / 32, lane = tid % 32;
    const int wk = warp / WARPS_MN, wm = (warp % WARPS_MN) / WARPS_N, wn = warp % WARPS_N;
#pragma unroll
    for (int ks = wk; ks < Tile::BN / 16; ks += WARPS_K) {
      uint32_t a[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        // A = g^T: stored [k][m], transposed on load; matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), ...
        ldmatrix_x4_trans(a[m], Gs + (ks * 16 + (lane & 7) + (lane >> 4) * 8) * Tile::LD + wm * WM + m * 16 +
                                    ((lane >> 3) & 1) * 8);
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        uint32_t b[4];  // B = x stored [k][n]: (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
        ldmatrix_x4_trans(b, Xs + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tile::LD + wn * WN + np * 16 +
                                 (lane >> 4) * 8);
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma_16816<T>(acc[m][2 * np], a[m], b[0], b[1]);
          mma_16816<T>(acc[m][2 * np + 1], a[m], b[2], b[3]);
        }
      }
    }
  }

  // Rs[wk][m][n]: one b x b slice per k-group of warps.
  __device__ __forceinline__ void store(float* Rs, int tid) const {
    const int warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
    const int wk = warp / WARPS_MN, wm = (warp % WARPS_MN) / WARPS_N, wn = warp % WARPS_N;
    float* R = Rs + wk * B * Tile::LDR;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int r = wm * WM + m * 16 + g, c = wn * WN + n * 8 + 2 * t;
        *reinterpret_cast<float2*>(R + r * Tile::LDR + c) = make_float2(acc[m][n][0], acc[m][n][1]);
        *reinterpret_cast<float2*>(R + (r + 8) * Tile::LDR + c) = make_float2(acc[m][n][2], acc[m][n][3]);
      }
    }
  }
};

// SIMT (fp32/fp64): thread (ty, tx) owns S rows ty + RT * i, columns tx + CT * j.
template <typename T, int B> struct SimtSampledMath {
  using Tile = SampledTile<T, B>;
  static constexpr int CT = B >= 64 ? 16 : 8, RT = kThreads / CT;
  static constexpr int TM = B / RT, TN = B / CT;
  static_assert(TM >= 1 && B % RT == 0 && B % CT == 0, "whole micro-tiles");
  T acc[TM][TN];

  __device__ __forceinline__ void zero() { zero_array(acc); }

  __device__ __forceinline__ void step(const T* Gs, const T* Xs, int tid) {
    const int ty = tid / CT, tx = tid % CT;
#pragma unroll 4
    for (int k = 0; k < Tile::BN; ++k) {
      T a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = Gs[k * Tile::LD + ty + RT * i];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = Xs[k * Tile::LD + tx + CT * j];
      fma_outer(acc, a, b);
    }
  }

  __device__ __forceinline__ void store(T* Rs, int tid) const {
    const int ty = tid / CT, tx = tid % CT;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Rs[(ty + RT * i) * Tile::LDR + tx + CT * j] = acc[i][j];
  }
};

template <typename T, int B>
using SampledMath = std::conditional_t<kTensorCore<T>, TensorCoreSampledMath<T, B>, SimtSampledMath<T, B>>;

// Block row of block k: the last i with crow[i] <= k (blocks of a row are contiguous).
__device__ __forceinline__ int64_t block_row_of(const int64_t* crow, int64_t rows, int64_t k) {
  int64_t lo = 0, hi = rows;  // crow[lo] <= k < crow[hi] for a valid layout
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (crow[mid] <= k) lo = mid;
    else hi = mid;
  }
  return lo;
}

template <typename T, int B>
__global__ void __launch_bounds__(kThreads) sampled_kernel(const SampledArgs p) {
  using Tile = SampledTile<T, B>;
  using A = acc_t<T>;
  constexpr int BN = Tile::BN, PK = Tile::PK, CB = B / PK;
  __shared__ uint4 smem_raw[Tile::SMEM_BYTES / 16];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x;
  const int64_t k = blockIdx.x, split = blockIdx.y;
  const int64_t out_block = block_row_of(p.crow, p.out_blocks, k);
  const int64_t in_block = checked(p.col[k], p.in_blocks);
  const int64_t ldg = p.out_blocks * B, ldx = p.in_blocks * B;
  const int64_t lo = split * p.chunk, hi = lo + p.chunk < p.n ? lo + p.chunk : p.n;
  const T* g = static_cast<const T*>(p.grad);
  const T* x = static_cast<const T*>(p.x);
  const T* g_src = g + out_block * B;
  const T* x_src = x + in_block * B;

  auto load = [&](int64_t it, int stage) {
    T* Gs = smem + stage * Tile::STAGE_ELEMS;
    T* Xs = Gs + BN * Tile::LD;
    const int64_t first = lo + it * BN;
#pragma unroll
    for (int c = tid; c < BN * CB; c += kThreads) {
      const int r = c / CB, cc = c % CB;
      const int64_t row = first + r;
      const bool valid = row < hi;
      cp_async16(Gs + r * Tile::LD + cc * PK, valid ? g_src + row * ldg + cc * PK : g, valid);
      cp_async16(Xs + r * Tile::LD + cc * PK, valid ? x_src + row * ldx + cc * PK : x, valid);
    }
  };

  SampledMath<T, B> math;
  math.zero();
  multistage<Tile::STAGES>(lo < hi ? ceil_div(hi - lo, BN) : 0, load, [&](int stage) {
    const T* Gs = smem + stage * Tile::STAGE_ELEMS;
    math.step(Gs, Gs + BN * Tile::LD, tid);
  });

  A* Rs = reinterpret_cast<A*>(smem_raw);
  math.store(Rs, tid);
  __syncthreads();
  // partials[split][k] = sum over the k-groups of warps, in order; 16-byte stores.
  constexpr int AP = 16 / static_cast<int>(sizeof(A));  // accumulators per packet
  A* dst = static_cast<A*>(p.partials) + (split * p.nnzb + k) * (B * B);
  for (int c = tid; c < B * B / AP; c += kThreads) {
    const int r = (c * AP) / B, col = (c * AP) % B;
    A sum[AP];
    load_shared<A, AP>(Rs + r * Tile::LDR + col, sum);
#pragma unroll
    for (int w = 1; w < Tile::WARPS_K; ++w) {
      A part[AP];
      load_shared<A, AP>(Rs + (w * B + r) * Tile::LDR + col, part);
#pragma unroll
      for (int e = 0; e < AP; ++e) sum[e] += part[e];
    }
    uint4 raw;
    A* e = reinterpret_cast<A*>(&raw);
#pragma unroll
    for (int i = 0; i < AP; ++i) e[i] = sum[i];
    reinterpret_cast<uint4*>(dst)[c] = raw;
  }
}

// Any block size, any alignment: one thread per element of S_k (more when b * b > threads).
constexpr int kGenericThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kGenericThreads) sampled_generic_kernel(const SampledArgs p) {
  using A = acc_t<T>;
  const int64_t b = p.block, k = blockIdx.x, split = blockIdx.y;
  const int64_t out_block = block_row_of(p.crow, p.out_blocks, k);
  const int64_t in_block = checked(p.col[k], p.in_blocks);
  const int64_t ldg = p.out_blocks * b, ldx = p.in_blocks * b;
  const int64_t lo = split * p.chunk, hi = lo + p.chunk < p.n ? lo + p.chunk : p.n;
  const T* g = static_cast<const T*>(p.grad) + out_block * b;
  const T* x = static_cast<const T*>(p.x) + in_block * b;
  A* dst = static_cast<A*>(p.partials) + (split * p.nnzb + k) * b * b;
  for (int64_t e = threadIdx.x; e < b * b; e += kGenericThreads) {
    const int64_t m = e / b, n = e % b;
    A acc = A(0);
    for (int64_t row = lo; row < hi; ++row) acc += widen<A>(g[row * ldg + m]) * widen<A>(x[row * ldx + n]);
    dst[e] = acc;
  }
}

constexpr int kReduceThreads = 256;
constexpr int64_t kMaxFinalizeBlocks = 1024;

// sum over the CTA of v, in a fixed tree order; valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
#pragma unroll
  for (int s = kReduceThreads / 2; s > 0; s /= 2) {
    if (static_cast<int>(threadIdx.x) < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  return shared[0];
}

template <typename T>
__global__ void __launch_bounds__(kReduceThreads) finalize_kernel(const FinalizeArgs p) {
  using A = acc_t<T>;
  __shared__ double shared[kReduceThreads];
  const A* partials = static_cast<const A*>(p.partials);
  const T* values = static_cast<const T*>(p.values);
  T* dvalues = static_cast<T*>(p.dvalues);
  const A alpha = load_alpha<A>(p.alpha, p.alpha_double);
  double dot = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kReduceThreads;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kReduceThreads + threadIdx.x; e < p.count; e += stride) {
    A s = partials[e];
    for (int64_t split = 1; split < p.splits; ++split) s += partials[split * p.count + e];
    if (dvalues != nullptr) dvalues[e] = narrow<T>(alpha * s);
    if (p.dalpha != nullptr) dot += static_cast<double>(s) * widen<double>(values[e]);
  }
  if (p.dalpha == nullptr) return;
  const double total = block_sum(dot, shared);
  if (threadIdx.x == 0) p.scratch[blockIdx.x] = total;
}

__global__ void __launch_bounds__(kReduceThreads) dalpha_kernel(const double* scratch, int64_t n, double* dalpha) {
  __shared__ double shared[kReduceThreads];
  double v = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kReduceThreads) v += scratch[i];
  const double total = block_sum(v, shared);
  if (threadIdx.x == 0) *dalpha = total;
}

int64_t finalize_blocks(int64_t count) {
  return std::max<int64_t>(1, std::min<int64_t>(ceil_div(count, kReduceThreads), kMaxFinalizeBlocks));
}

template <typename T> int sampled_bn(int64_t block) {
  int bn = 0;
  dispatch_block(block, [&](auto tag) { bn = SampledTile<T, decltype(tag)::value>::BN; });
  return bn > 0 ? bn : 64;
}

int sm_count() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // leave no sticky error for the caller's launch check
    return 108;
  }
  return sms;
}

}  // namespace

SampledPlan sampled_plan(int64_t n, int64_t nnzb, int64_t block, Scalar dtype) {
  int bn = 64;
  dispatch_scalar(dtype, [&](auto* type_tag) { bn = sampled_bn<std::remove_pointer_t<decltype(type_tag)>>(block); });
  if (n == 0 || nnzb == 0) return {1, std::max<int64_t>(n, 1)};
  // About four CTAs per SM in all, each chunk a whole number of pipeline tiles, at most
  // 1024 chunks (grid.y) and at least one tile per chunk.
  const int64_t want = ceil_div(4 * static_cast<int64_t>(sm_count()), nnzb);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, ceil_div(n, bn), int64_t{1024}}));
  const int64_t chunk = ceil_div(ceil_div(n, splits), bn) * bn;
  return {ceil_div(n, chunk), chunk};
}

const char* launch_sampled(const SampledArgs& p, Scalar dtype, cudaStream_t stream) {
  if (p.nnzb == 0) return nullptr;
  if (p.nnzb > 0x7fffffff || p.splits > 65535) return "entskip CUDA sampled kernel: grid too large";
  const dim3 grid(static_cast<unsigned>(p.nnzb), static_cast<unsigned>(p.splits));
  dispatch_scalar(dtype, [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    const bool aligned = aligned16(p.grad) && aligned16(p.x) && aligned16(p.partials);
    const bool tiled = aligned && dispatch_block(p.block, [&](auto block_tag) {
      sampled_kernel<T, decltype(block_tag)::value><<<grid, kThreads, 0, stream>>>(p);
    });
    if (!tiled) sampled_generic_kernel<T><<<grid, kGenericThreads, 0, stream>>>(p);
  });
  return nullptr;
}

int64_t finalize_scratch_doubles(int64_t count) { return finalize_blocks(count); }

const char* launch_finalize(const FinalizeArgs& p, Scalar dtype, cudaStream_t stream) {
  const int64_t blocks = finalize_blocks(p.count);
  if (p.count > 0 && (p.dvalues != nullptr || p.dalpha != nullptr)) {
    dispatch_scalar(dtype, [&](auto* type_tag) {
      using T = std::remove_pointer_t<decltype(type_tag)>;
      finalize_kernel<T><<<static_cast<unsigned>(blocks), kReduceThreads, 0, stream>>>(p);
    });
  }
  if (p.dalpha != nullptr) dalpha_kernel<<<1, kReduceThreads, 0, stream>>>(p.scratch, p.count > 0 ? blocks : 0, p.dalpha);
  return nullptr;
}

}  // namespace entskip::cuda
