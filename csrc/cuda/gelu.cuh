// The MLP's bias add and tanh-GELU, fused into one pass over c_fc's output.
#pragma once

#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"

namespace gpt2s::cuda {

// GPT-2's GELU: the tanh approximation (PyTorch's approximate="tanh", the checkpoints' training).
__device__ __forceinline__ float gelu_tanh(float x) {
  const float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  const float kKappa = 0.044715f;
  return 0.5f * x * (1.f + tanhf(kBeta * (x + kKappa * x * x * x)));
}

// out (N, F) in W = gelu(in (N, F) fp32 + bias (F)).
template <typename W>
__global__ void bias_gelu_kernel(W* __restrict__ out, const float* __restrict__ in, const float* __restrict__ bias,
                                 int64_t total, int F) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = from_float<W>(gelu_tanh(in[i] + bias[i % F]));
  }
}

template <typename W>
void bias_gelu(W* out, const float* in, const float* bias, int N, int F, cudaStream_t stream) {
  const int64_t total = int64_t(N) * F;
  if (total == 0) return;
  const int threads = 256;
  const int64_t blocks = (total + threads - 1) / threads;
  launch("bias_gelu", bias_gelu_kernel<W>, unsigned(blocks < 65536 ? blocks : 65536), threads, stream, out, in, bias,
         total, F);
}

}  // namespace gpt2s::cuda
