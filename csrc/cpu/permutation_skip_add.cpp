// CPU implementation of the permutation skip-add, y[..., i] = alpha * x[..., index[i]] +
// branch[..., i], and its backward (schemas in csrc/ops.cpp), each one pass over memory:
//   forward   per tile of 16 (float64: 8) rows: permute the rows of x into a buffer
//             (for_permuted_tiles), then y = alpha * permuted + branch row by row, as the
//             identity skip does (elementwise::forward_segment);
//   backward  the same with grad and inverse: dx[j] = alpha * grad[inverse[j]] and
//             grad[inverse[j]] * x[j] added into dalpha (elementwise::backward_segment).
// Memory is read and written row by row, in order; only the tile buffers are read out of
// order.
// index and inverse are checked on every call (O(D)): in range and inverse[index[i]] = i,
// so a corrupted index raises instead of reading out of bounds. Rows are cut into fixed
// chunks of about elementwise::kChunk elements, the work items and the terms of dalpha's
// deterministic sum (see identity_skip_add.cpp).
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <limits>
#include <memory>

#include "elementwise_skip.h"

namespace entskip::cpu {
namespace {

using namespace elementwise;

// index and inverse as int32 (twice the lanes of an int64 gather), after checking that they
// are inverse permutations of 0..d-1.
std::vector<int32_t> checked_permutation(const at::Tensor& index, const at::Tensor& inverse, const at::Tensor& x,
                                         const at::Tensor& which) {
  const int64_t d = x.size(-1);
  check_cpu(index, "index");
  check_cpu(inverse, "inverse");
  check_index(index, "index", d, x);
  check_index(inverse, "inverse", d, x);
  TORCH_CHECK(d <= std::numeric_limits<int32_t>::max(), "the permutation skip takes at most 2^31 - 1 features");
  const int64_t* ip = index.const_data_ptr<int64_t>();
  const int64_t* vp = inverse.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < d; ++i) {
    const int64_t j = ip[i];
    TORCH_CHECK(j >= 0 && j < d, "index[", i, "] = ", j, " is out of range for ", d, " features");
    TORCH_CHECK(vp[j] == i, "inverse is not the inverse permutation of index: inverse[index[", i, "]] = ", vp[j]);
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
// output vector. The buffers (2 x W x d elements) stay in L1/L2; x is read and y, branch and
// dx are read or written row by row, in order. Rows beyond a tile's n valid ones repeat its
// last row (read, never used).
template <typename T>
struct Tile {
  static constexpr int W = simd::Simd<acc_type<T>>::W;
  using Lane = std::conditional_t<sizeof(T) == 8, uint64_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;
  typedef Lane Column __attribute__((vector_size(W * sizeof(T))));  // the bits of W elements
};

// t = the transpose of rows p[0], ..., p[n - 1] (row stride `stride`, d columns), d x W.
template <typename T>
void load_tile(const T* p, int64_t stride, int64_t d, int64_t n, T* t) {
  constexpr int W = Tile<T>::W;
  const T* row[W];
  for (int k = 0; k < W; ++k) row[k] = p + std::min<int64_t>(k, n - 1) * stride;
  int64_t c = 0;
  for (; c + W <= d; c += W) {
    typename Tile<T>::Column v[W];
    for (int k = 0; k < W; ++k) std::memcpy(&v[k], row[k] + c, sizeof(v[k]));
    simd::transpose_rows(v);
    for (int k = 0; k < W; ++k) std::memcpy(t + (c + k) * W, &v[k], sizeof(v[k]));
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
  for (; i + W <= d; i += W) {
    typename Tile<T>::Column v[W];
    for (int l = 0; l < W; ++l) std::memcpy(&v[l], t + static_cast<int64_t>(idx[i + l]) * W, sizeof(v[l]));
    simd::transpose_rows(v);
    for (int k = 0; k < W; ++k) std::memcpy(out + k * d + i, &v[k], sizeof(v[k]));
  }
  for (; i < d; ++i) {
    for (int k = 0; k < W; ++k) out[k * d + i] = t[static_cast<int64_t>(idx[i]) * W + k];
  }
}

// Rows per chunk: about kChunk elements, a whole number of tiles (of 16 or 8 rows).
int64_t chunk_rows(int64_t d) {
  constexpr int64_t kTiles = simd::Simd<float>::W;
  return (std::max<int64_t>(1, kChunk / std::max<int64_t>(d, 1)) + kTiles - 1) / kTiles * kTiles;
}

// The working memory of for_permuted_tiles for d columns (uninitialised).
template <typename T>
std::unique_ptr<T[]> tile_buffers(int64_t d) {
  return std::unique_ptr<T[]>(new T[2 * d * Tile<T>::W]);
}

// fn(r, n, q) for the tiles of rows [begin, end) of the (rows, d) matrix p (row stride
// `stride`), in order from begin: q holds rows r .. r + n - 1 permuted through idx, q[k * d
// + i] = p[r + k][idx[i]]. buf: tile_buffers<T>(d).
template <typename T, typename Fn>
void for_permuted_tiles(const T* p, int64_t stride, const int32_t* idx, int64_t d, int64_t begin, int64_t end,
                        T* buf, Fn&& fn) {
  constexpr int64_t W = Tile<T>::W;
  T *t = buf, *q = buf + d * W;
  for (int64_t r = begin; r < end; r += W) {
    const int64_t n = std::min(W, end - r);
    load_tile(p + r * stride, stride, d, n, t);
    permute_tile(t, idx, d, q);
    fn(r, n, static_cast<const T*>(q));
  }
}

at::Tensor permutation_skip_add(const at::Tensor& x, const at::Tensor& index, const at::Tensor& inverse,
                                const at::Tensor& alpha, const c10::optional<at::Tensor>& branch) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (the features)");
  check_alpha(alpha, x);
  if (branch.has_value()) check_like(*branch, x, "branch");
  const std::vector<int32_t> idx = checked_permutation(index, inverse, x, index);
  const double a = alpha_value(alpha);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return y;
  const Rows xr = as_rows(x);
  const Rows br = branch.has_value() ? as_rows(*branch) : xr;
  const int64_t d = xr.cols, rows = xr.rows;
  AT_DISPATCH_V2(x.scalar_type(), "entskip_permutation_skip_add_cpu", AT_WRAP([&] {
    using A = acc_type<scalar_t>;
    const int64_t per = chunk_rows(d);
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* bp = branch.has_value() ? br.t.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (rows + per - 1) / per, 1, [&](int64_t begin, int64_t end) {
      const auto buf = tile_buffers<scalar_t>(d);
      for_permuted_tiles(xp, xr.stride, idx.data(), d, begin * per, std::min(end * per, rows), buf.get(),
                         [&](int64_t r, int64_t n, const scalar_t* q) {
        for (int64_t k = 0; k < n; ++k) {
          if (bp != nullptr) {
            forward_segment<true>(q + k * d, bp + (r + k) * br.stride, yp + (r + k) * d, d, static_cast<A>(a));
          } else {
            forward_segment<false>(q + k * d, bp, yp + (r + k) * d, d, static_cast<A>(a));
          }
        }
      });
    });
  }), at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  return y;
}

template <bool DX, bool DA, typename T>
void backward_kernel(const Rows& gr, const Rows& xr, const int32_t* inv, T* dxp, double a,
                     std::vector<double>& partials) {
  using A = acc_type<T>;
  const int64_t d = gr.cols, rows = gr.rows, per = chunk_rows(d);
  const T* gp = gr.t.const_data_ptr<T>();
  const T* xp = xr.t.const_data_ptr<T>();
  at::parallel_for(0, (rows + per - 1) / per, 1, [&](int64_t begin, int64_t end) {
    const auto buf = tile_buffers<T>(d);
    for (int64_t c = begin; c < end; ++c) {  // chunk c: one term of dalpha
      simd::Vec<A> acc[2] = {};
      A tail = 0;
      for_permuted_tiles(gp, gr.stride, inv, d, c * per, std::min((c + 1) * per, rows), buf.get(),
                         [&](int64_t r, int64_t n, const T* q) {
        for (int64_t k = 0; k < n; ++k) {
          backward_segment<DX, DA>(q + k * d, xp + (r + k) * xr.stride, DX ? dxp + (r + k) * d : nullptr, d,
                                   static_cast<A>(a), acc, tail);
        }
      });
      if constexpr (DA) partials[c] = lane_sum<A>(acc[0] + acc[1]) + static_cast<double>(tail);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> permutation_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                                 const at::Tensor& index, const at::Tensor& inverse,
                                                                 const at::Tensor& alpha,
                                                                 std::array<bool, 2> output_mask) {
  check_floating(x, "x");
  TORCH_CHECK(x.dim() >= 1, "x must have at least one dimension (the features)");
  check_alpha(alpha, x);
  check_like(grad, x, "grad");
  const std::vector<int32_t> inv = checked_permutation(index, inverse, x, inverse);
  const double a = alpha_value(alpha);
  const int64_t d = x.size(-1), rows = d == 0 ? 0 : x.numel() / d, per = chunk_rows(d);
  return elementwise::backward(x, alpha, output_mask, (rows + per - 1) / per,
                               [&](auto* dxp, auto& partials, auto dx, auto da) {
    const Rows gr = as_rows(grad);
    const Rows xr = da ? as_rows(x) : gr;  // x is read only for dalpha
    backward_kernel<decltype(dx)::value, decltype(da)::value>(gr, xr, inv.data(), dxp, a, partials);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CPU, m) {
  m.impl("permutation_skip_add", &permutation_skip_add);
  m.impl("permutation_skip_add_backward", &permutation_skip_add_backward);
}

}  // namespace entskip::cpu
