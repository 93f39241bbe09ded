#include "engine/core.h"

#include <chrono>
#include <stdexcept>

namespace gpt2s {

EngineCore::EngineCore(Engine& engine, int32_t slots, int32_t ctx) : engine_(engine), slots_(slots), ctx_(ctx) {
  const Config& config = engine.weights().config;
  if (slots < 1) throw std::invalid_argument("max_batch must be >= 1, got " + std::to_string(slots));
  if (ctx < 1 || ctx > config.n_ctx) {
    throw std::invalid_argument("context must be in [1, " + std::to_string(config.n_ctx) + "] (the model's n_ctx), got " +
                                std::to_string(ctx));
  }
  // Keyed by the caller's id; the scheduler calls back on this (the driving) thread.
  callbacks_.on_token = [this](int64_t id, int32_t token) { event(id).tokens.push_back(token); };
  callbacks_.on_finish = [this](int64_t id, const GenResult& r) { event(id).finish = finish_reason_name(r.finish_reason); };
}

EngineCore::~EngineCore() = default;

CoreEvent& EngineCore::event(int64_t id) {
  auto [it, fresh] = event_of_.try_emplace(id, events_.size());
  if (fresh) {
    events_.emplace_back();
    events_.back().id = id;
  }
  return events_[it->second];
}

int64_t EngineCore::add(GenRequest request) {
  validate_requests({request}, engine_.weights().config);  // names "requests[0].<field>"
  if (int64_t(request.prompt.size()) + request.max_new_tokens - 1 > ctx_) {
    throw std::invalid_argument("requests[0].max_new_tokens: the prompt's " + std::to_string(request.prompt.size()) +
                                " tokens plus " + std::to_string(request.max_new_tokens) +
                                " new ones exceed the context of " + std::to_string(ctx_) + " positions; ask for fewer");
  }
  auto owned = std::make_unique<GenRequest>(std::move(request));
  std::lock_guard<std::mutex> lock(mutex_);
  const int64_t id = next_id_++;
  queue_.emplace_back(id, std::move(owned));
  stats_.queued = int64_t(queue_.size());
  work_.notify_one();
  return id;
}

void EngineCore::abort(int64_t id) {
  std::lock_guard<std::mutex> lock(mutex_);
  aborts_.insert(id);
  work_.notify_one();
}

void EngineCore::wake() {
  std::lock_guard<std::mutex> lock(mutex_);
  woken_ = true;
  work_.notify_one();
}

std::vector<CoreEvent> EngineCore::step(double wait_seconds) {
  events_.clear();
  event_of_.clear();
  std::vector<std::pair<int64_t, std::unique_ptr<GenRequest>>> admitted;
  {
    std::unique_lock<std::mutex> lock(mutex_);
    if (running_.empty() && queue_.empty() && aborts_.empty() && !woken_) {
      work_.wait_for(lock, std::chrono::duration<double>(std::max(0.0, wait_seconds)),
                     [&] { return !queue_.empty() || !aborts_.empty() || woken_; });
    }
    woken_ = false;
    // Aborts first: a cancelled row's slot goes to the next queued request in this same step.
    for (int64_t id : aborts_) {
      bool found = false;
      for (auto it = queue_.begin(); it != queue_.end(); ++it) {
        if (it->first == id) {
          queue_.erase(it);
          found = true;
          break;
        }
      }
      if (!found && running_.count(id) != 0) {
        scheduler_->cancel(id);
        running_.erase(id);
        found = true;
      }
      if (found) event(id).finish = "cancelled";
    }
    aborts_.clear();
    const size_t free_slots = size_t(slots_) - running_.size();
    while (admitted.size() < free_slots && !queue_.empty()) {
      admitted.push_back(std::move(queue_.front()));
      queue_.pop_front();
    }
    stats_.queued = int64_t(queue_.size());
  }
  if (!admitted.empty() && !scheduler_) {
    // From idle: take the backend (waits for an Engine::generate call to end) and reserve the cache.
    engine_lock_ = std::unique_lock<std::mutex>(engine_.mutex());
    scheduler_ = std::make_unique<Scheduler>(engine_.backend(), engine_.weights(), slots_, ctx_, callbacks_, timings_);
  }
  for (auto& [id, request] : admitted) {
    GenRequest& r = *request;
    running_.emplace(id, std::move(request));
    scheduler_->admit(id, r);  // a request for 0 tokens ends here
  }
  if (scheduler_) {
    const auto t0 = std::chrono::steady_clock::now();
    scheduler_->step();
    timings_.total_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
  for (const CoreEvent& e : events_) {
    if (!e.finish.empty()) running_.erase(e.id);
  }
  if (scheduler_ && running_.empty()) {  // idle: let Engine::generate have the backend
    scheduler_.reset();
    engine_lock_.unlock();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  stats_.running = int32_t(running_.size());
  stats_.timings = timings_;
  return events_;
}

void EngineCore::clear() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.clear();
    aborts_.clear();
    stats_.queued = 0;
    stats_.running = 0;
  }
  running_.clear();
  scheduler_.reset();
  if (engine_lock_.owns_lock()) engine_lock_.unlock();
}

CoreStats EngineCore::stats() {
  std::lock_guard<std::mutex> lock(mutex_);
  return stats_;
}

}  // namespace gpt2s
