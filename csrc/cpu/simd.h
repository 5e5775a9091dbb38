// Portable 64-byte SIMD vectors for the CPU micro-kernels (GCC/Clang vector
// extensions): AVX-512 registers where the build targets them, pairs or quads of
// narrower registers elsewhere. Loads and stores convert between the storage type
// (float, double, BFloat16, Half) and the accumulation type; in-register transposes (of
// 32-byte vectors of 16-bit lanes too, by AVX2 unpacks).
#pragma once

#include <c10/util/BFloat16.h>

#if defined(__AVX2__) || defined(__F16C__)
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

// One unaligned load / store of the bits of a vector V. A std::memcpy of 64 bytes is split
// into two 32-byte moves where GCC tunes for a target that prefers 256-bit vectors (Intel's
// at -march=native), and a 64-byte register read back from a stack copy written in halves
// then waits on a failed store forwarding, some 15 cycles a load.
template <typename V>
inline V load_bits(const void* p) {
  struct Unaligned {
    V v;
  } __attribute__((packed, may_alias));
  return static_cast<const Unaligned*>(p)->v;
}

template <typename V>
inline void store_bits(void* p, const V& v) {
  struct Unaligned {
    V v;
  } __attribute__((packed, may_alias));
  static_cast<Unaligned*>(p)->v = v;
}

// W consecutive elements of p (any storage type) as one accumulation vector.
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef int32_t I32x16 __attribute__((vector_size(64)));

#if defined(__F16C__)
// 16 halves to floats and back by the F16C/AVX-512 conversions (the element-by-element
// c10::Half conversions took the float16 identity skip to about 5x torch.add's time): exact
// widening; narrowing rounds to nearest even, as c10::Half does (a NaN stays a NaN, its
// payload may differ).
inline Vec<float> from_half_bits(const U16x16& bits) {
  __m256i h;
  std::memcpy(&h, &bits, sizeof(h));
  Vec<float> v;
#if defined(__AVX512F__)
  const __m512 f = _mm512_cvtph_ps(h);
  std::memcpy(&v, &f, sizeof(v));
#else
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(h)), hi = _mm256_cvtph_ps(_mm256_extractf128_si256(h, 1));
  std::memcpy(&v, &lo, 32);
  std::memcpy(reinterpret_cast<char*>(&v) + 32, &hi, 32);
#endif
  return v;
}

inline U16x16 to_half_bits(const Vec<float>& v) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  __m256i h;
#if defined(__AVX512F__)
  __m512 f;
  std::memcpy(&f, &v, sizeof(f));
  h = _mm512_cvtps_ph(f, kRound);
#else
  __m256 lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  h = _mm256_set_m128i(_mm256_cvtps_ph(hi, kRound), _mm256_cvtps_ph(lo, kRound));
#endif
  U16x16 bits;
  std::memcpy(&bits, &h, sizeof(bits));
  return bits;
}
#endif

template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load(const scalar_t* p) {
  Vec<acc_t> v;
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    v = load_bits<Vec<acc_t>>(p);
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    const U16x16 bits = load_bits<U16x16>(p);  // a bfloat16 is the top half of a float32
    const U32x16 wide = __builtin_convertvector(bits, U32x16) << 16;
    std::memcpy(&v, &wide, sizeof(v));
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
    v = from_half_bits(load_bits<U16x16>(p));  // exact, as c10::Half's conversion
#endif
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
    store_bits(p, v);
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::BFloat16>) {
    store_bits(p, to_bfloat16_bits(v));
#if defined(__F16C__)
  } else if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, c10::Half>) {
    store_bits(p, to_half_bits(v));
#endif
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

// acc[m][v] += a[m * stride] * b[v] for m < M, v < NV: one step (one k) of an outer-product
// micro-kernel, with b = NV vectors of a row of the right operand.
template <int M, int NV, typename acc_t>
inline void outer_product_step(Vec<acc_t> (&acc)[M][NV], const acc_t* a, const Vec<acc_t> (&b)[NV],
                               int64_t stride = 1) {
  for (int m = 0; m < M; ++m) {
    const Vec<acc_t> am = broadcast(a[m * stride]);
    for (int v = 0; v < NV; ++v) acc[m][v] += am * b[v];
  }
}

// In-register transposes. The generic one, for W x W rows of W lanes: log2(W) stages, each
// swapping the off-diagonal H x H blocks of every 2H x 2H block with two-source lane
// shuffles (vpermt2ps/pd on AVX-512).
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
  static_assert(sizeof(a[0]) == 8 || sizeof(a[0]) == 4 || sizeof(a[0]) == 2, "lanes of 2, 4 or 8 bytes");
  typedef std::conditional_t<sizeof(a[0]) == 8, int64_t, std::conditional_t<sizeof(a[0]) == 4, int32_t, int16_t>> Lane;
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

#if defined(__AVX2__)
// 16-, 32- and 64-bit interleaves of 32- (__m256i) or 64-byte (__m512i) registers, which
// work within 128-bit lanes.
struct Interleave256 {
  static __m256i lo16(__m256i a, __m256i b) { return _mm256_unpacklo_epi16(a, b); }
  static __m256i hi16(__m256i a, __m256i b) { return _mm256_unpackhi_epi16(a, b); }
  static __m256i lo32(__m256i a, __m256i b) { return _mm256_unpacklo_epi32(a, b); }
  static __m256i hi32(__m256i a, __m256i b) { return _mm256_unpackhi_epi32(a, b); }
  static __m256i lo64(__m256i a, __m256i b) { return _mm256_unpacklo_epi64(a, b); }
  static __m256i hi64(__m256i a, __m256i b) { return _mm256_unpackhi_epi64(a, b); }
};
#if defined(__AVX512BW__)
struct Interleave512 {
  static __m512i lo16(__m512i a, __m512i b) { return _mm512_unpacklo_epi16(a, b); }
  static __m512i hi16(__m512i a, __m512i b) { return _mm512_unpackhi_epi16(a, b); }
  static __m512i lo32(__m512i a, __m512i b) { return _mm512_unpacklo_epi32(a, b); }
  static __m512i hi32(__m512i a, __m512i b) { return _mm512_unpackhi_epi32(a, b); }
  static __m512i lo64(__m512i a, __m512i b) { return _mm512_unpacklo_epi64(a, b); }
  static __m512i hi64(__m512i a, __m512i b) { return _mm512_unpackhi_epi64(a, b); }
};
#endif

// Within each 128-bit lane, the 8 x 8 transposes of 16-bit lanes of rows 0-7 and of rows
// 8-15 by 16-, 32- and 64-bit interleaves: after, r[h + c] (h = 0, 8; c < 8) holds rows
// h .. h + 7 at column c of each 128-bit lane's 8 x 8 block.
template <typename I, typename R>
__attribute__((always_inline)) inline void interleave_8x8_epi16(R* r) {
  R a[16];
  for (int h = 0; h < 16; h += 8) {  // rows h .. h + 7
    for (int i = 0; i < 8; i += 2) {
      a[h + i] = I::lo16(r[h + i], r[h + i + 1]);
      a[h + i + 1] = I::hi16(r[h + i], r[h + i + 1]);
    }
    // a[h + 2p + q]: rows h + 2p, h + 2p + 1 at columns 4q .. 4q + 3 (of each lane)
    R b[8];
    for (int q = 0; q < 2; ++q) {
      for (int s = 0; s < 2; ++s) {  // rows h + 4s .. h + 4s + 3: pairs p = 2s, 2s + 1
        b[4 * q + 2 * s] = I::lo32(a[h + 4 * s + q], a[h + 4 * s + 2 + q]);
        b[4 * q + 2 * s + 1] = I::hi32(a[h + 4 * s + q], a[h + 4 * s + 2 + q]);
      }
    }
    // b[4q + 2s + e]: rows h + 4s .. h + 4s + 3 at columns 4q + 2e, 4q + 2e + 1
    for (int q = 0; q < 2; ++q) {
      for (int e = 0; e < 2; ++e) {
        const int c = 4 * q + 2 * e;
        r[h + c] = I::lo64(b[4 * q + e], b[4 * q + 2 + e]);
        r[h + c + 1] = I::hi64(b[4 * q + e], b[4 * q + 2 + e]);
      }
    }
  }
}

// The transpose of 16 rows of 16 16-bit lanes (32-byte vectors) by unpacks, one-cycle
// shuffles (the generic stages compile to two-source word permutes, vpermt2w, several
// times slower): interleave_8x8_epi16 transposes each half of rows 0-7 and of rows 8-15,
// then vperm2i128 exchanges the halves.
template <typename V>
inline void transpose_16x16_epi16(V* v) {
  static_assert(sizeof(V) == 32 && sizeof(v[0][0]) == 2, "16 lanes of 16 bits");
  __m256i r[16], a[16];
  std::memcpy(r, v, sizeof(r));
  interleave_8x8_epi16<Interleave256>(r);  // r[h + c]: rows h .. h + 7 at column c (low half), c + 8 (high half)
  for (int c = 0; c < 8; ++c) {
    a[c] = _mm256_permute2x128_si256(r[c], r[8 + c], 0x20);
    a[c + 8] = _mm256_permute2x128_si256(r[c], r[8 + c], 0x31);
  }
  std::memcpy(v, a, sizeof(a));
}
#endif

}  // namespace detail

#if defined(__AVX512BW__)
// Two 16 x 16 transposes of 16-bit lanes at once, one in each 256-bit half of 16 64-byte
// vectors (v[k]: row k of matrix A in the low half, of matrix B in the high half; after:
// column k of each): the same interleaves as transpose_16x16_epi16 at the same cost for
// twice the elements, then vpermt2q gathers each half's rows 0-7 and 8-15.
__attribute__((always_inline)) inline void transpose_16x16_epi16_pairs(__m512i* v) {
  __m512i a[16];
  // v[h + c], 128-bit lanes: rows h .. h + 7 of A at column c, of A at c + 8, of B at c, of B at c + 8
  detail::interleave_8x8_epi16<detail::Interleave512>(v);
  const __m512i low = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), high = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int c = 0; c < 8; ++c) {
    a[c] = _mm512_permutex2var_epi64(v[c], low, v[8 + c]);
    a[c + 8] = _mm512_permutex2var_epi64(v[c], high, v[8 + c]);
  }
  for (int c = 0; c < 16; ++c) v[c] = a[c];
}
#endif

// The transpose of the W x W matrix whose rows are v[0], ..., v[W-1], for any vector type V
// of W lanes (2, 4 or 8 bytes): the unpack sequence above for 16 x 16-bit lanes with AVX2,
// else the generic stages.
template <typename V>
inline void transpose_rows(V* v) {
  constexpr int W = sizeof(V) / sizeof(v[0][0]);
#if defined(__AVX2__)
  if constexpr (W == 16 && sizeof(V) == 32) {
    detail::transpose_16x16_epi16(v);
    return;
  }
#endif
  detail::transpose_stages<W / 2, W>(v);
}

template <typename acc_t>
inline void transpose(Vec<acc_t>* v) {
  transpose_rows(v);
}

// The bits of one accumulation vector's worth of storage elements T, unconverted: W lanes
// of T's size (16 x 4 bytes for float, 16 x 2 for bfloat16 and half, 8 x 8 for double).
template <typename T>
struct StorageLanes {
  static constexpr int W = sizeof(T) == 8 ? 8 : 16;
  using Lane = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  typedef Lane vec __attribute__((vector_size(W * sizeof(T))));
};

// dst[l * dst_stride + k] = src[k * src_stride + l] for k, l < W = StorageLanes<T>::W: a
// W x W tile of T moved transposed, by whole-vector loads and stores.
template <typename T>
inline void transpose_tile(const T* src, int64_t src_stride, T* dst, int64_t dst_stride) {
  using V = typename StorageLanes<T>::vec;
  constexpr int W = StorageLanes<T>::W;
  V v[W];
  for (int k = 0; k < W; ++k) v[k] = load_bits<V>(src + k * src_stride);
  transpose_rows(v);
  for (int l = 0; l < W; ++l) store_bits(dst + l * dst_stride, v[l]);
}

}  // namespace entskip::cpu::simd
