// Permuting short rows in registers: q[i] = p[idx[i]] for rows of at most
// RegisterPermute<T>::kMaxColumns elements (256 float32, 512 bfloat16/half, 128 float64),
// with AVX-512 two-source permutes (vpermt2w/d/q). A row is loaded whole into at most 16
// vectors of L lanes (64 bytes each); each vector of L output elements is the blend of one
// two-source permute per pair of source vectors (2L elements): the permute picks lane
// idx[i] mod 2L from the pair, and the pair's mask keeps the lanes whose idx[i] lies in
// it. For d = 192 float32 that is 6 permutes and 5 blends per 16 outputs, against the two
// 16 x 16 transposes of the tiled permute (permutation_skip_add.cpp) at 8 shuffles per 16,
// and the row is read once in order instead of as a tile of 16 rows side by side. 16-bit
// lanes are permuted as byte pairs where the CPU has AVX512-VBMI (with vpermt2b the permute
// took about a quarter less time than with vpermt2w in a profile of the bfloat16 d = 192
// forward).
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace entskip::cpu {

#if defined(__AVX512BW__)

template <typename T>
class RegisterPermute {
 public:
  static constexpr int kBytes = sizeof(T);
  static constexpr int L = 64 / kBytes;   // lanes of a vector
  static constexpr int kMaxPairs = 8;     // 16 source vectors
  static constexpr int64_t kMaxColumns = 2 * L * kMaxPairs;
  static_assert(kBytes == 2 || kBytes == 4 || kBytes == 8, "16-, 32- or 64-bit elements");

  // Whether rows of d elements are permuted in registers.
  static bool takes(int64_t d) { return d > 0 && d <= kMaxColumns; }

  // For idx, a permutation of 0 .. d - 1 (takes(d)).
  RegisterPermute(const int32_t* idx, int64_t d)
      : d_(d), pairs_(static_cast<int>((d + 2 * L - 1) / (2 * L))), outputs_((d + L - 1) / L),
        lanes_(static_cast<size_t>(outputs_) * L, 0), masks_(static_cast<size_t>(outputs_) * pairs_, 0) {
    for (int64_t i = 0; i < d; ++i) {
      const int64_t o = i / L, l = i % L;
      const int64_t j = idx[i] % (2 * L);
      lanes_[i] = static_cast<Lane>(kByteLanes ? (2 * j) | ((2 * j + 1) << 8) : j);
      masks_[o * pairs_ + idx[i] / (2 * L)] |= static_cast<Mask>(uint64_t{1} << l);
    }
  }

  // q[i] = p[idx[i]], i < d.
  void operator()(const T* p, T* q) const {
    switch (pairs_) {
      case 1: return run<1>(p, q);
      case 2: return run<2>(p, q);
      case 3: return run<3>(p, q);
      case 4: return run<4>(p, q);
      case 5: return run<5>(p, q);
      case 6: return run<6>(p, q);
      case 7: return run<7>(p, q);
      default: return run<8>(p, q);
    }
  }

 private:
  using Lane = std::conditional_t<kBytes == 2, uint16_t, std::conditional_t<kBytes == 4, uint32_t, uint64_t>>;
#if defined(__AVX512VBMI__)
  static constexpr bool kByteLanes = kBytes == 2;  // 16-bit lanes permuted as byte pairs (vpermt2b)
#else
  static constexpr bool kByteLanes = false;
#endif
  using Mask = std::conditional_t<kBytes == 2, __mmask32, std::conditional_t<kBytes == 4, __mmask16, __mmask8>>;

  // The first n lanes (n may be <= 0 or >= L).
  static uint64_t first(int64_t n) { return n <= 0 ? 0 : (uint64_t{1} << (n < L ? n : L)) - 1; }

  static __m512i load(uint64_t m, const T* p) {
    if constexpr (kBytes == 2) return _mm512_maskz_loadu_epi16(static_cast<__mmask32>(m), p);
    else if constexpr (kBytes == 4) return _mm512_maskz_loadu_epi32(static_cast<__mmask16>(m), p);
    else return _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), p);
  }
  static void store(uint64_t m, T* p, __m512i v) {
    if constexpr (kBytes == 2) _mm512_mask_storeu_epi16(p, static_cast<__mmask32>(m), v);
    else if constexpr (kBytes == 4) _mm512_mask_storeu_epi32(p, static_cast<__mmask16>(m), v);
    else _mm512_mask_storeu_epi64(p, static_cast<__mmask8>(m), v);
  }
  static __m512i permute(__m512i a, __m512i lanes, __m512i b) {
#if defined(__AVX512VBMI__)
    if constexpr (kBytes == 2) return _mm512_permutex2var_epi8(a, lanes, b);
#else
    if constexpr (kBytes == 2) return _mm512_permutex2var_epi16(a, lanes, b);
#endif
    else if constexpr (kBytes == 4) return _mm512_permutex2var_epi32(a, lanes, b);
    else return _mm512_permutex2var_epi64(a, lanes, b);
  }
  static __m512i blend(const Mask* m, __m512i a, __m512i b) {  // b where *m, else a (a mask register load)
    if constexpr (kBytes == 2) return _mm512_mask_mov_epi16(a, _load_mask32(const_cast<Mask*>(m)), b);
    else if constexpr (kBytes == 4) return _mm512_mask_mov_epi32(a, _load_mask16(const_cast<Mask*>(m)), b);
    else return _mm512_mask_mov_epi64(a, _load_mask8(const_cast<Mask*>(m)), b);
  }

  template <int P>
  void run(const T* p, T* q) const {
    __m512i v[2 * P];
    for (int s = 0; s < 2 * P; ++s) v[s] = load(first(d_ - int64_t{s} * L), p + s * L);  // zeros past d
    for (int64_t o = 0; o < outputs_; ++o) {
      const __m512i lanes = _mm512_loadu_si512(lanes_.data() + o * L);
      const Mask* m = masks_.data() + o * P;
      __m512i out = permute(v[0], lanes, v[1]);
      for (int k = 1; k < P; ++k) out = blend(m + k, out, permute(v[2 * k], lanes, v[2 * k + 1]));
      store(first(d_ - o * L), q + o * L, out);
    }
  }

  int64_t d_;
  int pairs_;
  int64_t outputs_;
  std::vector<Lane> lanes_;     // lanes_[i] = idx[i] mod 2L, then zeros to a whole vector
  std::vector<Mask> masks_;  // masks_[o * pairs_ + k]: the lanes of output vector o from pair k
};

#endif

}  // namespace entskip::cpu
