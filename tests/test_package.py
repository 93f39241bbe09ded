"""The package imports fast, without torch, and its C++ extension is built and usable."""

import json
import os
import subprocess
import sys

import gpt_2_simple


def _python(code: str, env: dict | None = None) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_does_not_load_torch_or_matplotlib():
    loaded = json.loads(_python("import sys, json, gpt_2_simple as gpt2; gpt2.get_encoder; print(json.dumps(sorted(sys.modules)))"))
    assert "gpt_2_simple" in loaded
    assert "torch" not in loaded and "matplotlib" not in loaded


def test_version_matches_extension():
    from gpt_2_simple import _engine

    assert _engine.__version__ == gpt_2_simple.__version__


def test_cpu_features_and_isa_cap():
    from gpt_2_simple import _engine

    features = _engine.cpu_features()
    assert features["isa"] in {"avx512", "avx2", "neon", "scalar"}
    if features["isa"] == "avx512":
        assert features["avx512f"] and features["avx2"]
    # The kernel table: the family, with native BF16 dot products (x86) or the int8 dot product
    # (AArch64) where the CPU has them.
    extra = {"avx512": "avx512bf16" if features["avx512bf16"] else "avx512", "neon": "neondot" if features["asimddp"] else "neon"}
    assert features["kernels"] == extra.get(features["isa"], features["isa"])
    capped = json.loads(_python("import json; from gpt_2_simple import _engine; print(json.dumps(_engine.cpu_features()))", {"GPT2S_ISA": "scalar"}))
    assert capped["isa"] == capped["kernels"] == "scalar" and not capped["avx2"] and not capped["avx512f"]
    assert _engine.max_threads() >= 1


def test_unknown_attribute_is_an_attribute_error():
    try:
        gpt_2_simple.does_not_exist
    except AttributeError as e:
        assert "does_not_exist" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_extensions_export_only_their_init_function():
    # Anything else exported (template instances of the C++ library, the static CUDA runtime) can be
    # bound to, or bind, the same names in libraries loaded with RTLD_GLOBAL: after a CUDA build of
    # PyTorch was imported, that crashed the CUDA engine on a real GPU. csrc/exports.map.
    import glob
    import shutil

    import pytest

    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("binutils' nm is not installed")
    modules = glob.glob(os.path.join(os.path.dirname(gpt_2_simple.__file__), "_engine*.so"))
    assert modules, "the _engine extension is not built"
    for path in modules:
        out = subprocess.run([nm, "-D", "--defined-only", path], capture_output=True, text=True, check=True).stdout
        exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
        name = os.path.basename(path).split(".")[0]
        assert exported == {f"PyInit_{name}"}, f"{path} exports {sorted(exported - {f'PyInit_{name}'})[:5]}"
