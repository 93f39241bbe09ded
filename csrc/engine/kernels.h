// The CPU kernels, one table per instruction set (kernels_impl.h compiled by kernels_<isa>.cpp with
// that ISA's flags), chosen at run time from cpu_features().
//
// Determinism rule every kernel keeps: the value computed for one token row never depends on which
// other rows share the call, on the thread count or on the scheduling. Each output of a matmul is
// one dot product accumulated in a fixed lane order over K and reduced the same way whatever the
// tile it falls in. So an engine's logits (and its samples) are the same at batch 1 and batch 64.
#pragma once

#include <cstdint>

#include "engine/model.h"
#include "engine/thread_pool.h"

namespace gpt2s {

enum class Epilogue {
  kStore,  // y = x @ w^T + bias
  kGelu,   // y = gelu_tanh(x @ w^T + bias)
  kAdd,    // y += x @ w^T + bias (the residual connection)
};

struct Kernels {
  const char* isa;  // "avx512bf16", "avx512", "avx2" or "scalar"

  // y (M, N) = epilogue(x (M, K) @ w (N, K)^T + bias (N)); bias may be null. w is fp32 or bf16;
  // for bf16 the activations are rounded to bf16 once (into xb, M*K values) and multiplied with
  // fp32 accumulation. Parallel over N.
  void (*matmul)(ThreadPool& pool, const float* x, int64_t M, int64_t K, const TensorView& w, const float* bias,
                 float* y, Epilogue epilogue, uint16_t* xb);

  // y (M, C) = layernorm(x (M, C)) * g + b, eps 1e-5 (GPT-2's).
  void (*layernorm)(ThreadPool& pool, const float* x, int64_t M, int64_t C, const float* g, const float* b, float* y);

  // Causal attention for N tokens over a KV cache of one layer, k/v (slots, NH, T_cap, HS): token i
  // of slot[i] at position pos[i] attends to positions 0..pos[i] of its slot. q is read from
  // qkv (N, 3C); out (N, C). scratch: (pool threads, T_cap) floats. Parallel over (token, head).
  void (*attention)(ThreadPool& pool, const float* qkv, int64_t N, const int32_t* slot, const int32_t* pos,
                    const float* k, const float* v, int64_t NH, int64_t HS, int64_t T_cap, float* out, float* scratch);

  // x (N, C) = wte[tokens] + wpe[pos], widened to fp32.
  void (*embed)(ThreadPool& pool, const TensorView& wte, const TensorView& wpe, const int32_t* tokens,
                const int32_t* pos, int64_t N, int64_t C, float* x);

  // Sampler helpers. max_value: the largest of x[0..n), NaN ignored (-inf if none).
  float (*max_value)(const float* x, int64_t n);
  // w[i] = exp(x[i] / temperature - m) in float32 (a true division, as docs/sampling.md says);
  // NaN x gives 0. Returns the float64 sum of the w.
  double (*exp_weights)(const float* x, int64_t n, float temperature, float m, float* w);
};

// The table for the best ISA this CPU allows, after the GPT2S_ISA cap (cpu_features.h): AVX-512
// with native BF16 dot products where present, else AVX-512, AVX2 + FMA, or portable C++.
const Kernels& best_kernels();

}  // namespace gpt2s
