// Which SIMD instruction sets this CPU offers, read once at run time.
// Kernels are compiled for several ISAs in one binary and picked from this, so a wheel built on
// an AVX-512 machine still runs (on the AVX2 or scalar path) on an older x86-64, and an AArch64
// build reads the kernel's HWCAP bits the same way.
#pragma once

#include <string>

namespace gpt2s {

struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512bf16 = false;
  bool avx512vnni = false;
  // AArch64 (getauxval(AT_HWCAP), AT_HWCAP2): Advanced SIMD, its int8 dot product (sdot), bf16.
  bool asimd = false;
  bool asimddp = false;
  bool bf16 = false;
};

// Detected once (thread-safe static); the environment variable GPT2S_ISA=scalar|avx2|avx512
// (x86) or scalar|neon (AArch64) caps what is reported, so every kernel path can be tested on one
// machine (any cap turns off AVX512-BF16: "avx512" selects AVX-512 with emulated bf16 dot
// products; "neon" turns off the dot product and BF16 extensions).
const CpuFeatures& cpu_features();

// The best kernel family usable here: "avx512", "avx2", "neon" or "scalar" (after the GPT2S_ISA
// cap).
std::string best_isa();

}  // namespace gpt2s
