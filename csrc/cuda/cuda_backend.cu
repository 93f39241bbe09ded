// The CUDA backend: weights uploaded once, GPT-2's forward pass over the scheduler's packed tokens
// (one kernel or GEMM per op, csrc/cuda/*.cuh), a KV cache sized per generate call, the sampler on
// the device, and decode steps replayed from CUDA graphs. Only the drawn ids (and, for tests,
// logits) come back to the host; the one synchronisation per step is the one stop checks need.
#include "cuda/cuda_backend.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cuda/attention.cuh"
#include "cuda/check.cuh"
#include "cuda/decode.cuh"
#include "cuda/dtype.cuh"
#include "cuda/embedding.cuh"
#include "cuda/gelu.cuh"
#include "cuda/gemm.cuh"
#include "cuda/layernorm.cuh"
#include "cuda/memory.cuh"
#include "cuda/sampler.cuh"
#include "cuda/weights.cuh"

namespace gpt2s::cuda {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
constexpr size_t kCublasWorkspaceBytes = size_t(32) << 20;  // what cuBLAS asks for on Hopper

std::string gib(double bytes) {
  char text[32];
  std::snprintf(text, sizeof text, "%.2f GiB", bytes / kGiB);
  return text;
}

// Decode steps run B rows padded up to a bucket, so that one captured graph serves every B of
// its bucket: powers of two up to 8, then multiples of 8 up to 64, then of 32.
int bucket(int n) {
  if (n <= 8) {
    int b = 1;
    while (b < n) b <<= 1;
    return b;
  }
  const int step = n <= 64 ? 8 : 32;
  return (n + step - 1) / step * step;
}

RowSampling row_sampling(const SamplingParams& p, uint64_t position, int V) {
  if (!(p.temperature >= 0.f) || !std::isfinite(p.temperature)) {
    throw std::invalid_argument("temperature must be a finite number >= 0, got " + std::to_string(p.temperature));
  }
  if (!(p.top_p >= 0.f && p.top_p <= 1.f)) throw std::invalid_argument("top_p must be in [0, 1], got " + std::to_string(p.top_p));
  if (p.top_k < 0) throw std::invalid_argument("top_k must be >= 0, got " + std::to_string(p.top_k));
  RowSampling r;
  r.top_p = p.top_p;
  r.seed = p.seed;
  r.sample_index = p.sample_index;
  r.position = position;
  r.temperature = p.temperature;
  r.top_k = std::min(p.top_k, V);
  return r;
}

void check_device(int device) {
  const CudaStatus status = cuda_status();
  if (status.devices == 0) throw CudaError("the CUDA engine cannot run: " + status.reason);
  if (device < 0 || device >= status.devices) {
    throw std::invalid_argument("CUDA device " + std::to_string(device) + " does not exist: this machine shows " +
                                std::to_string(status.devices) + " (0.." + std::to_string(status.devices - 1) + ")");
  }
  const DeviceInfo info = device_info(device);
  if (info.major < 8) {
    throw CudaError("CUDA device " + std::to_string(device) + " (" + info.name + ") has compute capability " +
                    std::to_string(info.major) + "." + std::to_string(info.minor) +
                    "; the CUDA engine needs 8.0 or newer (A100, RTX 30xx/40xx, L4, H100): use backend='cpu'");
  }
}

// ---------------------------------------------------------------------------------------------
// Per-generate-call memory: the KV cache, activations for up to cap tokens, and the step's inputs
// and outputs (device arrays with a pinned host mirror of the same layout: one copy each way).

template <typename W>
struct Workspace {
  int slots = 0, ctx = 0, cap = 0, sample_cap = 0;  // cap: tokens per step; sample_cap: sampling rows
  int64_t kv_bytes = 0;
  DeviceMemory kv;    // keys then values: (L, slots + 1, NH, ctx, HS) each; slot `slots` is scratch
  DeviceMemory act;
  DeviceMemory io;
  PinnedMemory host_io;
  W *k_cache = nullptr, *v_cache = nullptr;
  int64_t layer_stride = 0;  // elements per layer of one cache
  // Activations (N = cap tokens, R = sample_cap sampling rows).
  float* x = nullptr;        // (N, C) residual stream
  W* ln = nullptr;           // (N, C) LayerNorm output, GEMM input
  float* qkv = nullptr;      // (N, 3C)
  float* q = nullptr;        // (N, C) queries with bias
  W* att = nullptr;          // (N, C) attention output
  float* delta = nullptr;    // (N, C) c_proj outputs (attention's, then the MLP's)
  float* fc = nullptr;       // (N, 4C)
  W* gelu = nullptr;         // (N, 4C)
  float* part_o = nullptr;   // attention splits
  float* part_ml = nullptr;
  W* lnf = nullptr;          // (R, C) final LayerNorm of the sampling rows
  float* logits = nullptr;   // (R, V)
  // io offsets: inputs [0, inputs_bytes), outputs [outputs_at, outputs_at + outputs_bytes)
  size_t tokens_at = 0, slots_at = 0, positions_at = 0, sample_at_at = 0, params_at = 0, inputs_bytes = 0;
  size_t drawn_at = 0, error_at = 0, outputs_at = 0, outputs_bytes = 0;
};

template <typename W>
class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelWeights& w, const CudaOptions& options, const DeviceInfo& info, const char* dtype_name)
      : config_(w.config),
        device_(options.device),
        multiprocessors_(info.multiprocessors),
        use_graphs_(options.graphs),
        description_("cuda:" + std::to_string(options.device) + " " + info.name + " (sm_" + std::to_string(info.major) +
                     std::to_string(info.minor) + "), " + dtype_name + (options.graphs ? ", CUDA graphs" : "")),
        stream_(make_stream()),
        cublas_(make_cublas()),
        cublas_workspace_(kCublasWorkspaceBytes),
        sample_start_(make_event()),
        sample_end_(make_event()),
        w_(w, stream_.get()) {
    C_ = config_.n_embd;
    NH_ = config_.n_head;
    HS_ = C_ / NH_;
    V_ = config_.n_vocab;
    L_ = config_.n_layer;
    if (HS_ * NH_ != C_) throw std::invalid_argument("n_embd must be a multiple of n_head");
    if (!attention_fits(HS_)) {
      throw std::invalid_argument("the CUDA engine needs a head size n_embd / n_head that is a multiple of 8 and at most " +
                                  std::to_string(kMaxHeadSize) + " (this model's is " + std::to_string(HS_) +
                                  "; GPT-2's is 64): use backend='cpu'");
    }
    CUBLAS_CHECK(cublasSetStream(cublas_.get(), stream_.get()));
    // After SetStream (which resets it): a fixed workspace, so graph capture allocates nothing.
    CUBLAS_CHECK(cublasSetWorkspace(cublas_.get(), cublas_workspace_.at<void>(), kCublasWorkspaceBytes));
  }

  ~CudaBackend() override {
    cudaSetDevice(device_);
    cudaStreamSynchronize(stream_.get());
  }

  void reserve(int32_t slots, int32_t ctx, int32_t max_step_tokens) override {
    CUDA_CHECK(cudaSetDevice(device_));
    if (slots < 1 || ctx < 1 || ctx > config_.n_ctx || max_step_tokens < 1) {
      throw std::invalid_argument("reserve: bad geometry (slots " + std::to_string(slots) + ", ctx " +
                                  std::to_string(ctx) + ", step tokens " + std::to_string(max_step_tokens) + ")");
    }
    const int cap = std::max(max_step_tokens, bucket(slots));
    if (cap > 65535) {
      throw std::invalid_argument("batch_size " + std::to_string(slots) + " is too large for the CUDA engine (at most 65535 rows)");
    }
    if (slots == ws_.slots && ctx == ws_.ctx && cap == ws_.cap) return;  // keep buffers and captured graphs
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    graphs_.clear();
    ws_ = Workspace<W>();

    Workspace<W> ws;
    ws.slots = slots;
    ws.ctx = ctx;
    ws.cap = cap;
    ws.sample_cap = bucket(slots);  // a row draws at most once per step; decode steps pad to the bucket
    ws.layer_stride = int64_t(slots + 1) * NH_ * ctx * HS_;
    const int64_t cache_elems = ws.layer_stride * L_;
    ws.kv_bytes = 2 * cache_elems * int64_t(sizeof(W));

    Layout act;
    const size_t x = act.add<float>(int64_t(cap) * C_), ln = act.add<W>(int64_t(cap) * C_),
                 qkv = act.add<float>(int64_t(cap) * 3 * C_), q = act.add<float>(int64_t(cap) * C_),
                 att = act.add<W>(int64_t(cap) * C_), delta = act.add<float>(int64_t(cap) * C_),
                 fc = act.add<float>(int64_t(cap) * 4 * C_), gelu = act.add<W>(int64_t(cap) * 4 * C_),
                 part_o = act.add<float>(attention_part_o_floats(cap, NH_, HS_, ctx)),
                 part_ml = act.add<float>(attention_part_ml_floats(cap, NH_, ctx)),
                 lnf = act.add<W>(int64_t(ws.sample_cap) * C_), logits = act.add<float>(int64_t(ws.sample_cap) * V_);

    Layout io;
    ws.tokens_at = io.add<int32_t>(cap);
    ws.slots_at = io.add<int32_t>(cap);
    ws.positions_at = io.add<int32_t>(cap);
    ws.sample_at_at = io.add<int32_t>(cap);
    ws.params_at = io.add<RowSampling>(cap);
    ws.inputs_bytes = io.total;
    ws.drawn_at = io.add<int32_t>(cap);
    ws.error_at = io.add<int>(1);
    ws.outputs_at = ws.drawn_at;
    ws.outputs_bytes = io.total - ws.drawn_at;

    size_t free_bytes = 0, total_bytes = 0;
    CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    const double need = double(ws.kv_bytes) + double(act.total) + double(io.total);
    if (need > double(free_bytes)) {
      throw CudaError("batch_size " + std::to_string(slots) + " with " + std::to_string(ctx) +
                      " positions per row needs " + gib(need) + " of GPU memory (KV cache " + gib(double(ws.kv_bytes)) +
                      "), but only " + gib(double(free_bytes)) + " of " + gib(double(total_bytes)) +
                      " are free: lower batch_size (or the length), or free GPU memory held elsewhere");
    }
    ws.kv = DeviceMemory(size_t(ws.kv_bytes));
    ws.k_cache = ws.kv.template at<W>();
    ws.v_cache = ws.k_cache + cache_elems;
    ws.act = DeviceMemory(act.total);
    ws.x = ws.act.template at<float>(x);
    ws.ln = ws.act.template at<W>(ln);
    ws.qkv = ws.act.template at<float>(qkv);
    ws.q = ws.act.template at<float>(q);
    ws.att = ws.act.template at<W>(att);
    ws.delta = ws.act.template at<float>(delta);
    ws.fc = ws.act.template at<float>(fc);
    ws.gelu = ws.act.template at<W>(gelu);
    ws.part_o = ws.act.template at<float>(part_o);
    ws.part_ml = ws.act.template at<float>(part_ml);
    ws.lnf = ws.act.template at<W>(lnf);
    ws.logits = ws.act.template at<float>(logits);
    ws.io = DeviceMemory(io.total);
    ws.host_io = PinnedMemory(io.total);
    CUDA_CHECK(cudaMemsetAsync(ws.io.template at<int>(ws.error_at), 0, sizeof(int), stream_.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream_.get()));
    ws_ = std::move(ws);
  }

  void step(const StepInput& in, StepOutput& out) override {
    CUDA_CHECK(cudaSetDevice(device_));
    Workspace<W>& ws = ws_;
    const int N = int(in.tokens.size()), R = int(in.sample_at.size());
    GPT2S_CUDA_ASSERT(ws.cap > 0, "step before reserve");
    GPT2S_CUDA_ASSERT(N >= 1 && N <= ws.cap, "step token count outside [1, reserved]");
    GPT2S_CUDA_ASSERT(in.slots.size() == size_t(N) && in.positions.size() == size_t(N), "step arrays disagree");
    GPT2S_CUDA_ASSERT(in.params.size() == size_t(R) && in.draw_position.size() == size_t(R) && R <= N,
                      "step sampling arrays disagree");
    GPT2S_CUDA_ASSERT(R <= ws.slots, "more sampling rows than slots");
    // The device trusts these indices: check them here, where a bug is an exception, not a fault.
    for (int j = 0; j < N; ++j) {
      GPT2S_CUDA_ASSERT(in.tokens[j] >= 0 && in.tokens[j] < V_, "token id out of range");
      GPT2S_CUDA_ASSERT(in.slots[j] >= 0 && in.slots[j] < ws.slots, "slot out of range");
      GPT2S_CUDA_ASSERT(in.positions[j] >= 0 && in.positions[j] < ws.ctx, "position out of range");
    }
    bool identity = R == N;
    for (int r = 0; r < R; ++r) {
      GPT2S_CUDA_ASSERT(in.sample_at[r] >= 0 && in.sample_at[r] < N, "sample_at out of range");
      identity = identity && in.sample_at[r] == r;
    }
    // A step where every row brings exactly its one next token (decode) replays a graph.
    const bool replay = use_graphs_ && identity;
    const int rows = replay ? bucket(N) : N;  // tokens the forward pass runs, padding included

    int32_t* tokens = ws.host_io.template at<int32_t>(ws.tokens_at);
    int32_t* slot_of = ws.host_io.template at<int32_t>(ws.slots_at);
    int32_t* positions = ws.host_io.template at<int32_t>(ws.positions_at);
    int32_t* sample_at = ws.host_io.template at<int32_t>(ws.sample_at_at);
    RowSampling* params = ws.host_io.template at<RowSampling>(ws.params_at);
    for (int j = 0; j < rows; ++j) {
      const bool pad = j >= N;  // padding tokens go to the scratch slot, position 0
      tokens[j] = pad ? 0 : in.tokens[j];
      slot_of[j] = pad ? ws.slots : in.slots[j];
      positions[j] = pad ? 0 : in.positions[j];
    }
    for (int r = 0; r < (replay ? rows : R); ++r) sample_at[r] = r < R ? in.sample_at[r] : r;
    for (int r = 0; r < R; ++r) params[r] = row_sampling(in.params[r], in.draw_position[r], V_);

    cudaStream_t stream = stream_.get();
    CUDA_CHECK(cudaMemcpyAsync(ws.io.template at<void>(), ws.host_io.template at<void>(), ws.inputs_bytes,
                               cudaMemcpyHostToDevice, stream));
    if (!replay) {
      forward(N, R);
    } else if (auto found = graphs_.find(rows); found != graphs_.end()) {
      CUDA_CHECK(cudaGraphLaunch(found->second.get(), stream));
    } else {
      // First step of this bucket: run it eagerly (which also loads every kernel and lets cuBLAS
      // pick its algorithms outside the capture), then capture the same pass for later steps.
      forward(rows, rows);
      try {
        capture(rows);
      } catch (const CudaError& e) {
        // This step's results stand (the eager pass made them); later steps run eagerly too.
        cudaGetLastError();
        use_graphs_ = false;
        graphs_.clear();
        description_ += std::string(" (off: capture failed: ") + e.what() + ")";
      }
    }
    CUDA_CHECK(cudaEventRecord(sample_start_.get(), stream));
    sample(ws.io.template at<int32_t>(ws.drawn_at), nullptr, ws.io.template at<int>(ws.error_at), ws.logits,
           ws.io.template at<RowSampling>(ws.params_at), R, V_, stream);
    CUDA_CHECK(cudaEventRecord(sample_end_.get(), stream));
    CUDA_CHECK(cudaMemcpyAsync(ws.host_io.template at<void>(ws.outputs_at), ws.io.template at<void>(ws.outputs_at),
                               ws.outputs_bytes, cudaMemcpyDeviceToHost, stream));
    if (in.want_logits) {
      out.logits.resize(size_t(R) * V_);
      CUDA_CHECK(cudaMemcpyAsync(out.logits.data(), ws.logits, out.logits.size() * sizeof(float),
                                 cudaMemcpyDeviceToHost, stream));
    } else {
      out.logits.clear();
    }
    CUDA_CHECK(cudaStreamSynchronize(stream));
    if (*ws.host_io.template at<int>(ws.error_at) != 0) throw_internal("sampler invariant", __FILE__, __LINE__);
    const int32_t* drawn = ws.host_io.template at<int32_t>(ws.drawn_at);
    out.drawn.assign(drawn, drawn + R);
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, sample_start_.get(), sample_end_.get()));
    out.sample_seconds = ms * 1e-3;
  }

  void copy_kv(int32_t from, int32_t to, int32_t begin, int32_t end) override {
    CUDA_CHECK(cudaSetDevice(device_));
    Workspace<W>& ws = ws_;
    GPT2S_CUDA_ASSERT(from >= 0 && from < ws.slots && to >= 0 && to < ws.slots && from != to && 0 <= begin &&
                          begin <= end && end <= ws.ctx,
                      "copy_kv: bad slots or positions");
    // Per layer (slots + 1, NH, ctx, HS): a slot's NH heads are rows of one 2D copy.
    const size_t pitch = size_t(ws.ctx) * HS_ * sizeof(W), width = size_t(end - begin) * HS_ * sizeof(W);
    W* const caches[2] = {ws.k_cache, ws.v_cache};
    for (W* cache : caches) {
      for (int l = 0; l < L_; ++l) {
        auto at = [&](int32_t slot) { return cache + l * ws.layer_stride + (int64_t(slot) * NH_ * ws.ctx + begin) * HS_; };
        CUDA_CHECK(cudaMemcpy2DAsync(at(to), pitch, at(from), pitch, width, size_t(NH_), cudaMemcpyDeviceToDevice,
                                     stream_.get()));
      }
    }
  }

  int64_t kv_cache_bytes() const override { return ws_.kv_bytes; }
  std::string describe() const override { return description_; }

 private:
  static Cublas make_cublas() {
    cublasHandle_t h = nullptr;
    CUBLAS_CHECK(cublasCreate(&h));
    return Cublas(h);
  }

  // Enqueues the forward pass of N tokens (the step's inputs already on the device) and leaves the
  // logits of the R sampling rows in ws_.logits. Only kernel launches and cuBLAS calls on stream_:
  // it is what a graph captures. Steps of a few rows (decode at small batch sizes) take
  // forward_few_rows: four fused products per layer instead of cuBLAS and six kernels around it.
  void forward(int N, int R) {
    if (decode_products_fit<W>(N, C_)) return forward_few_rows(N, R);
    Workspace<W>& ws = ws_;
    cudaStream_t stream = stream_.get();
    cublasHandle_t blas = cublas_.get();
    const int32_t* tokens = ws.io.template at<int32_t>(ws.tokens_at);
    const int32_t* slot_of = ws.io.template at<int32_t>(ws.slots_at);
    const int32_t* positions = ws.io.template at<int32_t>(ws.positions_at);
    const int32_t* sample_at = ws.io.template at<int32_t>(ws.sample_at_at);

    embedding(ws.x, w_.wte, w_.wpe, tokens, positions, N, C_, stream);
    for (int l = 0; l < L_; ++l) {
      const DeviceLayer<W>& layer = w_.h[l];
      // x += previous MLP output (from layer 1 on); ln = ln_1(x)
      const bool add = l > 0;
      residual_layernorm(ws.ln, ws.x, add ? ws.delta : nullptr, add ? w_.h[l - 1].mlp_c_proj_b : nullptr,
                         layer.ln_1_w, layer.ln_1_b, nullptr, true, N, C_, stream);
      gemm_xwt(blas, ws.qkv, ws.ln, layer.attn_c_attn_w, N, 3 * C_, C_);
      attention(ws.att, ws.q, ws.k_cache + l * ws.layer_stride, ws.v_cache + l * ws.layer_stride, ws.part_o,
                ws.part_ml, ws.qkv, layer.attn_c_attn_b, slot_of, positions, N, NH_, HS_, ws.ctx, stream);
      gemm_xwt(blas, ws.delta, ws.att, layer.attn_c_proj_w, N, C_, C_);
      // x += attention output; ln = ln_2(x)
      residual_layernorm(ws.ln, ws.x, ws.delta, layer.attn_c_proj_b, layer.ln_2_w, layer.ln_2_b, nullptr, true, N, C_,
                         stream);
      gemm_xwt(blas, ws.fc, ws.ln, layer.mlp_c_fc_w, N, 4 * C_, C_);
      bias_gelu(ws.gelu, ws.fc, layer.mlp_c_fc_b, N, 4 * C_, stream);
      gemm_xwt(blas, ws.delta, ws.gelu, layer.mlp_c_proj_w, N, C_, 4 * C_);
    }
    // Only the sampling rows go on: lnf = ln_f(x + last MLP output) at sample_at, logits = lnf wte^T.
    residual_layernorm(ws.lnf, ws.x, ws.delta, w_.h[L_ - 1].mlp_c_proj_b, w_.ln_f_w, w_.ln_f_b, sample_at, false, R, C_,
                       stream);
    gemm_xwt(blas, ws.logits, ws.lnf, w_.wte, R, V_, C_);
  }

  // The same pass for N <= kDecodeMaxRows tokens through decode.cuh's products, which add each
  // sub-layer's output to the residual stream x themselves.
  void forward_few_rows(int N, int R) {
    Workspace<W>& ws = ws_;
    cudaStream_t stream = stream_.get();
    const int32_t* slot_of = ws.io.template at<int32_t>(ws.slots_at);
    const int32_t* positions = ws.io.template at<int32_t>(ws.positions_at);
    auto product = [&](int n, int in, int out, const W* weight, const float* bias) {
      DecodeArgs<W> a;
      a.n = n;
      a.in = in;
      a.out = out;
      a.weight = weight;
      a.bias = bias;
      return a;
    };
    auto normalised = [&](DecodeArgs<W> a, const float* gamma, const float* beta) {
      a.residual = ws.x;
      a.gamma = gamma;
      a.beta = beta;
      return a;
    };

    embedding(ws.x, w_.wte, w_.wpe, ws.io.template at<int32_t>(ws.tokens_at), positions, N, C_, stream);
    for (int l = 0; l < L_; ++l) {
      const DeviceLayer<W>& layer = w_.h[l];
      W* k_cache = ws.k_cache + l * ws.layer_stride;
      W* v_cache = ws.v_cache + l * ws.layer_stride;
      // q, and k and v into the cache = ln_1(x) c_attn + b
      DecodeArgs<W> qkv = normalised(product(N, C_, 3 * C_, layer.attn_c_attn_w, layer.attn_c_attn_b), layer.ln_1_w,
                                     layer.ln_1_b);
      qkv.y = ws.q;
      qkv.k_cache = k_cache;
      qkv.v_cache = v_cache;
      qkv.slots = slot_of;
      qkv.positions = positions;
      qkv.NH = NH_;
      qkv.HS = HS_;
      qkv.T = ws.ctx;
      decode_product<W, true, DecodeOut::QKV>(qkv, multiprocessors_, stream);
      attend(ws.att, ws.q, k_cache, v_cache, ws.part_o, ws.part_ml, slot_of, positions, N, NH_, HS_, ws.ctx, stream);
      // x += att c_proj + b
      DecodeArgs<W> proj = product(N, C_, C_, layer.attn_c_proj_w, layer.attn_c_proj_b);
      proj.act = ws.att;
      proj.y = ws.x;
      decode_product<W, false, DecodeOut::Residual>(proj, multiprocessors_, stream);
      // gelu = gelu(ln_2(x) c_fc + b)
      DecodeArgs<W> fc = normalised(product(N, C_, 4 * C_, layer.mlp_c_fc_w, layer.mlp_c_fc_b), layer.ln_2_w,
                                    layer.ln_2_b);
      fc.act_out = ws.gelu;
      decode_product<W, true, DecodeOut::Gelu>(fc, multiprocessors_, stream);
      // x += gelu c_proj + b
      DecodeArgs<W> mlp = product(N, 4 * C_, C_, layer.mlp_c_proj_w, layer.mlp_c_proj_b);
      mlp.act = ws.gelu;
      mlp.y = ws.x;
      decode_product<W, false, DecodeOut::Residual>(mlp, multiprocessors_, stream);
    }
    // logits = ln_f(x at sample_at) wte^T
    DecodeArgs<W> logits = normalised(product(R, C_, V_, w_.wte, nullptr), w_.ln_f_w, w_.ln_f_b);
    logits.rows = ws.io.template at<int32_t>(ws.sample_at_at);
    logits.y = ws.logits;
    decode_product<W, true, DecodeOut::Logits>(logits, multiprocessors_, stream);
  }

  // The decode forward pass for `rows` tokens (= sampling rows), captured once per bucket. The
  // graph reads its inputs from the fixed io arrays, so replays only need those refreshed.
  void capture(int rows) {
    cudaStream_t stream = stream_.get();
    CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    try {
      forward(rows, rows);
    } catch (...) {
      cudaGraph_t broken = nullptr;
      cudaStreamEndCapture(stream, &broken);  // leaves the stream usable
      if (broken) cudaGraphDestroy(broken);
      throw;
    }
    cudaGraph_t captured = nullptr;
    CUDA_CHECK(cudaStreamEndCapture(stream, &captured));
    const Graph graph(captured);
    cudaGraphExec_t exec = nullptr;
    CUDA_CHECK(cudaGraphInstantiate(&exec, graph.get(), 0));
    graphs_.emplace(rows, GraphExec(exec));
  }

  Config config_;
  int C_ = 0, NH_ = 0, HS_ = 0, V_ = 0, L_ = 0;
  int device_;
  int multiprocessors_;
  bool use_graphs_;
  std::string description_;
  // Declaration order is destruction order reversed: graphs and buffers go before the stream.
  Stream stream_;
  Cublas cublas_;
  DeviceMemory cublas_workspace_;
  Event sample_start_, sample_end_;
  DeviceWeights<W> w_;
  Workspace<W> ws_;
  std::map<int, GraphExec> graphs_;  // bucket -> decode forward pass
};

// Runs the sampler over host logits: shared by the test hook and the timing hook.
struct SamplerSetup {
  Stream stream = make_stream();
  DeviceMemory logits, params, drawn, support, error;
  int B, V;

  SamplerSetup(const std::vector<float>& host_logits, int B_, int V_, const std::vector<SamplingParams>& p,
               const std::vector<uint64_t>& positions, bool want_support)
      : B(B_), V(V_) {
    if (B < 1 || V < 1 || host_logits.size() != size_t(B) * V || p.size() != size_t(B) || positions.size() != size_t(B)) {
      throw std::invalid_argument("sampler: logits must be (B, V) with B >= 1, V >= 1, and one parameter set per row");
    }
    std::vector<RowSampling> rows;
    for (int b = 0; b < B; ++b) rows.push_back(row_sampling(p[b], positions[b], V));
    logits = DeviceMemory(host_logits.size() * sizeof(float));
    params = DeviceMemory(rows.size() * sizeof(RowSampling));
    drawn = DeviceMemory(size_t(B) * sizeof(int32_t));
    error = DeviceMemory(sizeof(int));
    if (want_support) support = DeviceMemory(size_t(B) * V);
    CUDA_CHECK(cudaMemcpyAsync(logits.at<void>(), host_logits.data(), host_logits.size() * sizeof(float),
                               cudaMemcpyHostToDevice, stream.get()));
    CUDA_CHECK(cudaMemcpyAsync(params.at<void>(), rows.data(), rows.size() * sizeof(RowSampling), cudaMemcpyHostToDevice,
                               stream.get()));
    CUDA_CHECK(cudaMemsetAsync(error.at<void>(), 0, sizeof(int), stream.get()));
  }

  void launch(bool with_support) {
    sample(drawn.at<int32_t>(), with_support ? support.at<uint8_t>() : nullptr, error.at<int>(),
           logits.at<float>(), params.at<RowSampling>(), B, V, stream.get());
  }

  void check_error() {
    int flag = 0;
    CUDA_CHECK(cudaMemcpyAsync(&flag, error.at<int>(), sizeof(int), cudaMemcpyDeviceToHost, stream.get()));
    CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    if (flag) throw_internal("sampler invariant", __FILE__, __LINE__);
  }
};

}  // namespace

// ---------------------------------------------------------------------------------------------

CudaStatus cuda_status() {
  CudaStatus status;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();  // not sticky, but leave nothing behind
    const int runtime = CUDART_VERSION;
    const std::string version = std::to_string(runtime / 1000) + "." + std::to_string(runtime % 1000 / 10);
    if (err == cudaErrorInsufficientDriver) {
      status.reason = "no NVIDIA driver was found, or it is too old for CUDA " + version +
                      " (this build's runtime): install or update the driver (nvidia-smi shows it)";
    } else if (err == cudaErrorNoDevice) {
      status.reason = "no CUDA GPU is visible";
    } else {
      status.reason = std::string("CUDA cannot start: ") + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
    }
    if (err == cudaErrorNoDevice) {
      if (const char* visible = std::getenv("CUDA_VISIBLE_DEVICES")) {
        status.reason += std::string(" (CUDA_VISIBLE_DEVICES=") + visible + ")";
      }
    }
    return status;
  }
  if (count == 0) {
    status.reason = "no CUDA GPU is visible";
    return status;
  }
  // bf16 arithmetic and this build's machine code need compute capability 8.0 (Ampere) or newer.
  for (int d = 0; d < count; ++d) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, d) == cudaSuccess && prop.major >= 8) {
      status.devices = count;
      return status;
    }
    status.reason = std::string("the GPU (") + prop.name + ", compute capability " + std::to_string(prop.major) + "." +
                    std::to_string(prop.minor) + ") is older than the CUDA engine supports (8.0: A100, RTX 30xx/40xx, L4, H100)";
  }
  cudaGetLastError();
  return status;
}

DeviceInfo device_info(int device) {
  cudaDeviceProp prop{};
  CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  DeviceInfo info;
  info.index = device;
  info.name = prop.name;
  info.major = prop.major;
  info.minor = prop.minor;
  info.total_bytes = int64_t(prop.totalGlobalMem);
  info.multiprocessors = prop.multiProcessorCount;
  int current = 0;
  CUDA_CHECK(cudaGetDevice(&current));
  CUDA_CHECK(cudaSetDevice(device));
  size_t free_bytes = 0, total_bytes = 0;
  const cudaError_t err = cudaMemGetInfo(&free_bytes, &total_bytes);
  cudaSetDevice(current);
  CUDA_CHECK(err);
  info.free_bytes = int64_t(free_bytes);
  return info;
}

std::unique_ptr<Backend> make_cuda_backend(const ModelWeights& weights, const CudaOptions& options) {
  if (weights.dtype == DType::I8) {
    throw std::invalid_argument(
        "this model file holds int8 weights, which the CUDA engine does not run: export it with dtype 'bf16' (or 'fp32') "
        "for the GPU (`gpt_2_simple export --dtype bf16`), or use backend='cpu' for int8");
  }
  std::string dtype = options.dtype;
  if (dtype.empty()) dtype = weights.dtype == DType::BF16 ? "bf16" : "fp32";
  if (dtype != "fp32" && dtype != "bf16" && dtype != "fp16") {
    throw std::invalid_argument("CUDA dtype must be 'fp32', 'bf16' or 'fp16', got '" + dtype + "'");
  }
  check_device(options.device);
  CUDA_CHECK(cudaSetDevice(options.device));
  const DeviceInfo info = device_info(options.device);
  if (dtype == "fp32") return std::make_unique<CudaBackend<float>>(weights, options, info, "fp32");
  if (dtype == "bf16") return std::make_unique<CudaBackend<__nv_bfloat16>>(weights, options, info, "bf16");
  return std::make_unique<CudaBackend<__half>>(weights, options, info, "fp16");
}

SamplerRun sample_on_device(int device, const std::vector<float>& logits, int B, int V,
                            const std::vector<SamplingParams>& params, const std::vector<uint64_t>& positions,
                            bool want_support) {
  check_device(device);
  CUDA_CHECK(cudaSetDevice(device));
  SamplerSetup s(logits, B, V, params, positions, want_support);
  s.launch(want_support);
  SamplerRun run;
  run.drawn.resize(B);
  CUDA_CHECK(cudaMemcpyAsync(run.drawn.data(), s.drawn.at<void>(), B * sizeof(int32_t), cudaMemcpyDeviceToHost,
                             s.stream.get()));
  if (want_support) {
    run.support.resize(size_t(B) * V);
    CUDA_CHECK(cudaMemcpyAsync(run.support.data(), s.support.at<void>(), run.support.size(), cudaMemcpyDeviceToHost,
                               s.stream.get()));
  }
  s.check_error();  // synchronises
  return run;
}

double time_sampler_us(int device, const std::vector<float>& logits, int B, int V,
                       const std::vector<SamplingParams>& params, int iters) {
  if (iters < 1) throw std::invalid_argument("iters must be >= 1");
  check_device(device);
  CUDA_CHECK(cudaSetDevice(device));
  std::vector<uint64_t> positions(size_t(B), 0);
  SamplerSetup s(logits, B, V, params, positions, false);
  const Event start = make_event(), end = make_event();
  for (int i = 0; i < 3; ++i) s.launch(false);  // warm-up
  std::vector<float> times;
  for (int i = 0; i < iters; ++i) {
    CUDA_CHECK(cudaEventRecord(start.get(), s.stream.get()));
    s.launch(false);
    CUDA_CHECK(cudaEventRecord(end.get(), s.stream.get()));
    CUDA_CHECK(cudaEventSynchronize(end.get()));
    float ms = 0.f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start.get(), end.get()));
    times.push_back(ms * 1000.f);
  }
  s.check_error();
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace gpt2s::cuda
