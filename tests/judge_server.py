"""A scripted judge server on 127.0.0.1 for the evaluation tests.

It speaks Ollama's ``/api/tags`` and ``/api/chat`` (NDJSON stream or one JSON object) and
OpenAI's ``/v1/models`` and ``/v1/chat/completions`` (server-sent events or one JSON object),
both streamed with HTTP/1.1 chunked transfer encoding as the real servers do.

What each chat request gets is scripted by its index (0, 1, 2, ...): a normal answer, a slow
one, garbage text, malformed JSON, an HTTP error, or a connection dropped mid-stream. The
normal answer's text comes from ``scorer(prompt)``. Every chat request is recorded, and the
server refuses (503) anything past ``max_requests`` so a runaway client cannot loop forever.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "llama3"
DIGEST = "365c0bd3c000a25d28ddbf732fe1c6add414de7275464c4e4d1c3b5fcb5d8ad1"
_RESPONSE = re.compile(r"score the model response `(.*)` on a scale from 0 to 100", re.S)


@dataclass(frozen=True)
class Reply:
    """What one chat request gets.

    kind: ``ok`` (answer ``text`` or the scorer's), ``garbage`` (a non-numeric answer),
    ``badjson`` (a stream line that is not JSON), ``error`` (HTTP ``status``), ``drop``
    (headers and one piece, then the socket is closed), ``stall`` (one piece, then ``delay``
    seconds of silence mid-stream). ``delay``: otherwise, seconds to wait before answering.
    """

    kind: str = "ok"
    text: str | None = None
    delay: float = 0.0
    status: int = 500


OK = Reply()
GARBAGE = Reply("garbage", text="The response is mostly correct but a bit short.")
BAD_JSON = Reply("badjson")
DROP = Reply("drop")


def error(status: int = 500) -> Reply:
    return Reply("error", status=status)


def slow(delay: float, text: str | None = None) -> Reply:
    return Reply("ok", text=text, delay=delay)


def response_in(prompt: str) -> str:
    """The model response quoted inside a book judge prompt."""
    match = _RESPONSE.search(prompt)
    return match.group(1) if match else prompt


def hash_scorer(prompt: str) -> str:
    """A deterministic score from the quoted response: ``sha256 % 101``."""
    return str(expected_score(response_in(prompt)))


def expected_score(response: str) -> int:
    return int(hashlib.sha256(response.encode("utf-8")).hexdigest(), 16) % 101


class JudgeServer:
    """A threaded HTTP server speaking the Ollama and OpenAI wire formats; use as a context
    manager. ``script`` is a list (request i gets ``script[i]``, then ``OK``) or a function
    ``(i, body) -> Reply``."""

    def __init__(
        self,
        *,
        scorer: Callable[[str], str] = hash_scorer,
        script: Sequence[Reply] | Callable[[int, dict], Reply] = (),
        models: Sequence[str] = (f"{MODEL}:latest",),
        digest: str = DIGEST,
        max_requests: int = 400,
        template: str | None = None,
    ):
        self.scorer = scorer
        self.script = script
        self.models = list(models)
        self.digest = digest
        self.max_requests = max_requests
        self.template = template  # what /api/show reports (None: 404, as for an unknown model)
        self.chat_requests: list[dict] = []
        self.other_requests: list[str] = []
        self.auth_headers: list[str | None] = []
        self.overflow = False
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle

    def __enter__(self) -> JudgeServer:
        handler = type("Handler", (_Handler,), {"judge": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopping.set()  # wakes handlers sleeping in a scripted delay
        assert self._httpd is not None and self._thread is not None
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._httpd is not None
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def prompts(self) -> list[str]:
        with self._lock:
            return [_prompt_of(r["body"]) for r in self.chat_requests]

    # -- scripting

    def _next(self, body: dict) -> Reply | None:
        with self._lock:
            index = len(self.chat_requests)
            self.chat_requests.append({"body": body, "time": time.monotonic()})
            if index >= self.max_requests:
                self.overflow = True
                return None
        if callable(self.script):
            return self.script(index, body)
        return self.script[index] if index < len(self.script) else OK


def _prompt_of(body: dict) -> str:
    """The text a request asks about: the last chat message, or a completion's prompt."""
    if "messages" in body:
        return body["messages"][-1]["content"]
    return body.get("prompt", "")


# Raw completions (Ollama /api/generate, OpenAI /v1/completions) carry their piece of the answer
# here instead of in a chat message.
_COMPLETION_PATHS = ("/api/generate", "/v1/completions")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    judge: JudgeServer

    def log_message(self, format, *args) -> None:  # keep test output quiet
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            pass  # the client hung up (a time-out, or it stopped reading after "done")

    def end_headers(self) -> None:
        # One request per connection, as the client does: no keep-alive reads left hanging.
        self.send_header("Connection", "close")
        self.close_connection = True
        super().end_headers()

    # -- helpers

    def _send_json(self, obj, status: int = 200) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _end_chunked(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")

    # -- routes

    def do_GET(self) -> None:
        self.judge.other_requests.append(self.path)
        if self.path == "/api/tags":
            models = [
                {"name": m, "model": m, "digest": self.judge.digest, "size": 4661224676}
                for m in self.judge.models
            ]
            self._send_json({"models": models})
        elif self.path == "/v1/models":
            data = [{"id": m, "object": "model", "owned_by": "test"} for m in self.judge.models]
            self._send_json({"object": "list", "data": data})
        else:
            self._send_json({"error": "not found"}, status=404)

    def do_POST(self) -> None:
        body = self._body()
        if self.path == "/api/show":
            if self.judge.template is None:
                self._send_json({"error": "model not found"}, status=404)
            else:
                self._send_json({"template": self.judge.template, "parameters": ""})
            return
        if self.path not in ("/api/chat", "/v1/chat/completions", *_COMPLETION_PATHS):
            self._send_json({"error": "not found"}, status=404)
            return
        self.judge.auth_headers.append(self.headers.get("Authorization"))
        reply = self.judge._next(body)
        if reply is None:
            self._send_json({"error": "request budget exhausted"}, status=503)
            return
        if reply.kind != "stall" and reply.delay and self.judge.stopping.wait(reply.delay):
            return
        try:
            if reply.kind == "error":
                self._send_json({"error": f"scripted HTTP {reply.status}"}, status=reply.status)
                return
            text = reply.text
            if text is None:
                text = self.judge.scorer(_prompt_of(body))
            if self.path in ("/api/chat", "/api/generate"):
                self._ollama(body, reply, text)
            else:
                self._openai(body, reply, text)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a time-out): nothing to answer

    def _ollama(self, body: dict, reply: Reply, text: str) -> None:
        model = body.get("model", MODEL)
        if body.get("stream", True) is False:
            if reply.kind == "drop":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "500")
                self.end_headers()
                self.wfile.write(b'{"model": "llama3", "mess')
                self._drop()
                return
            if reply.kind == "badjson":
                data = b"<html>proxy error</html>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                return
            self._send_json(
                {"model": model, **self._ollama_piece(text), "done": True, "done_reason": "stop"}
            )
            return
        self._start_chunked("application/x-ndjson")
        pieces = [text[i : i + 2] for i in range(0, len(text), 2)] or [""]
        for n, piece in enumerate(pieces):
            if reply.kind == "drop" and n == 1:
                self._drop()
                return
            if reply.kind == "badjson" and n == 0:
                self._chunk(b"this is not json\n")
            line = {"model": model, **self._ollama_piece(piece), "done": False}
            self._chunk(json.dumps(line).encode() + b"\n")
            if reply.kind == "stall" and n == 0 and self.judge.stopping.wait(reply.delay):
                return
        if reply.kind == "drop":  # a one-piece answer: drop before "done"
            self._drop()
            return
        final = {"model": model, **self._ollama_piece(""), "done": True, "done_reason": "stop"}
        self._chunk(json.dumps(final).encode() + b"\n")
        self._end_chunked()

    def _ollama_piece(self, text: str) -> dict:
        if self.path == "/api/generate":
            return {"response": text}
        return {"message": {"role": "assistant", "content": text}}

    def _openai_choice(self, text: str, *, whole: bool) -> dict:
        if self.path == "/v1/completions":
            return {"text": text}
        return {"message" if whole else "delta": {"role": "assistant", "content": text}}

    def _openai(self, body: dict, reply: Reply, text: str) -> None:
        model = body.get("model", MODEL)
        if not body.get("stream", False):
            if reply.kind in ("drop", "badjson"):
                self.send_response(200)
                self.send_header("Content-Length", "400")
                self.end_headers()
                self.wfile.write(b'{"id": "x", "choi')
                self._drop()
                return
            self._send_json(
                {
                    "id": "chatcmpl-test",
                    "object": "chat.completion",
                    "model": model,
                    "system_fingerprint": "fp_test",
                    "choices": [
                        {
                            "index": 0,
                            **self._openai_choice(text, whole=True),
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
            return
        self._start_chunked("text/event-stream")
        self._chunk(b": keep-alive comment\n\n")
        pieces = [text[i : i + 2] for i in range(0, len(text), 2)] or [""]
        for n, piece in enumerate(pieces):
            if reply.kind == "drop" and n == 1:
                self._drop()
                return
            if reply.kind == "badjson" and n == 0:
                self._chunk(b"data: {not json\n\n")
            event = {
                "id": "chatcmpl-test",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [
                    {"index": 0, **self._openai_choice(piece, whole=False), "finish_reason": None}
                ],
            }
            self._chunk(b"data: " + json.dumps(event).encode() + b"\n\n")
            if reply.kind == "stall" and n == 0 and self.judge.stopping.wait(reply.delay):
                return
        if reply.kind == "drop":
            self._drop()
            return
        last = {
            "id": "chatcmpl-test",
            "object": "chat.completion.chunk",
            "model": model,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
        self._chunk(b"data: " + json.dumps(last).encode() + b"\n\n")
        self._chunk(b"data: [DONE]\n\n")
        self._end_chunked()
