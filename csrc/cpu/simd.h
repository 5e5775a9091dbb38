// Portable 64-byte SIMD vectors for the CPU micro-kernels (GCC/Clang vector
// extensions): AVX-512 registers where the build targets them, pairs or quads of
// narrower registers elsewhere. Loads and stores convert between the storage type
// (float, double, BFloat16, Half) and the accumulation type.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

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

template <typename acc_t, typename scalar_t>
inline void store(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(p, &v, sizeof(v));
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    // Round to nearest even, NaN to the canonical 0x7FC0, as c10::BFloat16 does.
    U32x16 bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const U32x16 rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const I32x16 is_nan = v != v;
    const U32x16 out = is_nan ? U32x16{} + 0x7FC0u : rounded;
    const U16x16 narrow = __builtin_convertvector(out, U16x16);
    std::memcpy(p, &narrow, sizeof(narrow));
  } else {
    for (int l = 0; l < Simd<acc_t>::W; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

}  // namespace entskip::cpu::simd
