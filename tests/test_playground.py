"""The web playground at `/` in a real headless browser (Debian's chromium, driven by Playwright
over CDP): type a prompt, generate, see the text stream in (equal to the PyTorch reference for
greedy), stop a long generation (its row is cancelled on the server). Skips when no browser is
installed; .ci/run installs one and fails if this test was skipped."""

from __future__ import annotations

import os
import shutil
import time

import pytest

pytest.importorskip("starlette")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from gpt_2_simple.engine import Request  # noqa: E402
from gpt_2_simple.export import read_tokenizer  # noqa: E402
from gpt_2_simple.torch_generate import generate_tokens  # noqa: E402
from serve_helpers import Server, serve_model  # noqa: E402

CHROMIUM = os.environ.get("GPT2S_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]

pytestmark = pytest.mark.skipif(not os.path.isfile(CHROMIUM),
                                reason=f"no chromium browser at {CHROMIUM} (apt-get install chromium, or set GPT2S_CHROMIUM)")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = tmp_path_factory.mktemp("playground")
    model, path = serve_model(folder)
    server = Server(path, "--max-batch", "4", log_path=folder / "server.log")
    yield model, read_tokenizer(path), server
    server.close()


@pytest.fixture(scope="module")
def page(served):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        requested = []
        page.on("request", lambda r: requested.append(r.url))
        page.goto(served[2].base + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('served')", timeout=30000)
        yield page
        assert all(url.startswith(served[2].base) for url in requested), requested  # nothing from a CDN
        browser.close()


def _set(page, **fields):
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def test_generate_streams_the_greedy_text(served, page):
    model, enc, _ = served
    _set(page, prompt="The quick brown fox", temperature=0, top_k=0, top_p=1, max_tokens=40, seed=7)
    page.click("#generate")
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=60000)
    ids = enc.encode("The quick brown fox")
    expected = enc.decode(generate_tokens(model, [Request(ids, 40, temperature=0.0, stop_ids=[enc.eot_token])])[0].tokens)
    assert page.text_content("#generated") == expected
    assert page.text_content("#output") == "The quick brown fox" + expected
    assert "tokens in" in page.text_content("#status")


def test_text_streams_in_and_stop_cancels(served, page):
    server = served[2]
    before = server.metrics()
    _set(page, prompt="Once upon a time", temperature=1.0, top_k=40, top_p=0.9, max_tokens=1000, seed="")
    page.click("#generate")
    lengths = []
    deadline = time.monotonic() + 30
    while len(set(n for n in lengths if n > 0)) < 3:  # the text grows while the request runs
        assert time.monotonic() < deadline, f"no streamed text: {lengths}"
        lengths.append(len(page.text_content("#generated")))
        time.sleep(0.02)
    assert page.text_content("#status") == "generating..." and page.is_enabled("#stop")
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=10000)
    assert page.is_enabled("#generate") and not page.is_enabled("#stop")
    deadline = time.monotonic() + 30
    while server.metrics()["gpt2s_running_rows"] > 0:
        assert time.monotonic() < deadline, "the stopped row kept running"
        time.sleep(0.05)
    after = server.metrics()
    assert after["gpt2s_cancelled_rows_total"] - before["gpt2s_cancelled_rows_total"] == 1
    assert after["gpt2s_generated_tokens_total"] - before["gpt2s_generated_tokens_total"] < 1000
    shown = page.text_content("#generated")
    time.sleep(0.3)
    assert page.text_content("#generated") == shown  # nothing arrives after the stop
