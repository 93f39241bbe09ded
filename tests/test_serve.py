"""`gpt_2_simple serve` started for real on 127.0.0.1 and driven with the official `openai` client
(and raw HTTP where the client hides what is checked): completions against the PyTorch reference
(torch_generate with the same requests, decoded with the model file's tokenizer), streaming, list
prompts with n, stop strings, errors, concurrent clients sharing a batch, the API key, a
disconnect cancelling its row, the bounded queue and SIGTERM draining."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from gpt_2_simple.engine import Engine, Request  # noqa: E402
from gpt_2_simple.export import read_tokenizer  # noqa: E402
from gpt_2_simple.torch_generate import generate_tokens  # noqa: E402
from serve_helpers import Server, serve_model  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    model, path = serve_model(folder)
    server = Server(path, "--max-batch", "8", log_path=folder / "server.log")
    yield model, path, read_tokenizer(path), server
    server.close()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[3].base + "/v1", api_key="unused", max_retries=0)


def _reference(served, prompt, max_tokens: int, n: int = 1, **sampling) -> list[str]:
    """The texts the PyTorch model gives for this prompt (or these prompts, batched), n samples
    each: generation ends at <|endoftext|>, which is not shown."""
    model, _, enc, _ = served
    prompts = [prompt] if isinstance(prompt, str) else prompt
    requests = []
    for p in prompts:
        ids = enc.encode(p) if p else [enc.eot_token]
        requests += [Request(ids, max_tokens, stop_ids=[enc.eot_token], sample_index=j, **sampling) for j in range(n)]
    return [enc.decode(r.tokens) for r in generate_tokens(model, requests, batch_size=len(requests))]


def _model_id(client) -> str:
    return client.models.list().data[0].id


def test_models_health_and_metrics(served, client):
    server = served[3]
    models = client.models.list().data
    assert [m.id for m in models] == ["served"]
    status, _, body = server.get("/health")
    assert status == 200 and json.loads(body)["status"] == "ok"
    metrics = server.metrics()
    for name in ("gpt2s_queued_rows", "gpt2s_running_rows", "gpt2s_tokens_per_second", "gpt2s_time_to_first_token_seconds_count",
                 'gpt2s_time_to_first_token_seconds_bucket{le="+Inf"}', "gpt2s_generated_tokens_total"):
        assert name in metrics


def test_greedy_completion_equals_pytorch_and_streams_the_same_text(served, client):
    model_id = _model_id(client)
    expected = _reference(served, "The meaning of life is", 40, temperature=0.0)[0]
    before = served[3].metrics()
    out = client.completions.create(model=model_id, prompt="The meaning of life is", max_tokens=40, temperature=0)
    choice = out.choices[0]
    assert choice.text == expected and choice.finish_reason == "length" and out.object == "text_completion"
    assert out.usage.prompt_tokens == len(served[2].encode("The meaning of life is")) and out.usage.completion_tokens == 40
    chunks = list(client.completions.create(model=model_id, prompt="The meaning of life is", max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == expected and len([t for t in texts if t]) > 5  # arrives in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40
    after = served[3].metrics()
    assert after["gpt2s_generated_tokens_total"] - before["gpt2s_generated_tokens_total"] == 80
    assert after["gpt2s_time_to_first_token_seconds_count"] - before["gpt2s_time_to_first_token_seconds_count"] == 2


def test_list_prompts_with_n_and_a_seed_equal_pytorch(served, client):
    prompts = ["Once upon a time", "", "import numpy as np"]
    out = client.completions.create(model=_model_id(client), prompt=prompts, max_tokens=25, n=3, temperature=0.9,
                                    top_p=0.95, seed=1234, extra_body={"top_k": 50})
    assert [c.index for c in out.choices] == list(range(9))
    assert [c.text for c in out.choices] == _reference(served, prompts, 25, n=3, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    assert len(set(c.text for c in out.choices)) == 9
    # A list of token ids is one prompt.
    ids = served[2].encode("Once upon a time")
    again = client.completions.create(model=_model_id(client), prompt=ids, max_tokens=25, n=3, temperature=0.9, top_p=0.95,
                                      seed=1234, extra_body={"top_k": 50})
    assert [c.text for c in again.choices] == [c.text for c in out.choices[:3]]


def test_stop_strings_cut_the_text_streamed_or_not(served, client):
    full = _reference(served, "Hello", 60, temperature=0.0)[0]
    stop = full[20:23]  # three characters from the middle of the greedy text
    cut = full[: full.find(stop)]
    out = client.completions.create(model=_model_id(client), prompt="Hello", max_tokens=60, temperature=0, stop=[stop, "\x00never"])
    assert out.choices[0].text == cut and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens < 60
    streamed = client.completions.create(model=_model_id(client), prompt="Hello", max_tokens=60, temperature=0, stop=stop, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=-1), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(n=0), "n"),
    (dict(max_tokens=1025), "max_tokens"),  # prompt + max_tokens - 1 beyond the 1024-token context
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
    (dict(logprobs=2), "logprobs"),
    (dict(seed=-5), "seed"),
    (dict(extra_body={"top_k": -1}), "top_k"),
    (dict(extra_body={"frobnicate": 1}), "frobnicate"),
    (dict(prompt=[[]]), "prompt"),
    (dict(prompt=[50257]), "prompt"),
])
def test_bad_requests_are_400_naming_the_field(client, kwargs, param):
    args = dict(model=_model_id(client), prompt="Hi", max_tokens=5) | kwargs
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.body["message"]


def test_other_errors_are_openai_json(served, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=5)
    assert e.value.body["param"] == "model" and "served" in e.value.body["message"]
    status, _, body = served[3].request("POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(body)["error"]["message"]
    status, _, body = served[3].request("POST", "/v1/completions", [1, 2])
    assert status == 400 and "JSON object" in json.loads(body)["error"]["message"]
    status, _, body = served[3].get("/v1/nothing")
    assert status == 404 and json.loads(body)["error"]["code"] == "not_found"


def test_concurrent_clients_share_the_batch_and_get_their_own_texts(served, client):
    model_id = _model_id(client)
    before = served[3].metrics()
    results = {}

    def work(k):
        stream = client.completions.create(model=model_id, prompt="Client says", max_tokens=60, temperature=1.0,
                                           seed=1000 + k, stream=True)
        results[k] = "".join(c.choices[0].text for c in stream)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The same seed with sample_index 0 alone in PyTorch (a batch there is independent rows too).
    model, _, enc, _ = served
    requests = [Request(enc.encode("Client says"), 60, temperature=1.0, seed=1000 + k, stop_ids=[enc.eot_token]) for k in range(6)]
    assert [results[k] for k in range(6)] == [enc.decode(r.tokens) for r in generate_tokens(model, requests, batch_size=6)]
    after = served[3].metrics()
    steps = after["gpt2s_decode_steps_total"] - before["gpt2s_decode_steps_total"]
    rows = after["gpt2s_decode_tokens_total"] - before["gpt2s_decode_tokens_total"]
    assert rows / steps > 2  # the clients' rows ran in the same steps


def _stream_lines(server, body, headers=None):
    """A raw streaming request: (connection, response, iterator over its SSE data lines)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()

    def lines():
        for raw in response:
            line = raw.decode().strip()
            if line.startswith("data: "):
                yield line[6:]
    return conn, response, lines()


def _wait_for(condition, seconds=30.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_that_disconnects_cancels_its_rows(served):
    server = served[3]
    before = server.metrics()
    conn, response, lines = _stream_lines(server, {"prompt": "Bye", "max_tokens": 1000, "temperature": 1.0, "n": 2, "stream": True,
                                                   "ignore_eos": True})
    assert response.status == 200 and json.loads(next(lines))["choices"]
    conn.sock.close()  # goes away mid-stream
    conn.close()
    _wait_for(lambda: server.metrics()["gpt2s_running_rows"] == 0)
    after = server.metrics()
    assert after["gpt2s_cancelled_rows_total"] - before["gpt2s_cancelled_rows_total"] == 2
    assert after["gpt2s_generated_tokens_total"] - before["gpt2s_generated_tokens_total"] < 1000
    # The same for a non-streamed request.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "Bye", "max_tokens": 1000, "ignore_eos": True}),
                 headers={"Content-Type": "application/json"})
    _wait_for(lambda: server.metrics()["gpt2s_running_rows"] == 1)
    conn.sock.close()
    _wait_for(lambda: server.metrics()["gpt2s_running_rows"] == 0)
    assert server.metrics()["gpt2s_cancelled_rows_total"] - after["gpt2s_cancelled_rows_total"] == 1


def test_api_key(tmp_path, served):
    server = Server(served[1], "--api-key", "s3cret", log_path=tmp_path / "server.log")
    try:
        bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.completions.create(model="served", prompt="Hi", max_tokens=3)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert server.get("/metrics")[0] == 401
        good = openai.OpenAI(base_url=server.base + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model="served", prompt="Hi", max_tokens=3, temperature=0).choices[0].text == \
            _reference(served, "Hi", 3, temperature=0.0)[0]
        assert server.get("/health")[0] == 200  # load balancers' probes need no key
    finally:
        server.close()


def test_a_full_queue_answers_429_and_sigterm_drains_running_requests(tmp_path, served):
    # One slot, one row may wait: a third request is turned away with Retry-After.
    server = Server(served[1], "--max-batch", "1", "--max-queue", "1", log_path=tmp_path / "server.log")
    try:
        body = {"prompt": "Long", "max_tokens": 300, "temperature": 0, "stream": True, "ignore_eos": True}
        conn1, response1, lines1 = _stream_lines(server, body)
        first = json.loads(next(lines1))
        conn2, response2, lines2 = _stream_lines(server, dict(body, max_tokens=5))
        _wait_for(lambda: server.metrics()["gpt2s_queued_rows"] == 1)
        status, headers, answer = server.request("POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1" and json.loads(answer)["error"]["code"] == "queue_full"
        # SIGTERM while both run or wait: both finish in full, then the server exits.
        server.proc.send_signal(signal.SIGTERM)
        rest = [json.loads(x) for x in lines1 if x != "[DONE]"]
        text = first["choices"][0]["text"] + "".join(c["choices"][0]["text"] for c in rest)
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        enc = served[2]  # the engine alone (test_engine.py checks it against PyTorch)
        alone = Engine(served[1], backend="cpu").generate([Request(enc.encode("Long"), 300, temperature=0.0)])[0]
        assert text == enc.decode(alone.tokens)
        second = [json.loads(x) for x in lines2 if x != "[DONE]"]
        assert second[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(60) in (0, -15)  # uvicorn ends by the signal it drained for
        with pytest.raises(OSError):
            server.get("/health")
    finally:
        server.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the server's memory map from Linux's /proc")
def test_the_server_never_loads_torch(served, client):
    client.completions.create(model=_model_id(client), prompt="Hi", max_tokens=3)
    with open(f"/proc/{served[3].proc.pid}/maps") as f:
        maps = f.read()
    assert "_engine" in maps and "libtorch" not in maps


def test_a_kv_cache_larger_than_the_free_memory_is_refused_at_startup(tmp_path, served):
    # 10**7 slots of the full context cannot fit any machine: refused before serving, naming the flag
    # and a value that fits, instead of failing (or waking the OOM killer) at the first request.
    with pytest.raises(RuntimeError, match="did not start"):
        Server(served[1], "--max-batch", str(10**7), log_path=tmp_path / "server.log")
    log = (tmp_path / "server.log").read_text()
    assert "needs a KV cache of" in log and "use --max-batch" in log and "Traceback" not in log
