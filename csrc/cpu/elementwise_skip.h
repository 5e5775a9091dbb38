// Shared plumbing of the elementwise skips (identity_skip_add.cpp, permutation_skip_add.cpp):
// tensors of any shape (..., D) seen as (rows, D) matrices read in place, the fixed work
// chunks, and the deterministic dalpha reduction.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../checks.h"
#include "../rows.h"
#include "common.h"
#include "simd.h"

namespace entskip::cpu::elementwise {

using entskip::Rows, entskip::as_rows, entskip::dense;

// Elements per work item and per dalpha partial sum. Fixed, so the partials and their
// order depend on the shape only, never on the number of threads.
constexpr int64_t kChunk = 16384;

template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, double>, double, float>;

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
