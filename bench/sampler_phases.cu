// Where the CUDA sampler's time goes, phase by phase (a development tool; needs a GPU). Built by
// bench/gpu_check.sh's `sampler` step, or by hand:
//
//   nvcc -std=c++17 -O3 -arch=sm_90 -DGPT2S_SAMPLER_TRACE -Icsrc/cuda -I<folder of cublas_v2.h> \
//        bench/sampler_phases.cu -o /tmp/sampler_phases && /tmp/sampler_phases
//
// For each sampling setting, batch size and logit spread (random normal logits, GPT-2's
// vocabulary): the GPU time of one sampler call when calls queue back to back, as in a decode
// step (the engine launches the sampler behind the forward pass), and of one call alone (event,
// launch, event: the launch's own latency included, as bench/generate_cuda.py's figure). Then the
// microseconds from the kernel's start to each mark that block 0 passed (sampler.cuh's
// sampler_mark), and the SM clock over them.
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "sampler.cuh"

using namespace gpt2s::cuda;

namespace {

struct Setting {
  const char* name;
  float temperature;
  int top_k;
  double top_p;
};

const char* const kMarks[] = {"start",   "argmax",    "bound",   "gather", "rank",    "list top-p",
                              "list draw", "top-k cut", "top-p", "sum",    "cdf walk"};

float elapsed_us(cudaEvent_t a, cudaEvent_t b) {
  float ms = 0.f;
  CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
  return ms * 1000.f;
}

}  // namespace

int main() {
  const int V = 50257;
  const Setting settings[] = {{"greedy", 0.f, 0, 0.0},
                              {"top_k_40", 1.f, 40, 0.0},
                              {"top_k_40_top_p_0.9", 1.f, 40, 0.9},
                              {"temperature_only", 1.f, 0, 0.0},
                              {"top_p_0.9", 1.f, 0, 0.9}};
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreate(&stream));
  cudaEvent_t e0, e1;
  CUDA_CHECK(cudaEventCreate(&e0));
  CUDA_CHECK(cudaEventCreate(&e1));
  std::mt19937 gen(1);
  for (const float sigma : {1.f, 3.f}) {
    for (const int B : {1, 256}) {
      std::normal_distribution<float> normal(0.f, sigma);
      std::vector<float> host(size_t(B) * V);
      for (float& x : host) x = normal(gen);
      float* logits;
      int32_t* out;
      int* error;
      RowSampling* params;
      CUDA_CHECK(cudaMalloc(&logits, host.size() * sizeof(float)));
      CUDA_CHECK(cudaMalloc(&out, B * sizeof(int32_t)));
      CUDA_CHECK(cudaMalloc(&error, sizeof(int)));
      CUDA_CHECK(cudaMalloc(&params, B * sizeof(RowSampling)));
      CUDA_CHECK(cudaMemcpy(logits, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
      CUDA_CHECK(cudaMemset(error, 0, sizeof(int)));
      for (const Setting& s : settings) {
        std::vector<RowSampling> rows(B);
        for (int b = 0; b < B; ++b) rows[b] = {s.top_p, 1234, uint64_t(b), 0, s.temperature, s.top_k};
        CUDA_CHECK(cudaMemcpy(params, rows.data(), B * sizeof(RowSampling), cudaMemcpyHostToDevice));
        auto call = [&] { sample(out, nullptr, error, logits, params, B, V, stream); };
        for (int i = 0; i < 5; ++i) call();
        constexpr int kQueued = 100;
        CUDA_CHECK(cudaEventRecord(e0, stream));
        for (int i = 0; i < kQueued; ++i) call();
        CUDA_CHECK(cudaEventRecord(e1, stream));
        CUDA_CHECK(cudaEventSynchronize(e1));
        const float queued = elapsed_us(e0, e1) / kQueued;
        std::vector<float> alone;
        for (int i = 0; i < 21; ++i) {
          CUDA_CHECK(cudaEventRecord(e0, stream));
          call();
          CUDA_CHECK(cudaEventRecord(e1, stream));
          CUDA_CHECK(cudaEventSynchronize(e1));
          alone.push_back(elapsed_us(e0, e1));
        }
        std::sort(alone.begin(), alone.end());
        unsigned long long zero[2][16] = {};
        CUDA_CHECK(cudaMemcpyToSymbol(sampler_trace, zero, sizeof(zero)));
        call();
        unsigned long long trace[2][16];
        CUDA_CHECK(cudaMemcpyFromSymbol(trace, sampler_trace, sizeof(trace)));
        int flag = 0;
        CUDA_CHECK(cudaMemcpy(&flag, error, sizeof(int), cudaMemcpyDeviceToHost));
        std::printf("sigma %.0f batch %3d %-19s queued %7.1f us, alone %7.1f us%s |", sigma, B, s.name, queued,
                    alone[alone.size() / 2], flag ? " ERROR FLAG" : "");
        int last = 0;
        for (int n = 1; n < 16; ++n) {
          if (trace[1][n] == 0) continue;
          std::printf(" %s %.1f", kMarks[n], (trace[1][n] - trace[1][0]) * 1e-3);
          last = n;
        }
        if (last > 0 && trace[1][last] > trace[1][0]) {
          std::printf(" (SM clock %.0f MHz)", double(trace[0][last] - trace[0][0]) * 1e3 / double(trace[1][last] - trace[1][0]));
        }
        std::printf("\n");
      }
      CUDA_CHECK(cudaFree(logits));
      CUDA_CHECK(cudaFree(out));
      CUDA_CHECK(cudaFree(error));
      CUDA_CHECK(cudaFree(params));
    }
  }
  return 0;
}
