// Shared plumbing of the elementwise skips (identity_skip_add.cpp, permutation_skip_add.cpp):
// tensors of any shape (..., D) seen as (rows, D) matrices read in place, the fixed work
// chunks, and the deterministic dalpha reduction.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

#include <vector>

#include "../checks.h"
#include "common.h"
#include "simd.h"

namespace entskip::cpu::elementwise {

// Elements per work item and per dalpha partial sum. Fixed, so the partials and their
// order depend on the shape only, never on the number of threads.
constexpr int64_t kChunk = 16384;

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

// A tensor (..., D) as a (rows, cols) matrix with unit column stride and row stride
// `stride`, read in place when its strides allow (a contiguous copy otherwise, kept in `t`).
struct Rows {
  at::Tensor t;
  int64_t rows, cols, stride;
};

inline Rows as_rows(const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "the elementwise skips take tensors with at least one dimension (the features)");
  const int64_t cols = t.size(-1);
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  const auto strides = at::detail::computeStride(t.sizes(), t.strides(), at::IntArrayRef{rows, cols});
  if (strides.has_value() && ((*strides)[1] == 1 || cols <= 1) && (*strides)[0] >= cols) {
    return {t, rows, cols, rows <= 1 ? cols : (*strides)[0]};
  }
  return {t.contiguous(), rows, cols, cols};
}

// Whether r covers one dense block of memory (its rows back to back).
inline bool dense(const Rows& r) { return r.stride == r.cols || r.rows <= 1; }

inline void check_floating(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  const auto st = t.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, name,
              " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  check_cpu(t, name);
  check_same(t, x, name, "x");
  TORCH_CHECK(t.sizes() == x.sizes(), name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
}

// sum(partials) in float64, in order, as a tensor of alpha's dtype and shape.
inline at::Tensor sum_partials(const std::vector<double>& partials, const at::Tensor& alpha) {
  double s = 0.0;
  for (const double p : partials) s += p;
  return at::scalar_tensor(s, alpha.options().dtype(at::kDouble)).to(alpha.scalar_type()).reshape(alpha.sizes());
}

// The lanes of an accumulator vector summed in a fixed order.
template <typename acc_t>
inline double lane_sum(const simd::Vec<acc_t>& v) {
  acc_t s = 0;
  for (int l = 0; l < simd::Simd<acc_t>::W; ++l) s += v[l];
  return static_cast<double>(s);
}

}  // namespace entskip::cpu::elementwise
