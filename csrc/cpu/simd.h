// Portable 64-byte SIMD vectors for the CPU micro-kernels (GCC/Clang vector
// extensions): AVX-512 registers where the build targets them, pairs or quads of
// narrower registers elsewhere. Loads and stores convert between the storage type
// (float, double, BFloat16, Half) and the accumulation type.
#pragma once

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
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    for (int l = 0; l < Simd<acc_t>::W; ++l) v[l] = static_cast<acc_t>(p[l]);
  }
  return v;
}

template <typename acc_t, typename scalar_t>
inline void store(scalar_t* p, const Vec<acc_t>& v) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    for (int l = 0; l < Simd<acc_t>::W; ++l) p[l] = static_cast<scalar_t>(v[l]);
  }
}

}  // namespace entskip::cpu::simd
