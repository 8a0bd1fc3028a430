"""The chat page at ``/``, driven in a real headless browser: Debian's ``chromium`` through
``playwright`` (pointed at it with ``executable_path``; playwright's own browser downloads are
not used). The page talks to a real uvicorn server on 127.0.0.1 serving tiny random models.

Without ``playwright`` or a ``chromium`` binary the browser tests skip with the reason;
``.ci/run`` installs ``chromium`` when it can, so they run in CI. Every wait is on a DOM or
server condition, never a sleep.
"""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest
import torch
from helpers import Server

from instructune.checkpoints import save_model
from instructune.data.prompts import prompt_format_for
from instructune.models import build_model, get_config
from instructune.serving.app import STATIC, create_app
from instructune.serving.models import ModelRegistry, load_served
from instructune.tokenization import load_tokenizer

TINY = dict(n_layers=2, emb_dim=32, n_heads=2, hidden_dim=64, context_length=256)
# Greedy, so the page's answer can be compared with the server's own.
GREEDY = {"temperature": "0", "repeat_penalty": "1"}
STOP_AFTER = 3  # model steps the gated model runs before it waits for the page's Stop


def _chromium() -> str | None:
    """The browser binary: ``INSTRUCTUNE_CHROMIUM``, else Debian's ``chromium`` on PATH."""
    named = os.environ.get("INSTRUCTUNE_CHROMIUM")
    if named:
        return named
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_the_page_and_its_files_are_served(served):
    page = httpx.get(f"{served.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Self-contained: every file it loads comes from this server, nothing from a CDN.
    assert "http://" not in page.text and "https://" not in page.text
    for name in ("chat.js", "chat.css"):
        r = httpx.get(f"{served.url}/static/{name}")
        assert r.status_code == 200 and r.text == (STATIC / name).read_text()
    missing = httpx.get(f"{served.url}/static/nothing.js")
    assert missing.status_code == 404 and "error" in missing.json()


@pytest.fixture(scope="module")
def gate():
    """Holds the ``gated`` model after ``STOP_AFTER`` model calls until the page's Stop has
    cancelled its request, so the Stop test never races the answer's end."""

    class Gate:
        blocked = threading.Event()  # the model is waiting: the answer is mid-stream
        requests: list = []  # what the page submitted to the gated model
        calls = 0

        def hook(self, module, args) -> None:
            self.calls += 1
            if self.calls != STOP_AFTER:
                return
            self.blocked.set()
            deadline = time.monotonic() + 30
            # Runs in the engine thread: waiting here holds only the gated model's engine.
            while not (self.requests and self.requests[-1].cancelled):
                if time.monotonic() > deadline:
                    raise AssertionError("the page's Stop never cancelled the request")
                time.sleep(0.005)

    return Gate()


@pytest.fixture(scope="module")
def served(tmp_path_factory, gate):
    """A server with two copies of one tiny GPT-2 (alpaca prompt format): ``tiny`` and
    ``gated`` (held mid-answer by ``gate``)."""
    torch.manual_seed(0)
    tok = load_tokenizer("gpt2")
    cfg = get_config("gpt2", **TINY)
    path = save_model(
        tmp_path_factory.mktemp("models") / "tiny",
        build_model(cfg),
        tok,
        cfg,
        prompt_format_for(tok, "alpaca"),
    )
    tiny = load_served("tiny", str(path), max_batch=2, max_queue=4)
    gated = load_served("gated", str(path), max_batch=2, max_queue=4)
    # Every model step (prefill or decode) embeds its input tokens once: the gate sits there.
    gated.loaded.model.tok_emb.register_forward_pre_hook(gate.hook)
    submit = gated.submit

    def recorded_submit(*args, **kwargs):
        request = submit(*args, **kwargs)
        gate.requests.append(request)
        return request

    gated.submit = recorded_submit
    with Server(create_app(ModelRegistry([tiny, gated]))) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
    )
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "no chromium browser: install Debian's (apt-get install chromium; .ci/run does so "
            "as root) or set INSTRUCTUNE_CHROMIUM to a Chromium binary"
        )
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(f"{served.url}/")
    page.wait_for_selector("body[data-ready=yes]")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def _settings(page, **values: str) -> None:
    for key, value in values.items():
        page.fill(f"#{key}", value)


def _say(page, text: str) -> None:
    page.fill("#message", text)
    page.press("#message", "Enter")


def _server_answer(url: str, model: str, messages: list[dict], n: int) -> str:
    options = {"temperature": 0, "repeat_penalty": 1, "num_predict": n}
    r = httpx.post(
        f"{url}/api/chat",
        json={"model": model, "messages": messages, "options": options, "stream": False},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["message"]["content"]


def test_send_streams_the_answer_and_reset_starts_over(page, served):
    picker = page.eval_on_selector_all("#model option", "options => options.map(o => o.value)")
    assert picker == ["tiny:latest", "gated:latest"]
    page.select_option("#model", "tiny:latest")
    _settings(page, **GREEDY, num_predict="12")

    _say(page, "Name a colour.")
    first = page.wait_for_selector("#log li.assistant[data-state=done]")
    answer = first.text_content()
    expected = _server_answer(
        served.url, "tiny", [{"role": "user", "content": "Name a colour."}], 12
    )
    assert answer == expected and answer
    # It arrived as NDJSON pieces, shown as they came (one per event).
    assert int(first.get_attribute("data-chunks")) > 1
    assert "tokens in" in page.text_content("#status")
    assert page.input_value("#message") == ""

    # A second turn sends the conversation so far: the answer is the server's for all of it.
    _say(page, "Another one?")
    page.wait_for_selector("#log li.assistant:nth-child(4)[data-state=done]")
    history = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Another one?"},
    ]
    second = page.text_content("#log li.assistant:nth-child(4)")
    assert second == _server_answer(served.url, "tiny", history, 12)
    assert page.evaluate("chat.messages.length") == 4

    page.click("#reset")
    page.wait_for_selector("#log li", state="detached")
    assert page.evaluate("chat.messages.length") == 0
    assert page.text_content("#status") == "New conversation."
    # A new conversation: the same first message gets the same first answer again.
    _say(page, "Name a colour.")
    again = page.wait_for_selector("#log li.assistant[data-state=done]")
    assert again.text_content() == answer
    assert page.locator("#log li").count() == 2


def test_stop_ends_the_answer_and_frees_its_row(page, served, gate):
    page.select_option("#model", "gated:latest")
    _settings(page, **GREEDY, num_predict="100")
    _say(page, "Count to a hundred.")
    page.wait_for_selector("#log li.assistant[data-state=streaming]")
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    assert gate.blocked.wait(15), "the answer never reached the model"

    page.click("#stop")
    stopped = page.wait_for_selector("#log li.assistant[data-state=stopped]")
    assert page.text_content("#status") == "Stopped."
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    # The partial answer stays in the conversation as the model's turn.
    assert page.evaluate("chat.messages.map(m => m.role)") == ["user", "assistant"]
    assert page.evaluate("chat.messages[1].content") == stopped.text_content()

    # The server saw the browser leave: the request ended "cancelled", well short of 100 tokens.
    [request] = gate.requests
    deadline = time.monotonic() + 15
    while request.finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)  # polling a condition, bounded: the engine finishes it on its next step
    assert request.finish_reason == "cancelled"
    health = httpx.get(f"{served.url}/health").json()["engines"]["gated"]
    assert health["running"] == 0 and health["cancelled"] == 1 and health["tokens"] < 100


def test_a_server_error_is_shown_and_the_message_kept(page):
    _settings(page, **GREEDY, num_predict="100000")  # more than the 256-token context holds
    _say(page, "Hello?")
    error = page.wait_for_selector("#error:not([hidden])")
    assert "num_predict" in error.text_content()
    assert page.locator("#log li").count() == 0
    assert page.input_value("#message") == "Hello?"
    assert page.is_enabled("#send")
