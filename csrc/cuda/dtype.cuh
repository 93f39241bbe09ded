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

template <typename W>
constexpr cudaDataType_t cuda_data_type();
template <>
constexpr cudaDataType_t cuda_data_type<float>() { return CUDA_R_32F; }
template <>
constexpr cudaDataType_t cuda_data_type<__nv_bfloat16>() { return CUDA_R_16BF; }
template <>
constexpr cudaDataType_t cuda_data_type<__half>() { return CUDA_R_16F; }

}  // namespace gpt2s::cuda
