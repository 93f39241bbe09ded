// One loaded model and one backend behind a lock: what the Python Engine class wraps. Both the CPU
// module (_engine) and the CUDA module (_engine_cuda) build one, each with its own Backend.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "engine/backend.h"
#include "engine/format.h"
#include "engine/scheduler.h"

namespace gpt2s {

class Engine {
 public:
  Engine(std::shared_ptr<const LoadedModel> model, std::unique_ptr<Backend> backend)
      : model_(std::move(model)), backend_(std::move(backend)) {}

  const ModelWeights& weights() const { return model_->weights(); }
  const LoadedModel& model() const { return *model_; }
  const Backend& backend() const { return *backend_; }

  // Concurrent calls run one after the other (the backend owns one KV cache and workspace).
  std::vector<GenResult> generate(const std::vector<GenRequest>& requests, int32_t batch_size, const Callbacks& callbacks) {
    std::lock_guard<std::mutex> lock(mutex_);
    Timings timings;
    std::vector<GenResult> results = gpt2s::generate(*backend_, weights(), requests, batch_size, callbacks, timings);
    std::lock_guard<std::mutex> timings_lock(timings_mutex_);
    timings_ = timings;
    return results;
  }

  // The lock generate() holds: the engine core (core.h) holds it while it has rows, so the two
  // share the one backend and KV cache by turns.
  std::mutex& mutex() { return mutex_; }
  Backend& backend() { return *backend_; }

  // Timings of the last completed call.
  Timings last_timings() {
    std::lock_guard<std::mutex> lock(timings_mutex_);
    return timings_;
  }

 private:
  std::shared_ptr<const LoadedModel> model_;
  std::unique_ptr<Backend> backend_;
  std::mutex mutex_;          // one generate call at a time
  std::mutex timings_mutex_;  // readable while another call runs
  Timings timings_;
};

}  // namespace gpt2s
