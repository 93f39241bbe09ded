#include "engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace gpt2s {

namespace {

// NaN logits rank (and weigh) as -inf.
inline float clean(float x) { return std::isnan(x) ? -INFINITY : x; }

// The first largest logit (lowest id among equals).
int32_t argmax(const float* x, int64_t n) {
  int32_t best = 0;
  float best_x = -INFINITY;
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] > best_x) {
      best_x = x[i];
      best = int32_t(i);
    }
  }
  return best;
}

// Token a ranks below token b: smaller logit, or equal logit and larger id.
inline bool ranks_below(float xa, int32_t a, float xb, int32_t b) { return xa < xb || (xa == xb && a > b); }

// The k best-ranked ids of x (V), ascending, by one pass with a k-entry heap whose root is the
// worst kept token (ids arrive in increasing order, so a newcomer enters only with a larger logit).
// The pass skips with vector compares to the next logit above the root: few enter the heap.
void top_k_ids(const float* x, int64_t V, int32_t k, const Kernels& kernels, SamplerScratch& s) {
  float* hx = s.x.data();
  int32_t* hid = s.ids.data();
  auto sift_down = [&](int32_t i) {
    for (;;) {
      int32_t worst = i;
      const int32_t l = 2 * i + 1, r = l + 1;
      if (l < k && ranks_below(hx[l], hid[l], hx[worst], hid[worst])) worst = l;
      if (r < k && ranks_below(hx[r], hid[r], hx[worst], hid[worst])) worst = r;
      if (worst == i) return;
      std::swap(hx[i], hx[worst]);
      std::swap(hid[i], hid[worst]);
      i = worst;
    }
  };
  for (int32_t i = 0; i < k; ++i) {
    hx[i] = clean(x[i]);
    hid[i] = i;
  }
  for (int32_t i = k / 2 - 1; i >= 0; --i) sift_down(i);
  for (int64_t i = k; (i += kernels.first_above(x + i, V - i, hx[0])) < V; ++i) {  // x[i] > root (NaN never is)
    hx[0] = x[i];
    hid[0] = int32_t(i);
    sift_down(0);
  }
  std::sort(hid, hid + k);
  for (int32_t i = 0; i < k; ++i) hx[i] = clean(x[hid[i]]);
}

// Top-p over n kept tokens (logits x, weights w summing to total): zero the weights of the tokens
// outside the shortest best-ranked prefix whose weight reaches top_p * total. Selection, not a
// sort: tokens are bucketed by their weight's float bits (monotone in the weight, hence in the
// rank), the bucket where the mass is reached is found from per-bucket sums, and only that
// bucket's tokens are sorted by rank.
void apply_top_p(const float* x, const int32_t* ids, float* w, int64_t n, double total, float top_p, SamplerScratch& s) {
  constexpr int kShift = 17;               // 64 buckets per power of two (~1.1% wide)
  constexpr uint32_t kBuckets = 32 * 64;   // down to 2^-32 of the largest weight; the rest share the last
  constexpr uint32_t kOne = 0x3F800000u;   // bits of 1.0f, the largest weight
  s.mass.assign(kBuckets, 0.0);
  uint16_t* bucket = s.bucket.data();
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &w[i], 4);
    const uint32_t b = bits >= kOne ? 0u : (kOne - bits) >> kShift;
    bucket[i] = uint16_t(b < kBuckets ? b : kBuckets - 1);
    s.mass[bucket[i]] += w[i];
  }
  const double need = double(top_p) * total;
  double before = 0.0;  // weight of the buckets ranked above the crossing one
  uint32_t cross = kBuckets - 1;
  for (uint32_t b = 0; b < kBuckets; ++b) {
    if (before + s.mass[b] >= need) {
      cross = b;
      break;
    }
    before += s.mass[b];
  }
  s.members.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (bucket[i] == cross) s.members.push_back(int32_t(i));
  }
  std::sort(s.members.begin(), s.members.end(),
            [&](int32_t a, int32_t b) {  // best first
              return ranks_below(clean(x[b]), ids ? ids[b] : b, clean(x[a]), ids ? ids[a] : a);
            });
  size_t keep = 0;
  while (keep < s.members.size() && before < need) before += w[s.members[keep++]];
  for (size_t j = keep; j < s.members.size(); ++j) w[s.members[j]] = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    if (bucket[i] > cross) w[i] = 0.0f;
  }
}

// Inverse CDF in id order: the first token whose running weight exceeds u * total. Blocks of 256
// are summed first so the running sum is only walked inside one block.
int64_t draw_index(const float* w, int64_t n, double u) {
  constexpr int64_t kBlock = 256;
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    double part[4] = {0, 0, 0, 0};
    int64_t i = b;
    for (; i + 4 <= e; i += 4) {
      for (int j = 0; j < 4; ++j) part[j] += w[i + j];
    }
    for (; i < e; ++i) part[0] += w[i];
    total += (part[0] + part[1]) + (part[2] + part[3]);
  }
  const double target = u * total;
  double running = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    double block = 0.0;
    for (int64_t i = b; i < e; ++i) block += w[i];
    if (running + block > target) {
      for (int64_t i = b; i < e; ++i) {
        running += w[i];
        if (running > target) return i;
      }
    }
    running += block;
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // rounding left no token past the target
    if (w[i] > 0.0f) return i;
  }
  return n - 1;
}

}  // namespace

int32_t sample_token(const float* logits, int64_t V, const SamplingParams& p, double u, const Kernels& kernels,
                     SamplerScratch& s) {
  if (p.temperature == 0.0f) return argmax(logits, V);
  if (int64_t(s.w.size()) < V) {
    s.x.resize(V);
    s.w.resize(V);
    s.ids.resize(V);
    s.bucket.resize(V);
  }
  // The kept set: all V tokens (ids implicit), or the top-k gathered with ascending ids.
  const bool all = p.top_k <= 0 || p.top_k >= V;
  const int64_t n = all ? V : p.top_k;
  if (!all) top_k_ids(logits, V, p.top_k, kernels, s);
  const float* x = all ? logits : s.x.data();
  const int32_t* ids = all ? nullptr : s.ids.data();

  const float m = kernels.max_value(x, n) / p.temperature;
  if (!std::isfinite(m)) return argmax(logits, V);
  float* w = s.w.data();
  const double total = kernels.exp_weights(x, n, p.temperature, m, w);
  if (p.top_p > 0.0f && p.top_p < 1.0f) apply_top_p(x, ids, w, n, total, p.top_p, s);
  const int64_t i = draw_index(w, n, u);
  return ids ? ids[i] : int32_t(i);
}

}  // namespace gpt2s
