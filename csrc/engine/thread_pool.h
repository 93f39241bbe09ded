// The CPU engine's threads: a fixed pool that runs "chunks" of a kernel, handed out one at a time
// from a shared counter. The call returns as soon as every chunk is done, whoever did it, so a
// worker that the OS has descheduled (on a machine busy with other work) costs at most the chunk
// it holds, never a whole barrier: the caller takes over what nobody has started. A fork/join
// team (OpenMP's) must wait for every thread to arrive, which on a loaded 2-core machine costs
// scheduler time slices, dozens of times per token.
//
// Every member is defined out of line, so ISA-specific translation units can call the pool
// without instantiating any shared inline code (see simd.h).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace gpt2s {

class ThreadPool {
 public:
  using ChunkFn = void (*)(void* context, int64_t chunk, int thread);

  // `threads` in total: the calling thread plus threads - 1 workers. threads <= 0: all cores.
  explicit ThreadPool(int threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const;

  // fn(context, chunk, thread) for every chunk in [0, n_chunks), on the calling thread (thread 0)
  // and the workers (1 .. size() - 1). Returns when all chunks are done. Not reentrant: one run at
  // a time per pool (the engine's lock guarantees it).
  void run(int64_t n_chunks, ChunkFn fn, void* context);

 private:
  void work(int index);
  bool claim(uint64_t generation, int64_t* chunk);
  void run_batch(int64_t first, int64_t n_chunks, ChunkFn fn, void* context);

  int size_;
  std::vector<std::thread> workers_;
  // The current job in one word: generation (bits 40-63), chunk count (20-39), next unclaimed
  // chunk (0-19). Claiming compares all three at once, so a late worker can never take a chunk
  // of a newer job, nor run one with an older job's function.
  std::atomic<uint64_t> job_{0};
  std::atomic<ChunkFn> fn_{nullptr};
  std::atomic<void*> context_{nullptr};
  std::atomic<int64_t> first_{0};  // chunk number of the job's chunk 0 (jobs over 2^20 chunks are split)
  std::atomic<int64_t> done_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace gpt2s
