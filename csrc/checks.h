// Argument checks shared by every native backend of the entskip ops. They raise
// c10::Error (RuntimeError in Python) naming the offending argument, so a direct
// call of torch.ops.entskip.* with bad input fails cleanly instead of reading
// out of bounds. The Python layer checks first and more kindly; these are the
// last line of defence.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <vector>

namespace entskip {

// t is 2-D (or, with three_d, 2-D or 3-D) and of a floating dtype the kernels support.
inline void check_float_matrix(const at::Tensor& t, const char* name, bool three_d = false) {
  TORCH_CHECK(t.dim() == 2 || (three_d && t.dim() == 3), name,
              three_d ? " must be 2-D (rows, D) or 3-D (N, D, S), got shape " : " must be 2-D, got shape ", t.sizes());
  const auto st = t.scalar_type();
  TORCH_CHECK(
      st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf,
      name, " must be float32, float64, bfloat16 or float16, got ", st);
}

inline void check_same(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), " but ", ref_name,
              " has dtype ", ref.scalar_type());
}

inline void check_alpha(const at::Tensor& alpha, const at::Tensor& x) {
  TORCH_CHECK(alpha.numel() == 1 && alpha.dim() == 0, "alpha must be a 0-d tensor, got shape ", alpha.sizes());
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()), "alpha must be floating point, got ", alpha.scalar_type());
  TORCH_CHECK(alpha.device() == x.device(), "alpha is on ", alpha.device(), " but x is on ", x.device());
}

// x's shape with d features: (rows, d) for a 2-D x, (N, d, S) for a 3-D (features-first) one.
inline std::vector<int64_t> features_shape(const at::Tensor& x, int64_t d) {
  std::vector<int64_t> shape = x.sizes().vec();
  shape[1] = d;
  return shape;
}

// t (`name`) in x's format with d features (features_shape).
inline void check_like_x(const at::Tensor& t, const at::Tensor& x, int64_t d, const char* name) {
  check_same(t, x, name, "x");
  const std::vector<int64_t> expected = features_shape(x, d);
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), name, " must have shape ", at::IntArrayRef(expected),
              " (x's format with ", d, " features), got ", t.sizes());
}

inline void check_branch(const c10::optional<at::Tensor>& branch, const at::Tensor& x, int64_t d_out) {
  if (branch.has_value()) check_like_x(*branch, x, d_out, "branch");
}

inline void check_index(const at::Tensor& t, const char* name, int64_t numel, const at::Tensor& x) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == at::kLong, name, " must be a 1-D int64 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
  TORCH_CHECK(t.numel() == numel, name, " must have ", numel, " entries, got ", t.numel());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

// The first i < d at which index and inverse (d int64 entries each) fail to be inverse
// permutations of 0 .. d - 1 (index[i] out of range, or inverse[index[i]] != i); d if none.
inline int64_t first_unpaired(const int64_t* index, const int64_t* inverse, int64_t d) {
  for (int64_t i = 0; i < d; ++i) {
    if (index[i] < 0 || index[i] >= d || inverse[index[i]] != i) return i;
  }
  return d;
}

// Shapes of a BSR operand: values (nnzb, b, b); x has D_in = ncols * b features (dim 1);
// crow (nrows + 1), col (nnzb); ccol (ncols + 1), row (nnzb), perm (nnzb).
struct BsrShape {
  int64_t nnzb, block, nrows, ncols;
};

// x is (rows, D_in), or, with features_first (the CPU kernels), also (N, D_in, S).
inline BsrShape check_bsr(const at::Tensor& x, const at::Tensor& values, const at::Tensor& crow,
                          const at::Tensor& col, const at::Tensor& ccol, const at::Tensor& row,
                          const at::Tensor& perm, bool features_first = false) {
  check_float_matrix(x, "x", features_first);
  TORCH_CHECK(values.dim() == 3 && values.size(1) == values.size(2) && values.size(1) > 0,
              "values must have shape (nnzb, b, b), got ", values.sizes());
  check_same(values, x, "values", "x");
  BsrShape s{values.size(0), values.size(1), crow.numel() - 1, 0};
  TORCH_CHECK(x.size(1) % s.block == 0, "x has ", x.size(1), " features, not divisible by the block size ",
              s.block);
  s.ncols = x.size(1) / s.block;
  TORCH_CHECK(crow.dim() == 1 && crow.numel() >= 1, "crow_indices must be 1-D and non-empty");
  check_index(crow, "crow_indices", s.nrows + 1, x);
  check_index(col, "col_indices", s.nnzb, x);
  check_index(ccol, "ccol_indices", s.ncols + 1, x);
  check_index(row, "row_indices", s.nnzb, x);
  check_index(perm, "perm", s.nnzb, x);
  return s;
}

}  // namespace entskip
