// Causal self-attention over the preallocated KV cache, one kernel family for prefill and decode.
//
// The cache of one layer is (S slots, NH, T, HS) in the storage type: the keys of one (slot, head)
// are contiguous, so a query reads its head's cached keys and values once, front to back.
// A forward pass handles N query tokens, each with its slot and position p (prefill chunks of
// several rows and decode steps alike): first qkv_scatter writes every token's key and value into
// the cache, then each token attends to positions [0, p] of its slot. Because the writes finish
// before the reads begin (stream order), tokens of one prompt see each other causally.
//
// The positions [0, p] are cut into splits of kAttnSplit (flash-decoding): one block per
// (head, split, token) computes a partial softmax (max m, sum l, unnormalised output o), and
// attention_combine merges the splits. Long contexts thus use many blocks even at batch 1, and the
// grid depends only on N and T, never on the positions, so a captured CUDA graph stays valid.
#pragma once

#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "reduce.cuh"

namespace gpt2s::cuda {

constexpr int kAttnSplit = 128;     // positions per split (a 144-position decode at batch 1 spreads over 2 x NH blocks)
constexpr int kAttnThreads = kAttnSplit;  // threads per split block: one per position for the scores
constexpr int kMaxHeadSize = 256;   // HS (GPT-2's is 64 in every size)

// Head sizes the kernels take: whole 16-byte pieces of every storage type, at most kMaxHeadSize.
inline bool attention_fits(int HS) { return HS % 8 == 0 && HS <= kMaxHeadSize; }

inline int attention_splits(int T) { return (T + kAttnSplit - 1) / kAttnSplit; }

// qkv (N, 3C) fp32, c_attn's output before its bias. Writes q (N, C) fp32 = q + bias, and
// k + bias, v + bias into the layer's caches at (slots[n], head, positions[n]).
template <typename KV>
__global__ void qkv_scatter_kernel(float* __restrict__ q, KV* __restrict__ k_cache, KV* __restrict__ v_cache,
                                   const float* __restrict__ qkv, const float* __restrict__ bias,
                                   const int32_t* __restrict__ slots, const int32_t* __restrict__ positions, int C,
                                   int NH, int HS, int T) {
  const int64_t n = blockIdx.x;
  const int64_t head0 = int64_t(slots[n]) * NH;
  const int64_t pos = positions[n];
  const float* row = qkv + n * 3 * C;
  for (int c = threadIdx.x; c < C; c += blockDim.x) {
    q[n * C + c] = row[c] + bias[c];
    const int h = c / HS, d = c - h * HS;
    const int64_t at = ((head0 + h) * T + pos) * HS + d;
    k_cache[at] = from_float<KV>(row[C + c] + bias[C + c]);
    v_cache[at] = from_float<KV>(row[2 * C + c] + bias[2 * C + c]);
  }
}

// Block (h, s, n): token n, head h, cache positions [s * kAttnSplit, min((s + 1) * kAttnSplit, p + 1)).
// part_o ((N, NH, splits), HS) and part_ml ((N, NH, splits), 2) receive o, and (m, l).
// Every cached row is read in 16-byte pieces (HS is a multiple of 8: attention_fits), and each
// thread's loads are independent of each other, so they are all in flight at once: a decode
// step's attention waits for memory about once per phase, not once per key.
template <typename KV>
__global__ void __launch_bounds__(kAttnThreads)
attention_partial_kernel(float* __restrict__ part_o, float* __restrict__ part_ml, const float* __restrict__ q,
                         const KV* __restrict__ k_cache, const KV* __restrict__ v_cache,
                         const int32_t* __restrict__ slots, const int32_t* __restrict__ positions, int NH, int HS,
                         int T, int splits, float scale) {
  constexpr int kPiece = Piece<KV>::kSize;
  const int h = blockIdx.x, s = blockIdx.y;
  const int64_t n = blockIdx.z;
  const int p = positions[n];
  const int t0 = s * kAttnSplit;
  if (t0 > p) return;  // the whole block leaves together, before any barrier
  const int len = min(t0 + kAttnSplit, p + 1) - t0;

  __shared__ float qs[kMaxHeadSize];            // (HS) the query
  __shared__ float w[kAttnSplit];               // scores, then softmax numerators
  __shared__ float part[kAttnThreads * 8];      // (groups, HS) partial outputs: groups * HS <= 8 * nt
  __shared__ float scratch[32];

  const int tid = threadIdx.x, nt = blockDim.x;
  const int64_t C = int64_t(NH) * HS;
  for (int d = tid; d < HS; d += nt) qs[d] = q[n * C + int64_t(h) * HS + d];
  __syncthreads();

  const int64_t head = (int64_t(slots[n]) * NH + h) * T + t0;  // first cached row of this split
  const KV* kb = k_cache + head * HS;
  const KV* vb = v_cache + head * HS;
  // Scores: thread i takes key i whole (kAttnSplit == kAttnThreads: one key each).
  float score = -INFINITY;
  if (tid < len) {
    float dot = 0.f;
    for (int d = 0; d < HS; d += kPiece) {
      float kv[kPiece];
      load_piece(kv, kb + int64_t(tid) * HS + d);
      for (int j = 0; j < kPiece; ++j) dot += qs[d + j] * kv[j];
    }
    score = dot * scale;
    w[tid] = score;
  }
  const float m = block_max(score, scratch);  // its barriers also publish w to every thread
  float numerator = 0.f;
  if (tid < len) {
    numerator = expf(w[tid] - m);
    w[tid] = numerator;
  }
  const float l = block_sum(numerator, scratch);  // and these publish the numerators

  // o[d] = sum_i w[i] v[i][d]: thread (g, piece) sums every groups-th position from g for the
  // kPiece values of its piece; the groups' sums are then added in a fixed order.
  const int pieces = HS / kPiece, groups = max(1, nt / pieces);
  if (tid < groups * pieces) {
    const int g = tid / pieces, d = (tid - g * pieces) * kPiece;
    float acc[kPiece] = {};
    for (int i = g; i < len; i += groups) {
      float vv[kPiece];
      load_piece(vv, vb + int64_t(i) * HS + d);
      for (int j = 0; j < kPiece; ++j) acc[j] += w[i] * vv[j];
    }
    for (int j = 0; j < kPiece; ++j) part[g * HS + d + j] = acc[j];
  }
  __syncthreads();
  const int64_t out = (n * NH + h) * splits + s;
  for (int d = tid; d < HS; d += nt) {
    float acc = 0.f;
    for (int g = 0; g < groups; ++g) acc += part[g * HS + d];
    part_o[out * HS + d] = acc;
  }
  if (tid == 0) {
    part_ml[out * 2] = m;
    part_ml[out * 2 + 1] = l;
  }
}

// Block (n, h): merges the splits that token n used into out (N, C) in W.
template <typename W>
__global__ void attention_combine_kernel(W* __restrict__ out, const float* __restrict__ part_o,
                                         const float* __restrict__ part_ml, const int32_t* __restrict__ positions,
                                         int NH, int HS, int splits) {
  const int64_t n = blockIdx.x;
  const int h = blockIdx.y;
  const int used = positions[n] / kAttnSplit + 1;
  const int64_t first = (n * NH + h) * splits;
  float M = -INFINITY;
  for (int s = 0; s < used; ++s) M = fmaxf(M, part_ml[(first + s) * 2]);
  float L = 0.f;
  for (int s = 0; s < used; ++s) L += expf(part_ml[(first + s) * 2] - M) * part_ml[(first + s) * 2 + 1];
  const float inv_l = 1.f / L;
  W* o = out + n * NH * HS + int64_t(h) * HS;
  for (int d = threadIdx.x; d < HS; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < used; ++s) acc += expf(part_ml[(first + s) * 2] - M) * part_o[(first + s) * HS + d];
    o[d] = from_float<W>(acc * inv_l);
  }
}

// Scratch the partial results need for N tokens: part_o floats, part_ml floats.
inline int64_t attention_part_o_floats(int N, int NH, int HS, int T) { return int64_t(N) * NH * attention_splits(T) * HS; }
inline int64_t attention_part_ml_floats(int N, int NH, int T) { return int64_t(N) * NH * attention_splits(T) * 2; }

// Each token attends to positions [0, p] of its slot's cache (its own key and value already
// written there). q (N, C) fp32 with bias; out (N, C) in W.
template <typename W>
void attend(W* out, const float* q, const W* k_cache, const W* v_cache, float* part_o, float* part_ml,
            const int32_t* slots, const int32_t* positions, int N, int NH, int HS, int T, cudaStream_t stream) {
  if (N == 0) return;
  GPT2S_CUDA_ASSERT(attention_fits(HS) && N <= 65535 && NH <= 65535, "attention: geometry beyond the kernels' limits");
  const int splits = attention_splits(T);
  const float scale = 1.f / sqrtf(float(HS));
  launch("attention_partial", attention_partial_kernel<W>, dim3(NH, splits, N), kAttnThreads, stream, part_o, part_ml, q,
         k_cache, v_cache, slots, positions, NH, HS, T, splits, scale);
  launch("attention_combine", attention_combine_kernel<W>, dim3(N, NH), 64, stream, out, part_o, part_ml, positions, NH,
         HS, splits);
}

// One layer: scatter this pass's keys/values into the cache, then attend. out (N, C) in W.
// k_cache/v_cache: the layer's (S, NH, T, HS) caches; T is the cache's positions per slot.
template <typename W>
void attention(W* out, float* q, W* k_cache, W* v_cache, float* part_o, float* part_ml, const float* qkv,
               const float* c_attn_b, const int32_t* slots, const int32_t* positions, int N, int NH, int HS, int T,
               cudaStream_t stream) {
  if (N == 0) return;
  launch("qkv_scatter", qkv_scatter_kernel<W>, N, 256, stream, q, k_cache, v_cache, qkv, c_attn_b, slots, positions,
         NH * HS, NH, HS, T);
  attend(out, q, k_cache, v_cache, part_o, part_ml, slots, positions, N, NH, HS, T, stream);
}

}  // namespace gpt2s::cuda
