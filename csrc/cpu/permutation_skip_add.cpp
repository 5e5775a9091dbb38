// CPU implementation of the permutation skip-add, y[..., i] = alpha * x[..., index[i]] +
// branch[..., i], and its backward (schemas in csrc/ops.cpp), each one pass over memory:
//   forward   per row: copy the row of x in order into an L1 buffer, widened to the
//             accumulation type (elementwise::for_widened_rows), gather from it through
//             index, read branch, write y;
//   backward  per row: the same with grad and inverse, write dx[j] = alpha * grad[inverse[j]],
//             and add grad[inverse[j]] * x[j] into dalpha: every read and write of memory is
//             in order, only the row's L1 copy is read out of order.
// index and inverse are checked on every call (O(D)): in range and inverse[index[i]] = i,
// so a corrupted index raises instead of reading out of bounds. Rows are cut into fixed
// chunks of about elementwise::kChunk elements, the work items and the terms of dalpha's
// deterministic sum (see identity_skip_add.cpp).
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include <limits>

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

template <bool HAS_BRANCH, typename T, typename A = acc_type<T>>
inline void forward_row(const A* x, const int32_t* idx, const T* b, T* y, int64_t d, A a) {
  constexpr int W = simd::Simd<A>::W;
  const simd::Vec<A> av = simd::broadcast(a);
  int64_t i = 0;
  for (; i + W <= d; i += W) {
    simd::Vec<A> v = av * gather(x, idx + i);
    if constexpr (HAS_BRANCH) v += load<A>(b + i);
    store<A>(y + i, v);
  }
  for (; i < d; ++i) {
    A v = a * x[idx[i]];
    if constexpr (HAS_BRANCH) v += static_cast<A>(b[i]);
    y[i] = static_cast<T>(v);
  }
}

template <bool DX, bool DA, typename T, typename A = acc_type<T>>
inline void backward_row(const A* g, const int32_t* inv, const T* x, T* dx, int64_t d, A a, simd::Vec<A>& acc,
                         A& tail) {
  constexpr int W = simd::Simd<A>::W;
  const simd::Vec<A> av = simd::broadcast(a);
  int64_t j = 0;
  for (; j + W <= d; j += W) {
    const simd::Vec<A> gv = gather(g, inv + j);
    if constexpr (DX) store<A>(dx + j, av * gv);
    if constexpr (DA) acc += gv * load<A>(x + j);
  }
  for (; j < d; ++j) {
    const A gj = g[inv[j]];
    if constexpr (DX) dx[j] = static_cast<T>(a * gj);
    if constexpr (DA) tail += gj * static_cast<A>(x[j]);
  }
}

// Rows per chunk: about kChunk elements, at least one row.
int64_t chunk_rows(int64_t d) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(d, 1)); }

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
  const int64_t d = xr.cols, rows = xr.rows, per = chunk_rows(d);
  AT_DISPATCH_V2(x.scalar_type(), "entskip_permutation_skip_add_cpu", AT_WRAP([&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* bp = branch.has_value() ? br.t.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, (rows + per - 1) / per, 1, [&](int64_t begin, int64_t end) {
      for_widened_rows<A>(xp, xr.stride, d, begin * per, std::min(end * per, rows), [&](int64_t r, const A* xrow) {
        if (bp != nullptr) {
          forward_row<true>(xrow, idx.data(), bp + r * br.stride, yp + r * d, d, static_cast<A>(a));
        } else {
          forward_row<false>(xrow, idx.data(), static_cast<const scalar_t*>(nullptr), yp + r * d, d, static_cast<A>(a));
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
    simd::Vec<A> acc = {};
    A tail = 0;
    const int64_t last = std::min(end * per, rows);
    for_widened_rows<A>(gp, gr.stride, d, begin * per, last, [&](int64_t r, const A* grow) {
      backward_row<DX, DA>(grow, inv, xp + r * xr.stride, DX ? dxp + r * d : nullptr, d, static_cast<A>(a), acc, tail);
      if (DA && (r % per == per - 1 || r + 1 == last)) {  // chunk r / per ends: its term of dalpha
        partials[r / per] = lane_sum<A>(acc) + static_cast<double>(tail);
        acc = simd::Vec<A>{};
        tail = 0;
      }
    });
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
