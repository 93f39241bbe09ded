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


def test_import_does_not_load_torch():
    loaded = json.loads(_python("import sys, json, gpt_2_simple as gpt2; gpt2.get_encoder; print(json.dumps(sorted(sys.modules)))"))
    assert "gpt_2_simple" in loaded
    assert "torch" not in loaded


def test_version_matches_extension():
    from gpt_2_simple import _engine

    assert _engine.__version__ == gpt_2_simple.__version__


def test_cpu_features_and_isa_cap():
    from gpt_2_simple import _engine

    features = _engine.cpu_features()
    assert features["isa"] in {"avx512", "avx2", "scalar"}
    if features["isa"] == "avx512":
        assert features["avx512f"] and features["avx2"]
    capped = json.loads(_python("import json; from gpt_2_simple import _engine; print(json.dumps(_engine.cpu_features()))", {"GPT2S_ISA": "scalar"}))
    assert capped["isa"] == "scalar" and not capped["avx2"] and not capped["avx512f"]
    assert _engine.max_threads() >= 1


def test_unknown_attribute_is_an_attribute_error():
    try:
        gpt_2_simple.does_not_exist
    except AttributeError as e:
        assert "does_not_exist" in str(e)
    else:
        raise AssertionError("expected AttributeError")
