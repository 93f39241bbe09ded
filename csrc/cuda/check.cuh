// Error checks for every CUDA runtime and cuBLAS call, and the one way kernels are launched: a
// failure becomes a CudaError (a C++ exception the binding turns into a Python RuntimeError) whose
// message names the call, the place and the library's own explanation. A bad launch configuration
// fails at the launch; a fault inside a kernel surfaces at the next synchronising call, which is
// checked the same way.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <utility>

namespace gpt2s::cuda {

class CudaError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* call, const char* file, int line) {
  std::string msg = std::string("CUDA error ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") in " +
                    call + " at " + file + ":" + std::to_string(line);
  if (err == cudaErrorMemoryAllocation) {
    msg += "; the GPU is out of memory: lower batch_size, or free memory held by other processes";
  } else if (err == cudaErrorInsufficientDriver || err == cudaErrorNoDevice) {
    msg += "; check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES";
  } else if (err == cudaErrorIllegalAddress || err == cudaErrorLaunchFailure || err == cudaErrorAssert) {
    msg += "; the GPU context is unusable now: restart the process";
  }
  throw CudaError(msg);
}

[[noreturn]] inline void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line) {
  std::string msg = std::string("cuBLAS error ") + cublasGetStatusName(status) + " (" + cublasGetStatusString(status) +
                    ") in " + call + " at " + file + ":" + std::to_string(line);
  if (status == CUBLAS_STATUS_ALLOC_FAILED) msg += "; the GPU is out of memory: lower batch_size";
  throw CudaError(msg);
}

// An internal invariant of the CUDA engine failed: a bug, never a user error.
[[noreturn]] inline void throw_internal(const std::string& what, const char* file, int line) {
  throw CudaError("internal error in the CUDA engine (" + what + ") at " + file + ":" + std::to_string(line) +
                  "; please report it");
}

}  // namespace gpt2s::cuda

#define CUDA_CHECK(call)                                                           \
  do {                                                                             \
    const cudaError_t gpt2s_err_ = (call);                                         \
    if (gpt2s_err_ != cudaSuccess) {                                               \
      ::gpt2s::cuda::throw_cuda_error(gpt2s_err_, #call, __FILE__, __LINE__);      \
    }                                                                              \
  } while (0)


#define CUBLAS_CHECK(call)                                                         \
  do {                                                                             \
    const cublasStatus_t gpt2s_status_ = (call);                                   \
    if (gpt2s_status_ != CUBLAS_STATUS_SUCCESS) {                                  \
      ::gpt2s::cuda::throw_cublas_error(gpt2s_status_, #call, __FILE__, __LINE__); \
    }                                                                              \
  } while (0)

#define GPT2S_CUDA_ASSERT(cond, what)                                               \
  do {                                                                             \
    if (!(cond)) ::gpt2s::cuda::throw_internal(what, __FILE__, __LINE__);          \
  } while (0)

namespace gpt2s::cuda {

// Launches kernel<<<grid, block, 0, stream>>>(args...) and checks the launch. Kernels use static
// shared memory only. (cudaLaunchKernelEx is a plain C++ call, which also lets the tests run these
// kernels on the CPU: tests/cuda_emulation.)
template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  const cudaError_t err = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (err != cudaSuccess) throw_cuda_error(err, name, __FILE__, __LINE__);
}

}  // namespace gpt2s::cuda
