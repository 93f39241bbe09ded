// The only pybind11 file: it checks inputs coming from Python, releases the GIL around long
// calls and forwards to the C++ core in csrc/engine, which knows nothing of Python.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "engine/cpu_features.h"
#include "engine/format.h"

namespace py = pybind11;

namespace {

// Model file loader (csrc/engine/format.h): what a file holds, as Python objects, for export's
// tests and tools. With data=True each tensor's bytes are copied out of the weight views the
// engine would use, so a test sees exactly what the engine sees.
py::dict inspect_model(const std::string& path, bool verify, bool data) {
  std::shared_ptr<const gpt2s::LoadedModel> model;
  {
    py::gil_scoped_release release;
    model = gpt2s::LoadedModel::open(path, verify);
  }
  const gpt2s::ModelWeights& w = model->weights();
  py::dict d;
  d["path"] = model->path();
  d["version"] = model->version();
  d["file_size"] = model->file_size();
  d["flags"] = model->flags();
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
  for (const gpt2s::TensorInfo& t : model->tensors()) {
    py::dict e;
    e["name"] = t.name;
    e["dtype"] = gpt2s::dtype_name(t.dtype);
    e["shape"] = t.ndim == 1 ? py::tuple(py::make_tuple(t.shape[0])) : py::tuple(py::make_tuple(t.shape[0], t.shape[1]));
    e["offset"] = t.offset;
    e["nbytes"] = t.nbytes;
    e["crc32"] = t.crc32;
    tensors.append(e);
  }
  d["tensors"] = tensors;
  py::list token_bytes;
  for (std::string_view t : w.token_bytes) token_bytes.append(py::bytes(t.data(), t.size()));
  d["token_bytes"] = token_bytes;
  d["token_kinds"] = py::bytes(model->token_kinds().data(), model->token_kinds().size());
  d["merges"] = py::bytes(model->merges().data(), model->merges().size());
  d["metadata"] = py::bytes(model->metadata().data(), model->metadata().size());
  if (data) {
    py::dict views;
    auto add = [&](const std::string& name, const gpt2s::TensorView& v) {
      views[py::str(name)] = py::bytes(static_cast<const char*>(v.data), v.rows * v.cols * gpt2s::dtype_size(v.dtype));
    };
    add("wte.weight", w.wte);
    add("wpe.weight", w.wpe);
    for (size_t i = 0; i < w.h.size(); ++i) {
      const gpt2s::LayerWeights& l = w.h[i];
      const std::string p = "h." + std::to_string(i) + ".";
      add(p + "ln_1.weight", l.ln_1_w);
      add(p + "ln_1.bias", l.ln_1_b);
      add(p + "attn.c_attn.weight", l.attn_c_attn_w);
      add(p + "attn.c_attn.bias", l.attn_c_attn_b);
      add(p + "attn.c_proj.weight", l.attn_c_proj_w);
      add(p + "attn.c_proj.bias", l.attn_c_proj_b);
      add(p + "ln_2.weight", l.ln_2_w);
      add(p + "ln_2.bias", l.ln_2_b);
      add(p + "mlp.c_fc.weight", l.mlp_c_fc_w);
      add(p + "mlp.c_fc.bias", l.mlp_c_fc_b);
      add(p + "mlp.c_proj.weight", l.mlp_c_proj_w);
      add(p + "mlp.c_proj.bias", l.mlp_c_proj_b);
    }
    add("ln_f.weight", w.ln_f_w);
    add("ln_f.bias", w.ln_f_b);
    d["data"] = views;
  }
  return d;
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
  m.doc() = "gpt_2_simple C++ generation engine (CPU)";
  m.attr("__version__") = GPT2S_VERSION;

  // A bad model file is a ValueError carrying the loader's message; the OS refusing to open or map
  // it is an OSError with its errno (FileNotFoundError, PermissionError, ...).
  py::register_exception<gpt2s::FormatError>(m, "FormatError", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const gpt2s::SystemError& e) {
      py::object error = py::reinterpret_borrow<py::object>(PyExc_OSError)(e.code, e.what());
      PyErr_SetObject(py::type::handle_of(error).ptr(), error.ptr());
    }
  });
  m.attr("FORMAT_VERSION") = gpt2s::kFormatVersion;
  m.def("inspect", &inspect_model, py::arg("path"), py::kw_only(), py::arg("verify") = false, py::arg("data") = false,
        "Validate a model file (docs/format.md) and describe it: version, config, dtype, eot_token, the tensor table, "
        "the embedded tokenizer (token_bytes, token_kinds, merges) and the metadata JSON. verify=True also checks every "
        "tensor's checksum (reads the whole file); data=True adds each tensor's bytes as the engine sees them. "
        "Raises FormatError (a ValueError) naming the problem.");

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
