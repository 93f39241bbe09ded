#include "engine/cpu_features.h"

#include <cstdlib>
#include <cstring>

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#endif

namespace gpt2s {

namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
  f.f16c = __builtin_cpu_supports("f16c");
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
#elif defined(__aarch64__) && defined(__linux__)
  // The bits of the Linux arm64 ABI (asm/hwcap.h), spelled out: older libc headers lack HWCAP2_BF16.
  const unsigned long hwcap = getauxval(AT_HWCAP), hwcap2 = getauxval(AT_HWCAP2);
  f.asimd = (hwcap & (1ul << 1)) != 0;     // HWCAP_ASIMD
  f.asimddp = (hwcap & (1ul << 20)) != 0;  // HWCAP_ASIMDDP
  f.bf16 = (hwcap2 & (1ul << 14)) != 0;    // HWCAP2_BF16
#elif defined(__aarch64__)
  f.asimd = true;  // Advanced SIMD is part of every AArch64 CPU
#endif
  // Lower the reported level on request (tests of the fallback paths, or a misbehaving CPU).
  const char* cap = std::getenv("GPT2S_ISA");
  if (cap != nullptr) {
    if (std::strcmp(cap, "neon") == 0) {
      f.asimddp = f.bf16 = false;  // "neon": Advanced SIMD alone (no sdot, so no screened head)
    }
    if (std::strcmp(cap, "avx512") == 0 || std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0) {
      f.avx512bf16 = f.avx512vnni = false;  // "avx512": AVX-512 without BF16 (the emulated bf16 dot-product path)
    }
    if (std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0) {
      f.avx512f = f.avx512bw = f.avx512vl = false;
    }
    if (std::strcmp(cap, "scalar") == 0) {
      f.avx2 = f.fma = f.f16c = false;
      f.asimd = f.asimddp = f.bf16 = false;
    }
  }
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

std::string best_isa() {
  const CpuFeatures& f = cpu_features();
  if (f.avx512f && f.avx512bw && f.avx512vl && f.fma) return "avx512";
  if (f.avx2 && f.fma && f.f16c) return "avx2";
  if (f.asimd) return "neon";
  return "scalar";
}

}  // namespace gpt2s
