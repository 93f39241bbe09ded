// The only pybind11 file: it checks inputs coming from Python, releases the GIL around long
// calls and forwards to the C++ core in csrc/engine, which knows nothing of Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine/cpu_features.h"

namespace py = pybind11;

PYBIND11_MODULE(_engine, m) {
  m.doc() = "gpt_2_simple C++ generation engine (CPU)";
  m.attr("__version__") = GPT2S_VERSION;

  m.def(
      "cpu_features",
      []() {
        const gpt2s::CpuFeatures& f = gpt2s::cpu_features();
        py::dict d;
        d["avx2"] = f.avx2;
        d["fma"] = f.fma;
        d["f16c"] = f.f16c;
        d["avx512f"] = f.avx512f;
        d["avx512bw"] = f.avx512bw;
        d["avx512vl"] = f.avx512vl;
        d["avx512bf16"] = f.avx512bf16;
        d["isa"] = gpt2s::best_isa();
        return d;
      },
      "SIMD features of this CPU as the engine sees them (after the GPT2S_ISA cap), and the kernel family it uses.");

  m.def(
      "max_threads",
      []() {
#ifdef _OPENMP
        return omp_get_max_threads();
#else
        return 1;
#endif
      },
      "Threads the engine uses by default (OpenMP; 1 when built without it).");
}
