// Device helpers shared by the entskip CUDA kernels: element types and conversions,
// 16-byte packets, cp.async, ldmatrix and mma.sync (m16n8k16, fp32 accumulation) for
// sm_80 and later. CUDA headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "launchers.h"

namespace entskip::cuda {

// Accumulation type: float64 for float64, float32 for everything else.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename T> constexpr bool kTensorCore = false;  // bf16/fp16 run on mma.sync
template <> constexpr bool kTensorCore<__half> = true;
template <> constexpr bool kTensorCore<__nv_bfloat16> = true;

template <typename A> __device__ __forceinline__ A widen(float v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A widen(double v) { return static_cast<A>(v); }
template <typename A> __device__ __forceinline__ A widen(__half v) { return static_cast<A>(__half2float(v)); }
template <typename A> __device__ __forceinline__ A widen(__nv_bfloat16 v) { return static_cast<A>(__bfloat162float(v)); }

template <typename T> __device__ __forceinline__ T narrow(acc_t<T> v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half narrow<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// alpha, stored as float32 or float64 on the device, in the accumulation type A.
template <typename A> __device__ __forceinline__ A load_alpha(const void* alpha, bool is_double) {
  return is_double ? static_cast<A>(*static_cast<const double*>(alpha)) : static_cast<A>(*static_cast<const float*>(alpha));
}

// An index read from a validated layout, checked against its bound anyway: a broken
// layout traps (an illegal-instruction error on the host) instead of reading out of bounds.
__device__ __forceinline__ int64_t checked(int64_t v, int64_t bound) {
  if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(bound)) __trap();
  return v;
}

// Elements of T in a 16-byte packet.
template <typename T> constexpr int kPack = 16 / static_cast<int>(sizeof(T));

// 16-byte global load/store of kPack<T> elements (addresses 16-byte aligned).
template <typename T> __device__ __forceinline__ void load_pack(const T* src, T (&v)[kPack<T>]) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kPack<T>; ++i) v[i] = e[i];
}
template <typename T> __device__ __forceinline__ void store_pack(T* dst, const T (&v)[kPack<T>]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < kPack<T>; ++i) e[i] = v[i];
  *reinterpret_cast<uint4*>(dst) = raw;
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

// cp.async of 16 bytes global -> shared, bypassing L1; zero-fills when !valid (then src
// is not read but must still be a mapped address: callers pass the tensor's base).
__device__ __forceinline__ void cp_async16(void* smem, const void* src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// ldmatrix of four 8x8 b16 matrices; lane l gives the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// d += a (16x16, row) @ b (16x8, col), fp32 accumulators. Fragment layouts (PTX ISA,
// mma.m16n8k16): with g = lane / 4, t = lane % 4, d[0..1] = D[g][2t..2t+1], d[2..3] = D[g+8][2t..2t+1].
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                                      uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <> __device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                               uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Sets every element of a register array of any rank (accumulator fragments) to zero.
template <typename E, int N> __device__ __forceinline__ void zero_array(E (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (std::is_array_v<E>) {
      zero_array(a[i]);
    } else {
      a[i] = E(0);
    }
  }
}

// acc[i][j] += a[i] * b[j]: one k-step of a SIMT outer-product micro-tile.
template <typename T, int TM, int TN>
__device__ __forceinline__ void fma_outer(T (&acc)[TM][TN], const T (&a)[TM], const T (&b)[TN]) {
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
}

// Calls fn(static_cast<T*>(nullptr)) with T the element type of dtype (the pointer deduces T).
template <typename Fn> void dispatch_scalar(Scalar dtype, Fn&& fn) {
  switch (dtype) {
    case Scalar::kFloat: fn(static_cast<float*>(nullptr)); break;
    case Scalar::kDouble: fn(static_cast<double*>(nullptr)); break;
    case Scalar::kHalf: fn(static_cast<__half*>(nullptr)); break;
    case Scalar::kBFloat16: fn(static_cast<__nv_bfloat16*>(nullptr)); break;
  }
}

// Calls fn(BlockTag<B>{}) for the block sizes with tiled kernels (16, 32, 64); false for any other.
template <int B> struct BlockTag { static constexpr int value = B; };
template <typename Fn> bool dispatch_block(int64_t b, Fn&& fn) {
  switch (b) {
    case 16: fn(BlockTag<16>{}); return true;
    case 32: fn(BlockTag<32>{}); return true;
    case 64: fn(BlockTag<64>{}); return true;
    default: return false;
  }
}

__host__ __device__ __forceinline__ int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The cp.async multistage main loop shared by the tiled kernels: load(it, stage) issues the
// copies of iteration it into buffer stage, compute(stage) consumes a buffer. One commit
// group per iteration (empty ones too) keeps the wait counts uniform; the barrier before a
// load makes sure every warp has finished with the buffer that load overwrites. On return
// every copy has landed and every warp is past its last compute (shared memory is free).
template <int Stages, typename Load, typename Compute>
__device__ __forceinline__ void multistage(int64_t iterations, Load&& load, Compute&& compute) {
  static_assert(Stages >= 2, "a pipeline needs at least two buffers");
#pragma unroll
  for (int s = 0; s < Stages - 1; ++s) {
    if (s < iterations) load(s, s);
    cp_async_commit();
  }
  for (int64_t it = 0; it < iterations; ++it) {
    cp_async_wait<Stages - 2>();
    __syncthreads();
    const int64_t next = it + Stages - 1;
    if (next < iterations) load(next, static_cast<int>(next % Stages));
    cp_async_commit();
    compute(static_cast<int>(it % Stages));
  }
  cp_async_wait<0>();
  __syncthreads();
}

// N consecutive accumulators from shared memory, 16 bytes at a time (16-byte aligned).
template <typename A, int N> __device__ __forceinline__ void load_shared(const A* src, A (&v)[N]) {
  static_assert((N * sizeof(A)) % 16 == 0, "whole 16-byte packets");
#pragma unroll
  for (int i = 0; i < N * static_cast<int>(sizeof(A)) / 16; ++i) {
    const uint4 raw = reinterpret_cast<const uint4*>(src)[i];
    const A* e = reinterpret_cast<const A*>(&raw);
#pragma unroll
    for (int j = 0; j < 16 / static_cast<int>(sizeof(A)); ++j) v[i * 16 / sizeof(A) + j] = e[j];
  }
}

}  // namespace entskip::cuda
