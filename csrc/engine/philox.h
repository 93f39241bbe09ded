// The random number of one draw (docs/sampling.md): Philox4x32-10 keyed by (seed, sample_index,
// position). Header-only and free of host-only code so the CUDA engine compiles the same lines.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GPT2S_HD __host__ __device__ __forceinline__
#else
#define GPT2S_HD inline
#endif

namespace gpt2s {

struct Philox4 {
  uint32_t v[4];
};

// Philox4x32-10 (Salmon et al., SC'11): 10 rounds of two 32x32->64 multiplies, key bumped per round.
GPT2S_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t{0xD2511F53u} * ctr.v[0];
    const uint64_t p1 = uint64_t{0xCD9E8D57u} * ctr.v[2];
    ctr = Philox4{{uint32_t(p1 >> 32) ^ ctr.v[1] ^ k0, uint32_t(p1), uint32_t(p0 >> 32) ^ ctr.v[3] ^ k1, uint32_t(p0)}};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// Uniform double in [0, 1) with 53 random bits: counter (position, sample_index), key seed.
GPT2S_HD double draw_uniform(uint64_t seed, uint64_t sample_index, uint64_t position) {
  const Philox4 r = philox4x32_10(
      Philox4{{uint32_t(position), uint32_t(position >> 32), uint32_t(sample_index), uint32_t(sample_index >> 32)}},
      uint32_t(seed), uint32_t(seed >> 32));
  return (double(r.v[0] >> 5) * 67108864.0 + double(r.v[1] >> 6)) * (1.0 / 9007199254740992.0);
}

}  // namespace gpt2s
