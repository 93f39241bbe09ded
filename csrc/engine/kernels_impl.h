// The CPU kernels, written once over simd.h and compiled once per instruction set by
// kernels_<isa>.cpp, inside namespace gpt2s::<isa>. Only intrinsics, builtins and this namespace's
// own functions are used here: no std:: templates (see simd.h for why).
// Shapes: M or N token rows, K inputs, N outputs, C channels, NH heads, HS head size.

#include "engine/simd.h"

inline float bf16_to_f32(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &bits, 4);
  return f;
}

// Round to nearest even, as PyTorch's and our exporter's fp32 -> bf16 conversion.
inline uint16_t f32_to_bf16(float f) {
  uint32_t bits;
  __builtin_memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((bits >> 16) | 0x40);  // NaN stays NaN
  return uint16_t((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Below this many multiply-adds (or element operations) a kernel runs on the calling thread alone:
// waking the pool's workers costs microseconds.
constexpr int64_t kParallelWork = int64_t(1) << 18;

// fn(job, chunk, thread) for chunks [0, n): through the pool when the work is worth it.
template <class Job>
inline void parallel_chunks(ThreadPool& pool, int64_t n, int64_t work, void (*fn)(void*, int64_t, int), Job* job) {
  if (work >= kParallelWork) {
    pool.run(n, fn, job);
  } else {
    for (int64_t c = 0; c < n; ++c) fn(job, c, 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Matmul: each output is a dot product of a row of x and a row of w (both contiguous over K),
// accumulated in kLanes partial sums stepping through K in order, reduced by vhsum, then the
// scalar tail. A micro-kernel computes an RB x NB block of such dot products sharing loads: each
// w vector is loaded once for RB rows and each x vector once for NB outputs.

struct F32Dot {
  using T = float;
  using V = Vf;
  static constexpr int kStep = kLanes;
  static V load(const float* p) { return vload(p); }
  static Vf madd(Vf acc, V x, V w) { return vfma(x, w, acc); }
  static float value(float a) { return a; }
};

struct BF16Dot {
  using T = uint16_t;
  using V = Vb;
  static constexpr int kStep = 2 * kLanes;
  static V load(const uint16_t* p) { return vload_bf16(p); }
  static Vf madd(Vf acc, V x, V w) { return vdot_bf16(acc, x, w); }
  static float value(uint16_t a) { return bf16_to_f32(a); }
};

#if defined(__AVX512F__)
constexpr int kRowBlock = 4, kColBlock = 6;  // 24 accumulators + 4 x + 1 w of 32 registers
#elif defined(__AVX2__)
constexpr int kRowBlock = 3, kColBlock = 4;  // 12 accumulators + 3 x + 1 w of 16 registers
#else
constexpr int kRowBlock = 2, kColBlock = 4;
#endif

// out[r * ldo + n] = dot(x row r, w row n) for r < RB, n < NB. With `ahead`, also prefetch rows
// n of the block there whose bit is set in `fetch_rows` (interleaved rows are short streams the
// hardware prefetcher does not run ahead of; the caller spreads the next block's rows over the
// row blocks that use this one).
template <class D, int RB, int NB>
inline void dot_block(const typename D::T* x, int64_t ldx, const typename D::T* w, int64_t ldw, int64_t K, float* out,
                      int64_t ldo, const typename D::T* ahead = nullptr, unsigned fetch_rows = 0) {
  Vf acc[RB][NB];
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) acc[r][n] = vzero();
  int64_t k = 0;
  for (; k + D::kStep <= K; k += D::kStep) {
    if (ahead != nullptr) {
#pragma GCC unroll 8
      for (int n = 0; n < NB; ++n) {
        if (fetch_rows >> n & 1u) __builtin_prefetch(ahead + n * ldw + k);
      }
    }
    typename D::V xv[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) xv[r] = D::load(x + r * ldx + k);
#pragma GCC unroll 8
    for (int n = 0; n < NB; ++n) {
      const typename D::V wv = D::load(w + n * ldw + k);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) acc[r][n] = D::madd(acc[r][n], xv[r], wv);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int n = 0; n < NB; ++n) {
      float s = vhsum(acc[r][n]);
      for (int64_t t = k; t < K; ++t) s += D::value(x[r * ldx + t]) * D::value(w[n * ldw + t]);
      out[r * ldo + n] = s;
    }
  }
}

// Rows [0, M) against NB outputs, in row blocks of kRowBlock and a smaller last one.
template <class D, int NB>
inline void dot_rows(const typename D::T* x, int64_t M, int64_t K, const typename D::T* w, float* out, int64_t ldo,
                     const typename D::T* ahead = nullptr, unsigned fetch_rows = 0) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock) {
    dot_block<D, kRowBlock, NB>(x + m * K, K, w, K, K, out + m * ldo, ldo, ahead, fetch_rows);
  }
  switch (M - m) {
    case 1: dot_block<D, 1, NB>(x + m * K, K, w, K, K, out + m * ldo, ldo); break;
    case 2: if constexpr (kRowBlock > 2) dot_block<D, 2, NB>(x + m * K, K, w, K, K, out + m * ldo, ldo); break;
    case 3: if constexpr (kRowBlock > 3) dot_block<D, 3, NB>(x + m * K, K, w, K, K, out + m * ldo, ldo); break;
    default: break;
  }
}

inline Vf vgelu(Vf x) {
  // gelu_tanh(x) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)) = x / (1 + exp(-2u)).
  const Vf x3 = vmul(vmul(x, x), x);
  const Vf u2 = vmul(vfma(x3, vset1(0.044715f), x), vset1(-1.5957691216057308f));  // -2 sqrt(2/pi)
  return vdiv(x, vadd(vset1(1.0f), vexp(u2)));
}

inline float gelu_scalar(float x) {
  const float u2 = -1.5957691216057308f * (x + 0.044715f * x * x * x);
  return x / (1.0f + __builtin_expf(u2 > 88.0f ? 88.0f : u2));
}

// Outputs per parallel work item: small enough to balance two busy cores, large enough that a
// work item streams several KB of weights.
constexpr int64_t kColChunk = 16 * kColBlock;

// Up to this many rows, the weights are read one row after the other (one sequential stream
// the hardware prefetcher keeps up with: memory-bound decoding); above it, kColBlock rows are
// interleaved so each weight load serves kRowBlock rows (compute-bound batches and prefill).
constexpr int64_t kStreamRows = kRowBlock;

template <class D>
struct MatmulJob {
  const typename D::T* x;  // (M, K)
  int64_t M, K;
  const typename D::T* w;  // (N, K)
  int64_t N;
  const float* bias;       // (N) or null
  float* y;                // (M, N)
  Epilogue epilogue;
};

// Outputs [c * kColChunk, (c + 1) * kColChunk) for all M rows.
template <class D>
void matmul_chunk(void* job_ptr, int64_t c, int /*thread*/) {
  const MatmulJob<D>& j = *static_cast<const MatmulJob<D>*>(job_ptr);
  const int64_t M = j.M, K = j.K, N = j.N;
  const typename D::T* x = j.x;
  const typename D::T* w = j.w;
  float* y = j.y;
  float block[kRowBlock * kColBlock];  // (rows, kColBlock) dot products before the epilogue
  const int64_t n_begin = c * kColChunk, n_end = min64(N, n_begin + kColChunk);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kColBlock) {
    const int64_t nb = min64(kColBlock, n_end - n0);
    for (int64_t m0 = 0; m0 < M; m0 += kRowBlock) {
      const int64_t rb = min64(kRowBlock, M - m0);
      if (M > kStreamRows && nb == kColBlock) {
        // Row block i fetches rows i, i + blocks, ... of the next column block.
        const int64_t blocks = (M + kRowBlock - 1) / kRowBlock, i = m0 / kRowBlock;
        unsigned fetch_rows = 0;
        for (int64_t n = i; n < kColBlock; n += blocks) fetch_rows |= 1u << n;
        const typename D::T* ahead = n0 + 2 * kColBlock <= N ? w + (n0 + kColBlock) * K : nullptr;
        dot_rows<D, kColBlock>(x + m0 * K, rb, K, w + n0 * K, block, kColBlock, ahead, fetch_rows);
      } else {
        for (int64_t jn = 0; jn < nb; ++jn) dot_rows<D, 1>(x + m0 * K, rb, K, w + (n0 + jn) * K, block + jn, kColBlock);
      }
      for (int64_t r = 0; r < rb; ++r) {
        float* yr = y + (m0 + r) * N + n0;
        for (int64_t jn = 0; jn < nb; ++jn) {
          const float v = block[r * kColBlock + jn] + (j.bias ? j.bias[n0 + jn] : 0.0f);
          yr[jn] = j.epilogue == Epilogue::kAdd ? yr[jn] + v : v;
        }
      }
    }
  }
  if (j.epilogue == Epilogue::kGelu) {
    for (int64_t m = 0; m < M; ++m) {
      float* yr = y + m * N;
      int64_t n = n_begin;
      for (; n + kLanes <= n_end; n += kLanes) vstore(yr + n, vgelu(vload(yr + n)));
      for (; n < n_end; ++n) yr[n] = gelu_scalar(yr[n]);
    }
  }
}

template <class D>
void matmul_t(ThreadPool& pool, const typename D::T* x, int64_t M, int64_t K, const typename D::T* w, int64_t N,
              const float* bias, float* y, Epilogue epilogue) {
  MatmulJob<D> job{x, M, K, w, N, bias, y, epilogue};
  parallel_chunks(pool, (N + kColChunk - 1) / kColChunk, M * N * K, matmul_chunk<D>, &job);
}

void matmul(ThreadPool& pool, const float* x, int64_t M, int64_t K, const TensorView& w, const float* bias, float* y,
            Epilogue epilogue, uint16_t* xb) {
  const int64_t N = w.rows;
  if (w.dtype == DType::F32) {
    matmul_t<F32Dot>(pool, x, M, K, static_cast<const float*>(w.data), N, bias, y, epilogue);
    return;
  }
  // bf16 weights: round the activations to bf16 once, then every dot product is bf16 x bf16
  // products (exact in fp32) accumulated in fp32.
  for (int64_t i = 0; i < M * K; ++i) xb[i] = f32_to_bf16(x[i]);
  matmul_t<BF16Dot>(pool, xb, M, K, static_cast<const uint16_t*>(w.data), N, bias, y, epilogue);
}

// ---------------------------------------------------------------------------------------------

inline float sum_lanes(const float* x, int64_t n) {
  Vf acc = vzero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = vadd(acc, vload(x + i));
  float s = vhsum(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

struct RowsJob {
  const float* x;  // (M, C) input rows
  int64_t M, C;
  const float* g;  // layernorm: (C) weight and bias
  const float* b;
  float* y;        // (M, C)
  int64_t per_chunk;
};

void layernorm_rows(const float* x, int64_t C, const float* g, const float* b, float* y, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const float* xr = x + m * C;
    float* yr = y + m * C;
    const float mean = sum_lanes(xr, C) / float(C);
    // Two passes (mean, then squared deviations): no cancellation for large activations.
    const Vf vm = vset1(mean);
    Vf acc = vzero();
    int64_t i = 0;
    for (; i + kLanes <= C; i += kLanes) {
      const Vf d = vsub(vload(xr + i), vm);
      acc = vfma(d, d, acc);
    }
    float var = vhsum(acc);
    for (; i < C; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const float rstd = 1.0f / __builtin_sqrtf(var / float(C) + 1e-5f);
    const Vf vr = vset1(rstd);
    for (i = 0; i + kLanes <= C; i += kLanes) {
      vstore(yr + i, vfma(vmul(vsub(vload(xr + i), vm), vr), vload(g + i), vload(b + i)));
    }
    for (; i < C; ++i) yr[i] = (xr[i] - mean) * rstd * g[i] + b[i];
  }
}

void layernorm(ThreadPool& pool, const float* x, int64_t M, int64_t C, const float* g, const float* b, float* y) {
  RowsJob job{x, M, C, g, b, y, (M + 4 * pool.size() - 1) / (4 * pool.size())};
  parallel_chunks(pool, (M + job.per_chunk - 1) / job.per_chunk, M * C, +[](void* p, int64_t c, int) {
    const RowsJob& j = *static_cast<const RowsJob*>(p);
    layernorm_rows(j.x, j.C, j.g, j.b, j.y, c * j.per_chunk, min64(j.M, (c + 1) * j.per_chunk));
  }, &job);
}

// ---------------------------------------------------------------------------------------------

inline float dot_f32(const float* a, const float* b, int64_t n) {
  Vf acc = vzero();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = vhsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// w[i] = exp(x[i] / divisor - m) for i < n (w may be x); returns the float64 sum of the w.
inline double exp_shifted(const float* x, int64_t n, float divisor, float m, float* w) {
  const Vf vd = vset1(divisor), vm = vset1(m);
  double sum = 0.0;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const Vf e = vexp(vsub(vdiv(vload(x + i), vd), vm));
    vstore(w + i, e);
    sum += double(vhsum(e));
  }
  if (i < n) {  // the tail through a padded vector: exp(-inf) lanes are 0
    float tail[kLanes];
    for (int j = 0; j < kLanes; ++j) tail[j] = i + j < n ? x[i + j] : -__builtin_inff();
    vstore(tail, vexp(vsub(vdiv(vload(tail), vd), vm)));
    for (int j = 0; i + j < n; ++j) {
      w[i + j] = tail[j];
      sum += double(tail[j]);
    }
  }
  return sum;
}

struct AttentionJob {
  const float* qkv;  // (N, 3C)
  const int32_t* slot;
  const int32_t* pos;
  const float* k;    // (slots, NH, T_cap, HS)
  const float* v;
  int64_t N, NH, HS, T_cap;
  float* out;        // (N, C)
  float* scratch;    // (threads, T_cap)
  int64_t per_chunk; // (token, head) tasks per chunk
};

// One (token, head): softmax(q K^T / sqrt(HS)) V over the token's positions 0..pos.
void attend(const AttentionJob& j, int64_t i, int64_t h, float* scores) {
  const int64_t C = j.NH * j.HS, HS = j.HS;
  const int64_t T = int64_t(j.pos[i]) + 1;
  const float scale = 1.0f / __builtin_sqrtf(float(HS));
  const float* q = j.qkv + i * 3 * C + h * HS;
  const float* kh = j.k + (int64_t(j.slot[i]) * j.NH + h) * j.T_cap * HS;  // (T_cap, HS)
  const float* vh = j.v + (int64_t(j.slot[i]) * j.NH + h) * j.T_cap * HS;  // (T_cap, HS)
  float m = -__builtin_inff();
  for (int64_t t = 0; t < T; ++t) {
    scores[t] = dot_f32(q, kh + t * HS, HS) * scale;
    m = scores[t] > m ? scores[t] : m;
  }
  const float inv = float(1.0 / exp_shifted(scores, T, 1.0f, m, scores));
  float* o = j.out + i * C + h * HS;  // (HS)
  for (int64_t d = 0; d < HS; ++d) o[d] = 0.0f;
  for (int64_t t = 0; t < T; ++t) {  // each cached value row read once
    const Vf p = vset1(scores[t]);
    const float* vr = vh + t * HS;
    int64_t d = 0;
    for (; d + kLanes <= HS; d += kLanes) vstore(o + d, vfma(p, vload(vr + d), vload(o + d)));
    for (; d < HS; ++d) o[d] += scores[t] * vr[d];
  }
  const Vf vinv = vset1(inv);
  int64_t d = 0;
  for (; d + kLanes <= HS; d += kLanes) vstore(o + d, vmul(vload(o + d), vinv));
  for (; d < HS; ++d) o[d] *= inv;
}

void attention(ThreadPool& pool, const float* qkv, int64_t N, const int32_t* slot, const int32_t* pos, const float* k,
               const float* v, int64_t NH, int64_t HS, int64_t T_cap, float* out, float* scratch) {
  const int64_t tasks = N * NH;
  AttentionJob job{qkv, slot, pos, k, v, N, NH, HS, T_cap, out, scratch, (tasks + 8 * pool.size() - 1) / (8 * pool.size())};
  int64_t work = 0;  // multiply-adds: two per head dimension and attended position
  for (int64_t i = 0; i < N; ++i) work += 2 * (int64_t(pos[i]) + 1) * NH * HS;
  parallel_chunks(pool, (tasks + job.per_chunk - 1) / job.per_chunk, work, +[](void* p, int64_t c, int thread) {
    const AttentionJob& j = *static_cast<const AttentionJob*>(p);
    float* scores = j.scratch + int64_t(thread) * j.T_cap;
    for (int64_t task = c * j.per_chunk; task < min64(j.N * j.NH, (c + 1) * j.per_chunk); ++task) {
      attend(j, task / j.NH, task % j.NH, scores);
    }
  }, &job);
}

// ---------------------------------------------------------------------------------------------

// out (C) += row `row` of t (fp32 or bf16), widened to fp32.
inline void add_row(const TensorView& t, int64_t row, int64_t C, float* out) {
  if (t.dtype == DType::F32) {
    const float* src = static_cast<const float*>(t.data) + row * C;
    for (int64_t c = 0; c < C; ++c) out[c] += src[c];
    return;
  }
  const uint16_t* src = static_cast<const uint16_t*>(t.data) + row * C;
  int64_t c = 0;
  for (; c + kLanes <= C; c += kLanes) vstore(out + c, vadd(vload(out + c), vload_bf16_f32(src + c)));
  for (; c < C; ++c) out[c] += bf16_to_f32(src[c]);
}

struct EmbedJob {
  const TensorView* wte;
  const TensorView* wpe;
  const int32_t* tokens;
  const int32_t* pos;
  int64_t C;
  float* x;  // (N, C)
};

void embed(ThreadPool& pool, const TensorView& wte, const TensorView& wpe, const int32_t* tokens, const int32_t* pos,
           int64_t N, int64_t C, float* x) {
  EmbedJob job{&wte, &wpe, tokens, pos, C, x};
  parallel_chunks(pool, N, N * C, +[](void* p, int64_t i, int) {
    const EmbedJob& j = *static_cast<const EmbedJob*>(p);
    float* xr = j.x + i * j.C;
    for (int64_t c = 0; c < j.C; ++c) xr[c] = 0.0f;
    add_row(*j.wte, j.tokens[i], j.C, xr);
    add_row(*j.wpe, j.pos[i], j.C, xr);
  }, &job);
}

// ---------------------------------------------------------------------------------------------
// Sampler helpers.

float max_value(const float* x, int64_t n) {
  Vf acc = vset1(-__builtin_inff());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) acc = vmax(vload(x + i), acc);  // a NaN lane keeps acc
  float m = vhmax(acc);
  for (; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

double exp_weights(const float* x, int64_t n, float temperature, float m, float* w) {
  return exp_shifted(x, n, temperature, m, w);
}

extern const Kernels table;
const Kernels table = {GPT2S_ISA_NAME, matmul, layernorm, attention, embed, max_value, exp_weights};
