// The model as the engines see it: config, named weight views, and the tokenizer's token bytes.
// format.cpp fills these from a validated, memory-mapped flat binary (docs/format.md); the CPU and
// CUDA engines only read them. Nothing here owns memory: views point into the mapping.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace gpt2s {

struct Config {
  int n_vocab = 0;  // V
  int n_ctx = 0;    // longest context the position table covers
  int n_embd = 0;   // C
  int n_head = 0;   // NH (head size HS = C / NH)
  int n_layer = 0;  // L
};

// Element types of stored tensors. The numbers are the on-disk codes; never reuse one.
enum class DType : uint32_t {
  F32 = 0,
  BF16 = 1,
  I8 = 2,  // int8 weights, one fp32 scale per row (format version 2): weight = scales[row] * q
};

// A read-only view of one stored tensor, row-major. Matrix weights are stored (out, in), i.e.
// transposed from GPT-2's Conv1D (in, out) layout, so each output is a dot product over a
// contiguous row: what a batch-1 GEMV and a row-major GEMM both want.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::F32;
  int64_t rows = 0;  // 1 for vectors
  int64_t cols = 0;
  const float* scales = nullptr;  // (rows) for I8, else null
};

struct LayerWeights {
  TensorView ln_1_w, ln_1_b;          // (C), (C)          fp32
  TensorView attn_c_attn_w;           // (3C, C)           weight dtype
  TensorView attn_c_attn_b;           // (3C)              fp32
  TensorView attn_c_proj_w;           // (C, C)            weight dtype
  TensorView attn_c_proj_b;           // (C)               fp32
  TensorView ln_2_w, ln_2_b;          // (C), (C)          fp32
  TensorView mlp_c_fc_w;              // (4C, C)           weight dtype
  TensorView mlp_c_fc_b;              // (4C)              fp32
  TensorView mlp_c_proj_w;            // (C, 4C)           weight dtype
  TensorView mlp_c_proj_b;            // (C)               fp32
};

struct ModelWeights {
  Config config;
  DType dtype = DType::F32;           // of wte, wpe and the matrix weights
  TensorView wte;                     // (V, C): token embeddings and, tied, the output head
  TensorView wpe;                     // (n_ctx, C)
  std::vector<LayerWeights> h;        // L layers
  TensorView ln_f_w, ln_f_b;          // (C), (C)          fp32
  // Raw bytes of each token id (V entries), views into the file: detokenization and stop-sequence
  // checks in C++ need no Python.
  std::vector<std::string_view> token_bytes;
  int eot_token = -1;                 // id of <|endoftext|>, -1 if the vocabulary has none
};

}  // namespace gpt2s
