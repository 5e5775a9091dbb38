// Shared plumbing of the elementwise skips (identity_skip_add.cpp, permutation_skip_add.cpp):
// tensors of any shape (..., D) seen as (rows, D) matrices read in place, the fixed work
// chunks, the deterministic dalpha reduction, the backward's outputs and the in-order
// segment kernels (y = a * x + b; dx = a * g, dalpha += g . x) that both run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>

#include <array>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "../rows.h"
#include "common.h"
#include "simd.h"

namespace entskip::cpu::elementwise {

using entskip::Rows, entskip::as_rows, entskip::dense;

// Elements per work item and per dalpha partial sum. Fixed, so the partials and their
// order depend on the shape only, never on the number of threads.
constexpr int64_t kChunk = 16384;

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

inline void check_floating(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
              " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_cpu(t, name);
  check_same(t, x, name, "x");
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
}

// sum(partials) in float64, in order, as a tensor of alpha's dtype and shape.
inline at::Tensor sum_partials(const std::vector<double>& partials, const at::Tensor& alpha) {
  double s = 0.0;
  for (const double p : partials) s += p;
  return at::scalar_tensor(s, alpha.options().dtype(at::kDouble)).to(alpha.scalar_type()).reshape(alpha.sizes());
}

// The backward of an elementwise skip: dx (x's shape, contiguous) when output_mask[0] and
// dalpha (alpha's dtype and shape) when output_mask[1], dalpha summed from `partial_count`
// deterministic partials. run(dx_ptr, partials, dx_tag, dalpha_tag) fills them, with the tags
// std::bool_constant of the mask (never both false); it is called only for non-empty x.
template <typename F>
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& x, const at::Tensor& alpha,
                                            std::array<bool, 2> output_mask, int64_t partial_count, F&& run) {
  at::Tensor dx = output_mask[0] ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                                 : at::Tensor();
  std::vector<double> partials(output_mask[1] ? partial_count : 0);
  if (x.numel() > 0 && (output_mask[0] || output_mask[1])) {
    AT_DISPATCH_V2(x.scalar_type(), "entskip_elementwise_skip_add_backward_cpu", AT_WRAP([&] {
      scalar_t* dxp = output_mask[0] ? dx.mutable_data_ptr<scalar_t>() : nullptr;
      if (output_mask[0] && output_mask[1]) {
        run(dxp, partials, std::true_type{}, std::true_type{});
      } else if (output_mask[0]) {
        run(dxp, partials, std::true_type{}, std::false_type{});
      } else {
        run(dxp, partials, std::false_type{}, std::true_type{});
      }
    }), at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  }
  at::Tensor dalpha = output_mask[1] ? sum_partials(partials, alpha) : at::Tensor();
  return {dx, dalpha};
}

// simd::store, with bfloat16 narrowed by AVX2 packs where the target lacks AVX-512: there
// the generic 32 -> 16-bit vector truncation compiles to a slow lane-by-lane sequence.
template <typename A, typename T>
inline void store(T* p, const simd::Vec<A>& v) {
#if defined(__AVX2__) && !defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    simd::U32x16 bits;  // round to nearest even, NaN to 0x7FC0, as simd::to_bfloat16_bits
    std::memcpy(&bits, &v, sizeof(bits));
    simd::U32x16 r = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const simd::I32x16 is_nan = v != v;
    r = is_nan ? simd::U32x16{} + 0x7FC0u : r;
    __m256i lo, hi;
    std::memcpy(&lo, &r, 32);
    std::memcpy(&hi, reinterpret_cast<const char*>(&r) + 32, 32);
    // packus works per 128-bit lane: (lo 0-3, hi 0-3, lo 4-7, hi 4-7); the permute restores the order
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
    return;
  }
#endif
  simd::store<A>(p, v);
}

// simd::load, with bfloat16 widened by AVX2 zero-extensions where the target lacks AVX-512
// (the generic 16 -> 32-bit vector conversion of a 64-byte vector is not one instruction there).
template <typename A, typename T>
inline simd::Vec<A> load(const T* p) {
#if defined(__AVX2__) && !defined(__AVX512BW__)
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<A, float>) {
    const __m256i lo = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
    const __m256i hi =
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8))), 16);
    simd::Vec<A> v;
    std::memcpy(&v, &lo, 32);
    std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
    return v;
  }
#endif
  return simd::load<A>(p);
}

// y[i] = a * x[i] + b[i] (HAS_BRANCH) or a * x[i], i < len.
template <bool HAS_BRANCH, typename T, typename A = acc_type<T>>
inline void forward_segment(const T* x, const T* b, T* y, int64_t len, A a) {
  constexpr int W = simd::Simd<A>::W;
  const simd::Vec<A> av = simd::broadcast(a);
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    simd::Vec<A> v0 = av * load<A>(x + i), v1 = av * load<A>(x + i + W);
    if constexpr (HAS_BRANCH) v0 += load<A>(b + i), v1 += load<A>(b + i + W);
    store<A>(y + i, v0);
    store<A>(y + i + W, v1);
  }
  for (; i + W <= len; i += W) {
    simd::Vec<A> v = av * load<A>(x + i);
    if constexpr (HAS_BRANCH) v += load<A>(b + i);
    store<A>(y + i, v);
  }
  for (; i < len; ++i) {
    A v = a * static_cast<A>(x[i]);
    if constexpr (HAS_BRANCH) v += static_cast<A>(b[i]);
    y[i] = static_cast<T>(v);
  }
}

// dx[i] = a * g[i] (DX) and acc += g[i] * x[i] (DA), i < len.
template <bool DX, bool DA, typename T, typename A = acc_type<T>>
inline void backward_segment(const T* g, const T* x, T* dx, int64_t len, A a, simd::Vec<A> (&acc)[2], A& tail) {
  constexpr int W = simd::Simd<A>::W;
  const simd::Vec<A> av = simd::broadcast(a);
  int64_t i = 0;
  for (; i + 2 * W <= len; i += 2 * W) {
    const simd::Vec<A> g0 = load<A>(g + i), g1 = load<A>(g + i + W);
    if constexpr (DX) store<A>(dx + i, av * g0), store<A>(dx + i + W, av * g1);
    if constexpr (DA) acc[0] += g0 * load<A>(x + i), acc[1] += g1 * load<A>(x + i + W);
  }
  for (; i + W <= len; i += W) {
    const simd::Vec<A> g0 = load<A>(g + i);
    if constexpr (DX) store<A>(dx + i, av * g0);
    if constexpr (DA) acc[0] += g0 * load<A>(x + i);
  }
  for (; i < len; ++i) {
    const A gi = static_cast<A>(g[i]);
    if constexpr (DX) dx[i] = static_cast<T>(a * gi);
    if constexpr (DA) tail += gi * static_cast<A>(x[i]);
  }
}

// The lanes of an accumulator vector summed in a fixed order.
template <typename acc_t>
inline double lane_sum(const simd::Vec<acc_t>& v) {
  acc_t s = 0;
  for (int l = 0; l < simd::Simd<acc_t>::W; ++l) s += v[l];
  return static_cast<double>(s);
}

}  // namespace entskip::cpu::elementwise
