// Element types on the device. Weights, KV cache and GEMM inputs use one storage type W (float,
// bf16 or fp16, chosen at load); the residual stream, GEMM outputs, LayerNorm and softmax math
// and the logits are always fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <library_types.h>

namespace gpt2s::cuda {

enum class DeviceDType { F32, BF16, F16 };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

// Round to nearest even, as PyTorch's .to(dtype) does.
template <typename W>
__device__ __forceinline__ W from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Eight bf16/fp16 or four fp32 values: one 16-byte load.
template <typename W>
struct alignas(16) Piece {
  static constexpr int kSize = 16 / sizeof(W);
  W v[kSize];
};

// out[0, kSize) = p[0, kSize) as fp32. p: 16-byte aligned (every matrix, activation and cache is
// 256-byte aligned, and the rows read this way hold a multiple of kSize values).
template <typename W>
__device__ __forceinline__ void load_piece(float* out, const W* p) {
  const Piece<W> piece = *reinterpret_cast<const Piece<W>*>(p);
  for (int j = 0; j < Piece<W>::kSize; ++j) out[j] = to_float(piece.v[j]);
}

template <typename W>
constexpr cudaDataType_t cuda_data_type();
template <>
constexpr cudaDataType_t cuda_data_type<float>() { return CUDA_R_32F; }
template <>
constexpr cudaDataType_t cuda_data_type<__nv_bfloat16>() { return CUDA_R_16BF; }
template <>
constexpr cudaDataType_t cuda_data_type<__half>() { return CUDA_R_16F; }

}  // namespace gpt2s::cuda
