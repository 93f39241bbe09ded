// The CPU kernels, one table per instruction set (kernels_impl.h compiled by kernels_isa.cpp with
// that ISA's flags), chosen at run time from cpu_features().
//
// Determinism rule every kernel keeps: the value computed for one token row never depends on which
// other rows share the call, on the thread count or on the scheduling. Each output of a matmul is
// accumulated in its own vector lane, input after input, whatever the row block, panel or thread
// that computes it. So an engine's logits (and its samples) are the same at batch 1 and batch 64.
#pragma once

#include <cstdint>

#include "engine/model.h"
#include "engine/thread_pool.h"

namespace gpt2s {

// Query rows of one sequence (consecutive positions of one slot, as in a prefill) that attention
// takes together, reading each cached key and value once for them all (kernels_impl.h, attend_rows).
constexpr int kAttentionRows = 4;

enum class Epilogue {
  kStore,  // y = x @ w^T + bias
  kGelu,   // y = gelu_tanh(x @ w^T + bias)
  kAdd,    // y += x @ w^T + bias (the residual connection)
};

// A weight matrix (N outputs, K inputs) rearranged by Kernels::pack into the layout that ISA's
// matmul streams (kernels_impl.h); `data` holds Kernels::packed_bytes(N, K, dtype) bytes.
struct PackedMatrix {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;  // N
  int64_t cols = 0;  // K
};

// wte quantized to int8 for the screened head (kernels_impl.h): `data` holds screen_bytes(rows,
// cols) bytes of packed panels; the per-output arrays hold panel-padded counts (a multiple of
// Kernels::panel), zeros past `rows`.
struct ScreenMatrix {
  const void* data = nullptr;
  const float* scale = nullptr;  // s_v: weight = s_v * q, q in [-127, 127]
  const int32_t* sum = nullptr;  // sum of q over the inputs
  const float* err = nullptr;    // || w_v - s_v q_v ||, rounded up
  const float* norm = nullptr;   // || w_v ||, rounded up
  float max_norm = 0;            // the largest norm
  int64_t rows = 0;              // N
  int64_t cols = 0;              // K
};

// The ScreenMatrix of an (N, K) matrix over `panels` (Kernels::screen_bytes(N, K) bytes, 64-byte
// aligned) and `arrays` (4 x N rounded up to a multiple of `panel` floats), before pack_screen.
ScreenMatrix screen_matrix(void* panels, float* arrays, int64_t N, int64_t K, int64_t panel);

struct Kernels {
  const char* isa;  // "avx512bf16", "avx512", "avx2", "neondot", "neon" or "scalar"

  // Outputs per packed panel: packing rows [r, r + n) of a matrix, r a multiple of this, writes
  // the bytes at packed_bytes(r, K, dtype) of the whole matrix's packed form.
  int64_t panel;
  // Bytes that pack() writes for a stored (N, K) matrix of `dtype`.
  int64_t (*packed_bytes)(int64_t N, int64_t K, DType dtype);
  // Rearranges the stored (N, K) matrix w (fp32, bf16, or int8 with its row scales) into out
  // (64-byte aligned). Parallel.
  void (*pack)(ThreadPool& pool, const TensorView& w, void* out);

  // y (M, N) = epilogue(x (M, K) @ w (N, K)^T + bias (N)); bias may be null. For bf16 weights the
  // activations are rounded to bf16 once (into xb, room for M * (K + 1) floats: bf16 values, or
  // fp32 where the kernels widen the weights) and multiplied with fp32 accumulation; for int8
  // weights each row is quantized to int8 (per row, into xb's memory) and the products summed
  // exactly in int32. Parallel over N.
  void (*matmul)(ThreadPool& pool, const float* x, int64_t M, int64_t K, const PackedMatrix& w, const float* bias,
                 float* y, Epilogue epilogue, uint16_t* xb);

  // The screened head, or four nulls where the ISA lacks an int8 dot product (simd.h,
  // GPT2S_INT8_DOT: AVX512-VNNI with -BF16, AVX2, NEON with sdot).
  // screen_bytes: bytes of a ScreenMatrix's panels. pack_screen: fills s's panels, arrays and
  // max_norm from the stored (N, K) matrix w; false if w has a weight or a norm that is not
  // finite (no screen).
  int64_t (*screen_bytes)(int64_t N, int64_t K);
  bool (*pack_screen)(ThreadPool& pool, const TensorView& w, ScreenMatrix& s);
  // For rows x (M, K), as matmul() would multiply them with weights of dtype bf16 (or fp32):
  // upper (M, N) bounds every logit from above, panel_lower (M, panels) the best logit of each
  // panel of `panel` outputs from below, panel_best (M, panels) the first token of the panel whose
  // lower bound that is; row_ok[m] false where row m's bound is not finite (its other outputs are
  // then meaningless). Scratch: xq (M * (K + 3)) bytes, terms (M * 5) floats.
  void (*screen)(ThreadPool& pool, const float* x, int64_t M, int64_t K, bool bf16, const ScreenMatrix& s, uint8_t* xq,
                 float* terms, float* upper, float* panel_lower, int32_t* panel_best, bool* row_ok);
  // out[i] = the logit of token ids[i] for row x (K), bit for bit what matmul() computes with the
  // packed w, from the stored row-major w. Scratch xb: K + 1.
  void (*exact_logits)(const float* x, const TensorView& w, const int32_t* ids, int64_t n, float* out, uint16_t* xb);

  // y (M, C) = layernorm(x (M, C)) * g + b, eps 1e-5 (GPT-2's).
  void (*layernorm)(ThreadPool& pool, const float* x, int64_t M, int64_t C, const float* g, const float* b, float* y);

  // Causal attention for N tokens over the KV cache of one layer: first the tokens' own keys and
  // values (from qkv (N, 3C)) go to position pos[i] of slot[i], then token i attends to positions
  // 0..pos[i] of its slot; out (N, C). k and v: (slots, NH, ctx, HS) of kv_dtype (fp32, or bf16:
  // rounded to nearest even when stored, widened when read). scratch: (pool threads,
  // kAttentionRows, ctx) floats. Parallel over (head, block of kAttentionRows tokens).
  void (*attention)(ThreadPool& pool, const float* qkv, int64_t N, const int32_t* slot, const int32_t* pos, void* k,
                    void* v, DType kv_dtype, int64_t NH, int64_t HS, int64_t ctx, float* out, float* scratch);

  // x (N, C) = wte[tokens] + wpe[pos], widened to fp32; wte is read from its packed form (the
  // output head's), so the file's copy is never touched again.
  void (*embed)(ThreadPool& pool, const PackedMatrix& wte, const TensorView& wpe, const int32_t* tokens,
                const int32_t* pos, int64_t N, int64_t C, float* x);

  // Sampler helpers. max_value: the largest of x[0..n), NaN ignored (-inf if none).
  float (*max_value)(const float* x, int64_t n);
  // w[i] = exp(x[i] / temperature - m) in float32 (a true division, as docs/sampling.md says);
  // NaN x gives 0. Returns the float64 sum of the w.
  double (*exp_weights)(const float* x, int64_t n, float temperature, float m, float* w);
  // The first i with x[i] > t (never a NaN), or n.
  int64_t (*first_above)(const float* x, int64_t n, float t);
  // Whether bf16 matmuls of more than a row block run as fp32 FMAs on weights widened slice by
  // slice (kernels_impl.h, widen_bf16: AVX2, AVX-512, and AVX512-BF16 CPUs whose vdpbf16ps is
  // the slower), bit for bit the bf16 dot product either way.
  bool (*bf16_widened)();
};

// The table for the best ISA this CPU allows, after the GPT2S_ISA cap (cpu_features.h): AVX-512
// with native BF16 dot products where present, else AVX-512, AVX2 + FMA; AArch64 Advanced SIMD
// (NEON) with its int8 dot product where present, else without; or portable C++.
const Kernels& best_kernels();

}  // namespace gpt2s
