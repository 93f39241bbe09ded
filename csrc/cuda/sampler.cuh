// Drawing the next token on the GPU (docs/sampling.md), no vocabulary sort and no logits leaving
// the device: only the drawn ids come back. The draw itself is one block per row (sample_kernel).
//
// Every step of the specification is a selection over a 64-bit rank key,
//   key(i) = (order-preserving bits of logit i) << 32 | (2^32 - 1 - i),
// larger = better rank (higher logit, then lower id), so the spec's ranking and its tie rule are
// one integer order. "The k best tokens" and "the shortest best-first prefix holding a share of
// the mass" are both {i : key(i) >= tau} for the tau a radix select finds (block_select): eight
// passes of 8 bits at most, usually three or four, since it stops as soon as one token is left.
//
// Weights are exp(x / T - m) (float32, as the spec says) held as 62-bit fixed-point integers, so
// every sum is exact and the same whatever the order of the threads: a draw depends only on its
// inputs. The rounding this adds (below 2^-46 of the largest weight per token) moves a top-p or
// draw boundary by less than the exp differences the spec already allows between backends.
//
// Top-k rows with k <= kCandidates (the usual case) take a short road. The argmax pass leaves
// each thread's own three best tokens; the k-th best of the threads' bests bounds the row's k-th
// best from below (k distinct tokens are at or above it). The tokens at or above the bound are
// gathered into shared memory from the threads' best two (typically little more than k: the best
// tokens rarely share a thread; only if some thread's third best passes too is the row read
// again), and each thread ranks one gathered token by counting. Only the k best go on to top-p
// and the draw. Rows whose bound gathers too many tokens (a large k) and rows without top-k take
// the radix select over the row.
#pragma once

#include <cstdint>

#include "../engine/philox.h"
#include "check.cuh"
#include "reduce.cuh"

namespace gpt2s::cuda {

constexpr int kSampleThreads = 1024;  // sample_kernel: one block per row
constexpr int kCandidates = kSampleThreads;  // a top-k row's gathered best tokens: one per thread
constexpr int kHistogramGroups = 4;          // block_select: bins per warp added with one atomic each
constexpr int kRound = 8;                    // logits a thread loads at once in a pass over the row

// Where a block's time goes (bench/sampler_phases.cu builds with GPT2S_SAMPLER_TRACE): thread 0
// of block 0 notes its SM clock and the global nanosecond timer at each mark.
#ifdef GPT2S_SAMPLER_TRACE
__device__ unsigned long long sampler_trace[2][16];
__device__ __forceinline__ void sampler_mark(int n) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  unsigned long long ns;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(ns));
  sampler_trace[0][n] = clock64();
  sampler_trace[1][n] = ns;
}
#else
__device__ __forceinline__ void sampler_mark(int) {}
#endif

// One row's sampling parameters as the host uploads them (already validated and clamped).
struct RowSampling {
  double top_p;           // in (0, 1): active; 0 or 1: off
  uint64_t seed;
  uint64_t sample_index;
  uint64_t position;      // tokens the row generated so far: the draw's counter
  float temperature;      // float32(temperature); 0 = greedy
  int32_t top_k;          // in [0, V]; 0 or V: off
};

// Bits of fixed-point precision for weights in [0, 1] such that V of them sum below 2^62.
inline int sampler_frac_bits(int V) {
  int bits = 0;
  for (uint32_t v = uint32_t(V); v; v >>= 1) ++bits;
  return 62 - bits;
}

struct SelectShared {  // block_select's
  unsigned int count[256];
  unsigned long long mass[256];
  unsigned long long sel_above;
  unsigned int sel_count;
  int sel_digit;
};

struct SampleShared {
  SelectShared select;
  unsigned long long warp_total[kSampleThreads / 32];
  int result;
  unsigned long long thread_best[kSampleThreads];  // short road: each thread's best rank key
  unsigned long long cand_key[kCandidates];    // the gathered tokens' rank keys
  unsigned long long kept_key[kCandidates];    // the top-k among them
  unsigned long long kept_weight[kCandidates]; // and their weights (0 once top-p drops them)
  unsigned int n_cand, n_kept;
  int rescan;                                  // short road: gather from the row, not the threads' best two
};

// Step 0 of the spec (NaN counts as -inf), and -0 made +0 so equal logits get equal keys (adding
// +0 changes nothing else).
__device__ __forceinline__ float clean_logit(float x) { return isnan(x) ? -INFINITY : x + 0.f; }

__device__ __forceinline__ uint32_t order_bits(float x) {  // monotone in x: negatives flipped whole
  const uint32_t bits = __float_as_uint(x);
  return bits ^ (uint32_t(int32_t(bits) >> 31) | 0x80000000u);
}

__device__ __forceinline__ uint64_t rank_key_of_bits(uint32_t bits, int id) {
  return (uint64_t(bits) << 32) | uint64_t(0xFFFFFFFFu - uint32_t(id));
}

__device__ __forceinline__ uint64_t rank_key(float x, int id) { return rank_key_of_bits(order_bits(x), id); }

__device__ __forceinline__ int key_id(uint64_t key) { return int(0xFFFFFFFFu - uint32_t(key)); }

// The largest tau with  sum of weight(i) over {i included, key(i) >= tau}  >= need, for
// 1 <= need <= the included total. key_of(i, key) returns whether i is included; weight_of(i) is
// asked only for included tokens that share the bytes fixed so far (after the first pass, few).
// Radix select from the top byte: histogram the next byte of the included keys that share the
// bytes fixed so far, take the first bin (best first) where the running mass reaches need. Once
// that bin holds a single token, the bytes fixed so far (low bytes zero) select the same set of
// included tokens (tokens left out by key_of may also pass that lower bound).
// kCount: every included token weighs 1 (the k best: weight_of is UnitWeight), so the counts are
// the masses and the 64-bit sums are skipped.
struct UnitWeight {
  __device__ uint64_t operator()(int) const { return 1; }
};
template <bool kCount, class Key, class Weight>
__device__ uint64_t block_select(int V, uint64_t need, const Key& key_of, const Weight& weight_of, SelectShared& sh,
                                 int* error_flag) {
  const int tid = threadIdx.x, nt = blockDim.x, lane = tid & 31, warp = tid >> 5;
  uint64_t prefix = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int d = tid; d < 256; d += nt) {
      sh.count[d] = 0;
      if (!kCount) sh.mass[d] = 0;
    }
    __syncthreads();
    const uint64_t fixed_mask = shift == 56 ? 0 : (~0ull << (shift + 8));
    // Every warp runs the same iterations (i0 is block-uniform), so the warp-wide votes below see
    // all 32 lanes. The first bytes of the keys are shared by most of the vocabulary (they hold the
    // logits' sign and exponent): 32 lanes adding to one shared counter are serialised, so the
    // lanes of a warp's (at most kHistogramGroups) most common bins add their counts and masses
    // with one atomic per bin, only the stragglers one by one.
    for (int i0 = 0; i0 < V; i0 += nt) {
      const int i = i0 + tid;
      uint64_t key = 0;
      const bool in = i < V && key_of(i, key) && (key & fixed_mask) == prefix;
      const uint64_t weight = !kCount && in ? weight_of(i) : 0;
      const int d = int((key >> shift) & 255);
      unsigned pending = __ballot_sync(kFullWarp, in);
      for (int g = 0; pending && g < kHistogramGroups; ++g) {
        const int leader = __ffs(pending) - 1;
        const int bin = __shfl_sync(kFullWarp, d, leader);
        const unsigned group = __ballot_sync(kFullWarp, in && d == bin);
        if (lane == leader) atomicAdd(&sh.count[bin], unsigned(__popc(group)));
        if (!kCount) {  // every lane takes part in the sum
          const unsigned long long mass = warp_sum<unsigned long long>(in && d == bin ? weight : 0);
          if (lane == leader && mass) atomicAdd(&sh.mass[bin], mass);
        }
        pending &= ~group;
      }
      if (pending & (1u << lane)) {
        atomicAdd(&sh.count[d], 1u);
        if (!kCount && weight) atomicAdd(&sh.mass[d], (unsigned long long)weight);
      }
    }
    __syncthreads();
    if (warp == 0) {
      // Lane L holds bins 255 - 8L down to 248 - 8L; an inclusive scan over lanes then orders all
      // 256 bins best first.
      auto bin_mass = [&](int bin) -> unsigned long long { return kCount ? sh.count[bin] : sh.mass[bin]; };
      unsigned long long lane_mass = 0;
      for (int j = 0; j < 8; ++j) lane_mass += bin_mass(255 - 8 * lane - j);
      unsigned long long incl = lane_mass;
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned long long t = __shfl_up_sync(kFullWarp, incl, offset);
        if (lane >= offset) incl += t;
      }
      const unsigned hit = __ballot_sync(kFullWarp, incl >= need);
      if (hit == 0) {
        if (lane == 0) sh.sel_digit = -1;
      } else if (lane == __ffs(hit) - 1) {
        unsigned long long acc = incl - lane_mass;
        for (int j = 0; j < 8; ++j) {
          const int bin = 255 - 8 * lane - j;
          if (acc + bin_mass(bin) >= need) {
            sh.sel_digit = bin;
            sh.sel_above = acc;
            sh.sel_count = sh.count[bin];
            break;
          }
          acc += bin_mass(bin);
        }
      }
    }
    __syncthreads();
    const int digit = sh.sel_digit;
    if (digit < 0) {  // need exceeded the included mass: a broken invariant, reported to the host
      if (tid == 0) atomicExch(error_flag, 1);
      return prefix;
    }
    need -= sh.sel_above;
    prefix |= uint64_t(digit) << shift;
    if (sh.sel_count == 1) break;
    // No barrier needed here: sel_* is rewritten only after the next round's two barriers.
  }
  return prefix;
}

// out (B) int32 ids; support (B, V) uint8 or null: the kept set (spec's support()), for tests.
// logits (B, V) fp32; params (B). error_flag is set (never cleared) if an invariant breaks.
__global__ void __launch_bounds__(kSampleThreads)
sample_kernel(int32_t* __restrict__ out, uint8_t* __restrict__ support, int* __restrict__ error_flag,
              const float* __restrict__ logits, const RowSampling* __restrict__ params, int V, int frac_bits) {
  __shared__ SampleShared sh;
  constexpr int nt = kSampleThreads, n_warps = nt / 32;  // as launched: constant offsets in the loads
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.x;
  const float* row = logits + b * V;
  const RowSampling P = params[b];
  sampler_mark(0);

  const float T = P.temperature;
  // The short road (see the top of this file) needs top-k with k small enough to gather.
  const bool short_road = T > 0.f && P.top_k > 0 && P.top_k < V && P.top_k <= kCandidates;
  if (tid == 0) sh.n_cand = sh.n_kept = sh.rescan = 0;

  // The row in rounds of kRound logits per thread (ids i0 + u * nt + tid), block-uniformly: a
  // round's loads are issued together, so a pass waits on memory once per round, not once per
  // logit. round(i0, bits) gets their order bits after step 0's cleaning, 0 past V (below every
  // token's: -inf's are 0x007FFFFF).
  auto each_round = [&](const auto& round) {
    for (int i0 = 0; i0 < V; i0 += kRound * nt) {
      const float* p = row + i0 + tid;
      const int left = V - i0 - tid;  // logit u is in the row if u * nt < left
      float xs[kRound];
#pragma unroll
      for (int u = 0; u < kRound; ++u) xs[u] = u * nt < left ? p[u * nt] : 0.f;
      uint32_t bits[kRound];
#pragma unroll
      for (int u = 0; u < kRound; ++u) bits[u] = u * nt < left ? order_bits(clean_logit(xs[u])) : 0;
      round(i0, bits);
    }
  };
  // Step 1: the argmax, lowest id among equal logits (also the fallback of step 4): the best rank
  // key. Each thread keeps its own three best tokens (for the short road): order bits and ids, 0
  // bits for none. A thread visits its ids in ascending order, so strict comparisons keep the
  // lower id among equal logits, as the rank keys do. Most rounds hold nothing better than the
  // thread's third best: one comparison of the round's best settles them.
  uint32_t bits0 = 0, bits1 = 0, bits2 = 0;
  int id0 = 0, id1 = 0, id2 = 0;
  each_round([&](int i0, const uint32_t (&bits)[kRound]) {
    uint32_t most = bits[0];
#pragma unroll
    for (int u = 1; u < kRound; ++u) most = max(most, bits[u]);
    if (most <= bits2) return;
#pragma unroll
    for (int u = 0; u < kRound; ++u) {
      const uint32_t o = bits[u];
      const int i = i0 + u * nt + tid;
      if (o > bits0) {
        bits2 = bits1, id2 = id1, bits1 = bits0, id1 = id0, bits0 = o, id0 = i;
      } else if (o > bits1) {
        bits2 = bits1, id2 = id1, bits1 = o, id1 = i;
      } else if (o > bits2) {
        bits2 = o, id2 = i;
      }
    }
  });
  auto key_or_zero = [](uint32_t bits, int id) -> unsigned long long { return bits ? rank_key_of_bits(bits, id) : 0; };
  auto better = [](unsigned long long a, unsigned long long c) { return a > c ? a : c; };
  unsigned long long top = key_or_zero(bits0, id0);  // 0: below every token's key
  if (short_road) sh.thread_best[tid] = top;  // read after block_reduce's barriers
  top = block_reduce(top, sh.warp_total, better);
  sampler_mark(1);
  const int best_id = key_id(top);
  const float best_x = clean_logit(row[best_id]);

  const float m = T > 0.f ? __fdiv_rn(best_x, T) : 0.f;  // max of x / T over any kept set
  if (T == 0.f || !isfinite(m)) {
    if (tid == 0) out[b] = best_id;
    if (support) {
      for (int i = tid; i < V; i += nt) support[b * V + i] = i == best_id;
    }
    return;
  }

  // Step 4's weights exp(x / T - m) in float32, as fixed point (2^frac_bits = weight 1). Scaling
  // by a power of two is exact in float32, so one conversion rounds the exact product (three
  // through double did the same, at a quarter of the rate).
  const float one = ldexpf(1.f, frac_bits);
  auto weight_of = [&](float x) -> uint64_t { return __float2ull_rn(expf(__fdiv_rn(x, T) - m) * one); };
  // Step 6's target floor(u * S) for the kept total S, with u = U / 2^53 exactly: the first token
  // (ascending ids) whose running sum exceeds u * S is the first whose integer running sum exceeds it.
  auto draw_target = [&](unsigned long long S) -> unsigned long long {
    const double u = draw_uniform(P.seed, P.sample_index, P.position);
    const unsigned long long U = (unsigned long long)(u * 9007199254740992.0);  // exact: u has 53 bits
    const unsigned long long lo = U * S, hi = __umul64hi(U, S);
    return (hi << 11) | (lo >> 53);
  };

  // Step 3 on the short road: leaves exactly the k best tokens in kept_key / kept_weight (any
  // order), or no list when the bound gathers more than kCandidates tokens.
  bool listed = false;
  if (short_road) {
    // The bound: the k-th best of the threads' own bests (threads past V hold none). block_select
    // may leave its low bytes zero, which only lowers it.
    const uint64_t bound = block_select<true>(
        nt, uint64_t(P.top_k),
        [&](int t, uint64_t& key) {
          key = sh.thread_best[t];
          return key != 0;
        },
        UnitWeight{}, sh.select, error_flag);
    sampler_mark(2);
    // Gather every token at or above it; only the count goes on past kCandidates. A thread's
    // tokens at or above it are its best two or fewer unless its third best is too: then (rarely,
    // with the best tokens crowded into a few threads) the block reads the row again.
    auto gather = [&](uint64_t key) {
      if (key == 0 || key < bound) return;
      const unsigned slot = atomicAdd(&sh.n_cand, 1u);
      if (slot < unsigned(kCandidates)) sh.cand_key[slot] = key;
    };
    const uint64_t third = key_or_zero(bits2, id2);
    if (third != 0 && third >= bound) sh.rescan = 1;
    __syncthreads();
    if (sh.rescan) {
      each_round([&](int i0, const uint32_t (&bits)[kRound]) {
#pragma unroll
        for (int u = 0; u < kRound; ++u) {
          if (bits[u]) gather(rank_key_of_bits(bits[u], i0 + u * nt + tid));
        }
      });
    } else {
      gather(key_or_zero(bits0, id0));
      gather(key_or_zero(bits1, id1));
    }
    __syncthreads();
    sampler_mark(3);
    const int n = int(sh.n_cand);
    if (n <= kCandidates) {
      // Candidate t (thread t) is kept if fewer than k candidates rank above it (every token not
      // gathered ranks below them all); the k kept move to a list of their own, so the later
      // steps loop over k tokens, not over every candidate.
      if (tid < n) {
        const uint64_t key = sh.cand_key[tid];
        int above = 0;
#pragma unroll 4  // loads in flight together: this loop is the latency of a step
        for (int j = 0; j < n; ++j) above += sh.cand_key[j] > key;
        if (above < P.top_k) {
          const unsigned slot = atomicAdd(&sh.n_kept, 1u);
          if (slot < unsigned(kCandidates)) {
            sh.kept_key[slot] = key;
            sh.kept_weight[slot] = weight_of(clean_logit(row[key_id(key)]));
          } else {
            atomicExch(error_flag, 1);  // more than k kept: a broken invariant (keys are distinct)
          }
        }
      }
      __syncthreads();
      sampler_mark(4);
      listed = true;
    }
  }

  if (listed) {
    const int k = min(int(sh.n_kept), kCandidates);  // = top_k: keys are distinct
    bool kept = tid < k;           // thread t owns kept token t
    const uint64_t key = kept ? sh.kept_key[tid] : 0;
    const int id = key_id(key);
    uint64_t weight = kept ? sh.kept_weight[tid] : 0;
    // Step 5: kept if the kept mass ranked above it is still short of p * W (the shortest
    // best-first prefix reaching it).
    if (P.top_p > 0.0 && P.top_p < 1.0) {
      const unsigned long long total = block_sum((unsigned long long)weight, sh.warp_total);
      unsigned long long need = (unsigned long long)ceil(P.top_p * double(total));
      need = need < 1 ? 1 : (need > total ? total : need);
      unsigned long long mass_above = 0;
#pragma unroll 4
      for (int j = 0; j < k; ++j) mass_above += sh.kept_key[j] > key ? sh.kept_weight[j] : 0;
      kept = kept && mass_above < need;
      weight = kept ? weight : 0;
      __syncthreads();  // every thread has read the top-k weights
      if (tid < k) sh.kept_weight[tid] = weight;
    }
    if (support) {
      for (int i = tid; i < V; i += nt) support[b * V + i] = 0;
      __syncthreads();  // the zeros land before the kept ones
      if (kept) support[b * V + id] = 1;
    }
    // Step 6 on the list: the running sum of the kept weights in ascending id order, and the
    // one token where it first exceeds the target (weight > 0, running sum before it <= target).
    if (tid == 0) sh.result = -1;
    sampler_mark(5);
    const unsigned long long target = draw_target(block_sum((unsigned long long)weight, sh.warp_total));
    unsigned long long running = 0;
#pragma unroll 4
    for (int j = 0; j < k; ++j) running += key_id(sh.kept_key[j]) <= id ? sh.kept_weight[j] : 0;
    if (weight > 0 && running > target && running - weight <= target) sh.result = id;
    __syncthreads();
    sampler_mark(6);
    if (tid == 0) {
      if (sh.result < 0) atomicExch(error_flag, 1);  // a broken invariant: S > target always crosses
      out[b] = sh.result < 0 ? best_id : sh.result;
    }
    return;
  }

  // Step 3, top-k: the k best keys.
  uint64_t tau = 0;  // kept: key >= tau (every key is >= 0)
  if (P.top_k > 0 && P.top_k < V) {
    tau = block_select<true>(
        V, uint64_t(P.top_k),
        [&](int i, uint64_t& key) {
          key = rank_key(clean_logit(row[i]), i);
          return true;
        },
        UnitWeight{}, sh.select, error_flag);
  }

  sampler_mark(7);
  // Step 5, top-p: the shortest best-first prefix of the kept tokens whose mass reaches p * W.
  if (P.top_p > 0.0 && P.top_p < 1.0) {
    const uint64_t tau_k = tau;
    unsigned long long local = 0;
#pragma unroll 8  // the loads of 8 iterations in flight together
    for (int i = tid; i < V; i += nt) {
      const float x = clean_logit(row[i]);
      if (rank_key(x, i) >= tau_k) local += weight_of(x);
    }
    const unsigned long long total = block_sum(local, sh.warp_total);
    unsigned long long need = (unsigned long long)ceil(P.top_p * double(total));
    need = need < 1 ? 1 : (need > total ? total : need);
    const uint64_t tau_p = block_select<false>(
        V, need,
        [&](int i, uint64_t& key) {
          key = rank_key(clean_logit(row[i]), i);
          return key >= tau_k;
        },
        [&](int i) { return weight_of(clean_logit(row[i])); }, sh.select, error_flag);
    // tau_p is exact only among the top-k survivors (block_select's early stop may leave lower
    // bytes zero, and a token top-k dropped can share the fixed bytes): keep both bounds.
    tau = tau_p > tau_k ? tau_p : tau_k;
  }

  if (support) {
    for (int i = tid; i < V; i += nt) support[b * V + i] = rank_key(clean_logit(row[i]), i) >= tau;
  }

  sampler_mark(8);
  // Step 6: inverse CDF in ascending id order. Warp w sums the weights of its tile of ids; the
  // tile holding the crossing is then walked 32 ids at a time with a warp scan.
  auto kept_weight = [&](float x, int i) -> uint64_t {
    x = clean_logit(x);
    return rank_key(x, i) >= tau ? weight_of(x) : 0;
  };
  const int tile = ((V + n_warps - 1) / n_warps + 31) / 32 * 32;
  const int begin = min(warp * tile, V), end = min(begin + tile, V);
  unsigned long long local = 0;
  for (int i0 = begin + lane; i0 < end; i0 += 32 * kRound) {  // a round's loads issued together
    const float* p = row + i0;
    const int left = end - i0;
    float xs[kRound];
#pragma unroll
    for (int u = 0; u < kRound; ++u) xs[u] = 32 * u < left ? p[32 * u] : 0.f;
#pragma unroll
    for (int u = 0; u < kRound; ++u) local += 32 * u < left ? kept_weight(xs[u], i0 + 32 * u) : 0;
  }
  local = warp_sum(local);
  __syncthreads();  // warp_total may still be read by the top-p block_sum
  if (lane == 0) sh.warp_total[warp] = local;
  if (tid == 0) sh.result = -1;
  __syncthreads();
  sampler_mark(9);
  unsigned long long S = 0;
#pragma unroll 1  // rolled: 32 register pairs live at once would spill
  for (int w = 0; w < n_warps; ++w) S += sh.warp_total[w];
  const unsigned long long target = draw_target(S);
  int crossing = 0;
  unsigned long long base = 0;
  while (crossing < n_warps - 1 && base + sh.warp_total[crossing] <= target) base += sh.warp_total[crossing++];
  if (warp == crossing) {
    for (int c0 = begin; c0 < end; c0 += 32) {
      const int i = c0 + lane;
      unsigned long long incl = i < end ? kept_weight(row[i], i) : 0;
      for (int offset = 1; offset < 32; offset <<= 1) {
        const unsigned long long t = __shfl_up_sync(kFullWarp, incl, offset);
        if (lane >= offset) incl += t;
      }
      const unsigned hit = __ballot_sync(kFullWarp, base + incl > target);
      if (hit) {
        if (lane == __ffs(hit) - 1) sh.result = i;
        break;
      }
      base += __shfl_sync(kFullWarp, incl, 31);
    }
  }
  __syncthreads();
  sampler_mark(10);
  if (tid == 0) {
    int id = sh.result;
    if (id < 0) {  // the running sums never passed target < S: a broken invariant
      atomicExch(error_flag, 1);
      id = best_id;
    }
    out[b] = id;
  }
}

// Draws one token for each of the B rows. error_flag: one device int, set to 1 on an internal error.
inline void sample(int32_t* out, uint8_t* support, int* error_flag, const float* logits, const RowSampling* params,
                   int B, int V, cudaStream_t stream) {
  if (B == 0) return;
  launch("sample", sample_kernel, B, kSampleThreads, stream, out, support, error_flag, logits, params, V,
         sampler_frac_bits(V));
}

}  // namespace gpt2s::cuda
