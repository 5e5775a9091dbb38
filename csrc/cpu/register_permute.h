// Permuting short rows in registers: q[i] = p[idx[i]] for rows of at most
// RegisterPermute<T>::kMaxColumns elements (256 float32, 512 bfloat16/half, 128 float64),
// with AVX-512 two-source permutes. A row is loaded whole into at most 16 vectors of L
// lanes (64 bytes each). Each vector of L output elements starts as its lanes' indices
// (idx[i] mod 2L) and takes, pair of source vectors by pair, the lanes whose source lies in
// that pair: vpermi2w/d/q with a merge mask writes into the index register, and a lane
// keeps its index until its own pair's permute reads it, so P pairs cost P permutes and
// no blends (d = 192 float32: 6 permutes per 16 outputs, against the two 16 x 16
// transposes of the tiled permute in permutation_skip_add.cpp at 8 shuffles per 16). Each
// permute needs its pair's lane mask in a mask register, and on AMD Zen 4 those mask
// writes, not the permutes, bounded the loop: rows of up to 6 pairs are permuted two at a
// time, each mask serving both (d = 192 float32 about a quarter less time a row than one
// row at a time with blends, in a microbenchmark on Zen 4). Rows of 7 or 8 pairs, whose
// two rows' sources would not fit the 32 vector registers, go one at a time (blended).
// 16-bit lanes are permuted as byte pairs where the CPU has AVX512-VBMI (vpermi2b: with
// vpermt2b the permute took about a quarter less time than with vpermt2w in a profile of
// the bfloat16 d = 192 forward on an Intel Xeon).
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
  static constexpr int kRows = 2;         // rows permuted together (one mask load for both) ...
  static constexpr int kMaxPairsTogether = 6;  // ... of up to 6 pairs (24 source vectors in registers)
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
      masks_[o * pairs_ + idx[i] / (2 * L)] |= static_cast<Mask>(kByteLanes ? uint64_t{3} << (2 * l) : uint64_t{1} << l);
    }
  }

  // q[k * d + i] = p[k * stride + idx[i]], i < d, for the n <= kRows rows k < n.
  void operator()(const T* p, int64_t stride, int64_t n, T* q) const {
    if (n == kRows && pairs_ <= kMaxPairsTogether) return dispatch<kRows>(p, stride, q);
    for (int64_t k = 0; k < n; ++k) dispatch<1>(p + k * stride, stride, q + k * d_);
  }

 private:
  using Lane = std::conditional_t<kBytes == 2, uint16_t, std::conditional_t<kBytes == 4, uint32_t, uint64_t>>;
#if defined(__AVX512VBMI__)
  static constexpr bool kByteLanes = kBytes == 2;  // 16-bit lanes permuted as byte pairs (vpermi2b/vpermt2b)
#else
  static constexpr bool kByteLanes = false;
#endif
  // a lane mask: one bit per element, or per byte where 16-bit lanes go as byte pairs
  using Mask = std::conditional_t<kByteLanes, __mmask64,
                                  std::conditional_t<kBytes == 2, __mmask32, std::conditional_t<kBytes == 4, __mmask16, __mmask8>>>;

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
  static Mask load_mask(const Mask* m) {
    if constexpr (sizeof(Mask) == 8) return _load_mask64(const_cast<Mask*>(m));
    else if constexpr (sizeof(Mask) == 4) return _load_mask32(const_cast<Mask*>(m));
    else if constexpr (kBytes == 4) return _load_mask16(const_cast<Mask*>(m));
    else return _load_mask8(const_cast<Mask*>(m));
  }
  static __m512i permute(__m512i a, __m512i lanes, __m512i b) {  // element (lane mod 2L) of the pair (a, b)
    if constexpr (kBytes == 2) {
#if defined(__AVX512VBMI__)
      return _mm512_permutex2var_epi8(a, lanes, b);
#else
      return _mm512_permutex2var_epi16(a, lanes, b);
#endif
    } else if constexpr (kBytes == 4) {
      return _mm512_permutex2var_epi32(a, lanes, b);
    } else {
      return _mm512_permutex2var_epi64(a, lanes, b);
    }
  }
  static __m512i blend(Mask m, __m512i a, __m512i b) {  // b in the lanes of m, else a
    if constexpr (kByteLanes) return _mm512_mask_mov_epi8(a, m, b);
    else if constexpr (kBytes == 2) return _mm512_mask_mov_epi16(a, m, b);
    else if constexpr (kBytes == 4) return _mm512_mask_mov_epi32(a, m, b);
    else return _mm512_mask_mov_epi64(a, m, b);
  }
  // Lanes of `acc` in m: element (acc's lane value mod 2L) of the pair (a, b); the other
  // lanes of acc as they are (vpermi2b/w/d/q with a merge mask, the index register as the
  // destination).
  static __m512i permute_into(__m512i acc, Mask m, __m512i a, __m512i b) {
    if constexpr (kBytes == 2) {
#if defined(__AVX512VBMI__)
      return _mm512_mask2_permutex2var_epi8(a, acc, m, b);
#else
      return _mm512_mask2_permutex2var_epi16(a, acc, m, b);
#endif
    } else if constexpr (kBytes == 4) {
      return _mm512_mask2_permutex2var_epi32(a, acc, m, b);
    } else {
      return _mm512_mask2_permutex2var_epi64(a, acc, m, b);
    }
  }

  // R rows (stride apart) into q (rows d apart); two rows only of up to kMaxPairsTogether
  // pairs (operator()).
  template <int R>
  void dispatch(const T* p, int64_t stride, T* q) const {
    switch (pairs_) {
      case 1: return run<1, R>(p, stride, q);
      case 2: return run<2, R>(p, stride, q);
      case 3: return run<3, R>(p, stride, q);
      case 4: return run<4, R>(p, stride, q);
      case 5: return run<5, R>(p, stride, q);
      case 6: return run<6, R>(p, stride, q);
    }
    if constexpr (R == 1) {
      if (pairs_ == 7) return blended<7>(p, q);
      return blended<8>(p, q);
    }
  }

  // One row of 7 or 8 pairs: each output vector the blend of P independent permutes, whose
  // short dependency chain (a blend) beat the merged permutes' P-long one there (d = 256
  // float32 about a quarter less time in a microbenchmark on Zen 4).
  template <int P>
  void blended(const T* p, T* q) const {
    __m512i v[2 * P];
    for (int s = 0; s < 2 * P; ++s) v[s] = load(first(d_ - int64_t{s} * L), p + s * L);  // zeros past d
    for (int64_t o = 0; o < outputs_; ++o) {
      const __m512i ix = _mm512_loadu_si512(lanes_.data() + o * L);
      __m512i out = permute(v[0], ix, v[1]);
      for (int k = 1; k < P; ++k) out = blend(load_mask(masks_.data() + o * P + k), out, permute(v[2 * k], ix, v[2 * k + 1]));
      store(first(d_ - o * L), q + o * L, out);
    }
  }

  template <int P, int R>
  void run(const T* p, int64_t stride, T* q) const {
    const int64_t d = d_, outputs = outputs_;
    __m512i v[R][2 * P];
    for (int r = 0; r < R; ++r) {
      for (int s = 0; s < 2 * P; ++s) v[r][s] = load(first(d - int64_t{s} * L), p + r * stride + s * L);  // zeros past d
    }
    for (int64_t o = 0; o < outputs; ++o) {
      const __m512i ix = _mm512_loadu_si512(lanes_.data() + o * L);
      __m512i out[R];
      for (int r = 0; r < R; ++r) out[r] = ix;
      for (int k = 0; k < P; ++k) {
        const Mask m = load_mask(masks_.data() + o * P + k);
        for (int r = 0; r < R; ++r) out[r] = permute_into(out[r], m, v[r][2 * k], v[r][2 * k + 1]);
      }
      for (int r = 0; r < R; ++r) store(first(d - o * L), q + r * d + o * L, out[r]);
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
