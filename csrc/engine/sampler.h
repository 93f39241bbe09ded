// The CPU sampler: one draw from one row of logits, exactly as docs/sampling.md defines it (the
// numpy reference is python/gpt_2_simple/sampling.py). A pure function of its inputs; the scratch
// only saves allocations.
#pragma once

#include <cstdint>
#include <vector>

#include "engine/backend.h"
#include "engine/kernels.h"

namespace gpt2s {

struct SamplerScratch {
  std::vector<float> x;         // (V) gathered logits of the kept tokens
  std::vector<float> w;         // (V) their weights
  std::vector<int32_t> ids;     // (V) their ids, ascending
  std::vector<uint16_t> bucket; // (V) top-p probability bucket of each kept token
  std::vector<double> mass;     // (buckets) weight per bucket
  std::vector<int32_t> members; // kept tokens of the bucket where top-p's mass is reached
};

// Draw a token from logits (V) with parameters p and the uniform number u in [0, 1).
int32_t sample_token(const float* logits, int64_t V, const SamplingParams& p, double u, const Kernels& kernels,
                     SamplerScratch& scratch);

}  // namespace gpt2s
