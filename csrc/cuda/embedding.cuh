// Token embedding plus positional embedding: the residual stream's first value.
#pragma once

#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"

namespace gpt2s::cuda {

// x (N, C) fp32 = wte[tokens[n]] + wpe[positions[n]]. The host has checked every id against V and
// every position against n_ctx before they reached the device.
template <typename W>
__global__ void embedding_kernel(float* __restrict__ x, const W* __restrict__ wte, const W* __restrict__ wpe,
                                 const int32_t* __restrict__ tokens, const int32_t* __restrict__ positions, int C) {
  const int64_t n = blockIdx.x;
  const W* te = wte + int64_t(tokens[n]) * C;
  const W* pe = wpe + int64_t(positions[n]) * C;
  float* out = x + n * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) out[c] = to_float(te[c]) + to_float(pe[c]);
}

template <typename W>
void embedding(float* x, const W* wte, const W* wpe, const int32_t* tokens, const int32_t* positions, int N, int C,
               cudaStream_t stream) {
  if (N == 0) return;
  launch("embedding", embedding_kernel<W>, N, 256, stream, x, wte, wpe, tokens, positions, C);
}

}  // namespace gpt2s::cuda
