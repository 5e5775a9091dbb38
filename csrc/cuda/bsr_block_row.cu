// Block-row product of the BSR skip-add: the forward and dx kernels.
//
//   forward  y[:, i]  = alpha * sum_{k = crow[i]}^{crow[i+1]-1} x[:, col[k]] @ V_k^T      + branch[:, i]
//   dx       dx[:, j] = alpha * sum_{t = ccol[j]}^{ccol[j+1]-1} g[:, row[t]] @ V_{perm[t]}
// where [:, i] is the i-th group of b features. Both are "walk a compressed row of
// blocks, accumulate, then alpha * acc (+ branch)", so one kernel template serves both
// (TRANSPOSED picks V^T or V and whether perm maps blocks to values).
//
// Tiling (block_row_kernel, block sizes 16/32/64): one CTA of 128 threads owns BM rows
// of the output and one output block column group i (a CTA per (row tile, block row);
// block rows vary fastest in the grid, so the CTAs resident together share their rows of
// the input through L2). It walks the blocks of segment i in chunks of KC reduction
// features (64 bytes of each row), double/triple-buffering the BM x KC input tile and the
// matching slice of the b x b value block through shared memory with cp.async
// (zero-filled rows past N, no partial tiles in the main loop), and accumulates:
//   - bfloat16/float16: on tensor cores, mma.sync.m16n8k16 with fp32 accumulators,
//     operands via ldmatrix (.trans for the untransposed V of dx); 4 warps of 32 rows
//     x b columns.
//   - float32/float64: SIMT FMA in the input's precision (no TF32: exact fp32 products),
//     a 64 x b tile, every thread a strided TM x TN micro-tile.
// The epilogue stages the fp32 (fp64) accumulators through shared memory and writes
// round(alpha * acc + branch) with 16-byte loads of branch and 16-byte stores, one
// rounding per output element.
//
// block_row_generic_kernel handles every other block size and inputs that are not
// 16-byte aligned: one thread per output element, no tensor cores (a correctness path).
//
// Indexing: row offsets are int64 (N * D may exceed 2^31); indices read from the layout
// are bounds-checked (a corrupt layout traps rather than reading out of bounds).
#include <type_traits>

#include "device_utils.cuh"

namespace entskip::cuda {
namespace {

constexpr int kThreads = 128;

// Tile shape of block_row_kernel for element type T and block size B.
template <typename T, int B, bool TRANSPOSED> struct RowTile {
  using A = acc_t<T>;
  static constexpr int BM = kTensorCore<T> ? 128 : 64;  // output rows per CTA
  static constexpr int KC = B < 64 / static_cast<int>(sizeof(T)) ? B : 64 / static_cast<int>(sizeof(T));
  static constexpr int kChunks = B / KC;    // pipeline iterations per stored block
  static constexpr int PK = kPack<T>;       // elements per 16-byte packet
  static constexpr int LDA = KC + PK;       // input tile row stride: one packet of padding (conflict-free ldmatrix)
  // Value slice: forward keeps V's rows ([n][k], B x KC), dx V's rows too, which are k ([k][n], KC x B).
  static constexpr int LDV = TRANSPOSED ? B + PK : KC + PK;
  static constexpr int A_ELEMS = BM * LDA;
  static constexpr int V_ELEMS = TRANSPOSED ? KC * LDV : B * LDV;
  static constexpr int STAGE_ELEMS = A_ELEMS + V_ELEMS;
  static constexpr int STAGES = kTensorCore<T> && B == 16 ? 4 : 3;
  static constexpr int LDE = B + 16 / static_cast<int>(sizeof(A));  // epilogue staging row stride (accumulators)
  static constexpr int PIPE_BYTES = STAGES * STAGE_ELEMS * static_cast<int>(sizeof(T));
  static constexpr int EPI_BYTES = BM * LDE * static_cast<int>(sizeof(A));
  static constexpr int SMEM_BYTES = PIPE_BYTES > EPI_BYTES ? PIPE_BYTES : EPI_BYTES;
  static_assert(B % KC == 0 && (KC * sizeof(T)) % 16 == 0, "whole 16-byte packets per row chunk");
  static_assert(SMEM_BYTES <= 48 * 1024, "static shared memory limit");
};

// Tensor-core accumulation (bf16/fp16): warp w owns rows [w * WM, (w + 1) * WM) and all B columns.
template <typename T, int B, bool TRANSPOSED> struct TensorCoreRowMath {
  using Tile = RowTile<T, B, TRANSPOSED>;
  static constexpr int WM = Tile::BM / (kThreads / 32);
  static constexpr int MT = WM / 16, NT = B / 8;
  static_assert(WM % 16 == 0 && B % 16 == 0 && Tile::KC % 16 == 0, "m16n8k16 tiles");
  float acc[MT][NT][4];

  __device__ __forceinline__ void zero() { zero_array(acc); }

  __device__ __forceinline__ void step(const T* As, const T* Vs, int tid) {
    const int warp = tid / 32, lane = tid % 32;
#pragma unroll
    for (int ks = 0; ks < Tile::KC / 16; ++ks) {
      uint32_t a[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        // matrices: rows 0-7 / 8-15 x k 0-7, then k 8-15 (a0..a3 of the A fragment)
        ldmatrix_x4(a[m], As + (warp * WM + m * 16 + (lane & 15)) * Tile::LDA + ks * 16 + (lane >> 4) * 8);
      }
#pragma unroll
      for (int np = 0; np < B / 16; ++np) {
        uint32_t b[4];  // b[0..1]: n-tile 2 np, b[2..3]: n-tile 2 np + 1
        if constexpr (!TRANSPOSED) {
          // V_k stored [n][k] is the "col" B operand as is: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, ...)
          ldmatrix_x4(b, Vs + (np * 16 + (lane & 7) + (lane >> 4) * 8) * Tile::LDV + ks * 16 + ((lane >> 3) & 1) * 8);
        } else {
          // V stored [k][n]: transpose on load; matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), ...
          ldmatrix_x4_trans(b, Vs + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * Tile::LDV + np * 16 + (lane >> 4) * 8);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          mma_16816<T>(acc[m][2 * np], a[m], b[0], b[1]);
          mma_16816<T>(acc[m][2 * np + 1], a[m], b[2], b[3]);
        }
      }
    }
  }

  __device__ __forceinline__ void store(float* Es, int tid) const {
    const int warp = tid / 32, lane = tid % 32, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const int r = warp * WM + m * 16 + g, c = n * 8 + 2 * t;
        *reinterpret_cast<float2*>(Es + r * Tile::LDE + c) = make_float2(acc[m][n][0], acc[m][n][1]);
        *reinterpret_cast<float2*>(Es + (r + 8) * Tile::LDE + c) = make_float2(acc[m][n][2], acc[m][n][3]);
      }
    }
  }
};

// SIMT accumulation (fp32/fp64): thread (ty, tx) owns rows ty + RT * i and columns tx + CT * j
// (strided, so the threads of a warp read consecutive or padded-apart shared words).
template <typename T, int B, bool TRANSPOSED> struct SimtRowMath {
  using Tile = RowTile<T, B, TRANSPOSED>;
  static constexpr int CT = B >= 64 ? 16 : 8, RT = kThreads / CT;
  static constexpr int TM = Tile::BM / RT, TN = B / CT;
  static_assert(Tile::BM % RT == 0 && B % CT == 0, "whole micro-tiles");
  T acc[TM][TN];

  __device__ __forceinline__ void zero() { zero_array(acc); }

  __device__ __forceinline__ void step(const T* As, const T* Vs, int tid) {
    const int ty = tid / CT, tx = tid % CT;
#pragma unroll 4
    for (int k = 0; k < Tile::KC; ++k) {
      T a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = As[(ty + RT * i) * Tile::LDA + k];
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = TRANSPOSED ? Vs[k * Tile::LDV + tx + CT * j] : Vs[(tx + CT * j) * Tile::LDV + k];
      fma_outer(acc, a, b);
    }
  }

  __device__ __forceinline__ void store(T* Es, int tid) const {
    const int ty = tid / CT, tx = tid % CT;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Es[(ty + RT * i) * Tile::LDE + tx + CT * j] = acc[i][j];
  }
};

template <typename T, int B, bool TRANSPOSED>
using RowMath = std::conditional_t<kTensorCore<T>, TensorCoreRowMath<T, B, TRANSPOSED>, SimtRowMath<T, B, TRANSPOSED>>;

template <typename T, int B, bool TRANSPOSED>
__global__ void __launch_bounds__(kThreads) block_row_kernel(const BlockRowArgs p) {
  using Tile = RowTile<T, B, TRANSPOSED>;
  using A = acc_t<T>;
  constexpr int BM = Tile::BM, KC = Tile::KC, PK = Tile::PK;
  __shared__ uint4 smem_raw[Tile::SMEM_BYTES / 16];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x;
  const int64_t out_block = blockIdx.x % p.out_blocks;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.out_blocks) * BM;
  const int64_t lda = p.in_blocks * B, ldo = p.out_blocks * B;
  const T* a = static_cast<const T*>(p.a);
  const T* values = static_cast<const T*>(p.values);
  const int64_t k0 = p.ptr[out_block], k1 = p.ptr[out_block + 1];
  if (k0 < 0 || k1 < k0 || k1 > p.nnzb) __trap();

  auto load = [&](int64_t it, int stage) {
    const int64_t t = k0 + it / Tile::kChunks;
    const int q = static_cast<int>(it % Tile::kChunks);
    const int64_t in_block = checked(p.idx[t], p.in_blocks);
    const int64_t v = p.perm != nullptr ? checked(p.perm[t], p.nnzb) : t;
    T* As = smem + stage * Tile::STAGE_ELEMS;
    T* Vs = As + Tile::A_ELEMS;
    constexpr int CA = KC / PK;  // packets per row of the input tile
    const T* a_src = a + in_block * B + q * KC;
#pragma unroll
    for (int c = tid; c < BM * CA; c += kThreads) {
      const int r = c / CA, cc = c % CA;
      const int64_t row = row0 + r;
      const bool valid = row < p.n;
      cp_async16(As + r * Tile::LDA + cc * PK, valid ? a_src + row * lda + cc * PK : a, valid);
    }
    const T* v_src = values + v * (B * B);
    if constexpr (!TRANSPOSED) {  // rows n of V_k, features [q * KC, (q + 1) * KC)
#pragma unroll
      for (int c = tid; c < B * CA; c += kThreads) {
        const int r = c / CA, cc = c % CA;
        cp_async16(Vs + r * Tile::LDV + cc * PK, v_src + r * B + q * KC + cc * PK, true);
      }
    } else {  // rows [q * KC, (q + 1) * KC) of V, all B columns
      constexpr int CB = B / PK;
#pragma unroll
      for (int c = tid; c < KC * CB; c += kThreads) {
        const int r = c / CB, cc = c % CB;
        cp_async16(Vs + r * Tile::LDV + cc * PK, v_src + (q * KC + r) * B + cc * PK, true);
      }
    }
  };

  RowMath<T, B, TRANSPOSED> math;
  math.zero();
  multistage<Tile::STAGES>((k1 - k0) * Tile::kChunks, load, [&](int stage) {
    const T* As = smem + stage * Tile::STAGE_ELEMS;
    math.step(As, As + Tile::A_ELEMS, tid);
  });

  // Epilogue: accumulators -> shared (the pipeline buffers are free) -> 16-byte stores.
  A* Es = reinterpret_cast<A*>(smem_raw);
  math.store(Es, tid);
  __syncthreads();
  const A alpha = load_alpha<A>(p.alpha, p.alpha_double);
  const T* branch = static_cast<const T*>(p.branch);
  T* out = static_cast<T*>(p.out);
  constexpr int CPR = B / PK;  // output packets per row
  for (int c = tid; c < BM * CPR; c += kThreads) {
    const int r = c / CPR, cc = c % CPR;
    const int64_t row = row0 + r;
    if (row >= p.n) continue;
    const int64_t offset = row * ldo + out_block * B + cc * PK;
    A acc[PK];
    load_shared<A, PK>(Es + r * Tile::LDE + cc * PK, acc);
    T res[PK], y[PK];
    if (branch != nullptr) load_pack<T>(branch + offset, res);
#pragma unroll
    for (int e = 0; e < PK; ++e) {
      A v = alpha * acc[e];
      if (branch != nullptr) v += widen<A>(res[e]);
      y[e] = narrow<T>(v);
    }
    store_pack<T>(out + offset, y);
  }
}

// Any block size, any alignment: a CTA owns `rows` rows of one output block column group,
// one thread per output element (more when rows * b > threads), scalar loads.
constexpr int kGenericThreads = 256;

template <typename T, bool TRANSPOSED>
__global__ void __launch_bounds__(kGenericThreads) block_row_generic_kernel(const BlockRowArgs p, int rows) {
  using A = acc_t<T>;
  const int64_t b = p.block;
  const int64_t out_block = blockIdx.x % p.out_blocks;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x / p.out_blocks) * rows;
  const int64_t lda = p.in_blocks * b, ldo = p.out_blocks * b;
  const T* a = static_cast<const T*>(p.a);
  const T* values = static_cast<const T*>(p.values);
  const T* branch = static_cast<const T*>(p.branch);
  T* out = static_cast<T*>(p.out);
  const int64_t k0 = p.ptr[out_block], k1 = p.ptr[out_block + 1];
  if (k0 < 0 || k1 < k0 || k1 > p.nnzb) __trap();
  const A alpha = load_alpha<A>(p.alpha, p.alpha_double);
  for (int64_t e = threadIdx.x; e < rows * b; e += kGenericThreads) {
    const int64_t row = row0 + e / b, j = e % b;
    if (row >= p.n) break;  // e grows with row: the rest of this thread's elements are past N too
    A acc = A(0);
    for (int64_t t = k0; t < k1; ++t) {
      const T* arow = a + row * lda + checked(p.idx[t], p.in_blocks) * b;
      const T* v = values + (p.perm != nullptr ? checked(p.perm[t], p.nnzb) : t) * b * b;
      for (int64_t c = 0; c < b; ++c) acc += widen<A>(arow[c]) * widen<A>(TRANSPOSED ? v[c * b + j] : v[j * b + c]);
    }
    A y = alpha * acc;
    if (branch != nullptr) y += widen<A>(branch[row * ldo + out_block * b + j]);
    out[row * ldo + out_block * b + j] = narrow<T>(y);
  }
}

constexpr int64_t kMaxGrid = 0x7fffffff;

}  // namespace

const char* launch_block_row(const BlockRowArgs& p, Scalar dtype, bool transposed, cudaStream_t stream) {
  if (p.n == 0 || p.out_blocks == 0) return nullptr;
  const char* error = nullptr;
  dispatch_scalar(dtype, [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    const bool aligned = aligned16(p.a) && aligned16(p.values) && aligned16(p.out) &&
                         (p.branch == nullptr || aligned16(p.branch));
    const bool tiled = aligned && dispatch_block(p.block, [&](auto block_tag) {
      constexpr int B = decltype(block_tag)::value;
      const int64_t grid = ceil_div(p.n, RowTile<T, B, false>::BM) * p.out_blocks;
      if (grid > kMaxGrid) {
        error = "entskip CUDA block-row kernel: too many row tiles x block rows for one grid";
        return;
      }
      if (transposed) {
        block_row_kernel<T, B, true><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
      } else {
        block_row_kernel<T, B, false><<<static_cast<unsigned>(grid), kThreads, 0, stream>>>(p);
      }
    });
    if (tiled) return;
    const int rows = static_cast<int>(p.block >= kGenericThreads ? 1 : kGenericThreads / p.block);
    const int64_t grid = ceil_div(p.n, rows) * p.out_blocks;
    if (grid > kMaxGrid) {
      error = "entskip CUDA block-row kernel: too many row tiles x block rows for one grid";
      return;
    }
    if (transposed) {
      block_row_generic_kernel<T, true><<<static_cast<unsigned>(grid), kGenericThreads, 0, stream>>>(p, rows);
    } else {
      block_row_generic_kernel<T, false><<<static_cast<unsigned>(grid), kGenericThreads, 0, stream>>>(p, rows);
    }
  });
  return error;
}

}  // namespace entskip::cuda
