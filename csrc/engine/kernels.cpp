#include "engine/kernels.h"

#include <string>

#include "engine/cpu_features.h"

namespace gpt2s {

// One table per compiled ISA (kernels_isa.cpp); the x86 SIMD ones only on x86 builds, NEON only
// on AArch64 builds.
namespace scalar { extern const Kernels table; }
#if defined(GPT2S_X86_KERNELS)
namespace avx2 { extern const Kernels table; }
namespace avx512 { extern const Kernels table; }
namespace avx512bf16 { extern const Kernels table; }
#endif
#if defined(GPT2S_ARM_KERNELS)
namespace neon { extern const Kernels table; }
namespace neondot { extern const Kernels table; }
#endif

ScreenMatrix screen_matrix(void* panels, float* arrays, int64_t N, int64_t K, int64_t panel) {
  const int64_t padded = (N + panel - 1) / panel * panel;
  return ScreenMatrix{panels, arrays, reinterpret_cast<const int32_t*>(arrays + padded), arrays + 2 * padded, arrays + 3 * padded,
                      0, N, K};
}

const Kernels& best_kernels() {
  const std::string isa = best_isa();
#if defined(GPT2S_X86_KERNELS)
  // Every CPU with AVX512-BF16 so far also has AVX512-VNNI (the screened head's int8 products;
  // AVX2 and NEON with sdot have theirs too: simd.h, GPT2S_INT8_DOT).
  if (isa == "avx512") return cpu_features().avx512bf16 && cpu_features().avx512vnni ? avx512bf16::table : avx512::table;
  if (isa == "avx2") return avx2::table;
#endif
#if defined(GPT2S_ARM_KERNELS)
  if (isa == "neon") return cpu_features().asimddp ? neondot::table : neon::table;
#endif
  return scalar::table;
}

}  // namespace gpt2s
