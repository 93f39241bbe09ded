"""A real `gpt_2_simple serve` process on 127.0.0.1 for the server and browser tests, and the
model it serves: a small random GPT-2 with GPT-2's tokenizer and a 1024-token context (long
generations take a second or so, so a test can act while one runs)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import torch

import gpt_2_simple
from gpt_2_simple.config import GPT2Config
from gpt_2_simple.export import export
from reference import random_gpt2

SERVE_MODEL = GPT2Config(n_ctx=1024, n_embd=64, n_head=4, n_layer=2)


def serve_model(folder):
    """(PyTorch model, exported fp32 file). The final LayerNorm gain x10 spreads the logits as a
    trained model's are (test_generate_engine.py's _peaked), so sampled texts compare exactly."""
    model = random_gpt2(SERVE_MODEL, seed=5)
    with torch.no_grad():
        model.ln_f.weight.mul_(10.0)
    return model, export(model, folder / "served.fp32.bin", "fp32", progress=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m gpt_2_simple serve --model FILE ...` started for real; stops on close()."""

    def __init__(self, model_file, *args: str, log_path=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        # The gpt_2_simple this test imports (the source tree's in development, the installed one in CI).
        package_parent = os.path.dirname(os.path.dirname(gpt_2_simple.__file__))
        env = dict(os.environ, PYTHONPATH=package_parent + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.log = open(log_path or os.devnull, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gpt_2_simple", "serve", "--model", str(model_file), "--port", str(self.port),
             "--dtype", "fp32", "--threads", "1", "--log-level", "warning", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env=env,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start (exit code {self.proc.poll()}); see {log_path}")
            time.sleep(0.1)

    def request(self, method: str, path: str, body=None, headers=None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()

    def get(self, path: str, headers=None):
        return self.request("GET", path, headers=headers)

    def metrics(self) -> dict[str, float]:
        status, _, body = self.get("/metrics", headers=getattr(self, "auth", None))
        assert status == 200
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in body.decode().splitlines() if line and not line.startswith("#")}

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.log.close()
