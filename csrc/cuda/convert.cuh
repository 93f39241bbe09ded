// Weight conversion at upload, when the device keeps another type than the file (e.g. an fp32 file
// run in bf16): element-wise, round to nearest even, with a flag for values the target type cannot
// hold (a finite weight that would become inf in fp16).
#pragma once

#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"

namespace gpt2s::cuda {

template <typename Src, typename Dst>
__global__ void convert_kernel(Dst* __restrict__ out, const Src* __restrict__ in, int64_t n, int* __restrict__ overflow) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const float x = to_float(in[i]);
    const Dst y = from_float<Dst>(x);
    if (isfinite(x) && !isfinite(to_float(y))) atomicExch(overflow, 1);
    out[i] = y;
  }
}

template <typename Src, typename Dst>
void convert(Dst* out, const Src* in, int64_t n, int* overflow, cudaStream_t stream) {
  if (n == 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  launch("convert", convert_kernel<Src, Dst>, unsigned(blocks < 65536 ? blocks : 65536), threads, stream, out, in, n,
         overflow);
}

}  // namespace gpt2s::cuda
