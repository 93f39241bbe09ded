// The CPU backend: GPT-2's forward pass over packed tokens with the SIMD kernels of kernels.h, a KV
// cache sized per generate call, and the sampler of sampler.h, on a ThreadPool of its own.
#pragma once

#include <sys/mman.h>

#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/kernels.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "engine/thread_pool.h"

namespace gpt2s {

// An uninitialised, 64-byte aligned array of a trivial type: pages are only touched (and counted
// in RSS) when written. One of 2 MiB or more is aligned to 2 MiB and asks the kernel for huge pages
// (transparent huge pages, where enabled): a matmul streaming the weights at batch 1 then misses
// the TLB once per 2 MiB instead of once per 4 KiB; on the 2-core test machine of docs/bench.md
// that raised its weight read rate from about 31 to 44 GB/s.
template <typename T>
class Buffer {
 public:
  void resize(int64_t n) {
    if (n == size_) return;
    const size_t bytes = size_t(n) * sizeof(T);
    const size_t align = bytes >= kHugePage ? kHugePage : 64;
    const size_t rounded = (bytes + align - 1) / align * align;
    data_ = std::unique_ptr<T, Free>(n > 0 ? static_cast<T*>(::operator new[](rounded, std::align_val_t(align))) : nullptr,
                                     Free{align});
    if (align == kHugePage) madvise(data_.get(), rounded, MADV_HUGEPAGE);  // a hint: failure is harmless
    size_ = n;
  }
  T* data() const { return data_.get(); }
  int64_t size() const { return size_; }

 private:
  static constexpr size_t kHugePage = size_t(2) << 20;
  struct Free {
    size_t align = 64;
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t(align)); }
  };
  std::unique_ptr<T, Free> data_{nullptr, Free{}};
  int64_t size_ = 0;
};

class CpuBackend final : public Backend {
 public:
  // `weights` must outlive the backend. threads <= 0: all cores. Repacks the matrices (about
  // 0.1-0.3 s for 124M) and drops the file's copies of them from this process's memory.
  CpuBackend(const ModelWeights& weights, int threads);

  void reserve(int32_t slots, int32_t ctx, int32_t max_step_tokens) override;
  void step(const StepInput& in, StepOutput& out) override;
  void copy_kv(int32_t from, int32_t to, int32_t begin, int32_t end) override;
  int64_t kv_cache_bytes() const override { return k_cache_.size() + v_cache_.size(); }
  std::string describe() const override;
  int threads() const { return pool_.size(); }

 private:
  // Leaves the logits of the sampling rows in logits_; true if they came through the screen.
  bool forward(const StepInput& in);
  // The head for the R rows of xf_ through the screen, if every row may take it: true when it
  // did, leaving in logits_ the exact logits of each row's possible top-k and -inf elsewhere.
  bool screened_head(const StepInput& in, int64_t R);
  // Bytes of one layer's keys (or values) for all slots.
  int64_t layer_kv_bytes() const;

  const ModelWeights& w_;
  const Kernels& kernels_;
  ThreadPool pool_;
  // The matrices repacked for the kernels (kernels.h, PackedMatrix), all in one allocation.
  struct PackedLayer {
    PackedMatrix attn_c_attn, attn_c_proj, mlp_c_fc, mlp_c_proj;
  };
  Buffer<uint8_t> packed_;
  std::vector<PackedLayer> layers_;
  PackedMatrix head_;  // wte, as the output head
  // The screened head (kernels.h, ScreenMatrix; docs/engine.md): wte in int8 with its error
  // terms, and the file's row-major wte kept mapped for the exact logits. Absent (screen_.data
  // null) where the kernels lack it or wte has values it cannot bound.
  Buffer<uint8_t> screen_panels_;
  Buffer<float> screen_arrays_;  // scale, sum (as int32), err, norm: 4 x panel-padded V
  ScreenMatrix screen_;
  int32_t slots_ = 0, ctx_ = 0, max_tokens_ = 0;
  // KV cache, per layer: (slots, NH, ctx, HS) keys and values, layers back to back, in the
  // weights' dtype (a bf16 model keeps bf16 keys and values: half the memory and reads).
  DType kv_dtype_;
  Buffer<uint8_t> k_cache_, v_cache_;
  // Workspace for up to max_tokens_ packed tokens (N) and slots_ sampling rows (R).
  Buffer<float> x_;        // (N, C) residual stream
  Buffer<float> ln_;       // (N, C) layernorm output
  Buffer<float> qkv_;      // (N, 3C)
  Buffer<float> att_;      // (N, C) attention output
  Buffer<float> fc_;       // (N, 4C) MLP hidden
  Buffer<float> xf_;       // (R, C) final layernorm of the sampling rows
  Buffer<float> logits_;   // (R, V)
  Buffer<float> scores_;   // (threads, kAttentionRows, ctx) attention scratch
  Buffer<uint16_t> xb_;    // (2, N, 2 (4C + 2)) activations rounded to bf16, or (2, N, 4C + 2) quantized to int8; two halves
  Buffer<uint8_t> xq_;     // (R, C + 3) sampling rows quantized for the screen
  Buffer<float> screen_rows_;  // (R, 5 + 2 panels) per row: the screen's terms, each panel's best lower bound and its token (int32)
  std::vector<uint8_t> row_ok_;
  struct ScreenScratch {  // one per thread: a row's candidate ids and exact logits (V each)
    std::vector<int32_t> ids;
    std::vector<float> values;
    std::vector<uint16_t> xb;  // (C + 1) the row rounded to bf16
  };
  std::vector<ScreenScratch> screen_scratch_;
  std::vector<SamplerScratch> samplers_;  // one per thread
};

}  // namespace gpt2s
