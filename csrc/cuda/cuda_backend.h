// The CUDA engine behind the scheduler's Backend interface (engine/backend.h), plus the device
// queries and sampler hooks the Python side needs. Plain C++: no CUDA header leaks out of here,
// so bindings.cpp compiles with the host compiler.
#pragma once

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/model.h"

namespace gpt2s::cuda {

// Whether CUDA can run here: the number of devices (at least one of compute capability 8.0 or
// newer), or 0 and the reason (no driver, an old driver, no GPU visible, only older GPUs). Never throws.
struct CudaStatus {
  int devices = 0;
  std::string reason;  // empty when devices > 0
};
CudaStatus cuda_status();

struct DeviceInfo {
  int index = 0;
  std::string name;
  int major = 0, minor = 0;  // compute capability
  int64_t total_bytes = 0, free_bytes = 0;
  int multiprocessors = 0;
};
DeviceInfo device_info(int device);

struct CudaOptions {
  int device = 0;
  // Type of the weights, KV cache and GEMM inputs on the device: "fp32", "bf16" or "fp16";
  // empty = the file's dtype.
  std::string dtype;
  // Capture each decode step's forward pass as a CUDA graph (per batch-size bucket) and replay it.
  bool graphs = true;
};

// Uploads the weights (converted to options.dtype) to the device. Throws std::invalid_argument
// for a bad option, CudaError (a std::runtime_error) for anything CUDA refuses.
std::unique_ptr<Backend> make_cuda_backend(const ModelWeights& weights, const CudaOptions& options);

// The GPU sampler on host data, for tests and benchmarks: logits (B, V) row-major, one parameter
// set and RNG position per row. Returns the drawn ids; with support, also the (B, V) kept-set
// mask (docs/sampling.md's support()).
struct SamplerRun {
  std::vector<int32_t> drawn;
  std::vector<uint8_t> support;
};
SamplerRun sample_on_device(int device, const std::vector<float>& logits, int B, int V,
                            const std::vector<SamplingParams>& params, const std::vector<uint64_t>& positions,
                            bool want_support);

// Device time of one sampler launch over B rows of the given logits (uploaded once), in
// microseconds: the median of `iters` launches timed with CUDA events after warm-up.
double time_sampler_us(int device, const std::vector<float>& logits, int B, int V,
                       const std::vector<SamplingParams>& params, int iters);

}  // namespace gpt2s::cuda
