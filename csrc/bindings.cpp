// The only pybind11 file: it checks inputs coming from Python, releases the GIL around long
// calls and forwards to the C++ core in csrc/engine, which knows nothing of Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <pybind11/numpy.h>

#include <algorithm>
#include <climits>

#include "engine/cpu_backend.h"
#include "engine/cpu_features.h"
#include "engine/core.h"
#include "engine/engine.h"
#include "engine/format.h"
#include "engine/philox.h"
#include "engine/sampler.h"

// The same file builds both modules: _engine (CPU) and, with GPT2S_CUDA_MODULE, _engine_cuda,
// whose Engine runs the CUDA backend (csrc/cuda) and which adds the device queries and sampler hooks.
// A process may load both, so every class and exception here is registered py::module_local.
#ifdef GPT2S_CUDA_MODULE
#include "cuda/cuda_backend.h"
#define GPT2S_MODULE_NAME _engine_cuda
#else
#define GPT2S_MODULE_NAME _engine
#endif

namespace py = pybind11;

namespace {

// Model files (csrc/engine/format.h) as Python sees them: a ModelFile keeps the validated mapping
// alive (what an engine built on it shares); describe() turns it into plain Python objects. With
// data=True each tensor's bytes are copied out of the weight views the engine would use, so a test
// sees exactly what the engine sees.
using ModelFile = gpt2s::LoadedModel;

std::shared_ptr<ModelFile> open_model(const std::string& path, bool verify, bool mmap) {
  py::gil_scoped_release release;
  gpt2s::LoadOptions options;
  options.verify_data = verify;
  options.mmap = mmap;
  return std::const_pointer_cast<ModelFile>(gpt2s::LoadedModel::open(path, options));
}

py::dict describe_model(const ModelFile& file, bool data) {
  const gpt2s::ModelWeights& w = file.weights();
  py::dict d;
  d["path"] = file.path();
  d["version"] = file.version();
  d["file_size"] = file.file_size();
  d["flags"] = file.flags();
  py::dict config;
  config["n_vocab"] = w.config.n_vocab;
  config["n_ctx"] = w.config.n_ctx;
  config["n_embd"] = w.config.n_embd;
  config["n_head"] = w.config.n_head;
  config["n_layer"] = w.config.n_layer;
  d["config"] = config;
  d["dtype"] = gpt2s::dtype_name(w.dtype);
  d["eot_token"] = w.eot_token;
  py::list tensors;
  for (const gpt2s::TensorInfo& t : file.tensors()) {
    py::dict e;
    e["name"] = t.name;
    e["dtype"] = gpt2s::dtype_name(t.dtype);
    e["shape"] = t.ndim == 1 ? py::tuple(py::make_tuple(t.shape[0])) : py::tuple(py::make_tuple(t.shape[0], t.shape[1]));
    e["offset"] = t.offset;
    e["nbytes"] = t.nbytes;
    e["crc32"] = t.crc32;
    if (t.dtype == gpt2s::DType::I8) {
      e["scales_offset"] = t.scales_offset;
      e["scales_crc32"] = t.scales_crc32;
    }
    tensors.append(e);
  }
  d["tensors"] = tensors;
  py::list token_bytes;
  for (std::string_view t : w.token_bytes) token_bytes.append(py::bytes(t.data(), t.size()));
  d["token_bytes"] = token_bytes;
  d["token_kinds"] = py::bytes(file.token_kinds().data(), file.token_kinds().size());
  d["merges"] = py::bytes(file.merges().data(), file.merges().size());
  d["metadata"] = py::bytes(file.metadata().data(), file.metadata().size());
  if (data) {
    py::dict views;
    auto add = [&](const std::string& name, const gpt2s::TensorView& v) {
      views[py::str(name)] = py::bytes(static_cast<const char*>(v.data), v.rows * v.cols * gpt2s::dtype_size(v.dtype));
      if (v.scales != nullptr) views[py::str(name + ".scales")] = py::bytes(reinterpret_cast<const char*>(v.scales), v.rows * 4);
    };
    add("wte.weight", w.wte);
    add("wpe.weight", w.wpe);
    for (size_t i = 0; i < w.h.size(); ++i)
      for (const gpt2s::LayerTensor& t : gpt2s::kLayerTensors) add("h." + std::to_string(i) + "." + t.suffix, w.h[i].*t.field);
    add("ln_f.weight", w.ln_f_w);
    add("ln_f.bias", w.ln_f_b);
    d["data"] = views;
  }
  return d;
}

// ---------------------------------------------------------------------------------------------
// Engine (csrc/engine/engine.h). Requests arrive as any objects with Request's attributes
// (python/gpt_2_simple/engine.py); every field is converted and checked here, with a ValueError
// naming requests[i].<field>, before the C++ core sees it.

[[noreturn]] void bad_field(size_t i, const char* field, const std::string& problem) {
  throw py::value_error("requests[" + std::to_string(i) + "]." + field + " " + problem);
}

// A Python int in [lo, hi], else a ValueError naming the field.
long long int_in(py::handle value, size_t i, const char* field, long long lo, long long hi) {
  if (PyBool_Check(value.ptr()) || !PyIndex_Check(value.ptr())) {
    bad_field(i, field, "must be an integer, got " + std::string(py::repr(value)));
  }
  int overflow = 0;
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (overflow != 0 || v < lo || v > hi) {
    bad_field(i, field, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " + std::string(py::repr(value)));
  }
  return v;
}

uint64_t uint64_field(py::handle value, size_t i, const char* field) {
  if (!PyIndex_Check(value.ptr()) || PyBool_Check(value.ptr())) bad_field(i, field, "must be an integer in [0, 2**64)");
  const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    bad_field(i, field, "must be an integer in [0, 2**64), got " + std::string(py::repr(value)));
  }
  return v;
}

float float_field(py::handle value, size_t i, const char* field) {
  const double v = PyFloat_AsDouble(value.ptr());
  if (PyErr_Occurred()) {
    PyErr_Clear();
    bad_field(i, field, "must be a number, got " + std::string(py::repr(value)));
  }
  return float(v);
}

std::vector<int32_t> token_list(py::handle value, size_t i, const char* field, int32_t n_vocab) {
  std::vector<int32_t> ids;
  for (py::handle t : py::iter(value)) ids.push_back(int32_t(int_in(t, i, field, 0, n_vocab - 1)));
  return ids;
}

gpt2s::GenRequest to_request(py::handle r, size_t i, const gpt2s::Config& config) {
  gpt2s::GenRequest g;
  auto attr = [&](const char* name) {
    if (!py::hasattr(r, name)) bad_field(i, name, "is missing: pass gpt_2_simple.engine.Request objects");
    return r.attr(name);
  };
  g.prompt = token_list(attr("prompt"), i, "prompt", config.n_vocab);
  g.max_new_tokens = int_in(attr("max_new_tokens"), i, "max_new_tokens", 0, LLONG_MAX / 2);
  g.sampling.temperature = float_field(attr("temperature"), i, "temperature");
  // top_k beyond the vocabulary keeps everything, like 0.
  g.sampling.top_k = int32_t(std::min<long long>(int_in(attr("top_k"), i, "top_k", 0, LLONG_MAX), config.n_vocab));
  g.sampling.top_p = float_field(attr("top_p"), i, "top_p");
  g.sampling.seed = uint64_field(attr("seed"), i, "seed");
  g.sampling.sample_index = uint64_field(attr("sample_index"), i, "sample_index");
  g.stop_ids = token_list(attr("stop_ids"), i, "stop_ids", config.n_vocab);
  for (py::handle s : py::iter(attr("stop_sequences"))) {
    if (PyUnicode_Check(s.ptr())) {
      g.stop_sequences.push_back(s.cast<std::string>());  // UTF-8
    } else if (PyBytes_Check(s.ptr()) || PyByteArray_Check(s.ptr())) {
      g.stop_sequences.push_back(std::string(py::bytes(py::reinterpret_borrow<py::object>(s))));
    } else {
      bad_field(i, "stop_sequences", "must hold bytes or str values, got " + std::string(py::repr(s)));
    }
  }
  return g;
}

py::dict timings_dict(const gpt2s::Timings& t) {
  py::dict d;
  d["prefill_tokens"] = t.prefill_tokens;
  d["prefill_steps"] = t.prefill_steps;
  d["shared_tokens"] = t.shared_tokens;
  d["prefill_seconds"] = t.prefill_seconds;
  d["decode_tokens"] = t.decode_tokens;
  d["decode_steps"] = t.decode_steps;
  d["decode_seconds"] = t.decode_seconds;
  d["decode_sample_seconds"] = t.decode_sample_seconds;
  d["screened_rows"] = t.screened_rows;
  d["total_seconds"] = t.total_seconds;
  d["slots"] = t.slots;
  d["ctx"] = t.ctx;
  d["kv_cache_bytes"] = t.kv_cache_bytes;
  return d;
}

// Runs with the GIL released; callbacks take it back for their Python call. An exception raised by
// a callback (or KeyboardInterrupt, noticed once per step) ends the call and propagates.
py::list engine_generate(gpt2s::Engine& engine, py::iterable requests, int64_t batch_size, py::object on_token,
                         py::object on_finish, py::object on_logits) {
  if (batch_size < 1 || batch_size > INT32_MAX) {
    throw py::value_error("batch_size must be between 1 and 2**31 - 1, got " + std::to_string(batch_size));
  }
  const gpt2s::Config& config = engine.weights().config;
  std::vector<gpt2s::GenRequest> reqs;
  for (py::handle r : requests) reqs.push_back(to_request(r, reqs.size(), config));
  gpt2s::validate_requests(reqs, config);

  gpt2s::Callbacks cb;
  if (!on_token.is_none()) {
    cb.on_token = [&](int64_t i, int32_t token) {
      py::gil_scoped_acquire gil;
      on_token(i, token);
    };
  }
  if (!on_finish.is_none()) {
    cb.on_finish = [&](int64_t i, const gpt2s::GenResult& r) {
      py::gil_scoped_acquire gil;
      on_finish(i, py::cast(r.tokens), gpt2s::finish_reason_name(r.finish_reason));
    };
  }
  if (!on_logits.is_none()) {
    cb.on_logits = [&](int64_t i, int64_t step, const float* logits) {
      py::gil_scoped_acquire gil;
      on_logits(i, step, py::array_t<float>(config.n_vocab, logits));  // a copy the callback may keep
    };
  }
  cb.poll = []() {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw py::error_already_set();
  };
  std::vector<gpt2s::GenResult> results;
  {
    py::gil_scoped_release release;
    results = engine.generate(reqs, int32_t(batch_size), cb);
  }
  py::list out;
  for (const gpt2s::GenResult& r : results) out.append(py::make_tuple(py::cast(r.tokens), gpt2s::finish_reason_name(r.finish_reason)));
  return out;
}

void bind_engine(py::module_& m) {
  // module_local: _engine and _engine_cuda each bind this class, and a process may load both.
  py::class_<gpt2s::Engine> engine(m, "Engine", py::module_local(),
                                   "A model file loaded for generation (see gpt_2_simple.engine.Engine).");
#ifdef GPT2S_CUDA_MODULE
  engine.def(py::init([](const std::string& path, int /*threads*/, int device, const std::string& dtype, bool graphs, bool verify,
                          bool mmap) {
               std::shared_ptr<const gpt2s::LoadedModel> model = open_model(path, verify, mmap);
               py::gil_scoped_release release;
               gpt2s::cuda::CudaOptions options;
               options.device = device;
               options.dtype = dtype;
               options.graphs = graphs;
               auto backend = gpt2s::cuda::make_cuda_backend(model->weights(), options);
               return std::make_unique<gpt2s::Engine>(model, std::move(backend));
             }),
             py::arg("path"), py::arg("threads") = 0, py::kw_only(), py::arg("device") = 0, py::arg("dtype") = "",
             py::arg("graphs") = true, py::arg("verify") = false, py::arg("mmap") = true,
             "Load a model file onto CUDA device `device` (threads is ignored). dtype: 'fp32', 'bf16' or 'fp16' on the "
             "device ('' = the file's); graphs: replay decode steps from CUDA graphs; verify: check the weights' CRC-32s; "
             "mmap: map the file (False: read it into memory).");
#else
  engine.def(py::init([](const std::string& path, int threads, bool verify, bool mmap) {
               if (threads < 0) throw py::value_error("threads must be >= 1, or 0 for all cores; got " + std::to_string(threads));
               std::shared_ptr<const gpt2s::LoadedModel> model = open_model(path, verify, mmap);
               py::gil_scoped_release release;
               auto backend = std::make_unique<gpt2s::CpuBackend>(model->weights(), threads);
               return std::make_unique<gpt2s::Engine>(model, std::move(backend));
             }),
             py::arg("path"), py::arg("threads") = 0, py::kw_only(), py::arg("verify") = false, py::arg("mmap") = true,
             "Load a model file for the CPU backend. verify: check the weights' CRC-32s; mmap: map the file (False: read "
             "it into memory, safe from writes to the file while loaded).");
#endif
  engine
      .def_property_readonly("config",
                             [](const gpt2s::Engine& e) {
                               const gpt2s::Config& c = e.weights().config;
                               py::dict d;
                               d["n_vocab"] = c.n_vocab;
                               d["n_ctx"] = c.n_ctx;
                               d["n_embd"] = c.n_embd;
                               d["n_head"] = c.n_head;
                               d["n_layer"] = c.n_layer;
                               return d;
                             })
      .def_property_readonly("dtype", [](const gpt2s::Engine& e) { return gpt2s::dtype_name(e.weights().dtype); })
      .def_property_readonly("eot_token", [](const gpt2s::Engine& e) { return e.weights().eot_token; })
      .def_property_readonly("path", [](const gpt2s::Engine& e) { return e.model().path(); })
      .def_property_readonly("device", [](const gpt2s::Engine& e) { return e.backend().describe(); })
      .def("generate", &engine_generate, py::arg("requests"), py::kw_only(), py::arg("batch_size"),
           py::arg("on_token") = py::none(), py::arg("on_finish") = py::none(), py::arg("on_logits") = py::none(),
           "Generate for every request; returns [(tokens, finish_reason)] in request order.")
      .def("last_timings", [](gpt2s::Engine& e) { return timings_dict(e.last_timings()); },
           "Where the time of the last completed generate call went (prefill/decode/sampling seconds and counts).");
}

// ---------------------------------------------------------------------------------------------
// Engine core (csrc/engine/core.h): requests join a running batch. python/gpt_2_simple/engine.py's
// EngineCore drives step() from one thread; add() and abort() come from any thread.

void bind_core(py::module_& m) {
  py::class_<gpt2s::EngineCore>(m, "EngineCore", py::module_local(),
                                "Requests join a running batch (see gpt_2_simple.engine.EngineCore).")
      .def(py::init([](gpt2s::Engine& engine, int64_t slots, int64_t ctx) {
             if (slots < 1 || slots > 65535) throw py::value_error("max_batch must be in [1, 65535], got " + std::to_string(slots));
             if (ctx < 1 || ctx > engine.weights().config.n_ctx) {
               throw py::value_error("context must be in [1, " + std::to_string(engine.weights().config.n_ctx) + "], got " +
                                     std::to_string(ctx));
             }
             return std::make_unique<gpt2s::EngineCore>(engine, int32_t(slots), int32_t(ctx));
           }),
           py::arg("engine"), py::arg("slots"), py::arg("ctx"), py::keep_alive<1, 2>())
      .def(
          "add",
          [](gpt2s::EngineCore& core, py::handle request) {
            gpt2s::GenRequest r = to_request(request, 0, core.config());
            try {
              return core.add(std::move(r));
            } catch (const std::invalid_argument& e) {
              throw py::value_error(e.what());
            }
          },
          py::arg("request"), "Queue a request (an engine.Request); returns its id.")
      .def("abort", &gpt2s::EngineCore::abort, py::arg("id"), py::call_guard<py::gil_scoped_release>())
      .def("wake", &gpt2s::EngineCore::wake, py::call_guard<py::gil_scoped_release>())
      .def("clear", &gpt2s::EngineCore::clear, py::call_guard<py::gil_scoped_release>())
      .def(
          "step",
          [](gpt2s::EngineCore& core, double wait_seconds) {
            std::vector<gpt2s::CoreEvent> events;
            {
              py::gil_scoped_release release;
              events = core.step(wait_seconds);
            }
            py::list out;
            for (const gpt2s::CoreEvent& e : events) {
              out.append(py::make_tuple(e.id, py::cast(e.tokens), e.finish.empty() ? py::object(py::none()) : py::str(e.finish)));
            }
            return out;
          },
          py::arg("wait_seconds"), "[(id, tokens, finish_reason or None)] for the requests this step touched.")
      .def("stats", [](gpt2s::EngineCore& core) {
        const gpt2s::CoreStats s = core.stats();
        py::dict d = timings_dict(s.timings);
        d["queued"] = s.queued;
        d["running"] = s.running;
        return d;
      });
}

// Value b of a per-row argument given as one value or one per row (B).
template <class T>
T row_value(const std::vector<T>& v, size_t B, size_t b, const char* name) {
  if (v.size() != 1 && v.size() != B) {
    throw py::value_error(std::string(name) + " must hold 1 or B = " + std::to_string(B) + " values, got " + std::to_string(v.size()));
  }
  return v[v.size() == 1 ? 0 : b];
}

// Per-row sampling parameters as the engine's SamplingParams, checked as the engine checks requests.
std::vector<gpt2s::SamplingParams> row_params(size_t B, const std::vector<float>& temperature,
                                              const std::vector<int64_t>& top_k, const std::vector<float>& top_p,
                                              const std::vector<uint64_t>& seed, const std::vector<uint64_t>& sample_index) {
  std::vector<gpt2s::SamplingParams> params(B);
  for (size_t b = 0; b < B; ++b) {
    gpt2s::SamplingParams& p = params[b];
    p.temperature = row_value(temperature, B, b, "temperature");
    p.top_k = int32_t(std::clamp<int64_t>(row_value(top_k, B, b, "top_k"), -1, INT32_MAX));
    p.top_p = row_value(top_p, B, b, "top_p");
    p.seed = row_value(seed, B, b, "seed");
    p.sample_index = row_value(sample_index, B, b, "sample_index");
    if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature) || p.top_k < 0 || !(p.top_p >= 0.0f && p.top_p <= 1.0f)) {
      throw py::value_error("row " + std::to_string(b) + ": temperature must be a finite number >= 0, top_k >= 0 and top_p in [0, 1]");
    }
  }
  return params;
}

using LogitsArray = py::array_t<float, py::array::c_style | py::array::forcecast>;

std::vector<float> logits_rows(const LogitsArray& logits) {
  if (logits.ndim() != 2 || logits.shape(0) < 1 || logits.shape(1) < 1) throw py::value_error("logits must be a non-empty (B, V) array");
  return std::vector<float>(logits.data(), logits.data() + logits.size());
}

std::vector<uint64_t> row_positions(size_t B, const std::vector<uint64_t>& position) {
  std::vector<uint64_t> positions(B);
  for (size_t b = 0; b < B; ++b) positions[b] = row_value(position, B, b, "position");
  return positions;
}

#ifndef GPT2S_CUDA_MODULE
void bind_cpu_sampler(py::module_& m) {
  m.def(
      "sample",
      [](const LogitsArray& logits, const std::vector<float>& temperature, const std::vector<int64_t>& top_k,
         const std::vector<float>& top_p, const std::vector<uint64_t>& seed, const std::vector<uint64_t>& sample_index,
         const std::vector<uint64_t>& position) {
        const std::vector<float> host = logits_rows(logits);
        const size_t B = size_t(logits.shape(0)), V = size_t(logits.shape(1));
        const auto params = row_params(B, temperature, top_k, top_p, seed, sample_index);
        const auto positions = row_positions(B, position);
        std::vector<int32_t> drawn(B);
        {
          py::gil_scoped_release release;
          gpt2s::SamplerScratch scratch;
          for (size_t b = 0; b < B; ++b) {
            const double u = gpt2s::draw_uniform(params[b].seed, params[b].sample_index, positions[b]);
            drawn[b] = gpt2s::sample_token(host.data() + b * V, int64_t(V), params[b], u, gpt2s::best_kernels(), scratch);
          }
        }
        return py::array_t<int32_t>(py::ssize_t(B), drawn.data());
      },
      py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"),
      py::arg("sample_index"), py::arg("position"),
      "The engine's sampler on host logits (B, V), for tests: one draw per row (parameters: one value or one per row), "
      "with the kernels of this process's ISA (GPT2S_ISA).");
  m.def(
      "screen_probe",
      [](const py::array& w, const py::array_t<float, py::array::c_style | py::array::forcecast>& x) {
        // The screened head's parts on a matrix of one's own (docs/engine.md), for tests.
        const gpt2s::Kernels& k = gpt2s::best_kernels();
        if (k.screen == nullptr) throw py::value_error("this CPU's kernels have no screen (it needs an int8 dot product: AVX512-VNNI with -BF16, AVX2, or NEON's sdot)");
        const bool bf16 = py::dtype::of<uint16_t>().is(w.dtype());
        if ((!bf16 && !py::dtype::of<float>().is(w.dtype())) || w.ndim() != 2 || !(w.flags() & py::array::c_style) ||
            x.ndim() != 2 || x.shape(1) != w.shape(1)) {
          throw py::value_error("screen_probe(w, x): w a C-contiguous (V, K) float32 or bf16-bits uint16 array, x (M, K)");
        }
        const int64_t V = w.shape(0), K = w.shape(1), M = x.shape(0), P = (V + k.panel - 1) / k.panel;
        gpt2s::TensorView view{w.data(), bf16 ? gpt2s::DType::BF16 : gpt2s::DType::F32, V, K};
        gpt2s::ThreadPool pool(1);
        std::vector<uint8_t> packed(static_cast<size_t>(k.packed_bytes(V, K, view.dtype) + 64));
        std::vector<uint8_t> panels(static_cast<size_t>(k.screen_bytes(V, K) + 64));
        std::vector<float> arrays(static_cast<size_t>(4 * P * k.panel));
        auto aligned = [](std::vector<uint8_t>& b) { return b.data() + (64 - reinterpret_cast<uintptr_t>(b.data()) % 64) % 64; };
        gpt2s::ScreenMatrix s = gpt2s::screen_matrix(aligned(panels), arrays.data(), V, K, k.panel);
        py::dict out;
        out["ok"] = k.pack_screen(pool, view, s);
        k.pack(pool, view, aligned(packed));
        const gpt2s::PackedMatrix head{aligned(packed), view.dtype, V, K};
        py::array_t<float> full({M, V}), upper({M, V}), lower({M, P}), exact({M, V});
        py::array_t<int32_t> best({M, P});
        std::vector<uint8_t> xq(static_cast<size_t>(M * (K + 3))), row_ok(static_cast<size_t>(M));
        std::vector<float> terms(static_cast<size_t>(M * 5));
        std::vector<uint16_t> xb(static_cast<size_t>(2 * M * (K + 2)));
        std::vector<int32_t> ids(static_cast<size_t>(V));
        for (int64_t i = 0; i < V; ++i) ids[size_t(i)] = int32_t(i);
        k.matmul(pool, x.data(), M, K, head, nullptr, full.mutable_data(), gpt2s::Epilogue::kStore, xb.data());
        k.screen(pool, x.data(), M, K, bf16, s, xq.data(), terms.data(), upper.mutable_data(), lower.mutable_data(),
                 best.mutable_data(), reinterpret_cast<bool*>(row_ok.data()));
        for (int64_t m = 0; m < M; ++m) k.exact_logits(x.data() + m * K, view, ids.data(), V, exact.mutable_data() + m * V, xb.data());
        out["full"] = full;
        out["upper"] = upper;
        out["panel_lower"] = lower;
        out["panel_best"] = best;
        out["exact"] = exact;
        out["row_ok"] = std::vector<bool>(row_ok.begin(), row_ok.end());
        out["panel"] = k.panel;
        return out;
      },
      py::arg("w"), py::arg("x"),
      "For tests: the screened head on rows x (M, K) and a matrix w (V, K) (float32, or uint16 bf16 bits): 'full' (the "
      "matmul's logits), 'exact' (exact_logits of every token), 'upper' (each logit's upper bound), 'panel_lower' (each "
      "panel's best lower bound), 'panel_best' (its token), 'row_ok', 'ok' (whether w can be screened) and 'panel' (outputs per panel).");
}
#else
void bind_cuda(py::module_& m) {
  m.def(
      "cuda_status",
      []() {
        const gpt2s::cuda::CudaStatus s = gpt2s::cuda::cuda_status();
        return py::make_tuple(s.devices, s.reason);
      },
      "(devices, reason): the number of CUDA devices, or 0 and why CUDA cannot run here.");
  m.def(
      "device_info",
      [](int device) {
        const gpt2s::cuda::DeviceInfo i = gpt2s::cuda::device_info(device);
        py::dict d;
        d["index"] = i.index;
        d["name"] = i.name;
        d["capability"] = py::make_tuple(i.major, i.minor);
        d["total_bytes"] = i.total_bytes;
        d["free_bytes"] = i.free_bytes;
        d["multiprocessors"] = i.multiprocessors;
        return d;
      },
      py::arg("device") = 0, "Name, compute capability, memory and multiprocessors of a CUDA device.");
  m.def(
      "sample",
      [](const LogitsArray& logits, const std::vector<float>& temperature, const std::vector<int64_t>& top_k,
         const std::vector<float>& top_p, const std::vector<uint64_t>& seed, const std::vector<uint64_t>& sample_index,
         const std::vector<uint64_t>& position, bool support, int device) {
        const std::vector<float> host = logits_rows(logits);
        const size_t B = size_t(logits.shape(0)), V = size_t(logits.shape(1));
        const auto params = row_params(B, temperature, top_k, top_p, seed, sample_index);
        const auto positions = row_positions(B, position);
        gpt2s::cuda::SamplerRun run;
        {
          py::gil_scoped_release release;
          run = gpt2s::cuda::sample_on_device(device, host, int(B), int(V), params, positions, support);
        }
        py::array_t<int32_t> ids(py::ssize_t(B), run.drawn.data());
        py::object mask = py::none();
        if (support) {
          py::array_t<bool> m({py::ssize_t(B), py::ssize_t(V)});
          std::copy(run.support.begin(), run.support.end(), m.mutable_data());
          mask = m;
        }
        return py::make_tuple(ids, mask);
      },
      py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("seed"),
      py::arg("sample_index"), py::arg("position"), py::kw_only(), py::arg("support") = false, py::arg("device") = 0,
      "The GPU sampler on host logits (B, V), for tests: one draw per row (parameters: one value or one per row), "
      "and with support=True the (B, V) mask of the tokens each draw could return (sampling.support()).");
  m.def(
      "time_sampler",
      [](const LogitsArray& logits, const std::vector<float>& temperature, const std::vector<int64_t>& top_k,
         const std::vector<float>& top_p, int iters, int device) {
        const std::vector<float> host = logits_rows(logits);
        const size_t B = size_t(logits.shape(0));
        const auto params = row_params(B, temperature, top_k, top_p, {0}, {0});
        py::gil_scoped_release release;
        return gpt2s::cuda::time_sampler_us(device, host, int(B), int(logits.shape(1)), params, iters);
      },
      py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"), py::kw_only(), py::arg("iters") = 50,
      py::arg("device") = 0,
      "Median device time in microseconds of one sampler launch over these logits (B rows, kept on the GPU).");
}
#endif

}  // namespace

PYBIND11_MODULE(GPT2S_MODULE_NAME, m) {
#ifdef GPT2S_CUDA_MODULE
  m.doc() = "gpt_2_simple C++ generation engine (CUDA)";
  bind_cuda(m);
#else
  m.doc() = "gpt_2_simple C++ generation engine (CPU)";
  bind_cpu_sampler(m);
#endif
  m.attr("__version__") = GPT2S_VERSION;

  // A bad model file is a ValueError carrying the loader's message; the OS refusing to open or map
  // it is an OSError with its errno (FileNotFoundError, PermissionError, ...).
  py::register_local_exception<gpt2s::FormatError>(m, "FormatError", PyExc_ValueError);
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gpt2s::SystemError& e) {
      py::object error = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.code, e.what());
      PyErr_SetObject(py::type::handle_of(error).ptr(), error.ptr());
    }
  });
  m.attr("FORMAT_VERSION") = gpt2s::kFormatVersion;
  py::class_<ModelFile, std::shared_ptr<ModelFile>>(m, "ModelFile", py::module_local(),
                                                    "A validated, memory-mapped model file (docs/format.md). Opening it maps the file "
                                                    "and checks everything but the weight checksums; verify=True checks those too.")
      .def(py::init(&open_model), py::arg("path"), py::kw_only(), py::arg("verify") = false, py::arg("mmap") = true)
      .def_property_readonly("path", &ModelFile::path)
      .def_property_readonly("file_size", &ModelFile::file_size)
      .def_property_readonly("dtype", [](const ModelFile& f) { return gpt2s::dtype_name(f.weights().dtype); })
      .def("verify", [](const ModelFile& f) {
             py::gil_scoped_release release;
             f.verify_data();
           }, "Check every tensor's CRC-32 (reads the whole file); raises FormatError naming a damaged tensor.")
      .def("describe", &describe_model, py::kw_only(), py::arg("data") = false,
           "The file's contents as a dict (see inspect).");
  m.def(
      "inspect", [](const std::string& path, bool verify, bool data) { return describe_model(*open_model(path, verify, true), data); },
      py::arg("path"), py::kw_only(), py::arg("verify") = false, py::arg("data") = false,
      "Validate a model file (docs/format.md) and describe it: version, config, dtype, eot_token, the tensor table, "
      "the embedded tokenizer (token_bytes, token_kinds, merges) and the metadata JSON. verify=True also checks every "
      "tensor's checksum (reads the whole file); data=True adds each tensor's bytes as the engine sees them. "
      "Raises FormatError (a ValueError) naming the problem.");

  bind_engine(m);
  bind_core(m);

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
        d["avx512vnni"] = f.avx512vnni;
        d["asimd"] = f.asimd;
        d["asimddp"] = f.asimddp;
        d["bf16"] = f.bf16;
        d["isa"] = gpt2s::best_isa();
        d["kernels"] = gpt2s::best_kernels().isa;
        d["bf16_widened"] = gpt2s::best_kernels().bf16_widened();
        return d;
      },
      "SIMD features of this CPU as the engine sees them (after the GPT2S_ISA cap), the kernel family it uses, and whether its bf16 matmuls widen the weights to fp32 FMAs.");

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
