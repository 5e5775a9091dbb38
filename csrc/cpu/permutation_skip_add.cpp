// CPU implementation of the permutation skip-add, y[..., i] = alpha * x[..., index[i]] +
// branch[..., i], and its backward (schemas in csrc/ops.cpp), each one pass over memory:
//   forward   per row (short rows, permuted in registers: register_permute.h) or per tile
//             of 16 (float64: 8) rows: permute the rows of x into a buffer (PermutedRows),
//             then y = alpha * permuted + branch row by row, as the identity skip does
//             (elementwise::forward_segment);
//   backward  the same with grad and inverse: dx[j] = alpha * grad[inverse[j]] and
//             grad[inverse[j]] * x[j] added into dalpha (elementwise::backward_segment).
// A tile's rows of x (of grad) are read side by side in order; branch, y, dx and x for
// dalpha row by row. Only the tile buffers are read out of order.
// With features_first, x is (N, D, S) and the permutation acts on dim 1: each row of S
// positions is read whole from its source row, in order (features_first_forward/_backward).
// index and inverse are checked on every call (O(D)): in range and inverse[index[i]] = i,
// so a corrupted index raises instead of reading out of bounds. Rows are cut into fixed
// chunks (chunk_rows), the work items and the terms of dalpha's deterministic sum (see
// identity_skip_add.cpp).
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "elementwise_skip.h"
#include "register_permute.h"

namespace entskip::cpu {
namespace {

using namespace elementwise;

// index and inverse as int32 (half the bytes of the int64 tensors), after checking that
// they are inverse permutations of 0..d-1.
std::vector<int32_t> checked_permutation(const at::Tensor& index, const at::Tensor& inverse, const at::Tensor& x,
                                         int64_t d, const at::Tensor& which) {
  check_cpu(index, "index");
  check_cpu(inverse, "inverse");
  check_index(index, "index", d, x);
  check_index(inverse, "inverse", d, x);
  TORCH_CHECK(d <= std::numeric_limits<int32_t>::max(), "the permutation skip takes at most 2^31 - 1 features");
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const int64_t* vp = inverse.const_data_ptr<int64_t>();
  if (const int64_t i = first_unpaired(ip, vp, d); i < d) {
    const int64_t j = ip[i];
    TORCH_CHECK(j >= 0 && j < d, "index[", i, "] = ", j, " is out of range for ", d, " features");
    TORCH_CHECK(false, "inverse is not the inverse permutation of index: inverse[index[", i, "]] = ", vp[j]);
  }
  const int64_t* src = which.const_data_ptr<int64_t>();
  return std::vector<int32_t>(src, src + d);
}

// Tiles of W consecutive rows (W = SIMD lanes of the accumulation type, 16 or 8), each
// permuted into a per-thread buffer and then run through the identity's in-order segment
// kernels. The tile is first held transposed (load_tile: t[c * W + k] = row k, column c,
// as stored, no widening), so that column c of all its rows is one vector; the permuted
// rows, p[k][i] = x[k][index[i]], are then whole-vector loads of columns index[i] and W x W
// in-register transposes back (permute_tile), instead of W scalar loads and inserts per
// output vector; with AVX-512, 16-bit tiles are transposed two 16 x 16 blocks per 64-byte
// vector (bfloat16 8192 x 1024 forward 16-20 % faster than one block per 32-byte vector in
// an A/B). The buffers hold 2 x W x d elements per thread (96 KiB for float32 at d =
// 768): rows wider than kMaxTileColumns are permuted by one ATen index_select copy
// instead. A tile of n < W valid rows fills rows n .. W - 1 with copies of row n - 1 (read,
// never used).
template <typename T>
struct Tile {
  static constexpr int W = simd::StorageLanes<T>::W;
  static_assert(W == simd::Simd<acc_type<T>>::W, "a tile row is one accumulation vector");
  using Column = typename simd::StorageLanes<T>::vec;  // the bits of W elements
};

constexpr int64_t kMaxTileColumns = 16384;  // 2 MiB of float32 tile buffers per thread

// The cache line at column c of each row of the next tile (W rows on): a tile's rows are
// read side by side, W streams a cache line at a time, which the hardware prefetchers
// left waiting on memory for 16-bit rows (bfloat16 64 x 197 x 768 forward about 15 %
// faster with it in A/Bs on AMD Zen 4; float32 8192 x 1024 3-4 % slower, so the float32
// and float64 tiles go without). A prefetch past the tensor's end does not fault.
template <typename T, int W>
void prefetch_next_tile(const T* const (&row)[W], int64_t stride, int64_t c) {
  for (int k = 0; k < W; ++k) __builtin_prefetch(row[k] + W * stride + c, 0, 3);
}

// t = the transpose of rows p[0], ..., p[n - 1] (row stride `stride`, d columns), d x W;
// rows n .. W - 1 of the tile repeat row n - 1.
template <typename T>
void load_tile(const T* p, int64_t stride, int64_t d, int64_t n, T* t) {
  constexpr int W = Tile<T>::W;
  const T* row[W];
  for (int k = 0; k < W; ++k) row[k] = p + std::min<int64_t>(k, n - 1) * stride;
  int64_t c = 0;
#if defined(__AVX512BW__)
  if constexpr (sizeof(T) == 2) {  // 16-bit: two W x W blocks a 64-byte vector
    for (; c + 2 * W <= d; c += 2 * W) {
      __m512i v[W];
      prefetch_next_tile(row, stride, c);
      for (int k = 0; k < W; ++k) v[k] = _mm512_loadu_si512(row[k] + c);
      simd::transpose_16x16_epi16_pairs(v);
      for (int l = 0; l < W; ++l) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + (c + l) * W), _mm512_castsi512_si256(v[l]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + (c + W + l) * W), _mm512_extracti64x4_epi64(v[l], 1));
      }
    }
  }
#endif
  for (; c + W <= d; c += W) {
    typename Tile<T>::Column v[W];
    for (int k = 0; k < W; ++k) v[k] = simd::load_bits<typename Tile<T>::Column>(row[k] + c);
    simd::transpose_rows(v);
    for (int k = 0; k < W; ++k) simd::store_bits(t + (c + k) * W, v[k]);
  }
  for (; c < d; ++c) {
    for (int k = 0; k < W; ++k) t[c * W + k] = row[k][c];
  }
}

// out[k * d + i] = row k of the transposed tile t at column idx[i], i < d, for the W rows.
template <typename T>
void permute_tile(const T* t, const int32_t* idx, int64_t d, T* out) {
  constexpr int W = Tile<T>::W;
  int64_t i = 0;
#if defined(__AVX512BW__)
  if constexpr (sizeof(T) == 2) {  // 16-bit: two W x W blocks a 64-byte vector
    for (; i + 2 * W <= d; i += 2 * W) {
      __m512i v[W];
      for (int l = 0; l < W; ++l) {
        const T* lo = t + static_cast<int64_t>(idx[i + l]) * W;
        const T* hi = t + static_cast<int64_t>(idx[i + W + l]) * W;
        v[l] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo))),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi)), 1);
      }
      simd::transpose_16x16_epi16_pairs(v);
      for (int k = 0; k < W; ++k) _mm512_storeu_si512(out + k * d + i, v[k]);
    }
  }
#endif
  for (; i + W <= d; i += W) {
    typename Tile<T>::Column v[W];
    for (int l = 0; l < W; ++l) v[l] = simd::load_bits<typename Tile<T>::Column>(t + static_cast<int64_t>(idx[i + l]) * W);
    simd::transpose_rows(v);
    for (int k = 0; k < W; ++k) simd::store_bits(out + k * d + i, v[k]);
  }
  for (; i < d; ++i) {
    for (int k = 0; k < W; ++k) out[k * d + i] = t[static_cast<int64_t>(idx[i]) * W + k];
  }
}

// Rows per chunk: about kChunk elements, a whole number of tiles (W divides 16); one row
// when rows are wider than kMaxTileColumns (no tiles).
int64_t chunk_rows(int64_t d) {
  constexpr int64_t kTileRows = simd::Simd<float>::W;
  if (d > kMaxTileColumns) return 1;
  return (std::max<int64_t>(1, kChunk / std::max<int64_t>(d, 1)) + kTileRows - 1) / kTileRows * kTileRows;
}

// The permuted rows of a (rows, d) matrix of T, q[r][i] = p[r][idx[i]]: either read from
// `permuted`, a copy made up front (rows wider than kMaxTileColumns), or made in a buffer,
// one object per thread: row by row in registers (RegisterPermute, short rows, AVX-512) or
// tile by tile (see load_tile).
template <typename T>
class PermutedRows {
 public:
  PermutedRows(const T* p, int64_t stride, const int32_t* idx, int64_t d, const T* permuted)
      : p_(p), stride_(stride), idx_(idx), d_(d), permuted_(permuted) {
    if (permuted_ != nullptr) return;
    const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
#if defined(__AVX512BW__)
    if (RegisterPermute<T>::takes(d)) {
      registers_.emplace(idx, d);
      buffers_ = at::empty({RegisterPermute<T>::kRows * d}, options);
      return;
    }
#endif
    // 64-byte aligned tile buffers: whole-line column loads and stores
    tile_stride_ = (d * Tile<T>::W * sizeof(T) + 63) / 64 * 64 / sizeof(T);
    buffers_ = at::empty({2 * tile_stride_}, options);
  }

  // fn(r, n, q) for consecutive tiles of n rows covering [begin, end), in order: q[k * d + i]
  // = p[r + k][idx[i]] for k < n. Rows permuted in registers come two at a time
  // (RegisterPermute::kRows): each row of p is then read just before fn reads and writes
  // the same row of its other operands, as the identity's kernels do (permuted 16 rows
  // ahead of them, the float32 16 x 197 x 192 forward was no faster than with the tiled
  // transposes).
  template <typename Fn>
  void for_tiles(int64_t begin, int64_t end, Fn&& fn) {
    constexpr int64_t W = Tile<T>::W;
    if (permuted_ != nullptr) {
      for (int64_t r = begin; r < end; r += W) fn(r, std::min(W, end - r), permuted_ + r * d_);
      return;
    }
    T* t = buffers_.mutable_data_ptr<T>();
#if defined(__AVX512BW__)
    if (registers_.has_value()) {
      for (int64_t r = begin; r < end; r += RegisterPermute<T>::kRows) {
        const int64_t n = std::min<int64_t>(RegisterPermute<T>::kRows, end - r);
        (*registers_)(p_ + r * stride_, stride_, n, t);
        fn(r, n, static_cast<const T*>(t));
      }
      return;
    }
#endif
    T* q = t + tile_stride_;
    for (int64_t r = begin; r < end; r += W) {
      const int64_t n = std::min(W, end - r);
      load_tile(p_ + r * stride_, stride_, d_, n, t);
      permute_tile(t, idx_, d_, q);
      fn(r, n, static_cast<const T*>(q));
    }
  }

 private:
  const T* p_;
  int64_t stride_;
  const int32_t* idx_;
  int64_t d_;
  const T* permuted_;
  int64_t tile_stride_ = 0;
  at::Tensor buffers_;
#if defined(__AVX512BW__)
  std::optional<RegisterPermute<T>> registers_;
#endif
};

// The rows of r permuted through `index` by ATen (contiguous), where rows are wider than
// kMaxTileColumns; else undefined.
at::Tensor permuted_copy(const Rows& r, const at::Tensor& index) {
  if (r.cols <= kMaxTileColumns) return at::Tensor();
  return r.t.as_strided({r.rows, r.cols}, {r.stride, 1}).index_select(1, index).contiguous();
}

// Features first, the rows of S positions are read in the permutation's order, one jump
// each. Rows of up to kPrefetchedRowBytes are over before the hardware prefetchers have
// followed them, so the kernels request the next row's lines while they work on the
// current one (the bfloat16 forward on 32 x 256 x 28 x 28 and the float32 one on
// 32 x 512 x 14 x 14 about 12-20 % faster in A/Bs on AMD Zen 4; rows of 3 KB and more no
// faster).
constexpr int64_t kPrefetchedRowBytes = 2048;

// Rows last, the operand read row by row beside the permuted one (the branch in the
// forward, x in the backward with dalpha) is requested into L2 kRowsAheadBytes ahead of its
// reads: its in-order stream otherwise waited on memory behind the tiles' W streams. A/Bs
// on AMD Zen 4, two threads: forward bfloat16 8192 x 1024 and 64 x 197 x 768, float32
// 8192 x 1024, 9-13 % faster, float32 64 x 197 x 768 7 %; backward (dx and dalpha)
// bfloat16 8192 x 1024 and float32 64 x 197 x 768 6-7 %; 16 x 197 x 192, in cache, the same.
constexpr int64_t kRowsAheadBytes = 16384;

template <typename T>
int64_t rows_ahead(int64_t d) {
  return std::max<int64_t>(1, kRowsAheadBytes / std::max<int64_t>(1, d * static_cast<int64_t>(sizeof(T))));
}

// Every cache line of the row p[0 .. n - 1], with __builtin_prefetch's locality (3: into
// L1, 2: into L2).
template <int LOCALITY = 3, typename T>
void prefetch_row(const T* p, int64_t n) {
  for (int64_t c = 0; c < n; c += 64 / sizeof(T)) __builtin_prefetch(p + c, 0, LOCALITY);
}

// x (N, D, S) read in place where its last dim is contiguous (else copied).
at::Tensor features_first_operand(const at::Tensor& t) {
  return t.stride(2) == 1 || t.size(2) <= 1 ? t : t.contiguous();
}

// Rows per chunk of a features-first map: about kChunk elements, rows of S positions.
int64_t features_first_chunk_rows(int64_t s) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(s, 1)); }

void check_features_first(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "a features-first x must be (N, D, S), got shape ", x.sizes());
}

// Features first, x (N, D, S): each (n, i) row of S positions is row index[i] of image n,
// read in order, so the identity's segment kernel runs on it directly (no tiles).
at::Tensor features_first_forward(const at::Tensor& x_in, const std::vector<int32_t>& idx, double a,
                                  const c10::optional<at::Tensor>& branch) {
  at::Tensor y = at::empty(x_in.sizes(), x_in.options().memory_format(at::MemoryFormat::Contiguous));
  if (x_in.numel() == 0) return y;
  const at::Tensor x = features_first_operand(x_in);
  const at::Tensor b = branch.has_value() ? features_first_operand(*branch) : at::Tensor();
  const int64_t d = x.size(1), s = x.size(2), rows = x.size(0) * d, per = features_first_chunk_rows(s);
  AT_DISPATCH_V2(x.scalar_type(), "entskip_permutation_skip_add_features_first_cpu", AT_WRAP([&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* bp = b.defined() ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const bool short_rows = s * static_cast<int64_t>(sizeof(scalar_t)) <= kPrefetchedRowBytes;
    const auto source = [&](int64_t q) { return xp + q / d * x.stride(0) + idx[q % d] * x.stride(1); };
    const int64_t items = (rows + per - 1) / per;
    parallel_for_stores(streams<scalar_t>(y.numel(), s), items, [&](int64_t begin, int64_t end, auto stream) {
      const int64_t last = std::min(end * per, rows);
      for (int64_t q = begin * per; q < last; ++q) {
        const int64_t n = q / d, i = q % d;
        const scalar_t* xq = source(q);
        if (short_rows && q + 1 < last) prefetch_row(source(q + 1), s);
        if (bp != nullptr) {
          forward_segment<true, stream>(xq, bp + n * b.stride(0) + i * b.stride(1), yp + q * s, s, static_cast<A>(a));
        } else {
          forward_segment<false, stream>(xq, bp, yp + q * s, s, static_cast<A>(a));
        }
      }
    });
  }), at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  return y;
}

at::Tensor permutation_skip_add(const at::Tensor& x, const at::Tensor& index, const at::Tensor& inverse,
                                const at::Tensor& alpha, const c10::optional<at::Tensor>& branch, bool features_first) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (the features)");
  if (features_first) check_features_first(x);
  check_alpha(alpha, x);
  if (branch.has_value()) check_like(*branch, x, "branch");
  const std::vector<int32_t> idx = checked_permutation(index, inverse, x, x.size(features_first ? 1 : -1), index);
  const double a = alpha_value(alpha);
  if (features_first) return features_first_forward(x, idx, a, branch);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const Rows xr = as_rows(x);
  const Rows br = branch.has_value() ? as_rows(*branch) : xr;
  const int64_t d = xr.cols, rows = xr.rows, per = chunk_rows(d);
  const at::Tensor permuted = permuted_copy(xr, index);
  AT_DISPATCH_V2(x.scalar_type(), "entskip_permutation_skip_add_cpu", AT_WRAP([&] {
    using A = acc_type<scalar_t>;
    const int64_t ahead = rows_ahead<scalar_t>(d);
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* bp = branch.has_value() ? br.t.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pp = permuted.defined() ? permuted.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t items = (rows + per - 1) / per;
    parallel_for_stores(streams<scalar_t>(y.numel(), d), items, [&](int64_t begin, int64_t end, auto stream) {
      PermutedRows<scalar_t>(xp, xr.stride, idx.data(), d, pp).for_tiles(begin * per, std::min(end * per, rows),
                                                                        [&](int64_t r, int64_t n, const scalar_t* q) {
        for (int64_t k = 0; k < n; ++k) {
          if (bp != nullptr) {
            if (r + k + ahead < rows) prefetch_row<2>(bp + (r + k + ahead) * br.stride, d);
            forward_segment<true, stream>(q + k * d, bp + (r + k) * br.stride, yp + (r + k) * d, d, static_cast<A>(a));
          } else {
            forward_segment<false, stream>(q + k * d, bp, yp + (r + k) * d, d, static_cast<A>(a));
          }
        }
      });
    });
  }), at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  return y;
}

// Chunks of `per` rows (chunk_rows), chunk c adding partials[c].
template <bool DX, bool DA, typename T>
void backward_kernel(const Rows& gr, const Rows& xr, const int32_t* inv, const at::Tensor& permuted, int64_t per,
                     T* dxp, double a, std::vector<double>& partials) {
  using A = acc_type<T>;
  const int64_t d = gr.cols, rows = gr.rows;
  const T* gp = gr.t.const_data_ptr<T>();
  const T* xp = xr.t.const_data_ptr<T>();
  const T* pp = permuted.defined() ? permuted.const_data_ptr<T>() : nullptr;
  const int64_t items = (rows + per - 1) / per, ahead = rows_ahead<T>(d);
  parallel_for_stores(DX && streams<T>(rows * d, d), items, [&](int64_t begin, int64_t end, auto stream) {
    PermutedRows<T> permuted_rows(gp, gr.stride, inv, d, pp);
    for (int64_t c = begin; c < end; ++c) {  // chunk c: one term of dalpha
      simd::Vec<A> acc[2] = {};
      A tail = 0;
      permuted_rows.for_tiles(c * per, std::min((c + 1) * per, rows), [&](int64_t r, int64_t n, const T* q) {
        for (int64_t k = 0; k < n; ++k) {
          if (DA && r + k + ahead < rows) prefetch_row<2>(xp + (r + k + ahead) * xr.stride, d);
          backward_segment<DX, DA, stream>(q + k * d, xp + (r + k) * xr.stride, DX ? dxp + (r + k) * d : nullptr, d,
                                           static_cast<A>(a), acc, tail);
        }
      });
      if constexpr (DA) partials[c] = lane_sum<A>(acc[0] + acc[1]) + static_cast<double>(tail);
    }
  });
}

// Features first: dx[n, j, :] = a * g[n, inv[j], :] and g[n, inv[j], :] . x[n, j, :] into
// dalpha, row by row, chunks of `per` rows (features_first_chunk_rows) adding partials[c].
template <bool DX, bool DA, typename T>
void features_first_backward(const at::Tensor& g, const at::Tensor& x, const int32_t* inv, int64_t per, T* dxp,
                             double a, std::vector<double>& partials) {
  using A = acc_type<T>;
  const int64_t d = g.size(1), s = g.size(2), rows = g.size(0) * d;
  const T* gp = g.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  const bool short_rows = s * static_cast<int64_t>(sizeof(T)) <= kPrefetchedRowBytes;
  const auto source = [&](int64_t q) { return gp + q / d * g.stride(0) + inv[q % d] * g.stride(1); };
  const int64_t items = (rows + per - 1) / per;
  parallel_for_stores(DX && streams<T>(rows * s, s), items, [&](int64_t begin, int64_t end, auto stream) {
    for (int64_t c = begin; c < end; ++c) {
      simd::Vec<A> acc[2] = {};
      A tail = 0;
      const int64_t last = std::min((c + 1) * per, rows);
      for (int64_t q = c * per; q < last; ++q) {
        const int64_t n = q / d, j = q % d;
        if (short_rows && q + 1 < last) prefetch_row(source(q + 1), s);
        backward_segment<DX, DA, stream>(source(q), xp + n * x.stride(0) + j * x.stride(1),
                                         DX ? dxp + q * s : nullptr, s, static_cast<A>(a), acc, tail);
      }
      if constexpr (DA) partials[c] = lane_sum<A>(acc[0] + acc[1]) + static_cast<double>(tail);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> permutation_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& index, const at::Tensor& inverse,
                                                                 const at::Tensor& alpha,
                                                                 std::array<bool, 2> output_mask,
                                                                 bool features_first) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (the features)");
  if (features_first) check_features_first(x);
  check_alpha(alpha, x);
  check_like(grad, x, "grad");
  const std::vector<int32_t> inv = checked_permutation(index, inverse, x, x.size(features_first ? 1 : -1), inverse);
  const double a = alpha_value(alpha);
  if (features_first) {
    const int64_t rows = x.size(0) * x.size(1), per = features_first_chunk_rows(x.size(2));
    return elementwise::backward(x, alpha, output_mask, (rows + per - 1) / per,
                                 [&](auto* dxp, auto& partials, auto dx, auto da) {
      const at::Tensor g = features_first_operand(grad);
      const at::Tensor xf = da ? features_first_operand(x) : g;  // x is read only for dalpha
      features_first_backward<decltype(dx)::value, decltype(da)::value>(g, xf, inv.data(), per, dxp, a, partials);
    });
  }
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d, per = chunk_rows(d);
  return elementwise::backward(x, alpha, output_mask, (rows + per - 1) / per,
                               [&](auto* dxp, auto& partials, auto dx, auto da) {
    const Rows gr = as_rows(grad);
    const Rows xr = da ? as_rows(x) : gr;  // x is read only for dalpha
    backward_kernel<decltype(dx)::value, decltype(da)::value>(gr, xr, inv.data(), permuted_copy(gr, inverse), per,
                                                              dxp, a, partials);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CPU, m) {
  m.impl("permutation_skip_add", &permutation_skip_add);
  m.impl("permutation_skip_add_backward", &permutation_skip_add_backward);
}

}  // namespace entskip::cpu
