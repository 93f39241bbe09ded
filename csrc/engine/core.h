// The engine core (docs/engine.md "Engine core"): requests join a running batch. vLLM's shape:
// add a request, abort one, step. Any thread may add and abort (a queue under a mutex); one thread
// drives step(), which drains the queue between steps into free KV-cache slots, frees aborted rows'
// slots, and runs one Scheduler step. Each request's tokens come out of the step that drew them.
// It uses the Engine's one backend and KV cache, taking the Engine's lock while it has rows, so an
// Engine::generate call and the core run by turns.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "engine/engine.h"
#include "engine/scheduler.h"

namespace gpt2s {

// What one step did to one request: the tokens it drew (in order) and, when it ended, why:
// finish_reason_name() or "cancelled" (aborted); empty while it runs.
struct CoreEvent {
  int64_t id = 0;
  std::vector<int32_t> tokens;
  std::string finish;
};

struct CoreStats {
  int64_t queued = 0;   // added, not yet in a slot
  int32_t running = 0;  // in a slot
  Timings timings;      // accumulated over the core's life (prefill/decode tokens and seconds)
};

class EngineCore {
 public:
  // `slots` rows at once, each `ctx` positions (1..n_ctx) of KV cache: a request must fit
  // (prompt + max_new_tokens - 1 <= ctx), so rows never slide. The cache is reserved when the
  // first request arrives (and again after an Engine::generate call has used the backend).
  EngineCore(Engine& engine, int32_t slots, int32_t ctx);
  ~EngineCore();

  // Thread-safe. Checks the request (std::invalid_argument naming "request.<field>") and queues
  // it; returns its id (1, 2, ...). A sample keyed by (seed, sample_index) gives the same tokens
  // whatever else runs (on the CPU: batch-invariant kernels).
  int64_t add(GenRequest request);
  // Thread-safe. Ends request `id` at the next step (event "cancelled"); unknown or ended ids are ignored.
  void abort(int64_t id);
  // Makes a step() that waits for work return now (to stop the driving thread).
  void wake();
  // The driving thread: waits up to wait_seconds while there is no work, then admits, aborts and
  // runs one step. Returns the step's events, one per request that drew tokens, ended or was cancelled.
  std::vector<CoreEvent> step(double wait_seconds);
  // The driving thread, when it stops: drops every queued and running request (no events) and
  // lets Engine::generate have the backend.
  void clear();
  CoreStats stats();
  int32_t slots() const { return slots_; }
  int32_t ctx() const { return ctx_; }
  const Config& config() const { return engine_.weights().config; }

 private:
  Engine& engine_;
  const int32_t slots_, ctx_;
  std::mutex mutex_;  // guards the queue, the aborts and stats_
  std::condition_variable work_;
  std::deque<std::pair<int64_t, std::unique_ptr<GenRequest>>> queue_;
  std::unordered_set<int64_t> aborts_;
  int64_t next_id_ = 1;
  bool woken_ = false;
  CoreStats stats_;
  // The driving thread's own state.
  std::unordered_map<int64_t, std::unique_ptr<GenRequest>> running_;
  std::unique_lock<std::mutex> engine_lock_;  // held while rows run
  std::unique_ptr<Scheduler> scheduler_;
  Callbacks callbacks_;
  std::vector<CoreEvent> events_;
  std::unordered_map<int64_t, size_t> event_of_;  // id -> index in events_ this step
  Timings timings_;
  CoreEvent& event(int64_t id);
};

}  // namespace gpt2s
