// The CPU's fp32 fused multiply-add peak: what no matmul on it can exceed (docs/bench.md, "What
// the machine allows"). Each thread runs 12 independent chains of 8-lane FMAs held in registers:
// no memory traffic, enough chains to cover the FMA latency on the CPUs we run on (4-5 cycles,
// 2 pipes). x86-64 with AVX2 + FMA (an AVX-512 CPU runs it too: the 8-lane figure is then half
// of what 16-lane FMAs reach, and the JSON says which). Build and run:
//
//   g++ -O2 -mavx2 -mfma -pthread bench/fma_peak.cpp -o /tmp/fma_peak && /tmp/fma_peak
//
// Prints one JSON object: GFLOP/s (2 per lane per FMA) for 1 thread and for every core.
#include <immintrin.h>

#include <chrono>
#include <cstdio>
#include <thread>
#include <vector>

namespace {

constexpr int kChains = 12;
constexpr long kIterations = 100'000'000;

// kIterations rounds of kChains FMAs; returns a value that depends on every chain, so that the
// compiler keeps them.
float chains() {
  __m256 a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(1.0f + float(i) * 1e-7f);
  const __m256 b = _mm256_set1_ps(0.9999999f), c = _mm256_set1_ps(1e-7f);
  for (long n = 0; n < kIterations; ++n) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], b, c);
  }
  float sum = 0.0f;
  for (int i = 0; i < kChains; ++i) sum += _mm256_cvtss_f32(a[i]);
  return sum;
}

double gflops(int threads) {
  std::vector<float> sink(threads);
  const auto t0 = std::chrono::steady_clock::now();
  std::vector<std::thread> pool;
  for (int t = 0; t < threads; ++t) pool.emplace_back([&sink, t] { sink[t] = chains(); });
  for (auto& t : pool) t.join();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  float keep = 0.0f;
  for (float s : sink) keep += s;
  if (keep == 0.0f) std::fprintf(stderr, "(unexpected zero)\n");
  return double(threads) * kIterations * kChains * 8 * 2 / seconds / 1e9;
}

}  // namespace

int main() {
  const int cores = int(std::thread::hardware_concurrency());
  const double one = gflops(1), all = gflops(cores);
  std::printf("{\"benchmark\": \"fma_peak\", \"lanes\": 8, \"threads\": [1, %d], \"gflops\": [%.1f, %.1f]}\n", cores, one,
              all);
}
