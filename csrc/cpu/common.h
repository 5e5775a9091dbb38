// Helpers shared by the CPU kernels of csrc/cpu/.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

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

// Large outputs are fresh memory from mmap, and the first write to each 4 KiB page takes
// a trapped page fault: for a 32 MiB output that costs more than the kernel's own memory
// traffic. Two remedies, both local to the output's own pages (no process-wide policy):
//  - advise_huge_pages asks for transparent huge pages (MADV_HUGEPAGE, honoured when the
//    system's THP mode is "madvise" or "always"): one fault per 2 MiB. It must come before
//    the first write; empty_output does it.
//  - prefault_for_write maps a range writable in one call (MADV_POPULATE_WRITE, Linux 5.14)
//    without touching its contents. Kernels call it per work item, so threads share the work.
// Both are best effort: no-ops where unsupported or for small ranges.
constexpr int64_t kHugePageBytes = int64_t{2} << 20;

// Outputs from this size on are written by non-temporal stores where their kernels stream
// (the block kernels' float32/float64 outputs, block_row_product.h; the elementwise skips'
// y and dx, elementwise_skip.h): fresh memory, not in any cache and larger than a core's
// L2, streamed in whole lines rather than read for ownership line by line and then written.
constexpr int64_t kStreamBytes = 2 * kHugePageBytes;

// madvise(advice) over the pages that hold [p, p + bytes), for ranges of at least min_bytes.
inline void advise_pages(void* p, int64_t bytes, int64_t min_bytes, int advice) {
#if defined(__linux__)
  if (bytes < min_bytes) return;
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = reinterpret_cast<uintptr_t>(p) & ~(page - 1);
  madvise(reinterpret_cast<void*>(first), reinterpret_cast<uintptr_t>(p) + bytes - first, advice);
#else
  (void)p, (void)bytes, (void)min_bytes, (void)advice;
#endif
}

inline void advise_huge_pages(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  advise_pages(p, bytes, 2 * kHugePageBytes, MADV_HUGEPAGE);  // smaller: no whole aligned huge page
#else
  (void)p, (void)bytes;
#endif
}

inline void prefault_for_write(void* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_POPULATE_WRITE)
  advise_pages(p, bytes, 64 * 1024, MADV_POPULATE_WRITE);
#else
  (void)p, (void)bytes;
#endif
}

// at::empty(sizes, options) for an output that an entskip kernel writes, with huge pages
// requested (advise_huge_pages) before anything touches it.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t.data_ptr(), static_cast<int64_t>(t.nbytes()));
  return t;
}

// empty_output with all its pages mapped by prefault_for_write, in parallel chunks: for
// outputs that a BLAS call, not an entskip kernel, writes.
inline at::Tensor empty_prefaulted(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = empty_output(sizes, options);
  char* const p = static_cast<char*>(t.data_ptr());
  const int64_t bytes = static_cast<int64_t>(t.nbytes());
  at::parallel_for(0, (bytes + kHugePageBytes - 1) / kHugePageBytes, 1, [&](int64_t begin, int64_t end) {
    prefault_for_write(p + begin * kHugePageBytes, std::min(bytes, end * kHugePageBytes) - begin * kHugePageBytes);
  });
  return t;
}

// A per-thread working buffer of n elements of T (trivial types), 64-byte aligned (ATen's
// CPU allocator aligns every allocation to 64 bytes): packed rows whose stride is whole
// lines then never split a vector or tile row across two cache lines, as they do in a
// std::vector, whose large allocations (glibc's mmap chunks) start 16 bytes into a page.
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t n)
      : bytes_(at::empty({std::max<int64_t>(n, 1) * static_cast<int64_t>(sizeof(T))}, at::TensorOptions().dtype(at::kByte))) {}
  T* data() { return reinterpret_cast<T*>(bytes_.mutable_data_ptr<uint8_t>()); }

 private:
  at::Tensor bytes_;
};

// Whether the bfloat16 kernels take their AVX512-BF16 paths where the build has them
// (entskip._C.avx512_bf16): yes, unless ENTSKIP_CPU_AVX512_BF16 is "0", which selects the
// widened float32 paths (to compare the two, or to test both on one machine).
inline bool use_avx512_bf16() {
  const char* v = std::getenv("ENTSKIP_CPU_AVX512_BF16");
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "1") == 0) return true;
  TORCH_CHECK(std::strcmp(v, "0") == 0, "ENTSKIP_CPU_AVX512_BF16 must be '0', '1' or empty, got '", v, "'");
  return false;
}

// <s, m> in float64, returned with alpha's dtype and shape: dalpha = <grad^T @ x, M>.
at::Tensor alpha_grad(const at::Tensor& s, const at::Tensor& m, const at::Tensor& alpha);

}  // namespace entskip::cpu
