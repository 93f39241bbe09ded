"""``gpt_2_simple serve``: an OpenAI-compatible completions server (docs/serve.md).

Every client's rows run in one batch: the engine core (engine.EngineCore) takes new rows between
steps, so throughput under concurrent load is the batch's, not one client's. Starlette + uvicorn
(the ``[serve]`` extra); never imports torch.

- ``POST /v1/completions``: OpenAI's legacy completions API (prompt string or list, max_tokens,
  temperature, top_p, ``top_k`` and ``ignore_eos`` as extensions, n, stop, seed, stream as
  server-sent events, usage).
- ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text), ``GET /`` (the playground).

Errors are OpenAI's JSON (``{"error": {"message", "type", "param", "code"}}``); a bad field gets
400 naming it. At most ``max_queue`` rows wait for a slot: beyond that 429 with Retry-After; while
shutting down 503. A client that disconnects cancels its rows at the next step. SIGTERM stops
accepting connections, lets running requests finish, then exits.
"""

from __future__ import annotations

import asyncio
import bisect
import codecs
import hmac
import json
import math
import numbers
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .engine import Engine, EngineCore, Request
from .generate import SEED_LIMIT, random_seed
from .tokenizer import Encoder

__all__ = ["APIError", "CompletionJob", "parse_completion", "build_app", "run_server", "PLAYGROUND"]

PLAYGROUND = Path(__file__).with_name("playground.html")
MAX_N = 128  # choices per prompt
MAX_STOP = 4  # stop strings, as OpenAI allows
RETRY_AFTER_SECONDS = 1
# Time-to-first-token histogram buckets, seconds (Prometheus' le labels).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOKENS_PER_SECOND_WINDOW = 10.0  # /metrics' tokens/s: tokens generated over the last this many seconds
# Fields OpenAI's completions API has that this server does not implement: accepted only at their
# default (what the openai client sends when they are not given).
UNSUPPORTED_DEFAULTS = {"suffix": (None,), "logprobs": (None,), "echo": (None, False), "presence_penalty": (None, 0, 0.0),
                        "frequency_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "user": None}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
          "stream_options", "ignore_eos", "best_of", *UNSUPPORTED_DEFAULTS}


class APIError(Exception):
    """An error answered as OpenAI's error JSON with this HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(param: str, problem: str) -> APIError:
    return APIError(400, f"{param} {problem}", param=param)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class CompletionJob:
    """A checked completions request: one engine Request per choice (prompt-major, as OpenAI
    numbers choices), the stop strings that cut the text, and what the answer needs."""

    prompts: list[list[int]]
    requests: list[Request]
    stop: list[str]
    stream: bool
    include_usage: bool

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


def _prompts(value, enc: Encoder, n_vocab: int) -> list[list[int]]:
    """A prompt is a string, a list of strings, a list of token ids or a list of such lists."""
    eot = enc.eot_token if enc.eot_token is not None else 0

    def text(s: str) -> list[int]:
        return enc.encode(s) if s else [eot]  # nothing: start from <|endoftext|>, as generate does

    def ids(v: list) -> list[int]:
        if not v or not all(_is_int(t) and 0 <= t < n_vocab for t in v):
            raise _bad("prompt", f"must hold token ids in [0, {n_vocab}) (and at least one), got {v!r:.80}")
        return [int(t) for t in v]

    if value is None:
        return [[eot]]
    if isinstance(value, str):
        return [text(value)]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return [text(p) for p in value]
        if all(_is_int(t) for t in value):
            return [ids(value)]
        if all(isinstance(p, list) for p in value):
            return [ids(p) for p in value]
    raise _bad("prompt", "must be a string, a non-empty list of strings, a list of token ids or a list of such lists")


def parse_completion(body: Any, enc: Encoder, *, n_vocab: int, context: int, model_id: str) -> CompletionJob:
    """Check a completions request body; raise APIError (400 naming the field, 404 for another model)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise _bad(unknown[0], f"is not a field this server knows; the fields are {', '.join(sorted(FIELDS))}")
    for name, allowed in UNSUPPORTED_DEFAULTS.items():
        if allowed is not None and name in body and body[name] not in allowed:
            raise _bad(name, "is not supported by this server; leave it out")
    model = body.get("model")
    if model is not None and model != model_id:
        raise APIError(404, f"model {model!r} is not served here; this server serves {model_id!r} (GET /v1/models)",
                       param="model", code="model_not_found")
    prompts = _prompts(body.get("prompt"), enc, n_vocab)

    max_tokens = body.get("max_tokens", 16)
    if max_tokens is None:
        max_tokens = 16
    if not _is_int(max_tokens) or max_tokens < 0:
        raise _bad("max_tokens", f"must be an integer >= 0, got {max_tokens!r}")
    longest = max(len(p) for p in prompts)
    if longest + max_tokens - 1 > context:
        raise _bad("max_tokens", f"plus the prompt's {longest} tokens exceeds the context of {context} tokens; "
                                 f"ask for at most {max(0, context + 1 - longest)} tokens or shorten the prompt")
    temperature = 1.0 if body.get("temperature") is None else body["temperature"]
    if not _is_number(temperature) or temperature < 0:
        raise _bad("temperature", f"must be a number >= 0 (0: the most likely token), got {temperature!r}")
    top_p = 1.0 if body.get("top_p") is None else body["top_p"]
    if not _is_number(top_p) or not 0 < top_p <= 1:
        raise _bad("top_p", f"must be a number in (0, 1], got {top_p!r}")
    top_k = 0 if body.get("top_k") is None else body["top_k"]
    if not _is_int(top_k) or top_k < 0:
        raise _bad("top_k", f"must be an integer >= 0 (0: off), got {top_k!r}")
    n = 1 if body.get("n") is None else body["n"]
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise _bad("n", f"must be an integer in [1, {MAX_N}], got {n!r}")
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise _bad("best_of", "is not supported by this server (only best_of = n); leave it out")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop", f"must be a non-empty string or a list of at most {MAX_STOP} of them, got {body.get('stop')!r}")
    seed = body.get("seed")
    if seed is None:
        seed = random_seed()
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise _bad("seed", f"must be an integer in [0, 2**64), got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise _bad("stream", f"must be true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
        raise _bad("stream_options", 'must be an object like {"include_usage": true}')
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("ignore_eos", f"must be true or false, got {ignore_eos!r}")
    stop_ids = [] if ignore_eos or enc.eot_token is None else [enc.eot_token]
    requests = [
        Request(prompt, int(max_tokens), temperature=float(temperature), top_k=int(top_k),
                top_p=0.0 if top_p >= 1 else float(top_p), seed=int(seed), sample_index=j,
                stop_ids=stop_ids, stop_sequences=[s.encode("utf-8") for s in stop])
        for prompt in prompts for j in range(n)
    ]
    return CompletionJob(prompts, requests, stop, bool(stream), bool(options.get("include_usage", False)))


class ChoiceText:
    """One choice's text as its tokens arrive: decoded incrementally (a character split across
    tokens waits for its last byte) and cut before the first stop string, holding back the end
    that could still become one, so the streamed deltas add up to the non-streamed text."""

    def __init__(self, enc: Encoder, stop: list[str]):
        self.enc, self.stop = enc, stop
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far
        self.sent = 0  # characters handed out
        self.tokens = 0
        self.finish: str | None = None
        self.hold = max((len(s) for s in stop), default=1) - 1

    def add(self, tokens: list[int], finish: str | None) -> str:
        """The new text to hand out after these tokens (and the end, when ``finish`` is set)."""
        self.tokens += len(tokens)
        self.text += self.decoder.decode(self.enc.decode_bytes(tokens), final=finish is not None)
        cut = min((i for i in (self.text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
        if finish is not None:
            self.finish = {"length": "length", "cancelled": "cancelled", "error": "error"}.get(finish, "stop")
            end = len(self.text)
        else:
            end = len(self.text) if cut >= 0 else max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent:end], max(self.sent, end)
        return delta


class Metrics:
    """The counters /metrics shows (Prometheus text format)."""

    def __init__(self):
        self.requests: dict[str, int] = {}  # by HTTP status
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cancelled_rows = 0
        self.ttft_counts = [0] * (len(TTFT_BUCKETS) + 1)
        self.ttft_sum = 0.0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) over the last window

    def request(self, status: int) -> None:
        self.requests[str(status)] = self.requests.get(str(status), 0) + 1

    def tokens(self, n: int) -> None:
        now = time.monotonic()
        self.generated_tokens += n
        self.recent.append((now, n))
        while self.recent and self.recent[0][0] < now - TOKENS_PER_SECOND_WINDOW:
            self.recent.popleft()

    def first_token(self, seconds: float) -> None:
        self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS, seconds)] += 1
        self.ttft_sum += seconds

    def render(self, core: EngineCore, draining: bool) -> str:
        stats = core.stats()
        now = time.monotonic()
        recent = sum(n for t, n in self.recent if t >= now - TOKENS_PER_SECOND_WINDOW)
        decode_rate = stats["decode_tokens"] / stats["decode_seconds"] if stats["decode_seconds"] else 0.0
        lines = [
            "# HELP gpt2s_queued_rows Rows (choices) waiting for a batch slot.", "# TYPE gpt2s_queued_rows gauge",
            f"gpt2s_queued_rows {stats['queued']}",
            "# HELP gpt2s_running_rows Rows in the running batch.", "# TYPE gpt2s_running_rows gauge",
            f"gpt2s_running_rows {stats['running']}",
            "# HELP gpt2s_max_batch Batch slots.", "# TYPE gpt2s_max_batch gauge", f"gpt2s_max_batch {core.max_batch}",
            "# HELP gpt2s_draining 1 while shutting down.", "# TYPE gpt2s_draining gauge", f"gpt2s_draining {int(draining)}",
            f"# HELP gpt2s_tokens_per_second Tokens generated per second over the last {TOKENS_PER_SECOND_WINDOW:g} s.",
            "# TYPE gpt2s_tokens_per_second gauge", f"gpt2s_tokens_per_second {recent / TOKENS_PER_SECOND_WINDOW:.3f}",
            "# HELP gpt2s_decode_tokens_per_second Tokens per second of decode steps, since start (engine time only).",
            "# TYPE gpt2s_decode_tokens_per_second gauge", f"gpt2s_decode_tokens_per_second {decode_rate:.3f}",
            "# HELP gpt2s_decode_steps_total Engine steps that only decoded (one token per running row).",
            "# TYPE gpt2s_decode_steps_total counter", f"gpt2s_decode_steps_total {stats['decode_steps']}",
            "# HELP gpt2s_decode_tokens_total Tokens those steps drew: divided by the steps, the mean batch.",
            "# TYPE gpt2s_decode_tokens_total counter", f"gpt2s_decode_tokens_total {stats['decode_tokens']}",
            "# HELP gpt2s_prefill_tokens_total Prompt tokens computed (not copied from a row sharing the prefix).",
            "# TYPE gpt2s_prefill_tokens_total counter", f"gpt2s_prefill_tokens_total {stats['prefill_tokens']}",
            "# HELP gpt2s_generated_tokens_total Tokens generated.", "# TYPE gpt2s_generated_tokens_total counter",
            f"gpt2s_generated_tokens_total {self.generated_tokens}",
            "# HELP gpt2s_prompt_tokens_total Prompt tokens of accepted requests.", "# TYPE gpt2s_prompt_tokens_total counter",
            f"gpt2s_prompt_tokens_total {self.prompt_tokens}",
            "# HELP gpt2s_cancelled_rows_total Rows cancelled (client gone).", "# TYPE gpt2s_cancelled_rows_total counter",
            f"gpt2s_cancelled_rows_total {self.cancelled_rows}",
            "# HELP gpt2s_requests_total Completion requests answered, by HTTP status.", "# TYPE gpt2s_requests_total counter",
            *(f'gpt2s_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.requests.items())),
            "# HELP gpt2s_time_to_first_token_seconds From a request's arrival to its first generated token.",
            "# TYPE gpt2s_time_to_first_token_seconds histogram",
        ]
        total = 0
        for le, count in zip([*map(str, TTFT_BUCKETS), "+Inf"], self.ttft_counts):
            total += count
            lines.append(f'gpt2s_time_to_first_token_seconds_bucket{{le="{le}"}} {total}')
        lines += [f"gpt2s_time_to_first_token_seconds_sum {self.ttft_sum:.6f}", f"gpt2s_time_to_first_token_seconds_count {total}"]
        return "\n".join(lines) + "\n"


@dataclass
class ServerState:
    engine: Engine
    enc: Encoder
    core: EngineCore
    model_id: str
    api_key: str | None
    max_queue: int
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    created: int = field(default_factory=lambda: int(time.time()))


def _error_response(e: APIError):
    from starlette.responses import JSONResponse

    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Rows:
    """A request's rows in the engine core: their events arrive on an asyncio queue."""

    def __init__(self, state: ServerState, job: CompletionJob):
        self.state, self.job = state, job
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.ids: list[int] = []
        self.open = set()

    def start(self) -> None:
        stats = self.state.core.stats()
        # An empty queue takes any request (so one with more rows than the bound can still run).
        if stats["queued"] > 0 and stats["queued"] + len(self.job.requests) > self.state.max_queue:
            raise APIError(429, f"the server is busy: {stats['queued']} rows wait for a slot (at most {self.state.max_queue}); "
                                "retry after a second", type="server_busy", code="queue_full",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        for i, request in enumerate(self.job.requests):
            handler = lambda tokens, finish, i=i: self.loop.call_soon_threadsafe(self.events.put_nowait, (i, tokens, finish))  # noqa: E731
            try:
                self.ids.append(self.state.core.add(request, handler))
            except RuntimeError:  # closing, or the engine failed
                self.cancel()
                raise _engine_failed(self.state.core) if self.state.core.error is not None else _draining() from None
            self.open.add(i)
        self.state.metrics.prompt_tokens += self.job.prompt_tokens

    async def next(self) -> tuple[int, list[int], str | None]:
        i, tokens, finish = await self.events.get()
        if finish is not None:
            self.open.discard(i)
        if tokens:
            self.state.metrics.tokens(len(tokens))
        return i, tokens, finish

    def cancel(self) -> None:
        for i in list(self.open):
            self.state.core.abort(self.ids[i])
            self.state.metrics.cancelled_rows += 1
        self.open.clear()


def _engine_failed(core: EngineCore) -> APIError:
    return APIError(500, f"the engine failed: {core.error}; see the server's log", type="server_error", code="engine_error")


def _draining() -> APIError:
    return APIError(503, "the server is shutting down; retry on another replica", type="server_unavailable",
                    code="shutting_down", headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def build_app(engine: Engine, enc: Encoder, *, model_id: str, api_key: str | None = None, max_batch: int = 16,
              max_queue: int | None = None, context: int | None = None):
    """The Starlette app serving ``engine``; its engine core starts with the app (lifespan) and
    drains and stops with it."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    holder: dict[str, ServerState] = {}

    def state() -> ServerState:
        return holder["state"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        core = EngineCore(engine, max_batch=max_batch, context=context)
        holder["state"] = app.state.serve = ServerState(engine, enc, core, model_id, api_key,
                                                        max_queue if max_queue is not None else 4 * max_batch)
        try:
            yield
        finally:
            app.state.serve.draining = True
            await asyncio.get_running_loop().run_in_executor(None, lambda: core.close(drain=True))

    def authorize(request: HTTPRequest) -> None:
        key = state().api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())):
            raise APIError(401, "a valid API key is required: send the header 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    def guarded(handler):
        async def endpoint(request: HTTPRequest):
            try:
                authorize(request)
                return await handler(request)
            except APIError as e:
                if handler is completions:
                    state().metrics.request(e.status)
                return _error_response(e)
        return endpoint

    async def models(request: HTTPRequest):
        s = state()
        return JSONResponse({"object": "list", "data": [{"id": s.model_id, "object": "model", "created": s.created,
                                                         "owned_by": "gpt_2_simple", "max_model_len": s.core.context}]})

    async def health(request: HTTPRequest):
        s = state()
        if s.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return JSONResponse({"status": "ok", "model": s.model_id, "device": s.engine.device})

    async def metrics(request: HTTPRequest):
        s = state()
        return PlainTextResponse(s.metrics.render(s.core, s.draining), media_type="text/plain; version=0.0.4")

    async def playground(request: HTTPRequest):
        return FileResponse(PLAYGROUND, media_type="text/html; charset=utf-8")

    async def completions(request: HTTPRequest):
        s = state()
        arrived = time.monotonic()
        if s.draining:
            raise _draining()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None
        job = parse_completion(body, s.enc, n_vocab=s.engine.config.n_vocab, context=s.core.context, model_id=s.model_id)
        rows = _Rows(s, job)
        rows.start()
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        texts = [ChoiceText(s.enc, job.stop) for _ in job.requests]
        first = [True]

        def note_first(tokens):
            if tokens and first[0]:
                first[0] = False
                s.metrics.first_token(time.monotonic() - arrived)

        def usage() -> dict:
            done = sum(t.tokens for t in texts)
            return {"prompt_tokens": job.prompt_tokens, "completion_tokens": done, "total_tokens": job.prompt_tokens + done}

        if job.stream:
            async def events():
                try:
                    while rows.open:
                        i, tokens, finish = await rows.next()
                        note_first(tokens)
                        delta = texts[i].add(tokens, finish)
                        if delta or finish is not None:
                            chunk = {"id": cid, "object": "text_completion", "created": created, "model": s.model_id,
                                     "choices": [{"index": i, "text": delta, "logprobs": None,
                                                  "finish_reason": texts[i].finish}]}
                            yield f"data: {json.dumps(chunk)}\n\n"
                    if job.include_usage:
                        chunk = {"id": cid, "object": "text_completion", "created": created, "model": s.model_id,
                                 "choices": [], "usage": usage()}
                        yield f"data: {json.dumps(chunk)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:  # the client went away (the generator is closed) or it is done
                    rows.cancel()
            s.metrics.request(200)
            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        async def collect():
            while rows.open:
                i, tokens, finish = await rows.next()
                note_first(tokens)
                texts[i].add(tokens, finish)

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(collect()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():  # the client went away: free its slots
                work.cancel()
                rows.cancel()
        if not work.done() or work.cancelled():
            return PlainTextResponse("", status_code=499)
        if any(t.finish == "error" for t in texts):
            raise _engine_failed(s.core)
        s.metrics.request(200)
        return JSONResponse({
            "id": cid, "object": "text_completion", "created": created, "model": s.model_id,
            "choices": [{"text": t.text, "index": i, "logprobs": None, "finish_reason": t.finish} for i, t in enumerate(texts)],
            "usage": usage(),
        })

    async def not_found(request: HTTPRequest, exc):
        return _error_response(APIError(404, f"no route {request.method} {request.url.path}; see docs/serve.md",
                                        code="not_found"))

    async def bad_method(request: HTTPRequest, exc):
        return _error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    routes = [
        Route("/", playground, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/v1/models", guarded(models), methods=["GET"]),
        Route("/v1/completions", guarded(completions), methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: bad_method})


def _model_id(args) -> str:
    if args.model:
        return Path(args.model).name.split(".")[0]
    return args.model_name or args.run_name


def _available_memory() -> int | None:
    """Bytes this machine can still give without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_cache_fits(engine: Engine, max_batch: int, context: int | None) -> None:
    """Refuses, at startup, a CPU KV cache larger than the free memory: the cache is reserved when
    the first request arrives, where a failed allocation (or the OOM killer) would hit a client."""
    if engine.backend != "cpu":
        return
    c = engine.config
    positions = context or c.n_ctx
    # keys and values of every layer: bf16 entries for bf16 weights, else fp32 (the larger, to be safe)
    per_slot = 2 * c.n_layer * positions * c.n_embd * (2 if engine.dtype == "bf16" else 4)
    free = _available_memory()
    if free is not None and max_batch * per_slot > free:
        raise ValueError(f"--max-batch {max_batch} x --context {positions} needs a KV cache of {max_batch * per_slot / 2**30:.1f} GiB, "
                         f"more than the {free / 2**30:.1f} GiB of memory free; use --max-batch {max(1, free // per_slot)} "
                         "or less, or a smaller --context")


def run_server(args) -> None:
    """``gpt_2_simple serve``: load the model, serve until SIGTERM / Ctrl-C (running requests finish first)."""
    try:
        import uvicorn
    except ImportError:
        raise RuntimeError("serve needs starlette and uvicorn: pip install 'gpt_2_simple[serve]'") from None
    from .generate import load_engine, model_source

    if args.max_batch < 1:
        raise ValueError(f"--max-batch must be >= 1, got {args.max_batch}")
    if args.max_queue is not None and args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.api_key is not None and not args.api_key:
        raise ValueError("--api-key must not be empty")
    source = args.model or model_source(None, run_name=args.run_name, checkpoint_dir=args.checkpoint_dir,
                                        model_name=args.model_name, model_dir=args.model_dir)
    engine, enc = load_engine(source, dtype=args.dtype, backend=args.backend, threads=args.threads)
    if args.context is not None and not 1 <= args.context <= engine.config.n_ctx:
        raise ValueError(f"--context must be in [1, {engine.config.n_ctx}] (the model's n_ctx), got {args.context}")
    check_cache_fits(engine, args.max_batch, args.context)
    app = build_app(engine, enc, model_id=_model_id(args), api_key=args.api_key, max_batch=args.max_batch,
                    max_queue=args.max_queue, context=args.context)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM / Ctrl-C: new requests get 503 while the running ones finish
            serve_state = getattr(app.state, "serve", None)
            if serve_state is not None:
                serve_state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            timeout_graceful_shutdown=None)
    server = Server(config)
    print(f"gpt_2_simple serve: {_model_id(args)} ({engine.device}, {args.max_batch} slots) on http://{args.host}:{args.port}/",
          flush=True)
    server.run()


def add_serve_args(p) -> None:
    """``gpt_2_simple serve``'s flags (cli.py registers the subcommand)."""
    p.add_argument("--run_name", default="run1", help="serve the newest checkpoint of --checkpoint_dir/<run_name> (default: run1)")
    p.add_argument("--checkpoint_dir", default="checkpoint", help="folder holding the runs (default: checkpoint)")
    p.add_argument("--model_name", default=None, help="serve the base model --model_dir/<name> (e.g. 124M) instead of a run")
    p.add_argument("--model_dir", default="models", help="folder holding downloaded base models (default: models)")
    p.add_argument("--model", default=None, metavar="FILE.bin", help="serve this exported model file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", dest="api_key", default=None, help="require 'Authorization: Bearer KEY' on every API request")
    p.add_argument("--max-batch", dest="max_batch", type=int, default=16, help="rows generated at once across all clients (default 16)")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=None, help="rows that may wait for a slot before 429 (default 4 x --max-batch)")
    p.add_argument("--context", type=int, default=None, help="KV-cache positions per row: prompt + max_tokens must fit (default: the model's n_ctx)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="engine weights (default: bf16, the faster)")
    p.add_argument("--backend", default="auto", choices=["auto", "cpu", "cuda"], help="engine backend (auto: CUDA when available)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--log-level", dest="log_level", default="info", choices=["critical", "error", "warning", "info", "debug"])
