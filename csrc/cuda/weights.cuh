// The model's weights on the device, uploaded once from the memory-mapped file: matrices (and wte,
// wpe) in the storage type W, converted on the device when the file holds another type;
// LayerNorm parameters and biases in fp32.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "check.cuh"
#include "convert.cuh"
#include "engine/model.h"
#include "memory.cuh"

namespace gpt2s::cuda {

template <typename W>
struct DeviceLayer {
  const float *ln_1_w, *ln_1_b, *attn_c_attn_b, *attn_c_proj_b, *ln_2_w, *ln_2_b, *mlp_c_fc_b, *mlp_c_proj_b;
  const W *attn_c_attn_w, *attn_c_proj_w, *mlp_c_fc_w, *mlp_c_proj_w;
};

template <typename W>
class DeviceWeights {
 public:
  DeviceWeights(const ModelWeights& w, cudaStream_t stream) : stream_(stream), overflow_(sizeof(int)) {
    CUDA_CHECK(cudaMemsetAsync(overflow_.at<int>(), 0, sizeof(int), stream_));
    wte = matrix(w.wte);
    wpe = matrix(w.wpe);
    for (const LayerWeights& l : w.h) {
      h.push_back(DeviceLayer<W>{vec(l.ln_1_w), vec(l.ln_1_b), vec(l.attn_c_attn_b), vec(l.attn_c_proj_b),
                                 vec(l.ln_2_w), vec(l.ln_2_b), vec(l.mlp_c_fc_b), vec(l.mlp_c_proj_b),
                                 matrix(l.attn_c_attn_w), matrix(l.attn_c_proj_w), matrix(l.mlp_c_fc_w),
                                 matrix(l.mlp_c_proj_w)});
    }
    ln_f_w = vec(w.ln_f_w);
    ln_f_b = vec(w.ln_f_b);
    int overflow = 0;
    CUDA_CHECK(cudaMemcpyAsync(&overflow, overflow_.at<int>(), sizeof(int), cudaMemcpyDeviceToHost, stream_));
    CUDA_CHECK(cudaStreamSynchronize(stream_));  // also: every copy out of the mapping is done
    staging_ = DeviceMemory();
    if (overflow) {
      throw std::invalid_argument("the model's weights do not fit in fp16 (some exceed its range): use dtype 'bf16' or 'fp32'");
    }
  }

  const W* wte = nullptr;  // (V, C)
  const W* wpe = nullptr;  // (n_ctx, C)
  std::vector<DeviceLayer<W>> h;
  const float *ln_f_w = nullptr, *ln_f_b = nullptr;

 private:
  const float* vec(const TensorView& v) {
    GPT2S_CUDA_ASSERT(v.dtype == DType::F32, "LayerNorm parameters and biases must be fp32");
    const int64_t n = v.rows * v.cols;
    blocks_.emplace_back(n * sizeof(float));
    float* dst = blocks_.back().at<float>();
    CUDA_CHECK(cudaMemcpyAsync(dst, v.data, n * sizeof(float), cudaMemcpyHostToDevice, stream_));
    return dst;
  }

  // Copied as is when the file already holds W, else staged in the file's type and converted.
  const W* matrix(const TensorView& v) {
    const int64_t n = v.rows * v.cols;
    const size_t src_bytes = n * (v.dtype == DType::F32 ? sizeof(float) : sizeof(__nv_bfloat16));
    blocks_.emplace_back(n * sizeof(W));
    W* dst = blocks_.back().at<W>();
    const bool same = (v.dtype == DType::F32 && std::is_same<W, float>::value) ||
                      (v.dtype == DType::BF16 && std::is_same<W, __nv_bfloat16>::value);
    if (same) {
      CUDA_CHECK(cudaMemcpyAsync(dst, v.data, src_bytes, cudaMemcpyHostToDevice, stream_));
      return dst;
    }
    if (src_bytes > staging_bytes_) {
      CUDA_CHECK(cudaStreamSynchronize(stream_));  // the old staging buffer may still be read
      staging_ = DeviceMemory(src_bytes);
      staging_bytes_ = src_bytes;
    }
    // Stream order makes the next copy into staging wait for this conversion.
    CUDA_CHECK(cudaMemcpyAsync(staging_.at<void>(), v.data, src_bytes, cudaMemcpyHostToDevice, stream_));
    if (v.dtype == DType::F32) {
      convert<float, W>(dst, staging_.at<float>(), n, overflow_.at<int>(), stream_);
    } else {
      convert<__nv_bfloat16, W>(dst, staging_.at<__nv_bfloat16>(), n, overflow_.at<int>(), stream_);
    }
    return dst;
  }

  cudaStream_t stream_;
  std::vector<DeviceMemory> blocks_;
  DeviceMemory staging_;
  size_t staging_bytes_ = 0;
  DeviceMemory overflow_;
};

}  // namespace gpt2s::cuda
