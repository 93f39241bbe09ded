// Owners of CUDA objects for the CUDA backend (cuda_backend.cu), and Layout, which carves several
// arrays out of one allocation. Destructors never throw: a failure there is ignored (the process may
// be tearing down its context already).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <utility>

#include "check.cuh"

namespace gpt2s::cuda {

// One allocation of device memory (cudaMalloc) or of pinned host memory (cudaMallocHost).
template <cudaError_t (*Alloc)(void**, size_t), cudaError_t (*Free)(void*)>
class Memory {
 public:
  Memory() = default;
  explicit Memory(size_t bytes) {
    if (bytes > 0) CUDA_CHECK(Alloc(&ptr_, bytes));
  }
  ~Memory() { Free(ptr_); }
  Memory(Memory&& other) noexcept : ptr_(std::exchange(other.ptr_, nullptr)) {}
  Memory& operator=(Memory&& other) noexcept {
    std::swap(ptr_, other.ptr_);  // the old block goes with `other`
    return *this;
  }
  template <typename T>
  T* at(size_t offset = 0) const {
    return reinterpret_cast<T*>(static_cast<char*>(ptr_) + offset);
  }

 private:
  void* ptr_ = nullptr;
};
using DeviceMemory = Memory<cudaMalloc, cudaFree>;
using PinnedMemory = Memory<cudaMallocHost, cudaFreeHost>;

struct StreamDeleter {
  void operator()(cudaStream_t s) const { cudaStreamDestroy(s); }
};
using Stream = std::unique_ptr<CUstream_st, StreamDeleter>;
inline Stream make_stream() {
  cudaStream_t s = nullptr;
  CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  return Stream(s);
}

struct EventDeleter {
  void operator()(cudaEvent_t e) const { cudaEventDestroy(e); }
};
using Event = std::unique_ptr<CUevent_st, EventDeleter>;
inline Event make_event() {
  cudaEvent_t e = nullptr;
  CUDA_CHECK(cudaEventCreate(&e));
  return Event(e);
}

struct CublasDeleter {
  void operator()(cublasHandle_t h) const { cublasDestroy(h); }
};
using Cublas = std::unique_ptr<cublasContext, CublasDeleter>;

struct GraphDeleter {
  void operator()(cudaGraph_t g) const { cudaGraphDestroy(g); }
};
using Graph = std::unique_ptr<CUgraph_st, GraphDeleter>;

struct GraphExecDeleter {
  void operator()(cudaGraphExec_t g) const { cudaGraphExecDestroy(g); }
};
using GraphExec = std::unique_ptr<CUgraphExec_st, GraphExecDeleter>;

// Offsets of several arrays carved out of one allocation, each 256-byte aligned.
struct Layout {
  size_t total = 0;
  template <typename T>
  size_t add(int64_t count) {
    const size_t at = (total + 255) / 256 * 256;
    total = at + size_t(count) * sizeof(T);
    return at;
  }
};

}  // namespace gpt2s::cuda
