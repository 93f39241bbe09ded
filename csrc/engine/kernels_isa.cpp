// The kernels compiled for one instruction set: CMakeLists.txt builds this file once per ISA with
// GPT2S_ISA=<name> and that ISA's compiler flags; kernels.cpp picks a table at run time.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "engine/kernels.h"

#ifndef GPT2S_ISA
#error "compile with -DGPT2S_ISA=<scalar|avx2|avx512|avx512bf16|neon|neondot>"
#endif
#define GPT2S_STR2(x) #x
#define GPT2S_STR(x) GPT2S_STR2(x)
#define GPT2S_ISA_NAME GPT2S_STR(GPT2S_ISA)

namespace gpt2s::GPT2S_ISA {
#include "engine/kernels_impl.h"
}  // namespace gpt2s::GPT2S_ISA
