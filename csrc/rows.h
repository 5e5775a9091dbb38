// A tensor (..., D) with its features last as a (rows, D) matrix read in place: the view the
// elementwise skips' kernels (csrc/cpu/, csrc/cuda/) take, so that row-strided inputs
// (slices, transposes of leading dims) are not copied.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

namespace entskip {

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

}  // namespace entskip
