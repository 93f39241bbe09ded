// The CPU kernels, written once over simd.h and compiled once per instruction set by
// kernels_isa.cpp (CMakeLists.txt), inside namespace gpt2s::<isa>. Only intrinsics, builtins and this namespace's
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

// Asks for the cache lines of [p, p + bytes) in the L2, for reading soon.
inline void prefetch_row(const void* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(static_cast<const char*>(p) + b, 0, 2);
}

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
// Matmul over packed weights. pack() cuts the stored (N, K) matrix into panels of kPanel outputs:
// an fp32 panel is (K, kPanel), the weights of its kPanel outputs for input 0, then input 1, ...;
// a bf16 panel is (ceil(K / 2), kPanel, 2), the same by pairs of inputs (what vdpbf16ps takes).
// Outputs past N and the odd input past K are zeros. The micro-kernel holds RB x kPanelVecs
// accumulator vectors (RB token rows by kPanel outputs) and, for each input, multiplies x[r][k]
// broadcast by one panel row: every output accumulates its products in input order in a lane of
// its own, so there are no horizontal sums, the weights stream through once, in order, and a
// result never depends on the row block, the panel or the thread that computed it.

#if defined(__AVX512F__)
constexpr int kRowBlock = 4, kPanelVecs = 6;  // 24 accumulators + 4 broadcasts + 1 weight of 32 registers
#elif defined(__AVX2__)
constexpr int kRowBlock = 3, kPanelVecs = 4;  // 12 accumulators + 3 broadcasts + 1 weight of 16 registers
#elif defined(__ARM_NEON) && defined(__aarch64__)
// 20 accumulators of 32 registers; bf16 splits each broadcast pair and weight vector in two (8 +
// 2) plus the mask: 31. Chosen by register count alone (no ARM hardware to time it on here).
constexpr int kRowBlock = 4, kPanelVecs = 5;
#else
constexpr int kRowBlock = 2, kPanelVecs = 4;
#endif
constexpr int64_t kPanel = kPanelVecs * kLanes;  // outputs per panel

inline int64_t pairs(int64_t K) { return (K + 1) / 2; }
inline int64_t quads(int64_t K) { return (K + 3) / 4; }

// An int8 panel (the "int8 weights" section below): (quads(K), kPanel, 4) bytes of weights, then
// the panel's kPanel fp32 scales and kPanel int32 sums of q.
inline int64_t i8_weight_bytes(int64_t K) { return quads(K) * kPanel * 4; }
inline int64_t i8_panel_bytes(int64_t K) { return i8_weight_bytes(K) + kPanel * 8; }

int64_t packed_bytes(int64_t N, int64_t K, DType dtype) {
  const int64_t panels = (N + kPanel - 1) / kPanel;
  if (dtype == DType::I8) return panels * i8_panel_bytes(K);
  return dtype == DType::F32 ? panels * K * kPanel * 4 : panels * pairs(K) * kPanel * 2 * 2;
}

// A panel is the transpose of its kPanel stored rows, on 32-bit words either way: an fp32 weight is
// a word, and so is a bf16 pair (inputs 2q, 2q + 1, the first in the low half as in memory).
#if defined(__AVX512F__)
// r[j] <- the j-th 32-bit lanes of r[0..16) (a 16 x 16 transpose).
inline void transpose16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(u[i], u[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(u[i + 8], u[i + 12], 0xdd);
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
  }
}

// 16 words of a stored row of K inputs from word q0, zeros past K (an odd K's last bf16 pairs
// with a zero).
inline __m512i row_words(const uint8_t* row, int64_t q0, int64_t K, bool f32) {
  const int64_t left = K - (f32 ? q0 : 2 * q0);  // inputs from word q0 to the row's end
  if (f32) return _mm512_maskz_loadu_epi32(left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1), row + 4 * q0);
  return _mm512_maskz_loadu_epi16(left >= 32 ? __mmask32(0xFFFFFFFFu) : __mmask32((1u << left) - 1), row + 4 * q0);
}

// Panel p of the stored w into out (words, kPanel): 16 rows by 16 words at a time, transposed in
// registers (loading 124M: fp32 175 -> 125 ms, bf16 99 -> 71 ms against the word copies below).
void pack_panel(const TensorView& w, int64_t p, uint32_t* out) {
  const int64_t N = w.rows, K = w.cols;
  const bool f32 = w.dtype == DType::F32;
  const int64_t words = f32 ? K : pairs(K), row_bytes = K * (f32 ? 4 : 2), rows = min64(kPanel, N - p * kPanel);
  const uint8_t* first = static_cast<const uint8_t*>(w.data) + p * kPanel * row_bytes;
  for (int64_t i0 = 0; i0 < kPanel; i0 += 16) {
    for (int64_t q0 = 0; q0 < words; q0 += 16) {
      __m512i r[16];
      for (int l = 0; l < 16; ++l) {  // rows past N (the last panel's padding) are zeros
        r[l] = i0 + l < rows ? row_words(first + (i0 + l) * row_bytes, q0, K, f32) : _mm512_setzero_si512();
      }
      transpose16(r);
      for (int64_t q = 0; q < min64(16, words - q0); ++q) _mm512_storeu_si512(out + (q0 + q) * kPanel + i0, r[q]);
    }
  }
}
#else
// Word q (inputs 2q, 2q + 1 for bf16; 0 past K) of a stored row of K inputs.
inline uint32_t pack_word(const uint8_t* row, int64_t q, int64_t K, bool f32) {
  uint32_t word;
  if (f32 || 2 * q + 1 < K) {
    __builtin_memcpy(&word, row + 4 * q, 4);
  } else {  // the last pair of an odd K: the input past K is 0
    uint16_t half;
    __builtin_memcpy(&half, row + 4 * q, 2);
    word = half;
  }
  return word;
}

// Panel p of the stored w into out (words, kPanel), in tiles of kPackTile words of every row,
// whose kPanel x kPackTile words stay in the L1 cache: a row at a time across the whole panel
// would write each of its K cache lines once per row.
constexpr int64_t kPackTile = 16;
void pack_panel(const TensorView& w, int64_t p, uint32_t* out) {
  const int64_t N = w.rows, K = w.cols;
  const bool f32 = w.dtype == DType::F32;
  const int64_t words = f32 ? K : pairs(K), row_bytes = K * (f32 ? 4 : 2), rows = min64(kPanel, N - p * kPanel);
  const uint8_t* first = static_cast<const uint8_t*>(w.data) + p * kPanel * row_bytes;
  for (int64_t q0 = 0; q0 < words; q0 += kPackTile) {
    const int64_t qn = min64(kPackTile, words - q0);
    for (int64_t i = 0; i < kPanel; ++i) {  // rows past N (the last panel's padding) are zeros
      uint32_t* d = out + q0 * kPanel + i;
      for (int64_t q = 0; q < qn; ++q) d[q * kPanel] = i < rows ? pack_word(first + i * row_bytes, q0 + q, K, f32) : 0;
    }
  }
}
#endif

struct PackJob {
  const TensorView* w;
  void* out;
};

void pack_i8(ThreadPool& pool, const TensorView& w, void* out);  // int8 weights, below

void pack(ThreadPool& pool, const TensorView& w, void* out) {
  if (w.dtype == DType::I8) return pack_i8(pool, w, out);
  PackJob job{&w, out};
  const int64_t panels = (w.rows + kPanel - 1) / kPanel;
  parallel_chunks(pool, panels, w.rows * w.cols, +[](void* ptr, int64_t p, int) {
    const PackJob& j = *static_cast<const PackJob*>(ptr);
    pack_panel(*j.w, p, static_cast<uint32_t*>(j.out) + p * packed_bytes(kPanel, j.w->cols, j.w->dtype) / 4);
  }, &job);
}

// The two weight formats a panel holds, as the micro-kernel sees them: inputs per step, the x
// value(s) broadcast to every lane, one vector of panel weights, and the multiply-add.
struct WeightsF32 {
  using T = float;
  using Vx = Vf;
  static constexpr int kStep = 1;
  static Vf broadcast(const float* x) { return vset1(*x); }
  static Vf load(const float* w) { return vload(w); }
  static Vf madd(Vf acc, Vf x, Vf w) { return vfma(x, w, acc); }
};
struct WeightsBF16 {  // x rows bf16 with an even stride (a zero after an odd K)
  using T = uint16_t;
  using Vx = Vb;
  static constexpr int kStep = 2;
  static Vb broadcast(const uint16_t* x) { return vbcast_pair(x); }
  static Vb load(const uint16_t* w) { return vload_bf16(w); }
  static Vf madd(Vf acc, Vb x, Vb w) { return vdot_bf16(acc, x, w); }
};

// Inputs per slice: a panel is multiplied slice by slice (fp32: 16 KiB of weights on AVX2, 24 KiB
// on AVX-512), every row of a group of up to kGroupRows rows over one slice before the next, so
// that the slice comes from memory once and from the L1 or L2 cache for the other row blocks.
// AVX-512's panels are three times AVX2's: 128-input slices of 48 KiB filled Sapphire Rapids' L1
// (48 KiB); 64 inputs made batch 20 10% faster and a 512-token prefill 4-5%
// (bench/results/20261207-slice-avx512-spr.json). Meanwhile the row blocks
// prefetch the next slice into the L2, a few cache lines per input step, spread over all of the
// group's passes: the memory streams while the arithmetic runs, instead of each first pass
// waiting on it. The partial sums wait in memory between slices as fp32, exactly, so every output
// still accumulates input after input in its own lane.
constexpr int64_t kSlice = kLanes == 16 ? 64 : 128;
constexpr int kGroupRows = 8 * kRowBlock;
constexpr int64_t kStepBytes = kPanel * 4;  // panel bytes per input step, either format

// Where the next prefetch goes, how far it may go, and how many cache lines per input step.
struct Prefetch {
  const char* at;
  const char* end;
  int64_t lines_per_step;
};

// A row block's accumulators from acc (RB, kPanel), or zeros when `first`; and back.
template <int RB>
inline void load_block(Vf (&a)[RB][kPanelVecs], const float* acc, bool first) {
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) a[r][v] = first ? vzero() : vload(acc + r * kPanel + v * kLanes);
}
template <int RB>
inline void store_block(const Vf (&a)[RB][kPanelVecs], float* acc) {
#pragma GCC unroll 8
  for (int r = 0; r < RB; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) vstore(acc + r * kPanel + v * kLanes, a[r][v]);
}

// acc (RB, kPanel) += x (RB rows of stride ldx, inputs [0, n)) times the panel's weights of those
// inputs, each output in its own lane, input after input; acc starts at zero when `first`.
template <class W, int RB>
inline void slice_block(const typename W::T* x, int64_t ldx, int64_t n, const typename W::T* panel, float* acc, bool first,
                        Prefetch& pf) {
  Vf a[RB][kPanelVecs];
  load_block<RB>(a, acc, first);
  const char* at = pf.at;
  for (int64_t k = 0; k < n; k += W::kStep, panel += W::kStep * kPanel) {
    for (int64_t i = 0; i < pf.lines_per_step && at < pf.end; ++i, at += 64) __builtin_prefetch(at, 0, 2);
    typename W::Vx xb[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) xb[r] = W::broadcast(x + r * ldx + k);
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) {
      const auto wv = W::load(panel + v * W::kStep * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) a[r][v] = W::madd(a[r][v], xb[r], wv);
    }
  }
  pf.at = at;
  store_block<RB>(a, acc);
}

inline Vf vgelu(Vf x) {
  // gelu_tanh(x) = x * sigmoid(2 * sqrt(2/pi) * (x + 0.044715 x^3)) = x / (1 + exp(-2u)).
  const Vf x3 = vmul(vmul(x, x), x);
  const Vf u2 = vmul(vfma(x3, vset1(0.044715f), x), vset1(-1.5957691216057308f));  // -2 sqrt(2/pi)
  return vdiv(x, vadd(vset1(1.0f), vexp(u2)));
}

// y = epilogue(acc + bias) for one row of one panel: `valid` outputs at y (all kPanel, or fewer
// in the last panel, which goes through a padded copy with the very same vector operations).
inline void store_panel(const float* acc, const float* bias, float* y, int64_t valid, Epilogue epilogue) {
  float yb[kPanel], bb[kPanel];
  const bool full = valid == kPanel;
  if (!full) {
    for (int64_t i = 0; i < kPanel; ++i) {
      yb[i] = i < valid && epilogue == Epilogue::kAdd ? y[i] : 0.0f;
      bb[i] = i < valid && bias ? bias[i] : 0.0f;
    }
  }
  float* out = full ? y : yb;
  const float* b = full ? bias : bb;
#pragma GCC unroll 8
  for (int v = 0; v < kPanelVecs; ++v) {
    Vf t = vload(acc + v * kLanes);
    if (b) t = vadd(t, vload(b + v * kLanes));
    if (epilogue == Epilogue::kGelu) t = vgelu(t);
    if (epilogue == Epilogue::kAdd) t = vadd(vload(out + v * kLanes), t);
    vstore(out + v * kLanes, t);
  }
  if (!full) {
    for (int64_t i = 0; i < valid; ++i) y[i] = yb[i];
  }
}

// out[i] = x[i] rounded to bf16, nearest even.
inline void round_bf16(const float* x, int64_t n, uint16_t* out) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) vstore_bf16(out + i, vload(x + i));
  for (; i < n; ++i) out[i] = f32_to_bf16(x[i]);
}

struct MatmulJob {
  const void* x;     // (M, ldx) fp32, or bf16 for bf16 weights (fp32, pairs swapped, where widened)
  int64_t M, K, ldx;
  const PackedMatrix* w;
  const float* bias; // (N) or null
  float* y;          // (M, N)
  Epilogue epilogue;
  int64_t panels;    // per chunk
};

// bf16 weights where the ISA has no bf16 dot product (AVX2): vdot_bf16 splits every weight vector
// and every broadcast pair into two fp32 halves (an and, a shift) next to each pair of FMAs, and 3
// rows x 4 vectors of accumulators plus the split operands need more than AVX2's 16 registers:
// the compiler spilled five accumulators to the stack, and bf16 ran at 0.75x fp32 from batch 4 up
// (docs/engine.md). For more than one row block, each slice of a panel is instead widened once
// per group into an fp32 copy (16 KiB, in the L1 cache) by the first row block as it multiplies
// it, and the group's other row blocks run the fp32 micro-kernel on the copy, with activations
// rounded to bf16 and stored as fp32. The copy holds the odd input of each pair before the even
// one, and the activations are swapped to match, so every lane computes the very FMAs of
// vdot_bf16 in its order: bit for bit the direct path, which matmuls of 1-3 rows keep (their one
// pass streams the weights from memory, and splitting in registers costs nothing there).
// AVX-512 without AVX512-BF16 has the same split vdot_bf16, and widens too. With it, the CPU
// decides: Sapphire Rapids issues one vdpbf16ps (32 pairs) every other cycle but two 16-lane
// FMAs a cycle, so the widened slices do twice the products per cycle wherever the matmul is
// compute-bound; Zen 4 issues a vdpbf16ps a cycle and one FMA, so it keeps the instruction.
// widen_bf16() times both once. vdpbf16ps treats denormal inputs and results as zero: the widened
// FMAs run with MXCSR's DAZ and FTZ set, and are then bit for bit the instruction (checked on
// 800,000 lanes with denormal inputs; tests/test_engine.py checks the engine's logits).
#if defined(__AVX2__)
constexpr bool kCanWidenBF16 = true;
#else
constexpr bool kCanWidenBF16 = false;
#endif

#if defined(__AVX512BF16__)
// Seconds for `rounds` of 12 independent chains of vdot_bf16, or of the two FMAs that widened
// weights take for the same products.
template <bool kDot>
double chain_seconds(long rounds) {
  Vf a[12];
  for (int i = 0; i < 12; ++i) a[i] = vset1(1.0f + float(i) * 1e-7f);
  const Vb x{_mm512_set1_epi32(0x3F803F80)}, w{_mm512_set1_epi32(0x3F7F3F7F)};  // pairs of 1 and 0.996
  const Vf scale = vset1(0.9999999f), shift = vset1(1e-7f);
  const auto start = std::chrono::steady_clock::now();
  for (long n = 0; n < rounds; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < 12; ++i) a[i] = kDot ? vdot_bf16(a[i], x, w) : vfma(vfma(a[i], scale, shift), scale, shift);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sum = 0;
  for (int i = 0; i < 12; ++i) sum += vhsum(a[i]);
  [[maybe_unused]] static volatile float sink;  // keeps every chain computed
  sink = sum;
  return seconds;
}

// GPT2S_BF16_WIDEN=0 or 1 forces the choice (tests, benchmarks); otherwise widen where the FMAs
// are clearly faster (best of 3 timings of about 0.1 ms each, once per process).
inline bool choose_widen_bf16() {
  if (const char* force = std::getenv("GPT2S_BF16_WIDEN"); force && (force[0] == '0' || force[0] == '1')) return force[0] == '1';
  double dot = 1e9, fma = 1e9;
  for (int trial = 0; trial < 3; ++trial) {
    dot = std::min(dot, chain_seconds<true>(20000));
    fma = std::min(fma, chain_seconds<false>(20000));
  }
  return dot > 1.25 * fma;
}
inline bool widen_bf16() {
  static const bool widen = choose_widen_bf16();
  return widen;
}
#else
constexpr bool widen_bf16() { return kCanWidenBF16; }
#endif
inline bool widened(const MatmulJob& j) { return j.w->dtype == DType::BF16 && j.M > kRowBlock && widen_bf16(); }

// out (2 pairs(K)) fp32 <- x (K) rounded to bf16 as round_bf16 rounds, each pair swapped (odd
// input first, as widening_block orders the weights), a zero for the input past an odd K.
inline void round_bf16_swapped(const float* x, int64_t K, uint32_t* out) {
  int64_t k = 0;
#if defined(__AVX2__)  // kCanWidenBF16: the ISAs that take this path
  for (; k + kLanes <= K; k += kLanes) vstore(reinterpret_cast<float*>(out + k), vround_bf16_swapped(vload(x + k)));
#endif
  for (; k < K; k += 2) {  // kLanes is even: k starts a pair
    out[k] = k + 1 < K ? uint32_t(f32_to_bf16(x[k + 1])) << 16 : 0;
    out[k + 1] = uint32_t(f32_to_bf16(x[k])) << 16;
  }
}

struct RoundJob {
  const float* x;  // (M, K)
  int64_t K, ldx;
  uint32_t* out;   // (M, ldx)
};

// acc (m1 - m0, kPanel) = rows [m0, m1) (at most kGroupRows) of x (stride ldx, K inputs) times
// panel p of the packed weights: slice after slice, row block after row block.
template <class W>
void panel_sums(const typename W::T* x, int64_t ldx, int64_t K, const void* packed, int64_t p, int64_t m0, int64_t m1,
                float* acc) {
  const auto* panel = static_cast<const typename W::T*>(packed) + p * ((K + W::kStep - 1) / W::kStep * W::kStep) * kPanel;
  for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
    const int64_t n = min64(kSlice, K - k0);
    const typename W::T* ws = panel + k0 * kPanel;
    // The next slice (for the last one, the start of the next panel, which follows in memory).
    const int64_t steps = (n + W::kStep - 1) / W::kStep, blocks = (m1 - m0 + kRowBlock - 1) / kRowBlock;
    // A group of one row block (batch <= kRowBlock) prefetches nothing: its one pass over the
    // slice is the stream itself, which the hardware prefetcher keeps further ahead than software
    // prefetches do (they hold miss buffers of their own). docs/engine.md has the measurements.
    const char* next = reinterpret_cast<const char*>(ws + steps * W::kStep * kPanel);
    const int64_t lines = blocks > 1 ? kSlice / W::kStep * kStepBytes / 64 : 0;
    Prefetch pf{next, next + lines * 64, (lines + blocks * steps - 1) / (blocks * steps)};
    for (int64_t m = m0; m < m1; m += kRowBlock) {
      const typename W::T* xs = x + m * ldx + k0;
      float* a = acc + (m - m0) * kPanel;
      const bool first = k0 == 0;
      switch (min64(kRowBlock, m1 - m)) {
        case 1: slice_block<W, 1>(xs, ldx, n, ws, a, first, pf); break;
        case 2: if constexpr (kRowBlock >= 2) slice_block<W, 2>(xs, ldx, n, ws, a, first, pf); break;
        case 3: if constexpr (kRowBlock >= 3) slice_block<W, 3>(xs, ldx, n, ws, a, first, pf); break;
        case 4: if constexpr (kRowBlock >= 4) slice_block<W, 4>(xs, ldx, n, ws, a, first, pf); break;
        default: break;
      }
    }
  }
}

// The first row block's pass over a bf16 slice (`steps` pairs of inputs) in widened_panel_sums:
// slice_block<WeightsF32> on x (swapped pairs, fp32) while it widens each panel row of pairs into
// two fp32 rows of `wide` (the odd inputs, then the even ones) for the other row blocks. Widening
// here overlaps the stores with the FMAs; a separate pass over the slice cost 8% of a 20-row
// matmul.
template <int RB>
inline void widening_block(const float* x, int64_t ldx, int64_t steps, const uint16_t* panel, float* wide, float* acc,
                           bool first, Prefetch& pf) {
  Vf a[RB][kPanelVecs];
  load_block<RB>(a, acc, first);
  const char* at = pf.at;
  for (int64_t s = 0; s < steps; ++s, panel += 2 * kPanel, wide += 2 * kPanel, x += 2) {
    for (int64_t i = 0; i < 2 * pf.lines_per_step && at < pf.end; ++i, at += 64) __builtin_prefetch(at, 0, 2);
    Vf xb[RB];
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) xb[r] = vset1(x[r * ldx]);  // the odd input of the pair
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) {
      const Vf w = vbf16_odd(vload_bf16(panel + v * 2 * kLanes));
      vstore(wide + v * kLanes, w);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) a[r][v] = vfma(xb[r], w, a[r][v]);
    }
#pragma GCC unroll 8
    for (int r = 0; r < RB; ++r) xb[r] = vset1(x[r * ldx + 1]);  // the even one
#pragma GCC unroll 8
    for (int v = 0; v < kPanelVecs; ++v) {
      const Vf w = vbf16_even(vload_bf16(panel + v * 2 * kLanes));
      vstore(wide + kPanel + v * kLanes, w);
#pragma GCC unroll 8
      for (int r = 0; r < RB; ++r) a[r][v] = vfma(xb[r], w, a[r][v]);
    }
  }
  pf.at = at;
  store_block<RB>(a, acc);
}

// panel_sums<WeightsBF16> as the fp32 kernel over widened slices (widened() above): x rows
// (stride ldx) of 2 pairs(K) swapped fp32 values from round_bf16_swapped.
void widened_panel_sums(const float* x, int64_t ldx, int64_t K, const void* packed, int64_t p, int64_t m0, int64_t m1,
                        float* acc) {
  const int64_t steps_k = pairs(K);
  const uint16_t* panel = static_cast<const uint16_t*>(packed) + p * steps_k * 2 * kPanel;
  alignas(64) float wide[kSlice * kPanel];  // (2 * steps, kPanel): the slice in fp32, odd input first
  for (int64_t q0 = 0; q0 < steps_k; q0 += kSlice / 2) {
    const int64_t steps = min64(kSlice / 2, steps_k - q0), n = 2 * steps, blocks = (m1 - m0 + kRowBlock - 1) / kRowBlock;
    const uint16_t* ws = panel + q0 * 2 * kPanel;
    // The next bf16 slice into the L2 meanwhile, as panel_sums does.
    const char* next = reinterpret_cast<const char*>(ws + steps * 2 * kPanel);
    const int64_t lines = blocks > 1 ? kSlice / 2 * kStepBytes / 64 : 0;
    Prefetch pf{next, next + lines * 64, (lines + blocks * n - 1) / (blocks * n)};
    const bool first = q0 == 0;
    // The first row block widens the slice as it multiplies it, then the other blocks.
    // (The widening block is the slowest; when the rows do not fill whole blocks it takes the
    // remainder, which leaves the block count unchanged: 20 rows = 2 + 6 x 3.)
    const int64_t wr = (m1 - m0) % kRowBlock ? (m1 - m0) % kRowBlock : min64(kRowBlock, m1 - m0);
    if (wr == 1) widening_block<1>(x + m0 * ldx + 2 * q0, ldx, steps, ws, wide, acc, first, pf);
    if (wr == 2) widening_block<2>(x + m0 * ldx + 2 * q0, ldx, steps, ws, wide, acc, first, pf);
    if (wr == 3) widening_block<3>(x + m0 * ldx + 2 * q0, ldx, steps, ws, wide, acc, first, pf);
    if constexpr (kRowBlock >= 4) {
      if (wr == 4) widening_block<4>(x + m0 * ldx + 2 * q0, ldx, steps, ws, wide, acc, first, pf);
    }
    for (int64_t m = m0 + wr; m < m1; m += kRowBlock) {
      const float* xs = x + m * ldx + 2 * q0;
      float* a = acc + (m - m0) * kPanel;
      switch (min64(kRowBlock, m1 - m)) {
        case 1: slice_block<WeightsF32, 1>(xs, ldx, n, wide, a, first, pf); break;
        case 2: if constexpr (kRowBlock >= 2) slice_block<WeightsF32, 2>(xs, ldx, n, wide, a, first, pf); break;
        case 3: if constexpr (kRowBlock >= 3) slice_block<WeightsF32, 3>(xs, ldx, n, wide, a, first, pf); break;
        case 4: if constexpr (kRowBlock >= 4) slice_block<WeightsF32, 4>(xs, ldx, n, wide, a, first, pf); break;
        default: break;
      }
    }
  }
}

// Rows per group on widened slices: a slice is widened once per group, so prefills (up to 512
// rows a step) take groups four times larger than kGroupRows (their partial sums, 12 KiB on AVX2,
// stay in the L1 and L2 caches beside the 16 KiB slice).
constexpr int kWidenGroupRows = 4 * kGroupRows;

template <class W>
void group_of_panel(const MatmulJob& j, int64_t p, int64_t m0, int64_t m1) {
  alignas(64) float acc[(kCanWidenBF16 ? kWidenGroupRows : kGroupRows) * kPanel];  // (rows, kPanel) partial sums between slices
  if (widened(j)) {
#if defined(__AVX512BF16__)
    const unsigned csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);  // DAZ and FTZ: vdpbf16ps's arithmetic (widen_bf16 above)
#endif
    widened_panel_sums(static_cast<const float*>(j.x), j.ldx, j.K, j.w->data, p, m0, m1, acc);
#if defined(__AVX512BF16__)
    _mm_setcsr(csr);
#endif
  } else {
    panel_sums<W>(static_cast<const typename W::T*>(j.x), j.ldx, j.K, j.w->data, p, m0, m1, acc);
  }
  const int64_t N = j.w->rows, n0 = p * kPanel, valid = min64(kPanel, N - n0);
  for (int64_t m = m0; m < m1; ++m) {
    store_panel(acc + (m - m0) * kPanel, j.bias ? j.bias + n0 : nullptr, j.y + m * N + n0, valid, j.epilogue);
  }
}

void matmul_chunk(void* job_ptr, int64_t c, int /*thread*/) {
  const MatmulJob& j = *static_cast<const MatmulJob*>(job_ptr);
  const int64_t n_panels = (j.w->rows + kPanel - 1) / kPanel;
  for (int64_t p = c * j.panels; p < min64(n_panels, (c + 1) * j.panels); ++p) {
    const int64_t group = widened(j) ? kWidenGroupRows : kGroupRows;
    for (int64_t m = 0; m < j.M; m += group) {
      if (j.w->dtype == DType::F32) {
        group_of_panel<WeightsF32>(j, p, m, min64(j.M, m + group));
      } else {
        group_of_panel<WeightsBF16>(j, p, m, min64(j.M, m + group));
      }
    }
  }
}

// Panels per parallel work item: about 8 items per thread, so a thread that falls behind (a busy
// machine) leaves little for the others to wait on, and at most kMaxChunkPanels.
constexpr int64_t kMaxChunkPanels = 8;

inline int64_t panels_per_chunk(int64_t n_panels, const ThreadPool& pool) {
  const int64_t per = n_panels / (8 * pool.size());
  return per < 1 ? 1 : per > kMaxChunkPanels ? kMaxChunkPanels : per;
}

void matmul_i8(ThreadPool& pool, const float* x, int64_t M, int64_t K, const PackedMatrix& w, const float* bias, float* y,
               Epilogue epilogue, uint8_t* scratch);  // int8 weights, below

void matmul(ThreadPool& pool, const float* x, int64_t M, int64_t K, const PackedMatrix& w, const float* bias, float* y,
            Epilogue epilogue, uint16_t* xb) {
  if (w.dtype == DType::I8) return matmul_i8(pool, x, M, K, w, bias, y, epilogue, reinterpret_cast<uint8_t*>(xb));
  const int64_t N = w.rows, n_panels = (N + kPanel - 1) / kPanel;
  MatmulJob job{x, M, K, K, &w, bias, y, epilogue, panels_per_chunk(n_panels, pool)};
  if (widened(job)) {
    const int64_t ldx = 2 * pairs(K);
    uint32_t* xw = reinterpret_cast<uint32_t*>(xb);  // xb holds M (K + 1) floats
    // Row by row on the pool, like the kernels: on the calling thread alone, the other core waited.
    RoundJob round{x, K, ldx, xw};
    parallel_chunks(pool, M, M * K, +[](void* p, int64_t m, int) {
      const RoundJob& r = *static_cast<const RoundJob*>(p);
      round_bf16_swapped(r.x + m * r.K, r.K, r.out + m * r.ldx);
    }, &round);
    job.x = xw;
    job.ldx = ldx;
  } else if (w.dtype == DType::BF16) {
    // Round the activations to bf16 once: rows of an even stride, a zero after an odd K. Every
    // product is then bf16 x bf16 (exact in fp32), accumulated in fp32.
    const int64_t ldx = 2 * pairs(K);
    for (int64_t m = 0; m < M; ++m) {
      round_bf16(x + m * K, K, xb + m * ldx);
      if (ldx > K) xb[m * ldx + K] = 0;
    }
    job.x = xb;
    job.ldx = ldx;
  }
  parallel_chunks(pool, (n_panels + job.panels - 1) / job.panels, M * N * K, matmul_chunk, &job);
}

// ---------------------------------------------------------------------------------------------
// The screened head (kernels.h, ScreenMatrix; docs/engine.md "Screened head"). A row that keeps
// only its k best tokens needs only their exact logits: an int8 copy of wte gives every logit
// within a proven error bound at a quarter of the fp32 bytes, and the logits whose upper bound
// can reach the k-th best lower bound are then computed exactly, lane for lane as the matmul.
// The builds with an int8 dot product have it (simd.h, GPT2S_INT8_DOT): AVX512-VNNI with -BF16
// (vpdpbusd), AVX2 (vpmaddubsw + vpmaddwd) and AArch64 with the dot product extension (sdot).

// The smallest float >= d.
inline float round_up(double d) {
  float f = float(d);
  if (double(f) < d) f = __builtin_nextafterf(f, __builtin_inff());
  return f;
}

// x rows: bytes q + kQuantOffset (stride a multiple of 4, kQuantOffset past K); panel:
// (quads(K), kPanel, 4) s8 weights. Lane i gains four products, exactly, in int32 (held in a
// float vector's bits; simd.h, vdot_q).
struct WeightsI8 {
  using T = uint8_t;
  using Vx = Vq;
  static constexpr int kStep = 4;
  static Vq broadcast(const uint8_t* x) { return vbcast_quad(x); }
  static Vq load(const uint8_t* w) { return vload_q(w); }
  static Vf madd(Vf acc, Vq x, Vq w) { return vdot_q(acc, x, w); }
};

int64_t screen_bytes(int64_t N, int64_t K) { return (N + kPanel - 1) / kPanel * quads(K) * kPanel * 4; }

struct ScreenPackJob {
  const TensorView* w;
  const ScreenMatrix* s;
  int bad;  // set when a weight or a norm is not finite
};

// kLanes weights of a stored fp32 or bf16 row from k, widened; zeros past K.
#if defined(__AVX512F__)
inline Vf row_floats(const void* row, bool f32, int64_t k, int64_t K) {
  const __mmask16 m = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K > k ? K - k : 0)) - 1);
  if (f32) return {_mm512_maskz_loadu_ps(m, static_cast<const float*>(row) + k)};
  const __m256i h = _mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(row) + k);
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
#else
inline Vf row_floats(const void* row, bool f32, int64_t k, int64_t K) {
  if (k + kLanes <= K) return f32 ? vload(static_cast<const float*>(row) + k) : vload_bf16_f32(static_cast<const uint16_t*>(row) + k);
  float tail[kLanes];
  for (int64_t i = 0; i < kLanes; ++i) {
    tail[i] = k + i >= K ? 0.0f : f32 ? static_cast<const float*>(row)[k + i] : bf16_to_f32(static_cast<const uint16_t*>(row)[k + i]);
  }
  return vload(tail);
}
#endif

struct Quantized {
  float scale;  // s
  int32_t sum;  // sum of q
  double err;   // || v - s q ||
  double norm;  // || v ||
  bool finite;  // every v finite
};

#if defined(__AVX512F__)
// Lanes 0-7 and 8-15 of x in double (exact).
inline __m512d widen_low(__m512 x) { return _mm512_cvtps_pd(_mm512_castps512_ps256(x)); }
inline __m512d widen_high(__m512 x) { return _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))); }

// The int8 quantization of one row, the same for wte's rows and for the activations: s = max |v|
// / 127 (1 for a zero row), q = round(v / s) clamped to [-127, 127] (any q is sound: the bound
// uses the error of the q stored), written as bytes (q, or q + kQuantOffset with `offset`) in
// quads of four inputs at out + j * quad_stride; the sums of squares in double lanes. load(k):
// v[k, k + kLanes), zeros past K.
template <class Load>
Quantized quantize_row(Load load, int64_t K, uint8_t* out, int64_t quad_stride, bool offset) {
  __m512 amax = _mm512_setzero_ps();
  __mmask16 bad = 0;
  for (int64_t k = 0; k < K; k += 16) {
    const __m512 a = _mm512_abs_ps(load(k).v);
    bad |= _mm512_cmp_ps_mask(a, _mm512_set1_ps(3.0e38f), _CMP_NLE_UQ);  // inf and NaN
    amax = _mm512_max_ps(amax, a);
  }
  const float top = _mm512_reduce_max_ps(amax);
  const float scale = top > 0.0f ? float(double(top) / 127.0) : 1.0f;
  const __m512 s = _mm512_set1_ps(scale);
  const __m512d sd = _mm512_set1_pd(double(scale));
  __m512d e = _mm512_setzero_pd(), n = _mm512_setzero_pd();
  __m512i q_sum = _mm512_setzero_si512();
  const int64_t Q = quads(K);
  for (int64_t k = 0; k < Q * 4; k += 16) {
    const __m512 v = load(k).v;
    __m512 q = _mm512_roundscale_ps(_mm512_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    q = _mm512_min_ps(_mm512_max_ps(q, _mm512_set1_ps(-127.0f)), _mm512_set1_ps(127.0f));
    const __m512d vd[2] = {widen_low(v), widen_high(v)}, qd[2] = {widen_low(q), widen_high(q)};
    for (int h = 0; h < 2; ++h) {
      const __m512d d = _mm512_fnmadd_pd(sd, qd[h], vd[h]);  // v - s q, s q exact in double
      e = _mm512_fmadd_pd(d, d, e);
      n = _mm512_fmadd_pd(vd[h], vd[h], n);
    }
    const __m512i qi = _mm512_cvtps_epi32(q);
    q_sum = _mm512_add_epi32(q_sum, qi);
    // q + 128 as a byte is q's two's-complement byte with the top bit flipped.
    __m128i bytes = _mm512_cvtepi32_epi8(qi);
    if (offset) bytes = _mm_xor_si128(bytes, _mm_set1_epi8(int8_t(0x80)));
    alignas(16) int32_t quad[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(quad), bytes);
    for (int64_t j = 0; j < 4 && k / 4 + j < Q; ++j) __builtin_memcpy(out + (k / 4 + j) * quad_stride, &quad[j], 4);
  }
  return {scale, _mm512_reduce_add_epi32(q_sum), __builtin_sqrt(_mm512_reduce_add_pd(e)),
          __builtin_sqrt(_mm512_reduce_add_pd(n)), bad == 0};
}
#else
// quantize_row as above, a vector of kLanes values at a time, each value's arithmetic in scalar
// (double for the sums of squares, as above).
template <class Load>
Quantized quantize_row(Load load, int64_t K, uint8_t* out, int64_t quad_stride, bool offset) {
  float top = 0.0f;
  bool finite = true;
  for (int64_t k = 0; k < K; k += kLanes) {
    float v[kLanes];
    vstore(v, load(k));
    for (int i = 0; i < kLanes; ++i) {
      const float a = __builtin_fabsf(v[i]);
      finite = finite && a <= 3.0e38f;  // inf and NaN fail
      top = a > top ? a : top;
    }
  }
  if (!finite) return {1.0f, 0, 0.0, 0.0, false};
  const float scale = top > 0.0f ? float(double(top) / 127.0) : 1.0f;
  const int64_t Q = quads(K);
  double e = 0.0, n = 0.0;
  int32_t q_sum = 0;
  for (int64_t k = 0; k < Q * 4; k += kLanes) {
    float v[kLanes];
    vstore(v, load(k));
    for (int64_t i = 0; i < kLanes && k + i < Q * 4; ++i) {
      float q = __builtin_nearbyintf(v[i] / scale);  // nearest, ties to even (the default rounding)
      q = q < -127.0f ? -127.0f : q > 127.0f ? 127.0f : q;
      const double d = double(v[i]) - double(scale) * double(q);  // s q exact in double
      e += d * d;
      n += double(v[i]) * double(v[i]);
      q_sum += int32_t(q);
      out[(k + i) / 4 * quad_stride + (k + i) % 4] = uint8_t(int32_t(q) + (offset ? kQuantOffset : 0));
    }
  }
  return {scale, q_sum, __builtin_sqrt(e), __builtin_sqrt(n), finite};
}
#endif

#if defined(GPT2S_INT8_DOT)

bool pack_screen(ThreadPool& pool, const TensorView& w, ScreenMatrix& out) {
  ScreenPackJob job{&w, &out, 0};
  const int64_t panels = (w.rows + kPanel - 1) / kPanel;
  parallel_chunks(pool, panels, w.rows * w.cols, +[](void* ptr, int64_t p, int) {
    ScreenPackJob& j = *static_cast<ScreenPackJob*>(ptr);
    const TensorView& w = *j.w;
    const ScreenMatrix& s = *j.s;
    const int64_t K = w.cols;
    int8_t* panel = static_cast<int8_t*>(const_cast<void*>(s.data)) + p * quads(K) * kPanel * 4;
    for (int64_t i = 0; i < kPanel; ++i) {
      const int64_t n = p * kPanel + i;
      float scale = 0.0f, err = 0.0f, norm = 0.0f;
      int32_t sum = 0;
      bool ok = true;
      if (n >= w.rows) {  // the last panel's padding: q = 0
        for (int64_t k = 0; k < quads(K) * 4; ++k) panel[((k / 4) * kPanel + i) * 4 + k % 4] = 0;
      } else {
        const bool f32 = w.dtype == DType::F32;
        const uint8_t* row = static_cast<const uint8_t*>(w.data) + n * K * (f32 ? 4 : 2);
        const Quantized q = quantize_row([&](int64_t k) { return row_floats(row, f32, k, K); }, K,
                                         reinterpret_cast<uint8_t*>(panel) + i * 4, kPanel * 4, false);
        scale = q.scale;
        sum = q.sum;
        err = round_up(q.err);
        norm = round_up(q.norm);
        ok = q.finite && norm <= 1.0e30f;
      }
      if (!ok) __atomic_store_n(&j.bad, 1, __ATOMIC_RELAXED);
      const_cast<float*>(s.scale)[n] = scale;
      const_cast<int32_t*>(s.sum)[n] = sum;
      const_cast<float*>(s.err)[n] = err;
      const_cast<float*>(s.norm)[n] = norm;
    }
  }, &job);
  out.max_norm = 0.0f;
  for (int64_t n = 0; n < w.rows; ++n) out.max_norm = out.norm[n] > out.max_norm ? out.norm[n] : out.max_norm;
  return job.bad == 0;
}

struct ScreenJob {
  const uint8_t* xq;          // (M, ldq) quantized rows
  int64_t M, K, ldq;
  const ScreenMatrix* s;
  const float* terms;         // (M, 5): s_h, A, B, G, T of each row (screen() below)
  float* upper;               // (M, N)
  float* panel_lower;         // (M, panels)
  int32_t* panel_best;        // (M, panels)
  int64_t panels;             // per chunk
};

void screen_chunk(void* job_ptr, int64_t c, int /*thread*/) {
  const ScreenJob& j = *static_cast<const ScreenJob*>(job_ptr);
  const int64_t N = j.s->rows, n_panels = (N + kPanel - 1) / kPanel;
  alignas(64) float acc[kGroupRows * kPanel];
  for (int64_t p = c * j.panels; p < min64(n_panels, (c + 1) * j.panels); ++p) {
    const int64_t n0 = p * kPanel, valid = min64(kPanel, N - n0);
    for (int64_t m0 = 0; m0 < j.M; m0 += kGroupRows) {
      const int64_t m1 = min64(j.M, m0 + kGroupRows);
      panel_sums<WeightsI8>(j.xq, j.ldq, j.K, j.s->data, p, m0, m1, acc);
      for (int64_t m = m0; m < m1; ++m) {
        const float* t = j.terms + m * 5;
        const Vf sh = vset1(t[0]), A = vset1(t[1]), B = vset1(t[2]), G = vset1(t[3]), T = vset1(t[4]);
        float spare[kPanel];  // the last panel's upper bounds, of which `valid` are kept
        float* upper = valid == kPanel ? j.upper + m * N + n0 : spare;
        float lower[kPanel];  // each output's lower bound; -inf past N
        Vf lower_max = vset1(-__builtin_inff());
#pragma GCC unroll 8
        for (int v = 0; v < kPanelVecs; ++v) {
          const int64_t n = n0 + v * kLanes;
          const Vf a = vmul(vdot_q_value(vload(acc + (m - m0) * kPanel + v * kLanes), j.s->sum + n), vmul(sh, vload(j.s->scale + n)));
          const Vf err = vload(j.s->err + n), norm = vload(j.s->norm + n);
          const Vf e = vfma(A, err, vfma(B, vadd(norm, err), vfma(G, norm, T)));
          vstore(upper + v * kLanes, vadd(a, e));
          vstore(lower + v * kLanes, vsub(a, e));
        }
        for (int64_t i = valid; i < kPanel; ++i) lower[i] = -__builtin_inff();
#pragma GCC unroll 8
        for (int v = 0; v < kPanelVecs; ++v) lower_max = vmax(lower_max, vload(lower + v * kLanes));
        for (int64_t i = 0; upper == spare && i < valid; ++i) j.upper[m * N + n0 + i] = spare[i];
        const float best = vhmax(lower_max);
        int64_t at = n0;  // (a row whose bounds are not finite may match no lane: its outputs are unused)
        for (int64_t i = 0; i < kPanel; ++i) {
          if (lower[i] == best) {
            at = n0 + i;
            break;
          }
        }
        j.panel_lower[m * n_panels + p] = best;
        j.panel_best[m * n_panels + p] = int32_t(at);
      }
    }
  }
}

// The error terms of one row h (K values as the matmul multiplies them: x, or x rounded to bf16).
// a = s_h s_v sum q_h q_v; the computed logit l (fp32 sums, K roundings) obeys
//   |l - a| <= ||h|| ||d_v|| + ||D|| (||w_v|| + ||d_v||) + gamma_K ||h|| ||w_v|| + tiny,
// d_v = w_v - s_v q_v and D = h - s_h q_h the quantization errors (Cauchy-Schwarz on each of the
// three cross terms). A, B, G carry a relative margin of 2^-10 and 16 extra units of roundoff for
// the float arithmetic of a and of the bound itself; T covers denormals flushed by vdpbf16ps.
// Returns false for a row whose bound is not finite (the caller computes that row in full).
bool screen_terms(const float* x, int64_t K, bool bf16, float max_norm, uint8_t* xq, float* t) {
  const Quantized q = quantize_row([&](int64_t k) {  // h as the matmul multiplies it
    const Vf v = row_floats(x, true, k, K);
    if (!bf16) return v;
    alignas(64) uint16_t rounded[kLanes];
    vstore_bf16(rounded, v);  // as round_bf16 rounds the matmul's input
    return vload_bf16_f32(rounded);
  }, K, xq, 4, true);
  if (!q.finite) return false;
  const double hn = q.norm, dn = q.err;
  const double u = 1.0 / 16777216.0, gamma = double(K) * u / (1.0 - double(K) * u), margin = 1.0 + 1.0 / 1024.0;
  t[0] = q.scale;
  t[1] = round_up(hn * margin);
  t[2] = round_up(dn * margin);
  t[3] = round_up((gamma + 16.0 * u) * hn * margin);
  t[4] = round_up(double(K) * 0x1p-124 * (1.0 + hn + double(max_norm)));
  for (int i = 1; i < 5; ++i) {
    if (!(t[i] <= 1.0e30f)) return false;
  }
  return true;
}

void screen(ThreadPool& pool, const float* x, int64_t M, int64_t K, bool bf16, const ScreenMatrix& s, uint8_t* xq,
            float* terms, float* upper, float* panel_lower, int32_t* panel_best, bool* row_ok) {
  const int64_t ldq = quads(K) * 4, n_panels = (s.rows + kPanel - 1) / kPanel;
  for (int64_t m = 0; m < M; ++m) row_ok[m] = screen_terms(x + m * K, K, bf16, s.max_norm, xq + m * ldq, terms + m * 5);
  ScreenJob job{xq, M, K, ldq, &s, terms, upper, panel_lower, panel_best, panels_per_chunk(n_panels, pool)};
  parallel_chunks(pool, (n_panels + job.panels - 1) / job.panels, M * s.rows * K / 4, screen_chunk, &job);
}

// The logits of tokens ids[0..n) for one row x, each computed as matmul() computes it: one lane
// per token, the same multiply-adds in the same order, on vectors that hold word j of every token
// as a panel row does (an odd K's last bf16 pairs with a zero, as in pack()).
template <class W>
void exact_lanes(const typename W::T* xw, const TensorView& w, const int32_t* ids, int64_t n, float* out) {
  const bool f32 = W::kStep == 1;
  const int64_t K = w.cols, words = (K + W::kStep - 1) / W::kStep, row_bytes = K * (f32 ? 4 : 2);
  const uint8_t* base = static_cast<const uint8_t*>(w.data);
  for (int64_t i0 = 0; i0 < n; i0 += kLanes) {
    const uint8_t* rows[kLanes];
    for (int l = 0; l < kLanes; ++l) rows[l] = base + int64_t(ids[i0 + l < n ? i0 + l : i0]) * row_bytes;
    Vf acc = vzero();
#if defined(__AVX512F__)
    // 16 words of the 16 rows at a time (masked past the row's end), transposed in registers.
    for (int64_t q0 = 0; q0 < words; q0 += 16) {
      __m512i r[16];
      for (int l = 0; l < kLanes; ++l) r[l] = row_words(rows[l], q0, K, f32);
      transpose16(r);
      const int64_t m = words - q0 < 16 ? words - q0 : 16;
      for (int64_t j = 0; j < m; ++j) {
        if constexpr (W::kStep == 1) {
          acc = W::madd(acc, W::broadcast(xw + q0 + j), Vf{_mm512_castsi512_ps(r[j])});
        } else {
          acc = W::madd(acc, W::broadcast(xw + 2 * (q0 + j)), Vb{r[j]});
        }
      }
    }
#else
    // A word of each row at a time, gathered into a vector.
    for (int64_t q = 0; q < words; ++q) {
      alignas(64) uint32_t column[kLanes];
      for (int l = 0; l < kLanes; ++l) column[l] = pack_word(rows[l], q, K, f32);
      acc = W::madd(acc, W::broadcast(xw + W::kStep * q), W::load(reinterpret_cast<const typename W::T*>(column)));
    }
#endif
    alignas(64) float lanes[kLanes];
    vstore(lanes, acc);
    for (int l = 0; l < kLanes && i0 + l < n; ++l) out[i0 + l] = lanes[l];
  }
}

void exact_logits(const float* x, const TensorView& w, const int32_t* ids, int64_t n, float* out, uint16_t* xb) {
  if (w.dtype == DType::F32) {
    exact_lanes<WeightsF32>(x, w, ids, n, out);
  } else {
    round_bf16(x, w.cols, xb);  // as matmul() rounds its input, with a zero after an odd K
    xb[w.cols] = 0;
    exact_lanes<WeightsBF16>(xb, w, ids, n, out);
  }
}

#define GPT2S_SCREEN_KERNELS screen_bytes, pack_screen, screen, exact_logits
#else
#define GPT2S_SCREEN_KERNELS nullptr, nullptr, nullptr, nullptr
#endif

// ---------------------------------------------------------------------------------------------
// int8 weights (docs/engine.md "int8 weights"; format version 2: int8 q with one fp32 scale s_w
// per output row). Packed into the screen's panel layout, (quads(K), kPanel, 4) bytes followed by
// the panel's kPanel scales and kPanel sums of q (what vpdpbusd's offset multiplies), and
// multiplied by panel_sums<WeightsI8> like the screen: each activation row is quantized per row
// as wte's rows are for the screen (quantize_row: s_x = max |x| / 127, q_x = round(x / s_x)), the
// products of a whole row summed exactly in int32 (|sum| <= 127^2 K < 2^31 for K < 133,000), then
// y = epilogue(float(sum) * (s_x * s_w) + bias), lane by lane. Integer sums in any order are exact
// and the quantization is per row, so a row's outputs never depend on its batch.

// Panel p of the stored int8 w (rows of K bytes, scales per row) into out: words of four inputs,
// kPackTile of each row at a time (as pack_panel); -128, which export never writes, is taken as
// -127 so that no product can overflow the int16 pairs of vpmaddubsw.
void pack_panel_i8(const TensorView& w, int64_t p, uint8_t* out) {
  constexpr int64_t kPackTile = 16;
  const int64_t N = w.rows, K = w.cols, Q = quads(K), rows = min64(kPanel, N - p * kPanel);
  const int8_t* first = static_cast<const int8_t*>(w.data) + p * kPanel * K;
  float* scale = reinterpret_cast<float*>(out + i8_weight_bytes(K));
  int32_t* sum = reinterpret_cast<int32_t*>(scale + kPanel);
  for (int64_t i = 0; i < kPanel; ++i) sum[i] = 0;
  for (int64_t q0 = 0; q0 < Q; q0 += kPackTile) {
    const int64_t qn = min64(kPackTile, Q - q0);
    for (int64_t i = 0; i < kPanel; ++i) {
      const int8_t* row = first + i * K;
      int32_t s = 0;
      for (int64_t q = q0; q < q0 + qn; ++q) {
        int8_t quad[4] = {0, 0, 0, 0};
        for (int64_t b = 0; b < 4 && i < rows && 4 * q + b < K; ++b) {
          quad[b] = row[4 * q + b] < -127 ? int8_t(-127) : row[4 * q + b];
          s += quad[b];
        }
        __builtin_memcpy(out + (q * kPanel + i) * 4, quad, 4);
      }
      sum[i] += s;
    }
  }
  for (int64_t i = 0; i < kPanel; ++i) scale[i] = i < rows ? w.scales[p * kPanel + i] : 0.0f;
}

void pack_i8(ThreadPool& pool, const TensorView& w, void* out) {
  PackJob job{&w, out};
  const int64_t panels = (w.rows + kPanel - 1) / kPanel;
  parallel_chunks(pool, panels, w.rows * w.cols, +[](void* ptr, int64_t p, int) {
    const PackJob& j = *static_cast<const PackJob*>(ptr);
    pack_panel_i8(*j.w, p, static_cast<uint8_t*>(j.out) + p * i8_panel_bytes(j.w->cols));
  }, &job);
}

struct MatmulI8Job {
  MatmulJob m;      // x: (M, ldx) quantized rows (q + kQuantOffset)
  const float* sx;  // (M) their scales
};

void matmul_i8_chunk(void* job_ptr, int64_t c, int /*thread*/) {
  const MatmulI8Job& job = *static_cast<const MatmulI8Job*>(job_ptr);
  const MatmulJob& j = job.m;
  const int64_t N = j.w->rows, n_panels = (N + kPanel - 1) / kPanel;
  alignas(64) float acc[kGroupRows * kPanel];  // int32 sums in float bits, then the outputs
  for (int64_t p = c * j.panels; p < min64(n_panels, (c + 1) * j.panels); ++p) {
    const uint8_t* panel = static_cast<const uint8_t*>(j.w->data) + p * i8_panel_bytes(j.K);
    const float* scale = reinterpret_cast<const float*>(panel + i8_weight_bytes(j.K));
    const int32_t* sum = reinterpret_cast<const int32_t*>(scale + kPanel);
    const int64_t n0 = p * kPanel, valid = min64(kPanel, N - n0);
    for (int64_t m0 = 0; m0 < j.M; m0 += kGroupRows) {
      const int64_t m1 = min64(j.M, m0 + kGroupRows);
      panel_sums<WeightsI8>(static_cast<const uint8_t*>(j.x), j.ldx, j.K, panel, 0, m0, m1, acc);
      for (int64_t m = m0; m < m1; ++m) {
        float* a = acc + (m - m0) * kPanel;
        const Vf sx = vset1(job.sx[m]);
#pragma GCC unroll 8
        for (int v = 0; v < kPanelVecs; ++v) {
          vstore(a + v * kLanes, vmul(vdot_q_value(vload(a + v * kLanes), sum + v * kLanes), vmul(sx, vload(scale + v * kLanes))));
        }
        store_panel(a, j.bias ? j.bias + n0 : nullptr, j.y + m * N + n0, valid, j.epilogue);
      }
    }
  }
}

// scratch: M floats (the rows' scales), then M rows of quads(K) * 4 bytes; M * (K + 1) uint16
// values, as matmul() documents for xb, hold them for any K >= 5 (and the engine's K are larger).
void matmul_i8(ThreadPool& pool, const float* x, int64_t M, int64_t K, const PackedMatrix& w, const float* bias, float* y,
               Epilogue epilogue, uint8_t* scratch) {
  const int64_t ldq = quads(K) * 4, n_panels = (w.rows + kPanel - 1) / kPanel;
  float* sx = reinterpret_cast<float*>(scratch);
  uint8_t* xq = scratch + M * 4;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    const Quantized q = quantize_row([&](int64_t k) { return row_floats(row, true, k, K); }, K, xq + m * ldq, 4, kQuantOffset != 0);
    sx[m] = q.scale;
    if (!q.finite) {  // a row with inf or NaN gives NaN outputs, as the fp32 matmul would
      for (int64_t k = 0; k < ldq; ++k) xq[m * ldq + k] = uint8_t(kQuantOffset);
      sx[m] = __builtin_nanf("");
    }
  }
  MatmulI8Job job{{xq, M, K, ldq, &w, bias, y, epilogue, panels_per_chunk(n_panels, pool)}, sx};
  parallel_chunks(pool, (n_panels + job.m.panels - 1) / job.m.panels, M * w.rows * K / 4, matmul_i8_chunk, &job);
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

// The KV cache of one layer: keys and values (slots, NH, ctx, HS), fp32 or bf16 (KVF32 / KVBF16:
// how a cached row is stored and read back widened to fp32).
struct KVF32 {
  using T = float;
  static void store(float* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i];
  }
  static Vf load(const float* p) { return vload(p); }
  static float value(float a) { return a; }
};

struct KVBF16 {
  using T = uint16_t;
  static void store(uint16_t* dst, const float* src, int64_t n) { round_bf16(src, n, dst); }
  static Vf load(const uint16_t* p) { return vload_bf16_f32(p); }
  static float value(uint16_t a) { return bf16_to_f32(a); }
};

template <class KV>
struct AttentionJob {
  const float* qkv;           // (N, 3C)
  const int32_t* slot;
  const int32_t* pos;
  const typename KV::T* k;    // (slots, NH, ctx, HS)
  const typename KV::T* v;    // (slots, NH, ctx, HS)
  int64_t N, NH, HS, ctx;
  float* out;                 // (N, C)
  float* scratch;             // (threads, kAttentionRows, ctx)
  int64_t per_chunk;          // (head, block of kAttentionRows tokens) tasks per chunk
};

// s[r] = q_r . k for R query rows (q + r * ldq) and one cached key row, which is loaded (and, for
// a bf16 cache, widened) once for all R. Each row keeps its own accumulator, FMAs over d in order,
// then one horizontal sum: a row's score is the same whatever R.
template <class KV, int R>
inline void dot_keys(const float* q, int64_t ldq, const typename KV::T* k, int64_t HS, float* s) {
  Vf acc[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) acc[r] = vzero();
  int64_t d = 0;
  for (; d + kLanes <= HS; d += kLanes) {
    const Vf kd = KV::load(k + d);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = vfma(vload(q + r * ldq + d), kd, acc[r]);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float sr = vhsum(acc[r]);
    for (int64_t e = d; e < HS; ++e) sr += q[r * ldq + e] * KV::value(k[e]);
    s[r] = sr;
  }
}

// o_r[d0 + v * kLanes ...] = sum over t < T + r of p_r[t] * vh[t][d0 + v * kLanes ...] for R rows
// (p_r = p + r * ldp, o_r = o + r * ldo) and NV vectors, held in registers across the positions:
// the first T positions, which all R rows attend to, load each value vector once for the R rows,
// then row r alone takes its r further ones. Every output sums its products in t order, whatever
// R. With `prefetch`, row t of it is prefetched as row t < T is read.
template <class KV, int R, int NV>
inline void weighted_rows(const float* p, int64_t ldp, int64_t T, const typename KV::T* vh, int64_t HS, int64_t d0, float* o,
                          int64_t ldo, const typename KV::T* prefetch) {
  Vf acc[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = vzero();
  }
  for (int64_t t = 0; t < T; ++t) {
    if (prefetch) prefetch_row(prefetch + t * HS, HS * int64_t(sizeof(typename KV::T)));
    Vf pt[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) pt[r] = vset1(p[r * ldp + t]);
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const Vf x = KV::load(vh + t * HS + d0 + v * kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][v] = vfma(pt[r], x, acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 1; r < R; ++r) {
    for (int64_t t = T; t < T + r; ++t) {
      const Vf pt = vset1(p[r * ldp + t]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = vfma(pt, KV::load(vh + t * HS + d0 + v * kLanes), acc[r][v]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) vstore(o + r * ldo + d0 + v * kLanes, acc[r][v]);
  }
}

// A (ctx, HS) head of the K or V cache: that of token i's slot, head h.
template <class KV>
inline const typename KV::T* head_rows(const AttentionJob<KV>& j, const typename KV::T* cache, int64_t i, int64_t h) {
  return cache + (int64_t(j.slot[i]) * j.NH + h) * j.ctx * j.HS;
}

// Head h of R consecutive query rows of one sequence (tokens i .. i + R - 1: one slot, positions
// pos[i] .. pos[i] + R - 1): softmax(q K^T / sqrt(HS)) V over each row's positions 0..pos. The
// keys and values of the positions all R rows attend to are read (and widened) once for the R
// rows; each row's arithmetic is exactly what it is alone (R = 1, every decode row), so a token's
// result never depends on how its prompt was split into steps or on its batch. As it goes, it
// prefetches the keys and values of the next rows (next_k, next_v, or null) into the L2: a task's
// rows are a short stream that the hardware prefetcher only catches up with late, and at batch 20
// attention reads 59-118 MB a step.
template <class KV, int R>
void attend_rows(const AttentionJob<KV>& j, int64_t i, int64_t h, const typename KV::T* next_k, const typename KV::T* next_v,
                 float* scores) {
  const int64_t C = j.NH * j.HS, HS = j.HS, ctx = j.ctx;
  const int64_t T = int64_t(j.pos[i]) + 1;  // row r attends to T + r positions
  const float scale = 1.0f / __builtin_sqrtf(float(HS));
  const float* q = j.qkv + i * 3 * C + h * HS;  // R rows, stride 3C
  const typename KV::T* kh = head_rows(j, j.k, i, h);
  const typename KV::T* vh = head_rows(j, j.v, i, h);
  float m[R];  // each row's largest score
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) m[r] = -__builtin_inff();
  auto keep = [&](int r, int64_t t, float s) {  // scores: (R, ctx)
    const float st = s * scale;
    scores[r * ctx + t] = st;
    m[r] = st > m[r] ? st : m[r];
  };
  for (int64_t t = 0; t < T; ++t) {
    if (next_k) prefetch_row(next_k + t * HS, HS * int64_t(sizeof(typename KV::T)));
    float s[R];
    dot_keys<KV, R>(q, 3 * C, kh + t * HS, HS, s);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) keep(r, t, s[r]);
  }
  for (int r = 1; r < R; ++r) {  // the positions of the block's own earlier rows
    for (int64_t t = T; t < T + r; ++t) {
      float s;
      dot_keys<KV, 1>(q + r * 3 * C, 3 * C, kh + t * HS, HS, &s);
      keep(r, t, s);
    }
  }
  float inv[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) inv[r] = float(1.0 / exp_shifted(scores + r * ctx, T + r, 1.0f, m[r], scores + r * ctx));
  float* o = j.out + i * C + h * HS;  // R rows, stride C
  // R x NV accumulators: at most 8 of AVX2's 16 registers, beside the R weights and a value.
  constexpr int NV = R <= 2 ? 4 : 2;
  int64_t d0 = 0;
  // The first pass over the values prefetches the next rows'.
  for (; d0 + NV * kLanes <= HS; d0 += NV * kLanes) weighted_rows<KV, R, NV>(scores, ctx, T, vh, HS, d0, o, C, d0 == 0 ? next_v : nullptr);
  for (; d0 + kLanes <= HS; d0 += kLanes) weighted_rows<KV, R, 1>(scores, ctx, T, vh, HS, d0, o, C, d0 == 0 ? next_v : nullptr);
  for (int r = 0; r < R; ++r) {
    const float* p = scores + r * ctx;
    float* o_r = o + r * C;
    for (int64_t d = d0; d < HS; ++d) {
      float acc = 0.0f;
      for (int64_t t = 0; t < T + r; ++t) acc += p[t] * KV::value(vh[t * HS + d]);
      o_r[d] = acc;
    }
    const Vf vinv = vset1(inv[r]);
    int64_t d = 0;
    for (; d + kLanes <= HS; d += kLanes) vstore(o_r + d, vmul(vload(o_r + d), vinv));
    for (; d < HS; ++d) o_r[d] *= inv[r];
  }
}

// Attention takes the step's tokens in aligned blocks of kAttentionRows (kernels.h), each cut into
// runs: tokens of one slot at consecutive positions (a prompt's rows in a prefill; a decode step's
// rows are runs of one). The run that starts at token i has this many tokens.
template <class KV>
inline int64_t run_length(const AttentionJob<KV>& j, int64_t i) {
  const int64_t end = min64(j.N, (i / kAttentionRows + 1) * kAttentionRows);
  int64_t n = 1;
  while (i + n < end && j.slot[i + n] == j.slot[i] && int64_t(j.pos[i + n]) == int64_t(j.pos[i]) + n) ++n;
  return n;
}

// Head h of the run of n tokens from token i, prefetching for token ni's head nh (ni < 0: none).
template <class KV>
void attend_run(const AttentionJob<KV>& j, int64_t i, int64_t n, int64_t h, int64_t ni, int64_t nh, float* scores) {
  static_assert(kAttentionRows == 4, "one case per run length");
  const typename KV::T* next_k = ni >= 0 ? head_rows(j, j.k, ni, nh) : nullptr;
  const typename KV::T* next_v = ni >= 0 ? head_rows(j, j.v, ni, nh) : nullptr;
  switch (n) {
    case 1: attend_rows<KV, 1>(j, i, h, next_k, next_v, scores); break;
    case 2: attend_rows<KV, 2>(j, i, h, next_k, next_v, scores); break;
    case 3: attend_rows<KV, 3>(j, i, h, next_k, next_v, scores); break;
    default: attend_rows<KV, 4>(j, i, h, next_k, next_v, scores); break;
  }
}

template <class KV>
void attention_t(ThreadPool& pool, const float* qkv, int64_t N, const int32_t* slot, const int32_t* pos,
                 typename KV::T* k, typename KV::T* v, int64_t NH, int64_t HS, int64_t ctx, float* out, float* scratch) {
  const int64_t C = NH * HS;
  // The new keys and values first: a token attends to those of earlier tokens of this step.
  for (int64_t i = 0; i < N; ++i) {
    for (int64_t h = 0; h < NH; ++h) {
      const int64_t at = ((int64_t(slot[i]) * NH + h) * ctx + pos[i]) * HS;
      KV::store(k + at, qkv + i * 3 * C + C + h * HS, HS);
      KV::store(v + at, qkv + i * 3 * C + 2 * C + h * HS, HS);
    }
  }
  // Tasks (head, block), head by head: consecutive blocks of a prompt read the same head's keys
  // and values, which then stay in the L2.
  const int64_t blocks = (N + kAttentionRows - 1) / kAttentionRows, tasks = blocks * NH;
  AttentionJob<KV> job{qkv, slot, pos, k, v, N, NH, HS, ctx, out, scratch, (tasks + 8 * pool.size() - 1) / (8 * pool.size())};
  int64_t work = 0;  // multiply-adds: two per head dimension and attended position
  for (int64_t i = 0; i < N; ++i) work += 2 * (int64_t(pos[i]) + 1) * C;
  parallel_chunks(pool, (tasks + job.per_chunk - 1) / job.per_chunk, work, +[](void* p, int64_t c, int thread) {
    const AttentionJob<KV>& j = *static_cast<const AttentionJob<KV>*>(p);
    float* scores = j.scratch + int64_t(thread) * kAttentionRows * j.ctx;
    const int64_t blocks = (j.N + kAttentionRows - 1) / kAttentionRows, end = min64(blocks * j.NH, (c + 1) * j.per_chunk);
    for (int64_t task = c * j.per_chunk; task < end; ++task) {
      const int64_t h = task / blocks, b = task % blocks, stop = min64(j.N, (b + 1) * kAttentionRows);
      for (int64_t i = b * kAttentionRows; i < stop;) {
        const int64_t n = run_length(j, i);
        // What comes next: the block's next run, else the next task's first.
        int64_t ni = i + n, nh = h;
        if (ni >= stop) {
          nh = task + 1 < end ? (task + 1) / blocks : 0;
          ni = task + 1 < end ? (task + 1) % blocks * kAttentionRows : -1;
        }
        attend_run(j, i, n, h, ni, nh, scores);
        i += n;
      }
    }
  }, &job);
}

void attention(ThreadPool& pool, const float* qkv, int64_t N, const int32_t* slot, const int32_t* pos, void* k, void* v,
               DType kv_dtype, int64_t NH, int64_t HS, int64_t ctx, float* out, float* scratch) {
  if (kv_dtype == DType::F32) {
    attention_t<KVF32>(pool, qkv, N, slot, pos, static_cast<float*>(k), static_cast<float*>(v), NH, HS, ctx, out, scratch);
  } else {
    attention_t<KVBF16>(pool, qkv, N, slot, pos, static_cast<uint16_t*>(k), static_cast<uint16_t*>(v), NH, HS, ctx, out,
                        scratch);
  }
}

// ---------------------------------------------------------------------------------------------

// Element (n, k) of a packed matrix (the layout of pack()), widened to fp32.
inline float packed_at(const PackedMatrix& w, int64_t n, int64_t k) {
  const int64_t p = n / kPanel, i = n % kPanel, K = w.cols;
  if (w.dtype == DType::I8) {
    const uint8_t* panel = static_cast<const uint8_t*>(w.data) + p * i8_panel_bytes(K);
    return float(int8_t(panel[((k / 4) * kPanel + i) * 4 + k % 4])) * reinterpret_cast<const float*>(panel + i8_weight_bytes(K))[i];
  }
  if (w.dtype == DType::F32) return static_cast<const float*>(w.data)[(p * K + k) * kPanel + i];
  return bf16_to_f32(static_cast<const uint16_t*>(w.data)[((p * pairs(K) + k / 2) * kPanel + i) * 2 + k % 2]);
}

struct EmbedJob {
  const PackedMatrix* wte;
  const TensorView* wpe;
  const int32_t* tokens;
  const int32_t* pos;
  int64_t C;
  float* x;  // (N, C)
};

void embed(ThreadPool& pool, const PackedMatrix& wte, const TensorView& wpe, const int32_t* tokens, const int32_t* pos,
           int64_t N, int64_t C, float* x) {
  EmbedJob job{&wte, &wpe, tokens, pos, C, x};
  parallel_chunks(pool, N, N * C, +[](void* p, int64_t i, int) {
    const EmbedJob& j = *static_cast<const EmbedJob*>(p);
    float* xr = j.x + i * j.C;
    for (int64_t c = 0; c < j.C; ++c) {
      const int64_t at = j.pos[i] * j.C + c;
      const float pe = j.wpe->dtype == DType::F32  ? static_cast<const float*>(j.wpe->data)[at]
                       : j.wpe->dtype == DType::I8 ? float(static_cast<const int8_t*>(j.wpe->data)[at]) * j.wpe->scales[j.pos[i]]
                                                   : bf16_to_f32(static_cast<const uint16_t*>(j.wpe->data)[at]);
      xr[c] = packed_at(*j.wte, j.tokens[i], c) + pe;
    }
  }, &job);
}

// ---------------------------------------------------------------------------------------------
// Sampler helpers.

int64_t first_above(const float* x, int64_t n, float t) {
  const Vf vt = vset1(t);
  int64_t i = 0;
  for (; i + 4 * kLanes <= n; i += 4 * kLanes) {  // one branch per four vectors
    const uint64_t bits = uint64_t(vmask_above(vload(x + i), vt)) | uint64_t(vmask_above(vload(x + i + kLanes), vt)) << kLanes |
                          uint64_t(vmask_above(vload(x + i + 2 * kLanes), vt)) << (2 * kLanes) |
                          uint64_t(vmask_above(vload(x + i + 3 * kLanes), vt)) << (3 * kLanes);
    if (bits) return i + __builtin_ctzll(bits);
  }
  for (; i < n; ++i) {
    if (x[i] > t) return i;
  }
  return n;
}

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
bool bf16_widened() { return widen_bf16(); }
const Kernels table = {GPT2S_ISA_NAME, kPanel, packed_bytes, pack, matmul, GPT2S_SCREEN_KERNELS, layernorm, attention, embed,
                       max_value, exp_weights, first_above, bf16_widened};
