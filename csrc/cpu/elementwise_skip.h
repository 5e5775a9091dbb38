// Shared plumbing of the elementwise skips (identity_skip_add.cpp, permutation_skip_add.cpp):
// tensors of any shape (..., D) seen as (rows, D) matrices read in place, the fixed work
// chunks, the deterministic dalpha reduction, the backward's outputs and the in-order
// segment kernels (y = a * x + b; dx = a * g, dalpha += g . x) that both run.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
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

// Whether an output of numel elements of T, written in contiguous rows (segments) of
// row_len elements, is streamed to memory: at least kStreamBytes, on targets with
// non-temporal stores, in rows that are whole lines or at least kMinStreamedRowBytes long.
// The segment kernels then write each row's whole 64-byte lines by non-temporal stores
// (its first elements up to a line boundary, and its last ones, by plain stores), run by
// parallel_for_stores. A/Bs on AMD Zen 4 (two
// threads, development runs): identity forward float32 64 x 197 x 768 1.17x -> 0.87x
// torch.add's time, bfloat16 0.99x -> 0.85x; permutation forward float32 8192 x 1024
// 1.46x -> 1.19x x + r's, bfloat16 1.65x -> 1.55x; features-first permutation forward
// float32 32 x 512 x 196 (784-byte rows) 0.78-0.87x the time with plain stores, but
// bfloat16 32 x 512 x 196 (392-byte rows, two partial lines in seven) 1.12-1.31x.
constexpr int64_t kMinStreamedRowBytes = 512;

template <typename T>
inline bool streams(int64_t numel, int64_t row_len) {
  const int64_t row_bytes = row_len * static_cast<int64_t>(sizeof(T));
  return simd::kStreams && numel * static_cast<int64_t>(sizeof(T)) >= kStreamBytes &&
         (row_bytes % 64 == 0 || row_bytes >= kMinStreamedRowBytes);
}

// fn(begin, end, std::bool_constant<stream>{}) over disjoint ranges covering the work items
// [0, n), the kernel for either kind of store. at::parallel_for starts one claimant per
// thread; each claims ranges from a shared counter until none are left, each range a share
// of what remains (a quarter of it with two threads, down to one item), then fences its
// streamed stores (simd::stream_fence). A thread that starts late (woken from sleep, as
// with OMP_WAIT_POLICY=passive) finds that the others have taken part of its share,
// instead of adding its wake-up to a fixed half of the work. On the 2-vCPU AMD EPYC
// (Zen 4) a worker's wake-up took about 60 us, a single call's time; in an A/B there, two
// threads, the 16 x 197 x 192 float32 forwards went from 0.183 to 0.150 ms (permutation)
// and 0.118 to 0.088 ms (identity), and the large shapes' 3-9 % faster. Items are fixed
// chunks, so what each computes does not depend on the thread that runs it.
template <typename Fn>
inline void parallel_for_stores(bool stream, int64_t n, Fn&& fn) {
  if (n <= 0) return;
  const int64_t claimants = std::min<int64_t>(n, at::get_num_threads());
  std::atomic<int64_t> next{0};
  const auto run = [&](auto streamed) {
    at::parallel_for(0, claimants, 1, [&](int64_t, int64_t) {
      int64_t begin = next.load(std::memory_order_relaxed);
      while (begin < n) {
        const int64_t take = std::max<int64_t>(1, (n - begin) / (2 * claimants));
        if (next.compare_exchange_weak(begin, begin + take, std::memory_order_relaxed)) {
          fn(begin, begin + take, streamed);
          begin = next.load(std::memory_order_relaxed);
        }
      }
      if constexpr (decltype(streamed)::value) simd::stream_fence();
    });
  };
  if (stream) {
    run(std::true_type{});
  } else {
    run(std::false_type{});
  }
}

// y[0 .. 2W) = v0, v1 (two accumulation vectors of W lanes): with STREAM (y then 64-byte
// aligned), float32/float64 as two non-temporal stores and 16-bit types narrowed into one
// whole line and streamed; else two stores.
template <bool STREAM, typename A, typename T>
inline void put_pair(T* y, const simd::Vec<A>& v0, const simd::Vec<A>& v1) {
  constexpr int W = simd::Simd<A>::W;
  if constexpr (STREAM && std::is_same_v<A, T>) {
    simd::stream<A>(y, v0);
    simd::stream<A>(y + W, v1);
#if defined(__AVX512F__)
  } else if constexpr (STREAM && sizeof(T) == 2 && std::is_same_v<A, float>) {
    simd::U16x16 lo, hi;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
      lo = simd::to_bfloat16_bits(v0), hi = simd::to_bfloat16_bits(v1);
    } else {
      lo = simd::to_half_bits(v0), hi = simd::to_half_bits(v1);
    }
    __m256i l, h;
    std::memcpy(&l, &lo, sizeof(l));
    std::memcpy(&h, &hi, sizeof(h));
    _mm512_stream_si512(reinterpret_cast<__m512i*>(y), _mm512_inserti64x4(_mm512_castsi256_si512(l), h, 1));
#endif
  } else {
    store<A>(y, v0);
    store<A>(y + W, v1);
  }
}

// y[0 .. W) = v: a non-temporal store where STREAM and the vector is a whole line (y then
// 64-byte aligned), else a store.
template <bool STREAM, typename A, typename T>
inline void put(T* y, const simd::Vec<A>& v) {
  if constexpr (STREAM && std::is_same_v<A, T>) {
    simd::stream<A>(y, v);
  } else {
    store<A>(y, v);
  }
}

// y[i] = a * x[i] + b[i] (HAS_BRANCH) or a * x[i], i < len; STREAM: y's whole 64-byte
// lines by non-temporal stores (streams<T>).
template <bool HAS_BRANCH, bool STREAM = false, typename T, typename A = acc_type<T>>
inline void forward_segment(const T* x, const T* b, T* y, int64_t len, A a) {
  constexpr int W = simd::Simd<A>::W;
  const simd::Vec<A> av = simd::broadcast(a);
  int64_t i = 0;
  const auto one = [&](int64_t k) {
    A v = a * static_cast<A>(x[k]);
    if constexpr (HAS_BRANCH) v += static_cast<A>(b[k]);
    y[k] = static_cast<T>(v);
  };
  if constexpr (STREAM) {
    for (; i < len && reinterpret_cast<uintptr_t>(y + i) % 64 != 0; ++i) one(i);
  }
  for (; i + 2 * W <= len; i += 2 * W) {
    simd::Vec<A> v0 = av * load<A>(x + i), v1 = av * load<A>(x + i + W);
    if constexpr (HAS_BRANCH) v0 += load<A>(b + i), v1 += load<A>(b + i + W);
    put_pair<STREAM, A>(y + i, v0, v1);
  }
  for (; i + W <= len; i += W) {
    simd::Vec<A> v = av * load<A>(x + i);
    if constexpr (HAS_BRANCH) v += load<A>(b + i);
    put<STREAM, A>(y + i, v);
  }
  for (; i < len; ++i) one(i);
}

// dx[i] = a * g[i] (DX) and acc += g[i] * x[i] (DA), i < len; STREAM: dx's whole 64-byte
// lines by non-temporal stores (streams<T>).
template <bool DX, bool DA, bool STREAM = false, typename T, typename A = acc_type<T>>
inline void backward_segment(const T* g, const T* x, T* dx, int64_t len, A a, simd::Vec<A> (&acc)[2], A& tail) {
  constexpr int W = simd::Simd<A>::W;
  const simd::Vec<A> av = simd::broadcast(a);
  int64_t i = 0;
  const auto one = [&](int64_t k) {
    const A gk = static_cast<A>(g[k]);
    if constexpr (DX) dx[k] = static_cast<T>(a * gk);
    if constexpr (DA) tail += gk * static_cast<A>(x[k]);
  };
  if constexpr (STREAM && DX) {
    for (; i < len && reinterpret_cast<uintptr_t>(dx + i) % 64 != 0; ++i) one(i);
  }
  for (; i + 2 * W <= len; i += 2 * W) {
    const simd::Vec<A> g0 = load<A>(g + i), g1 = load<A>(g + i + W);
    if constexpr (DX) put_pair<STREAM, A>(dx + i, av * g0, av * g1);
    if constexpr (DA) acc[0] += g0 * load<A>(x + i), acc[1] += g1 * load<A>(x + i + W);
  }
  for (; i + W <= len; i += W) {
    const simd::Vec<A> g0 = load<A>(g + i);
    if constexpr (DX) put<STREAM, A>(dx + i, av * g0);
    if constexpr (DA) acc[0] += g0 * load<A>(x + i);
  }
  for (; i < len; ++i) one(i);
}

// The lanes of an accumulator vector summed in a fixed order.
template <typename acc_t>
inline double lane_sum(const simd::Vec<acc_t>& v) {
  acc_t s = 0;
  for (int l = 0; l < simd::Simd<acc_t>::W; ++l) s += v[l];
  return static_cast<double>(s);
}

}  // namespace entskip::cpu::elementwise
