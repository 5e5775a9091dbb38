// Helpers shared by the CPU kernels of csrc/cpu/.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace entskip::cpu {

// alpha as a finite double; a NaN or Inf skip weight is an error, never silently propagated.
inline double alpha_value(const at::Tensor& alpha) {
  TORCH_CHECK(alpha.device().is_cpu(), "alpha must be on the CPU for the CPU kernels, got ", alpha.device());
  const double a = alpha.item<double>();
  TORCH_CHECK(std::isfinite(a), "alpha must be finite, got ", a);
  return a;
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor for the CPU kernels, got ", t.device());
  TORCH_CHECK(t.layout() == at::kStrided, name, " must be a strided (dense) tensor, got layout ", t.layout());
}

// Maps the pages of [p, p + bytes) writable before a kernel writes them. A fresh large
// tensor comes from mmap, and its first write takes one trapped page fault per 4 KiB page;
// MADV_POPULATE_WRITE (Linux 5.14) maps a whole range in one call at a fraction of that
// cost, without touching the contents. Kernels call it per work item, so threads share the
// work. Best effort: a no-op where unsupported or for small ranges.
inline void prefault_for_write(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  constexpr int64_t kMinBytes = 64 * 1024;
  if (bytes < kMinBytes) return;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  madvise(reinterpret_cast<void*>(first), reinterpret_cast<uintptr_t>(p) + bytes - first, MADV_POPULATE_WRITE);
#else
  (void)p;
  (void)bytes;
#endif
}

// at::empty(sizes, options) with its pages mapped by prefault_for_write, in parallel
// chunks: for outputs that a BLAS call, not an entskip kernel, writes.
inline at::Tensor empty_prefaulted(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  constexpr int64_t kChunk = int64_t{1} << 21;
  char* const p = static_cast<char*>(t.data_ptr());
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  at::parallel_for(0, (bytes + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
    prefault_for_write(p + begin * kChunk, std::min(bytes, end * kChunk) - begin * kChunk);
  });
  return t;
}

// <s, m> in float64, returned with alpha's dtype and shape: dalpha = <grad^T @ x, M>.
at::Tensor alpha_grad(const at::Tensor& s, const at::Tensor& m, const at::Tensor& alpha);

}  // namespace entskip::cpu
