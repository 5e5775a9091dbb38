// CPU implementation of the identity skip-add, y = alpha * x + branch, and its backward
// dx = alpha * grad, dalpha = sum(grad * x) (schemas in csrc/ops.cpp), each in one pass over
// memory: x and branch read where they lie (rows with a row stride), y written once, and
// dx and dalpha from the same read of grad and x. The flattened problem is cut into fixed
// chunks of elementwise::kChunk elements, the work items that the threads claim
// (elementwise::parallel_for_stores) and the terms of dalpha's sum (float32 accumulation,
// float64 for float64): its bits depend neither on the number of threads nor on which
// thread computes which chunk.
#include <ATen/Dispatch_v2.h>
#include <torch/library.h>

#include "elementwise_skip.h"

namespace entskip::cpu {
namespace {

using namespace elementwise;

// fn(row, col, len) for the row segments of the flat range [begin, end) of a (rows, cols) matrix.
template <typename Fn>
inline void for_segments(int64_t begin, int64_t end, int64_t cols, Fn&& fn) {
  while (begin < end) {
    const int64_t row = begin / cols, col = begin % cols, len = std::min(cols - col, end - begin);
    fn(row, col, len);
    begin += len;
  }
}

int64_t chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

at::Tensor identity_skip_add(const at::Tensor& x, const at::Tensor& alpha, const c10::optional<at::Tensor>& branch) {
  check_floating(x, "x");
  check_alpha(alpha, x);
  if (branch.has_value()) check_like(*branch, x, "branch");
  const double a = alpha_value(alpha);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t total = x.numel();
  if (total == 0) return y;
  const Rows xr = as_rows(x);
  const Rows br = branch.has_value() ? as_rows(*branch) : xr;
  // Dense operands are one long row: segments end at chunk boundaries only.
  const bool flat = dense(xr) && dense(br);
  const int64_t cols = flat ? total : xr.cols;
  const int64_t xs = flat ? 0 : xr.stride, bs = flat ? 0 : br.stride;
  AT_DISPATCH_V2(x.scalar_type(), "entskip_identity_skip_add_cpu", AT_WRAP([&] {
    using A = acc_type<scalar_t>;
    const scalar_t* xp = xr.t.const_data_ptr<scalar_t>();
    const scalar_t* bp = branch.has_value() ? br.t.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    parallel_for_stores(streams<scalar_t>(total, cols), chunks(total), [&](int64_t begin, int64_t end, auto stream) {
      for_segments(begin * kChunk, std::min(end * kChunk, total), cols, [&](int64_t row, int64_t col, int64_t len) {
        const scalar_t* xi = xp + row * xs + col;
        scalar_t* yi = yp + row * cols + col;
        if (bp != nullptr) {
          forward_segment<true, stream>(xi, bp + row * bs + col, yi, len, static_cast<A>(a));
        } else {
          forward_segment<false, stream>(xi, static_cast<const scalar_t*>(nullptr), yi, len, static_cast<A>(a));
        }
      });
    });
  }), at::kFloat, at::kDouble, at::kBFloat16, at::kHalf);
  return y;
}

template <bool DX, bool DA, typename T>
void backward_kernel(const Rows& gr, const Rows& xr, T* dxp, double a, int64_t total, std::vector<double>& partials) {
  using A = acc_type<T>;
  const bool flat = dense(gr) && dense(xr);
  const int64_t cols = flat ? total : gr.cols;
  const int64_t gs = flat ? 0 : gr.stride, xs = flat ? 0 : xr.stride;
  const T* gp = gr.t.const_data_ptr<T>();
  const T* xp = xr.t.const_data_ptr<T>();
  parallel_for_stores(DX && streams<T>(total, cols), chunks(total), [&](int64_t begin, int64_t end, auto stream) {
    for (int64_t c = begin; c < end; ++c) {
      simd::Vec<A> acc[2] = {};
      A tail = 0;
      for_segments(c * kChunk, std::min((c + 1) * kChunk, total), cols, [&](int64_t row, int64_t col, int64_t len) {
        backward_segment<DX, DA, stream>(gp + row * gs + col, xp + row * xs + col,
                                         DX ? dxp + row * cols + col : nullptr, len, static_cast<A>(a), acc, tail);
      });
      if constexpr (DA) partials[c] = lane_sum<A>(acc[0] + acc[1]) + static_cast<double>(tail);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> identity_skip_add_backward(const at::Tensor& grad, const at::Tensor& x,
                                                              const at::Tensor& alpha, std::array<bool, 2> output_mask) {
  check_floating(x, "x");
  check_alpha(alpha, x);
  check_like(grad, x, "grad");
  const double a = alpha_value(alpha);
  const int64_t total = x.numel();
  return elementwise::backward(x, alpha, output_mask, chunks(total), [&](auto* dxp, auto& partials, auto dx, auto da) {
    const Rows gr = as_rows(grad);
    const Rows xr = da ? as_rows(x) : gr;  // x is read only for dalpha
    backward_kernel<decltype(dx)::value, decltype(da)::value>(gr, xr, dxp, a, total, partials);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(entskip, CPU, m) {
  m.impl("identity_skip_add", &identity_skip_add);
  m.impl("identity_skip_add_backward", &identity_skip_add_backward);
}

}  // namespace entskip::cpu
