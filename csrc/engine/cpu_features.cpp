#include "engine/cpu_features.h"

#include <cstdlib>
#include <cstring>

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
#endif
  // Lower the reported level on request (tests of the fallback paths, or a misbehaving CPU).
  const char* cap = std::getenv("GPT2S_ISA");
  if (cap != nullptr) {
    if (std::strcmp(cap, "avx512") == 0 || std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0) {
      f.avx512bf16 = f.avx512vnni = false;  // "avx512": AVX-512 without BF16 (the emulated bf16 dot-product path)
    }
    if (std::strcmp(cap, "avx2") == 0 || std::strcmp(cap, "scalar") == 0) {
      f.avx512f = f.avx512bw = f.avx512vl = false;
    }
    if (std::strcmp(cap, "scalar") == 0) {
      f.avx2 = f.fma = f.f16c = false;
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
  return "scalar";
}

}  // namespace gpt2s
