// Which SIMD instruction sets this CPU offers, read once at run time.
// Kernels are compiled for several ISAs in one binary and picked from this, so a wheel built on
// an AVX-512 machine still runs (on the AVX2 or scalar path) on an older x86-64.
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
};

// Detected once (thread-safe static); the environment variable GPT2S_ISA=scalar|avx2|avx512
// caps what is reported, so every kernel path can be tested on one machine (any cap turns off
// AVX512-BF16: "avx512" selects AVX-512 with emulated bf16 dot products).
const CpuFeatures& cpu_features();

// The best kernel family usable here: "avx512", "avx2" or "scalar" (after the GPT2S_ISA cap).
std::string best_isa();

}  // namespace gpt2s
