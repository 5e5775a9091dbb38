// Whether the bfloat16 kernels may run on Intel AMX tiles (block_row_amx.h): the CPU has
// AMX-BF16 and Linux grants this process the tile state. Free of ATen, for csrc/ops.cpp.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 11)
#define ENTSKIP_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#define ENTSKIP_AMX 0
#endif

namespace entskip::cpu {

// Whether the CPU has AMX-BF16 and this process may use the tile registers: checked once
// (the permission request is process-wide). ENTSKIP_CPU_AMX="0" turns the AMX paths off
// (to compare them with the AVX-512 ones, or to test both on one machine), read per call.
inline bool amx_supported() {
#if ENTSKIP_AMX
  static const bool supported = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1u, bf16 = (edx >> 22) & 1u;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;  // from <asm/prctl.h>
    return tile && bf16 && syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  }();
  return supported;
#else
  return false;
#endif
}

inline bool amx_available() {
  const char* v = std::getenv("ENTSKIP_CPU_AMX");
  if (v != nullptr && v[0] != '\0' && std::strcmp(v, "1") != 0) {
    TORCH_CHECK(std::strcmp(v, "0") == 0, "ENTSKIP_CPU_AMX must be '0', '1' or empty, got '", v, "'");
    return false;
  }
  return amx_supported();
}

}  // namespace entskip::cpu
