#include "engine/thread_pool.h"

#include <algorithm>
#include <chrono>

namespace gpt2s {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// How long an idle worker polls for the next job before sleeping: longer than the serial gaps
// between the kernels of one token (layernorms, bookkeeping), far shorter than a user's pause.
constexpr auto kSpin = std::chrono::microseconds(200);

}  // namespace

ThreadPool::ThreadPool(int threads)
    : size_(threads > 0 ? threads : std::max(1, int(std::thread::hardware_concurrency()))) {
  for (int i = 1; i < size_; ++i) workers_.emplace_back([this, i] { work(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true);
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

int ThreadPool::size() const { return size_; }

namespace {

constexpr int kGenerationShift = 40, kCountShift = 20;
constexpr uint64_t kField = (uint64_t(1) << kCountShift) - 1;  // chunk count and index: 20 bits

uint64_t generation_of(uint64_t job) { return job >> kGenerationShift; }

}  // namespace

bool ThreadPool::claim(uint64_t generation, int64_t* chunk) {
  uint64_t job = job_.load(std::memory_order_acquire);
  for (;;) {
    if (generation_of(job) != generation) return false;  // a newer job: not ours to touch
    const uint64_t next = job & kField, count = (job >> kCountShift) & kField;
    if (next >= count) return false;
    if (job_.compare_exchange_weak(job, job + 1, std::memory_order_acq_rel)) {
      *chunk = int64_t(next);
      return true;
    }
  }
}

void ThreadPool::run(int64_t n_chunks, ChunkFn fn, void* context) {
  if (size_ == 1 || n_chunks <= 1) {
    for (int64_t c = 0; c < n_chunks; ++c) fn(context, c, 0);
    return;
  }
  for (int64_t first = 0; first < n_chunks; first += int64_t(kField)) {
    run_batch(first, std::min<int64_t>(int64_t(kField), n_chunks - first), fn, context);
  }
}

// One job of at most 2^20 - 1 chunks, numbered from `first`.
void ThreadPool::run_batch(int64_t first, int64_t n_chunks, ChunkFn fn, void* context) {
  // Every chunk of the previous job is done (run waited for it), so no worker can claim from it:
  // the job's fields may change.
  fn_.store(fn, std::memory_order_relaxed);
  context_.store(context, std::memory_order_relaxed);
  first_.store(first, std::memory_order_relaxed);
  done_.store(0, std::memory_order_relaxed);
  const uint64_t generation = (generation_of(job_.load(std::memory_order_relaxed)) + 1) & ((uint64_t(1) << (64 - kGenerationShift)) - 1);
  job_.store(generation << kGenerationShift | uint64_t(n_chunks) << kCountShift);  // publish (seq_cst, as sleepers_)
  if (sleepers_.load() > 0) {
    std::lock_guard<std::mutex> lock(mutex_);
    wake_.notify_all();
  }
  int64_t chunk;
  while (claim(generation, &chunk)) {
    fn(context, first + chunk, 0);
    done_.fetch_add(1, std::memory_order_acq_rel);
  }
  // Only chunks that a worker has claimed remain; wait for those alone.
  while (done_.load(std::memory_order_acquire) < n_chunks) cpu_relax();
}

void ThreadPool::work(int index) {
  uint64_t seen = 0;  // the generation this worker last looked at
  for (;;) {
    auto spin_until = std::chrono::steady_clock::now() + kSpin;
    uint64_t generation;
    for (int polls = 0;; ++polls) {
      generation = generation_of(job_.load(std::memory_order_acquire));
      if (generation != seen || stop_.load()) break;
      if ((polls & 63) != 63 || std::chrono::steady_clock::now() < spin_until) {
        cpu_relax();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      sleepers_.fetch_add(1);
      wake_.wait(lock, [&] { return generation_of(job_.load()) != seen || stop_.load(); });
      sleepers_.fetch_sub(1);
      spin_until = std::chrono::steady_clock::now() + kSpin;
    }
    if (stop_.load()) return;
    seen = generation;
    const ChunkFn fn = fn_.load(std::memory_order_acquire);
    void* context = context_.load(std::memory_order_acquire);
    const int64_t first = first_.load(std::memory_order_acquire);
    int64_t chunk;
    while (claim(generation, &chunk)) {
      fn(context, first + chunk, index);
      done_.fetch_add(1, std::memory_order_acq_rel);
    }
  }
}

}  // namespace gpt2s
