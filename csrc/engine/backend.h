// What the scheduler (scheduler.h) asks of a backend: run the model on a packed list of tokens
// against a preallocated KV cache, then draw one token for each row that needs one. The CPU engine
// (cpu_backend.h) and the CUDA engine implement it; everything else (slots, continuous batching,
// prefill chunks, stop checks, the sliding window, callbacks) is the scheduler's and is shared.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace gpt2s {

// docs/sampling.md: temperature 0 = greedy; top_k 0 and top_p 0 (or 1) = off.
struct SamplingParams {
  float temperature = 1.0f;
  int32_t top_k = 0;
  float top_p = 0.0f;
  uint64_t seed = 0;
  uint64_t sample_index = 0;
};

// One forward step. Tokens of many rows are packed back to back without padding: a decoding row
// contributes its one new token, a row being prefilled a chunk of its prompt (or of its window
// after a slide). Token j goes to KV-cache slot slots[j] at position positions[j], and attends to
// positions 0..positions[j] of that slot (earlier ones were written by this or earlier steps).
struct StepInput {
  std::vector<int32_t> tokens;     // (N) token ids
  std::vector<int32_t> slots;      // (N) KV-cache slot of each token's row
  std::vector<int32_t> positions;  // (N) position of each token in its row's current window
  // Rows that draw a token after this step (R of them): the index in `tokens` of the row's last
  // token (whose logits are used), its parameters, and its RNG position (tokens it generated so far).
  std::vector<int32_t> sample_at;          // (R)
  std::vector<SamplingParams> params;      // (R)
  std::vector<uint64_t> draw_position;     // (R)
  bool want_logits = false;                // copy the R rows of logits out (on_logits; slow)
};

struct StepOutput {
  std::vector<int32_t> drawn;  // (R) the drawn token of each sampling row
  std::vector<float> logits;   // (R, V) when want_logits
  double sample_seconds = 0;   // time spent drawing (for the timing summary)
  int64_t screened_rows = 0;   // rows whose logits came through a screened head (cpu_backend.h)
};

class Backend {
 public:
  virtual ~Backend() = default;
  // Allocate the KV cache for `slots` rows of `ctx` positions each, and the workspace for steps of
  // up to `max_step_tokens` tokens and `slots` sampling rows. Called once per generate call.
  virtual void reserve(int32_t slots, int32_t ctx, int32_t max_step_tokens) = 0;
  virtual void step(const StepInput& in, StepOutput& out) = 0;
  // Copies positions [begin, end) of every layer's keys and values from slot `from` to slot `to`
  // (a prompt prefix that two rows share, scheduler.cpp), ordered before the next step.
  virtual void copy_kv(int32_t from, int32_t to, int32_t begin, int32_t end) = 0;
  // Bytes held by the KV cache after reserve() (for the documentation of memory use).
  virtual int64_t kv_cache_bytes() const = 0;
  virtual std::string describe() const = 0;  // e.g. "cpu avx512bf16, 2 threads"
};

}  // namespace gpt2s
