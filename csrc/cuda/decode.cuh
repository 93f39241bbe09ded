// Matrix products of steps with few rows (decode at small batch sizes): each reads its whole weight
// once and does at most kDecodeMaxRows multiply-adds per weight, so they are bound by the weight
// reads and by the launches around them, not by arithmetic. cuBLAS's GEMM kernels are made for the
// opposite case, and the general path adds a LayerNorm, a bias + GELU and a scatter launch around
// them. Here each product is one kernel that also does what comes before and after it:
//
//   c_attn:   LayerNorm ln_1 of the residual rows, the product, + bias, q out, k and v into the cache
//   c_proj:   the product over the attention output, + bias, added to the residual stream
//   c_fc:     LayerNorm ln_2, the product, + bias, GELU
//   c_proj:   the product over the GELU output, + bias, added to the residual stream
//   wte^T:    LayerNorm ln_f of the sampling rows, the product: the logits
//
// so a layer is four of these and the two attention kernels. One warp computes one output feature
// for every row: its lanes read the weight row in 16-byte pieces, side by side (coalesced), multiply
// them with the rows' inputs (LayerNorm output in shared memory, or the previous kernel's output,
// which the block reads through the cache), and add across the warp.
#pragma once

#include <algorithm>
#include <cstdint>

#include "check.cuh"
#include "dtype.cuh"
#include "gelu.cuh"
#include "reduce.cuh"

namespace gpt2s::cuda {

constexpr int kDecodeMaxRows = 8;        // steps with more rows use cuBLAS
constexpr int kDecodeThreads = 256;      // 8 warps: one LayerNorm row each
constexpr int kDecodeNormFloats = 8192;  // rows x n_embd normalised in shared memory (32 KB)

enum class DecodeOut {
  QKV,       // y: q (n, C) fp32; k and v written into the layer's caches
  Residual,  // y: the residual stream (n, out), added to
  Gelu,      // act_out: gelu(x W^T + b) (n, out) in W
  Logits,    // y: (n, out) fp32, no bias
};

template <typename W>
struct DecodeArgs {
  int n = 0, in = 0, out = 0;     // rows, and the product (n, in) x (out, in)^T
  const W* weight = nullptr;      // (out, in)
  const float* bias = nullptr;    // (out); unused for Logits
  // Input rows: LayerNorm of residual rows (gamma given; row r is residual[rows ? rows[r] : r]),
  // else act (n, in) in W.
  const float* residual = nullptr;
  const int32_t* rows = nullptr;
  const float *gamma = nullptr, *beta = nullptr;
  const W* act = nullptr;
  float* y = nullptr;
  W* act_out = nullptr;
  // QKV: the layer's caches (S, NH, T, HS) and each row's slot and position.
  W *k_cache = nullptr, *v_cache = nullptr;
  const int32_t *slots = nullptr, *positions = nullptr;
  int NH = 0, HS = 0, T = 0;
};

template <typename W, int kRows, bool kNorm, DecodeOut kOut>
__global__ void __launch_bounds__(kDecodeThreads) decode_product_kernel(const DecodeArgs<W> a) {
  constexpr int kPiece = Piece<W>::kSize;
  __shared__ float xs[kNorm ? kDecodeNormFloats : 1];  // (n, in) LayerNorm outputs, rounded to W
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if constexpr (kNorm) {
    // Warp r normalises row r (mean, then the variance around it, as residual_layernorm), reading
    // the row from memory once; each lane only touches its own columns, so no barrier is needed
    // until the rows are shared.
    if (warp < a.n) {
      const float* x = a.residual + int64_t(a.rows ? a.rows[warp] : warp) * a.in;
      float* row = xs + warp * a.in;
      float sum = 0.f;
      for (int c = lane; c < a.in; c += 32) sum += row[c] = x[c];
      const float mean = warp_sum(sum) / float(a.in);
      float sq = 0.f;
      for (int c = lane; c < a.in; c += 32) sq += (row[c] - mean) * (row[c] - mean);
      const float rstd = rsqrtf(warp_sum(sq) / float(a.in) + 1e-5f);
      for (int c = lane; c < a.in; c += 32) {
        row[c] = to_float(from_float<W>((row[c] - mean) * rstd * a.gamma[c] + a.beta[c]));
      }
    }
    __syncthreads();
  }

  const int warps = gridDim.x * (kDecodeThreads / 32);
  for (int o = blockIdx.x * (kDecodeThreads / 32) + warp; o < a.out; o += warps) {
    const W* w = a.weight + int64_t(o) * a.in;
    float acc[kRows];
    for (int r = 0; r < kRows; ++r) acc[r] = 0.f;
#pragma unroll 4
    for (int c = lane * kPiece; c < a.in; c += 32 * kPiece) {
      float wv[kPiece], xv[kPiece];
      load_piece(wv, w + c);
      for (int r = 0; r < kRows; ++r) {
        if (r >= a.n) break;
        if constexpr (kNorm) {
          for (int j = 0; j < kPiece; ++j) xv[j] = xs[r * a.in + c + j];
        } else {
          load_piece(xv, a.act + int64_t(r) * a.in + c);
        }
        for (int j = 0; j < kPiece; ++j) acc[r] += wv[j] * xv[j];
      }
    }
    // Lane r keeps row r's sum.
    float mine = 0.f;
    for (int r = 0; r < kRows; ++r) {
      const float total = warp_sum(acc[r]);
      if (lane == r) mine = total;
    }
    if (lane >= a.n) continue;
    const int r = lane;
    if constexpr (kOut == DecodeOut::Logits) {
      a.y[int64_t(r) * a.out + o] = mine;
    } else if constexpr (kOut == DecodeOut::Gelu) {
      a.act_out[int64_t(r) * a.out + o] = from_float<W>(gelu_tanh(mine + a.bias[o]));
    } else if constexpr (kOut == DecodeOut::Residual) {
      float& x = a.y[int64_t(r) * a.out + o];
      x = x + (mine + a.bias[o]);  // x + (xW + b), as PyTorch
    } else {
      const float v = mine + a.bias[o];
      const int C = a.NH * a.HS;
      if (o < C) {
        a.y[int64_t(r) * C + o] = v;
      } else {
        const int c = (o - C) % C, h = c / a.HS, d = c - h * a.HS;
        const int64_t at = ((int64_t(a.slots[r]) * a.NH + h) * a.T + a.positions[r]) * a.HS + d;
        (o < 2 * C ? a.k_cache : a.v_cache)[at] = from_float<W>(v);
      }
    }
  }
}

// Whether decode_product handles a step of n rows for this model (else: cuBLAS and the general path).
template <typename W>
bool decode_products_fit(int n, int C) {
  return n >= 1 && n <= kDecodeMaxRows && C % Piece<W>::kSize == 0 && n * C <= kDecodeNormFloats;
}

template <typename W, bool kNorm, DecodeOut kOut>
void decode_product(const DecodeArgs<W>& a, int multiprocessors, cudaStream_t stream) {
  GPT2S_CUDA_ASSERT(a.n >= 1 && a.n <= kDecodeMaxRows && a.in % Piece<W>::kSize == 0 &&
                        (!kNorm || a.n * a.in <= kDecodeNormFloats),
                    "decode_product: geometry beyond the kernel's limits");
  // Enough blocks to fill the GPU a few times over, not one per 8 outputs: each block normalises
  // its rows again, and for the logits that would read more than the weights.
  const int warps = kDecodeThreads / 32;
  const int blocks = std::min((a.out + warps - 1) / warps, 4 * multiprocessors);
  auto pick = [&](auto kernel) { launch("decode_product", kernel, blocks, kDecodeThreads, stream, a); };
  if (a.n == 1) {
    pick(decode_product_kernel<W, 1, kNorm, kOut>);
  } else if (a.n == 2) {
    pick(decode_product_kernel<W, 2, kNorm, kOut>);
  } else if (a.n <= 4) {
    pick(decode_product_kernel<W, 4, kNorm, kOut>);
  } else {
    pick(decode_product_kernel<W, 8, kNorm, kOut>);
  }
}

}  // namespace gpt2s::cuda
