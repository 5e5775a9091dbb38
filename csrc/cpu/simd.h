// Portable 64-byte SIMD vectors for the CPU micro-kernels (GCC/Clang vector
// extensions): AVX-512 registers where the build targets them, pairs or quads of
// narrower registers elsewhere. Loads and stores convert between the storage type
// (float, double, BFloat16, Half) and the accumulation type.
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

namespace entskip::cpu::simd {

template <typename T>
struct Simd {
  typedef T vec __attribute__((vector_size(64)));
  static constexpr int W = 64 / sizeof(T);  // lanes
};

template <typename acc_t>
using Vec = typename Simd<acc_t>::vec;

template <typename acc_t>
inline Vec<acc_t> broadcast(acc_t s) {
  return s - Vec<acc_t>{};
}

// W consecutive elements of p (any storage type) as one accumulation vector.
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    U16x16 bits;  // a bfloat16 is the top half of a float32
    std::memcpy(&bits, p, sizeof(bits));
    const U32x16 wide = __builtin_convertvector(bits, U32x16) << 16;
    std::memcpy(&v, &wide, sizeof(v));
  } else {
    for (int l = 0; l < Simd<acc_t>::W; ++l) v[l] = static_cast<acc_t>(p[l]);
  }
  return v;
}

// The bfloat16 bits of 16 floats: round to nearest even, NaN to the canonical 0x7FC0, as
// c10::BFloat16 does.
inline U16x16 to_bfloat16_bits(const Vec<float>& v) {
  U32x16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const U32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const I32x16 is_nan = v != v;
  const U32x16 out = is_nan ? U32x16{} + 0x7FC0u : rounded;
  return __builtin_convertvector(out, U16x16);
}

template <typename acc_t, typename scalar_t>
inline void store(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    const U16x16 narrow = to_bfloat16_bits(v);
    std::memcpy(p, &narrow, sizeof(narrow));
  } else {
    for (int l = 0; l < Simd<acc_t>::W; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

// Whether stream() is a non-temporal store on this target (else a plain store).
#if defined(__AVX512F__)
constexpr bool kStreams = true;
#else
constexpr bool kStreams = false;
#endif

// store() of a whole 64-byte line (float or double, no narrowing) as a non-temporal
// (streaming) store where the target has one (AVX-512): the line goes to memory without
// being read first and without displacing the cache. p must be 64-byte aligned. Callers
// issue a store fence (stream_fence) before another thread may read what they streamed.
template <typename T>
inline void stream(T* p, const Vec<T>& v) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "whole lines of float or double");
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    _mm512_stream_ps(p, reinterpret_cast<const __m512&>(v));
  } else {
    _mm512_stream_pd(p, reinterpret_cast<const __m512d&>(v));
  }
#else
  store<T>(p, v);
#endif
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// Keeps v in a register from here on: stops the compiler from folding v's load into each
// of its uses as a memory operand. GCC does that in the sampled micro-kernel at 4 vectors per
// row (b = 64, float32), which then issues one 64-byte load per FMA and is bound by loads.
template <typename V>
inline void keep_in_register(V& v) {
#if defined(__GNUC__) && defined(__AVX512F__)
  asm("" : "+v"(v));
#else
  (void)v;
#endif
}

// acc[m][v] += a[m] * b[v] for m < M, v < NV: one step (one k) of an outer-product
// micro-kernel, with b = NV vectors of a row of the right operand.
template <int M, int NV, typename acc_t>
inline void outer_product_step(Vec<acc_t> (&acc)[M][NV], const acc_t* a, const Vec<acc_t> (&b)[NV]) {
  for (int m = 0; m < M; ++m) {
    const Vec<acc_t> am = broadcast(a[m]);
    for (int v = 0; v < NV; ++v) acc[m][v] += am * b[v];
  }
}

// Transpose of the W x W matrix whose rows are v[0], ..., v[W-1] (W = lanes), in
// registers: log2(W) stages, each swapping the off-diagonal H x H blocks of every
// 2H x 2H block with two-source lane shuffles (vpermt2ps/pd on AVX-512).
namespace detail {

// Lane l of the new row i (bit H of i clear) and of the new row i + H, as indices
// into the concatenation of old rows i (lanes 0..W-1) and i + H (lanes W..2W-1).
template <int H, int W>
constexpr int low_lane(int l) { return (l & H) == 0 ? l : l - H + W; }
template <int H, int W>
constexpr int high_lane(int l) { return (l & H) == 0 ? l + H : l + W; }

template <typename V, int... I>
inline V shuffle(const V& a, const V& b) {
#if defined(__clang__)
  return __builtin_shufflevector(a, b, I...);
#else
  typedef std::conditional_t<sizeof(a[0]) == 8, int64_t, int32_t> Lane;
  typedef Lane Mask __attribute__((vector_size(sizeof(V))));
  return __builtin_shuffle(a, b, Mask{I...});
#endif
}

template <int H, typename V, size_t... L>
inline void transpose_stage(V* v, std::index_sequence<L...>) {
  constexpr int W = sizeof...(L);
  for (int i = 0; i < W; ++i) {
    if (i & H) continue;
    const V a = v[i], b = v[i + H];
    v[i] = shuffle<V, low_lane<H, W>(L)...>(a, b);
    v[i + H] = shuffle<V, high_lane<H, W>(L)...>(a, b);
  }
}

// The stages commute (each swaps one bit of the row index with the same bit of the lane).
template <int H, int W, typename V>
inline void transpose_stages(V* v) {
  transpose_stage<H>(v, std::make_index_sequence<W>{});
  if constexpr (H > 1) transpose_stages<H / 2, W>(v);
}

}  // namespace detail

template <typename acc_t>
inline void transpose(Vec<acc_t>* v) {
  constexpr int W = Simd<acc_t>::W;
  detail::transpose_stages<W / 2, W>(v);
}

}  // namespace entskip::cpu::simd
