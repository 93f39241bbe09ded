// Warp and block reductions. Every thread of the block must call a block_* function (they contain
// __syncthreads), blockDim.x must be a multiple of 32, and each returns the result to every thread.
// Partial results are combined in a fixed order, so the result never depends on timing.
#pragma once

#include <cuda_runtime.h>

namespace gpt2s::cuda {

constexpr unsigned kFullWarp = 0xffffffffu;

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, const Op& op) {
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(kFullWarp, v, offset));
  return v;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  return warp_reduce(v, [](T a, T b) { return a + b; });
}

__device__ __forceinline__ float warp_max(float v) {
  return warp_reduce(v, [](float a, float b) { return fmaxf(a, b); });
}

// scratch: 32 values of shared memory, reused across calls.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* scratch, const Op& op) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // a previous call may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T total = scratch[0];
  for (int w = 1; w < n_warps; ++w) total = op(total, scratch[w]);
  return total;
}

template <typename T>
__device__ T block_sum(T v, T* scratch) {
  return block_reduce(v, scratch, [](T a, T b) { return a + b; });
}

__device__ inline float block_max(float v, float* scratch) {
  return block_reduce(v, scratch, [](float a, float b) { return fmaxf(a, b); });
}

}  // namespace gpt2s::cuda
