#include "engine/cpu_backend.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <utility>

#include "engine/format.h"
#include "engine/philox.h"

namespace gpt2s {

namespace {

// The model file's pages of a tensor that has been repacked are not read again: return them to
// the page cache (they stay there for the next process), so this process holds the weights once.
void release_pages(const TensorView& t) {
  const long page = sysconf(_SC_PAGESIZE);
  const auto begin = reinterpret_cast<uintptr_t>(t.data);
  const uintptr_t end = begin + uintptr_t(t.rows * t.cols) * dtype_size(t.dtype);
  const uintptr_t first = (begin + page - 1) / page * page, last = end / page * page;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

}  // namespace

CpuBackend::CpuBackend(const ModelWeights& weights, int threads)
    // A bf16 model keeps its KV cache in bf16; fp32 and int8 models in fp32.
    : w_(weights), kernels_(best_kernels()), pool_(threads), kv_dtype_(weights.dtype == DType::BF16 ? DType::BF16 : DType::F32) {
  // Every matrix a matmul reads, in order, and where its packed copy goes.
  std::vector<std::pair<const TensorView*, PackedMatrix*>> matrices;
  layers_.resize(w_.h.size());
  for (size_t i = 0; i < w_.h.size(); ++i) {
    const LayerWeights& l = w_.h[i];
    PackedLayer& p = layers_[i];
    matrices.insert(matrices.end(), {{&l.attn_c_attn_w, &p.attn_c_attn}, {&l.attn_c_proj_w, &p.attn_c_proj},
                                     {&l.mlp_c_fc_w, &p.mlp_c_fc}, {&l.mlp_c_proj_w, &p.mlp_c_proj}});
  }
  matrices.push_back({&w_.wte, &head_});
  int64_t total = 0;
  std::vector<int64_t> offsets;
  for (const auto& [view, packed] : matrices) {
    offsets.push_back(total);
    total += (kernels_.packed_bytes(view->rows, view->cols, view->dtype) + 63) / 64 * 64;
  }
  packed_.resize(total);
  // The screened head (docs/engine.md) first, while the file's wte is in memory; its row-major
  // pages then stay (not released below) for the exact logits of the screened tokens: 154 MiB
  // (fp32) or 77 MiB (bf16) more for 124M, and 39 MiB for the int8 copy. It saved 11-21% of a
  // top-k step in fp32 and 3-14% in bf16. GPT2S_SCREEN=0 turns it off.
  const int64_t V = w_.wte.rows, C = w_.wte.cols;
  const char* want = std::getenv("GPT2S_SCREEN");
  // An int8 model has no screen: its head is already the int8 product the screen's first pass
  // computes (docs/engine.md, "int8 weights"), and there is no fp32 wte for exact logits.
  if (kernels_.screen != nullptr && w_.dtype != DType::I8 && !(want != nullptr && std::strcmp(want, "0") == 0)) {
    screen_panels_.resize(kernels_.screen_bytes(V, C));
    screen_arrays_.resize(4 * ((V + kernels_.panel - 1) / kernels_.panel * kernels_.panel));
    ScreenMatrix s = screen_matrix(screen_panels_.data(), screen_arrays_.data(), V, C, kernels_.panel);
    if (kernels_.pack_screen(pool_, w_.wte, s)) {
      screen_ = s;
    } else {
      screen_panels_.resize(0);
      screen_arrays_.resize(0);
    }
  }
  for (size_t i = 0; i < matrices.size(); ++i) {
    const TensorView& view = *matrices[i].first;
    uint8_t* out = packed_.data() + offsets[i];
    // In slices of whole panels (about 16 MiB of the file each), each released once packed, so
    // the process never holds much more than one copy of the weights (wte alone is 150 MiB).
    const int64_t row_bytes = view.cols * int64_t(dtype_size(view.dtype));
    const int64_t slice = std::max<int64_t>(1, (int64_t(16) << 20) / (row_bytes * kernels_.panel)) * kernels_.panel;
    for (int64_t r0 = 0; r0 < view.rows; r0 += slice) {
      TensorView part = view;
      part.data = static_cast<const uint8_t*>(view.data) + r0 * row_bytes;
      part.rows = std::min(slice, view.rows - r0);
      if (view.scales != nullptr) part.scales = view.scales + r0;
      kernels_.pack(pool_, part, out + kernels_.packed_bytes(r0, view.cols, view.dtype));
      if (view.data != w_.wte.data || screen_.data == nullptr) release_pages(part);
    }
    *matrices[i].second = PackedMatrix{out, view.dtype, view.rows, view.cols};
  }
}

std::string CpuBackend::describe() const {
  const int n = pool_.size();
  return std::string("cpu ") + kernels_.isa + ", " + std::to_string(n) + " thread" + (n > 1 ? "s" : "");
}

void CpuBackend::reserve(int32_t slots, int32_t ctx, int32_t max_step_tokens) {
  const Config& c = w_.config;
  const int64_t C = c.n_embd, V = c.n_vocab, L = c.n_layer;
  if (slots < 1 || ctx < 1 || ctx > c.n_ctx || max_step_tokens < 1) throw std::logic_error("CpuBackend::reserve: bad sizes");
  slots_ = slots;
  ctx_ = ctx;
  max_tokens_ = max_step_tokens;
  const int64_t N = max_step_tokens;
  k_cache_.resize(L * layer_kv_bytes());
  v_cache_.resize(L * layer_kv_bytes());
  x_.resize(N * C);
  ln_.resize(N * C);
  qkv_.resize(N * 3 * C);
  att_.resize(N * C);
  fc_.resize(N * 4 * C);
  xf_.resize(int64_t(slots) * C);
  logits_.resize(int64_t(slots) * V);
  scores_.resize(int64_t(pool_.size()) * kAttentionRows * ctx);
  // bf16 rows (stored as fp32 where the kernels widen the weights: two uint16 per value), or int8 rows and their scales
  xb_.resize(w_.dtype == DType::BF16 ? 2 * 2 * N * (4 * C + 2) : w_.dtype == DType::I8 ? 2 * N * (4 * C + 2) : 0);
  if (screen_.data != nullptr) {
    xq_.resize(int64_t(slots) * (C + 3));
    screen_rows_.resize(int64_t(slots) * (5 + 2 * ((V + kernels_.panel - 1) / kernels_.panel)));
    row_ok_.resize(size_t(slots));
    screen_scratch_.resize(size_t(pool_.size()));
    for (ScreenScratch& s : screen_scratch_) {
      s.ids.resize(size_t(V));
      s.values.resize(size_t(V));
      s.xb.resize(size_t(C + 1));
    }
  }
  samplers_.resize(size_t(pool_.size()));
}

int64_t CpuBackend::layer_kv_bytes() const {
  return int64_t(slots_) * ctx_ * w_.config.n_embd * (kv_dtype_ == DType::F32 ? 4 : 2);
}

void CpuBackend::copy_kv(int32_t from, int32_t to, int32_t begin, int32_t end) {
  if (from < 0 || from >= slots_ || to < 0 || to >= slots_ || from == to || begin < 0 || begin > end || end > ctx_) {
    throw std::logic_error("CpuBackend::copy_kv: bad slots or positions");
  }
  const int64_t NH = w_.config.n_head, HS = w_.config.n_embd / NH, row = HS * (kv_dtype_ == DType::F32 ? 4 : 2);
  const int64_t layer_kv = layer_kv_bytes();
  for (uint8_t* cache : {k_cache_.data(), v_cache_.data()}) {
    for (int64_t l = 0; l < w_.config.n_layer; ++l) {
      for (int64_t h = 0; h < NH; ++h) {
        // (slots, NH, ctx, HS) per layer
        auto at = [&](int32_t slot) { return cache + l * layer_kv + ((int64_t(slot) * NH + h) * ctx_ + begin) * row; };
        std::memcpy(at(to), at(from), size_t(end - begin) * size_t(row));
      }
    }
  }
}

bool CpuBackend::forward(const StepInput& in) {
  const Config& c = w_.config;
  const int64_t C = c.n_embd, NH = c.n_head, HS = C / NH, N = int64_t(in.tokens.size());
  const int64_t R = int64_t(in.sample_at.size());
  const int64_t layer_kv = layer_kv_bytes();
  const Kernels& k = kernels_;

  // The bf16 copies of successive matmul inputs alternate between the two halves of xb_: the half
  // written now was last read two matmuls ago, by then gone from the other cores' caches, so the
  // writes need not wait line by line for those cores to give the lines up (with one buffer that
  // wait made the rounding 2-3% of a batch-20 step).
  int half = 0;
  auto xb = [&] {
    half ^= 1;
    return xb_.data() + half * (xb_.size() / 2);
  };
  k.embed(pool_, head_, w_.wpe, in.tokens.data(), in.positions.data(), N, C, x_.data());
  for (const LayerWeights& l : w_.h) {
    const int64_t li = &l - w_.h.data();
    uint8_t* kc = k_cache_.data() + li * layer_kv;  // (slots, NH, ctx, HS)
    uint8_t* vc = v_cache_.data() + li * layer_kv;
    k.layernorm(pool_, x_.data(), N, C, static_cast<const float*>(l.ln_1_w.data), static_cast<const float*>(l.ln_1_b.data),
                ln_.data());
    k.matmul(pool_, ln_.data(), N, C, layers_[size_t(li)].attn_c_attn, static_cast<const float*>(l.attn_c_attn_b.data), qkv_.data(),
             Epilogue::kStore, xb());
    k.attention(pool_, qkv_.data(), N, in.slots.data(), in.positions.data(), kc, vc, kv_dtype_, NH, HS, ctx_,
                att_.data(), scores_.data());
    k.matmul(pool_, att_.data(), N, C, layers_[size_t(li)].attn_c_proj, static_cast<const float*>(l.attn_c_proj_b.data), x_.data(),
             Epilogue::kAdd, xb());
    k.layernorm(pool_, x_.data(), N, C, static_cast<const float*>(l.ln_2_w.data), static_cast<const float*>(l.ln_2_b.data),
                ln_.data());
    k.matmul(pool_, ln_.data(), N, C, layers_[size_t(li)].mlp_c_fc, static_cast<const float*>(l.mlp_c_fc_b.data), fc_.data(),
             Epilogue::kGelu, xb());
    k.matmul(pool_, fc_.data(), N, 4 * C, layers_[size_t(li)].mlp_c_proj, static_cast<const float*>(l.mlp_c_proj_b.data), x_.data(),
             Epilogue::kAdd, xb());
  }
  // Only the rows that draw a token need the final layernorm and the head (V outputs each).
  for (int64_t r = 0; r < R; ++r) std::memcpy(ln_.data() + r * C, x_.data() + in.sample_at[r] * C, size_t(C) * sizeof(float));
  k.layernorm(pool_, ln_.data(), R, C, static_cast<const float*>(w_.ln_f_w.data), static_cast<const float*>(w_.ln_f_b.data),
              xf_.data());
  if (!in.want_logits && screened_head(in, R)) return true;
  k.matmul(pool_, xf_.data(), R, C, head_, nullptr, logits_.data(), Epilogue::kStore, xb());
  return false;
}

namespace {

// The tokens a row keeps, if the screen can find them: its top-k (temperature 0: the top one),
// while k is small against the panels (tau comes from one token of each of the k best panels). 0: no.
constexpr int64_t kMaxScreenedK = 128;

int64_t screened_k(const SamplingParams& p, int64_t panels) {
  if (p.temperature == 0.0f) return 1;
  return p.top_k >= 1 && p.top_k <= kMaxScreenedK && 4 * int64_t(p.top_k) <= panels ? p.top_k : 0;
}

}  // namespace

bool CpuBackend::screened_head(const StepInput& in, int64_t R) {
  const int64_t V = w_.config.n_vocab, C = w_.config.n_embd, panels = (V + kernels_.panel - 1) / kernels_.panel;
  if (screen_.data == nullptr) return false;
  for (int64_t r = 0; r < R; ++r) {
    if (screened_k(in.params[size_t(r)], panels) == 0) return false;
  }
  float* terms = screen_rows_.data();                             // (R, 5)
  float* panel_lower = terms + R * 5;                             // (R, panels)
  int32_t* panel_best = reinterpret_cast<int32_t*>(panel_lower + R * panels);  // (R, panels)
  // The upper bounds go where the logits will: a row's candidates are read out before its logits are written.
  kernels_.screen(pool_, xf_.data(), R, C, w_.dtype == DType::BF16, screen_, xq_.data(), terms, logits_.data(), panel_lower,
                  panel_best, reinterpret_cast<bool*>(row_ok_.data()));
  struct ExactJob {
    CpuBackend* self;
    const StepInput* in;
    const float* panel_lower;
    const int32_t* panel_best;
    int64_t panels;
  } job{this, &in, panel_lower, panel_best, panels};
  pool_.run(R, [](void* p, int64_t r, int thread) {
    ExactJob& j = *static_cast<ExactJob*>(p);
    CpuBackend& b = *j.self;
    const int64_t V = b.w_.config.n_vocab, C = b.w_.config.n_embd;
    ScreenScratch& s = b.screen_scratch_[size_t(thread)];
    float* row = b.logits_.data() + r * V;
    int32_t* ids = s.ids.data();
    int64_t n = 0;
    if (b.row_ok_[size_t(r)]) {
      // tau: the smallest exact logit of k distinct tokens, so the k-th best logit is at or above
      // it, and a token whose upper bound is below it is out. The k tokens: the best (by lower
      // bound) of the k panels with the best lower bounds. Their lower bounds alone would make a
      // valid tau too, but the exact logits sit about one error bound above them: on the random
      // 124M model 172 tokens reach tau at k = 40 instead of 550 (5 instead of 22 for greedy rows).
      const int64_t k = screened_k(j.in->params[size_t(r)], j.panels);
      const float* lower = j.panel_lower + r * j.panels;
      for (int64_t p = 0; p < j.panels; ++p) ids[p] = int32_t(p);
      std::nth_element(ids, ids + (k - 1), ids + j.panels, [lower](int32_t a, int32_t b) { return lower[a] > lower[b]; });
      int32_t top[kMaxScreenedK];
      float top_logits[kMaxScreenedK];
      for (int64_t i = 0; i < k; ++i) top[i] = j.panel_best[r * j.panels + ids[i]];
      b.kernels_.exact_logits(b.xf_.data() + r * C, b.w_.wte, top, k, top_logits, s.xb.data());
      const float tau = *std::min_element(top_logits, top_logits + k);
      const float below = std::nextafter(tau, -INFINITY);  // upper > below: upper >= tau
      for (int64_t i = 0; (i += b.kernels_.first_above(row + i, V - i, below)) < V; ++i) ids[n++] = int32_t(i);
    } else {
      for (int64_t i = 0; i < V; ++i) ids[n++] = int32_t(i);  // an unbounded row: every logit, exactly
    }
    float* exact = s.values.data();
    b.kernels_.exact_logits(b.xf_.data() + r * C, b.w_.wte, ids, n, exact, s.xb.data());
    std::fill(row, row + V, -INFINITY);
    for (int64_t i = 0; i < n; ++i) row[ids[i]] = exact[i];
  }, &job);
  return true;
}

void CpuBackend::step(const StepInput& in, StepOutput& out) {
  const int64_t N = int64_t(in.tokens.size()), R = int64_t(in.sample_at.size()), V = w_.config.n_vocab;
  // The scheduler's promises, checked because a broken one would write outside the cache.
  if (N < 1 || N > max_tokens_ || R > slots_ || in.slots.size() != size_t(N) || in.positions.size() != size_t(N) ||
      in.params.size() != size_t(R) || in.draw_position.size() != size_t(R)) {
    throw std::logic_error("CpuBackend::step: inconsistent step sizes");
  }
  for (int64_t i = 0; i < N; ++i) {
    if (in.slots[i] < 0 || in.slots[i] >= slots_ || in.positions[i] < 0 || in.positions[i] >= ctx_ || in.tokens[i] < 0 ||
        in.tokens[i] >= V) {
      throw std::logic_error("CpuBackend::step: token, slot or position out of range");
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    if (in.sample_at[r] < 0 || in.sample_at[r] >= N) throw std::logic_error("CpuBackend::step: bad sampling row");
  }
  out.screened_rows = forward(in) ? R : 0;

  out.drawn.resize(size_t(R));
  if (in.want_logits) out.logits.assign(logits_.data(), logits_.data() + R * V);
  const auto t0 = std::chrono::steady_clock::now();
  struct SampleJob {
    CpuBackend* self;
    const StepInput* in;
    StepOutput* out;
  } job{this, &in, &out};
  auto sample_row = [](void* p, int64_t r, int thread) {
    SampleJob& j = *static_cast<SampleJob*>(p);
    const SamplingParams& params = j.in->params[size_t(r)];
    const int64_t V = j.self->w_.config.n_vocab;
    const double u = draw_uniform(params.seed, params.sample_index, j.in->draw_position[size_t(r)]);
    j.out->drawn[size_t(r)] = sample_token(j.self->logits_.data() + r * V, V, params, u, j.self->kernels_, j.self->samplers_[size_t(thread)]);
  };
  if (R > 1 && R * V >= (int64_t(1) << 16)) {
    pool_.run(R, sample_row, &job);
  } else {
    for (int64_t r = 0; r < R; ++r) sample_row(&job, r, 0);
  }
  out.sample_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace gpt2s
