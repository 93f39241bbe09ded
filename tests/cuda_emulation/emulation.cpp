// CUDA emulation for tests (see README.md): the runtime, cuBLAS and block execution behind the
// headers in include/. One emulated device. Kernels run when launched (or when their captured
// graph is launched); the blocks of a grid run one after another, and the threads of a block run
// as cooperative fibers on the calling thread, switching at __syncthreads and at warp operations.
// Mistakes a GPU would punish are made loud: a barrier some threads never reach, blockDim not a
// multiple of 32, synchronising or allocating while capturing, a GEMM with an impossible leading
// dimension, and (with the reverse order) a read of shared memory missing its barrier.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "cublas_v2.h"
#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "cuda_runtime.h"

thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct CUstream_st {
  bool capturing = false;
  std::vector<std::function<void()>> captured;
};
struct CUevent_st {
  std::chrono::steady_clock::time_point when{};
};
struct CUgraph_st {
  std::vector<std::function<void()>> ops;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> ops;
};
struct cublasContext {
  cudaStream_t stream = nullptr;
};

namespace gpt2s_emulation {
namespace {

[[noreturn]] void fail(const char* what) {
  std::fprintf(stderr, "CUDA emulation: %s\n", what);
  std::fflush(stderr);
  std::abort();
}

thread_local int capturing_streams = 0;  // cudaStreamCaptureModeThreadLocal forbids allocations then

// ---- fibers ------------------------------------------------------------------------------
// A fiber switch saves the callee-saved registers on the current stack, stores the stack pointer
// and loads another (the System V x86-64 ABI leaves every other register to the caller; the FP
// control words are left alone: no kernel changes them). ucontext's swapcontext would also make a
// system call per switch: 100x slower.

#if !defined(__x86_64__)
#error "the CUDA emulation's fiber switch is written for x86-64"
#endif

extern "C" void gpt2s_emulation_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl gpt2s_emulation_switch
.type gpt2s_emulation_switch, @function
gpt2s_emulation_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size gpt2s_emulation_switch, .-gpt2s_emulation_switch
)");

struct Barrier {
  int participants = 0;
  int arrived = 0;
  uint64_t generation = 0;
};

struct Barrier;

struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  bool done = false;
  const Barrier* waiting = nullptr;  // the barrier it waits at, and that barrier's generation then
  uint64_t waiting_generation = 0;
};

constexpr size_t kStackBytes = 64 * 1024;

struct Block {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber> fibers;
  void* scheduler_sp = nullptr;
  int current = 0;
  uint64_t progress = 0;  // arrivals, releases and finishes: a round without any is a deadlock
  Barrier block_barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_slots;  // (warps, 32)
};

thread_local Block* running = nullptr;

void yield() {
  Block& b = *running;
  gpt2s_emulation_switch(&b.fibers[b.current].sp, b.scheduler_sp);
}

// Where a new fiber starts; it never returns (its last switch goes back to the scheduler for good).
void fiber_main() {
  Block& b = *running;
  (*b.body)();
  b.fibers[b.current].done = true;
  ++b.progress;
  yield();
  fail("a finished fiber was resumed");
}

// A fresh stack that gpt2s_emulation_switch "returns" into fiber_main on, aligned as at a
// function's entry.
void* new_stack(char* base) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(base) + kStackBytes) & ~uintptr_t(15);
  auto* slots = reinterpret_cast<uint64_t*>(top);
  slots[-1] = 0;                                          // fiber_main's (unused) return address
  slots[-2] = reinterpret_cast<uint64_t>(&fiber_main);   // popped by ret
  for (int r = 3; r <= 8; ++r) slots[-r] = 0;            // rbp rbx r12 r13 r14 r15
  return &slots[-8];
}

void wait(Barrier& barrier) {
  Block& b = *running;
  const uint64_t generation = barrier.generation;
  ++b.progress;
  if (++barrier.arrived == barrier.participants) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  Fiber& self = b.fibers[b.current];
  self.waiting = &barrier;  // the scheduler resumes this fiber only once the barrier opens
  self.waiting_generation = generation;
  yield();
  self.waiting = nullptr;
}

void run_block(const std::function<void()>& body, unsigned threads, bool reverse_order) {
  static thread_local std::vector<std::unique_ptr<char[]>> stacks;
  while (stacks.size() < threads) stacks.emplace_back(new char[kStackBytes]);
  Block b;
  b.body = &body;
  b.fibers.resize(threads);
  b.block_barrier.participants = int(threads);
  b.warp_barriers.resize(threads / 32);
  for (Barrier& w : b.warp_barriers) w.participants = 32;
  b.warp_slots.assign(threads, 0);
  Block* outer = running;
  running = &b;
  for (unsigned t = 0; t < threads; ++t) b.fibers[t].sp = new_stack(stacks[t].get());
  size_t unfinished = threads;
  while (unfinished > 0) {
    const uint64_t before = b.progress;
    for (unsigned k = 0; k < threads; ++k) {
      const unsigned t = reverse_order ? threads - 1 - k : k;
      const Fiber& f = b.fibers[t];
      if (f.done || (f.waiting && f.waiting->generation == f.waiting_generation)) continue;
      b.current = int(t);
      threadIdx = dim3(t, 0, 0);
      gpt2s_emulation_switch(&b.scheduler_sp, b.fibers[t].sp);
    }
    unfinished = size_t(std::count_if(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return !f.done; }));
    if (unfinished > 0 && b.progress == before) {
      fail("deadlock: some threads of a block wait at __syncthreads or a warp operation that others never reach");
    }
  }
  running = outer;
}

}  // namespace

void syncthreads() {
  if (!running) fail("__syncthreads outside a kernel");
  wait(running->block_barrier);
}

uint64_t warp_exchange(uint64_t value, int src_lane) {
  Block& b = *running;
  const int lane = b.current & 31, warp = b.current >> 5;
  b.warp_slots[size_t(warp) * 32 + lane] = value;
  wait(b.warp_barriers[warp]);
  const uint64_t result = b.warp_slots[size_t(warp) * 32 + src_lane];
  wait(b.warp_barriers[warp]);  // nobody overwrites a slot before every lane has read
  return result;
}

unsigned warp_ballot(bool predicate) {
  Block& b = *running;
  const int warp = b.current >> 5;
  b.warp_slots[size_t(b.current)] = predicate;
  wait(b.warp_barriers[warp]);
  unsigned mask = 0;
  for (int lane = 0; lane < 32; ++lane) mask |= unsigned(b.warp_slots[size_t(warp) * 32 + lane] != 0) << lane;
  wait(b.warp_barriers[warp]);
  return mask;
}

cudaError_t enqueue(cudaStream_t stream, std::function<void()> op) {
  if (stream && stream->capturing) {
    stream->captured.push_back(std::move(op));
  } else {
    op();
  }
  return cudaSuccess;
}

cudaError_t launch(const cudaLaunchConfig_t& config, std::function<void()> body) {
  const dim3 grid = config.gridDim, block = config.blockDim;
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x % 32 != 0 || block.x > 1024) {
    fail("blockDim must be (32k, 1, 1) with 32k <= 1024 in these kernels");
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidValue;
  if (config.dynamicSmemBytes != 0) fail("the engine's kernels use static shared memory only");
  // GPT2S_CUDA_EMULATION_REVERSE=1 runs each block's threads last to first: a read of shared memory
  // that lacks its barrier then sees the writes of later threads missing.
  const char* reverse = std::getenv("GPT2S_CUDA_EMULATION_REVERSE");
  const bool reverse_order = reverse && reverse[0] == '1';
  return enqueue(config.stream, [grid, block, reverse_order, body = std::move(body)]() {
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          blockIdx = dim3(x, y, z);
          blockDim = block;
          gridDim = grid;
          run_block(body, block.x, reverse_order);
        }
      }
    }
  });
}

}  // namespace gpt2s_emulation

using gpt2s_emulation::enqueue;

// ---- runtime ------------------------------------------------------------------------------

const char* cudaGetErrorName(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorStreamCaptureUnsupported: return "cudaErrorStreamCaptureUnsupported";
    default: return "cudaError (emulated)";
  }
}
const char* cudaGetErrorString(cudaError_t err) { return cudaGetErrorName(err); }
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  std::memset(prop, 0, sizeof *prop);
  std::snprintf(prop->name, sizeof prop->name, "CUDA emulation on the CPU");
  prop->totalGlobalMem = size_t(80) << 30;
  prop->major = 9;
  prop->minor = 0;
  prop->multiProcessorCount = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *free_bytes = size_t(64) << 30;
  *total_bytes = size_t(80) << 30;
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** ptr, size_t bytes) {
  if (gpt2s_emulation::capturing_streams > 0) return cudaErrorStreamCaptureUnsupported;
  *ptr = std::malloc(bytes ? bytes : 1);  // uninitialised, like device memory
  return *ptr ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* ptr) {
  std::free(ptr);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** ptr, size_t bytes) { return cudaMalloc(ptr, bytes); }
cudaError_t cudaFreeHost(void* ptr) { return cudaFree(ptr); }
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t stream) {
  return enqueue(stream, [=]() { std::memcpy(dst, src, bytes); });
}
cudaError_t cudaMemcpy2DAsync(void* dst, size_t dpitch, const void* src, size_t spitch, size_t width, size_t height,
                              cudaMemcpyKind, cudaStream_t stream) {
  if (width > dpitch || width > spitch) return cudaErrorInvalidValue;  // as the runtime: rows may not overlap
  return enqueue(stream, [=]() {
    for (size_t r = 0; r < height; ++r) {
      std::memcpy(static_cast<char*>(dst) + r * dpitch, static_cast<const char*>(src) + r * spitch, width);
    }
  });
}
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t stream) {
  return enqueue(stream, [=]() { std::memset(dst, value, bytes); });
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) {
  *stream = new CUstream_st();
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  return stream && stream->capturing ? cudaErrorStreamCaptureUnsupported : cudaSuccess;
}
cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = new CUevent_st();
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  return enqueue(stream, [event]() { event->when = std::chrono::steady_clock::now(); });
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = std::chrono::duration<float, std::milli>(end->when - start->when).count();
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  if (!stream || stream->capturing) return cudaErrorStreamCaptureUnsupported;
  stream->capturing = true;
  stream->captured.clear();
  ++gpt2s_emulation::capturing_streams;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (!stream || !stream->capturing) return cudaErrorStreamCaptureInvalidated;
  stream->capturing = false;
  --gpt2s_emulation::capturing_streams;
  // GPT2S_CUDA_EMULATION_FAIL_CAPTURE=1: every capture fails, as when a driver refuses one.
  const char* fail_capture = std::getenv("GPT2S_CUDA_EMULATION_FAIL_CAPTURE");
  if (fail_capture && fail_capture[0] == '1') {
    *graph = nullptr;
    return cudaErrorStreamCaptureInvalidated;
  }
  *graph = new CUgraph_st{std::move(stream->captured)};
  stream->captured.clear();
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  *exec = new CUgraphExec_st{graph->ops};
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  if (stream && stream->capturing) return cudaErrorStreamCaptureUnsupported;
  for (const auto& op : exec->ops) op();
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}

// ---- cuBLAS -------------------------------------------------------------------------------

const char* cublasGetStatusName(cublasStatus_t status) {
  switch (status) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS (emulated)";
  }
}
const char* cublasGetStatusString(cublasStatus_t status) { return cublasGetStatusName(status); }
cublasStatus_t cublasCreate(cublasHandle_t* handle) {
  *handle = new cublasContext();
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasDestroy(cublasHandle_t handle) {
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetStream(cublasHandle_t handle, cudaStream_t stream) {
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}
cublasStatus_t cublasSetWorkspace(cublasHandle_t, void*, size_t) { return CUBLAS_STATUS_SUCCESS; }

namespace {
float load(const void* p, cudaDataType_t type, size_t i) {
  switch (type) {
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_16BF: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case CUDA_R_16F: return __half2float(static_cast<const __half*>(p)[i]);
  }
  return 0.f;
}
}  // namespace

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n, int k,
                            const void* alpha, const void* A, cudaDataType_t Atype, int lda, const void* B,
                            cudaDataType_t Btype, int ldb, const void* beta, void* C, cudaDataType_t Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t) {
  // cuBLAS's own argument rules (column-major): op(A) is m x k, op(B) is k x n, C is m x n.
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, transa == CUBLAS_OP_N ? m : k) ||
      ldb < std::max(1, transb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m)) {
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (Atype != Btype || Ctype != CUDA_R_32F || computeType != CUBLAS_COMPUTE_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
  const float a = *static_cast<const float*>(alpha), b = *static_cast<const float*>(beta);  // read at the call
  enqueue(handle->stream, [=]() {
    float* c = static_cast<float*>(C);
    for (int j = 0; j < n; ++j) {
      for (int i = 0; i < m; ++i) {
        float acc = 0.f;
        for (int l = 0; l < k; ++l) {
          const size_t ai = transa == CUBLAS_OP_N ? size_t(i) + size_t(l) * lda : size_t(l) + size_t(i) * lda;
          const size_t bi = transb == CUBLAS_OP_N ? size_t(l) + size_t(j) * ldb : size_t(j) + size_t(l) * ldb;
          acc += load(A, Atype, ai) * load(B, Btype, bi);
        }
        float& out = c[size_t(i) + size_t(j) * ldc];
        out = a * acc + (b != 0.f ? b * out : 0.f);  // beta 0 ignores C, as cuBLAS does
      }
    }
  });
  return CUBLAS_STATUS_SUCCESS;
}
