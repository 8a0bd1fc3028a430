"""Any OpenAI-compatible ``POST /v1/chat/completions`` (llama.cpp's server, vLLM, OpenAI).

Streamed answers are server-sent events: ``data: {json}`` lines whose ``choices[0].delta``
carries a piece of the content, ending with ``data: [DONE]``. The API key, when one is needed,
comes from ``OPENAI_API_KEY`` only, and is sent only over https or to a loopback address:
plain http to another host would put it on the network in clear text.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import urllib.parse

from instructune.evaluation.clients import (
    JudgeClient,
    JudgeError,
    JudgeSpec,
    RetryableError,
    ServerInfo,
    append_piece,
    loads_json,
)
from instructune.evaluation.prompt import BOOK_OPTIONS, SCORE_SCHEMA

OPENAI_HELP = (
    "Start an OpenAI-compatible server there (for example `llama-server -m MODEL.gguf "
    "--port 8000` or `vllm serve MODEL --port 8000`), or pass --url; the API key, if one is "
    "needed, is read from OPENAI_API_KEY."
)


API_KEY_ENV = "OPENAI_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (127.0.0.0/8, ::1) or ``localhost``.

    Other names are not resolved (what a name resolves to can change), and ``0.0.0.0`` is not
    a loopback address even where connecting to it happens to reach this machine.
    """
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
    return (mapped or address).is_loopback


def check_key_destination(url: str) -> None:
    """Refuse to send ``OPENAI_API_KEY`` to ``url`` unless it is https or a loopback address.

    Raises:
        JudgeError: the key is set and ``url`` is plain http to another host (checked before
            any connection is made).
    """
    if not os.environ.get(API_KEY_ENV):
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or is_loopback(parts.hostname or ""):
        return
    raise JudgeError(
        f"{API_KEY_ENV} is set and --url {url} is plain http to {parts.hostname}, so the key "
        "would cross the network unencrypted; nothing was sent. Use an https:// URL, a "
        f"loopback address (127.0.0.1, localhost), or unset {API_KEY_ENV} for a server that "
        "needs no key"
    )


class OpenAIClient(JudgeClient):
    """Any OpenAI-compatible ``POST /v1/chat/completions`` (llama.cpp, vLLM, OpenAI itself).

    ``url`` is the server's root (``/v1`` is appended) or may already end in ``/v1``.
    """

    help_text = OPENAI_HELP

    def __init__(self, spec: JudgeSpec, **kwargs):
        if spec.url.endswith("/v1"):
            spec = JudgeSpec(spec.backend, spec.model, spec.url[: -len("/v1")])
        check_key_destination(spec.url)
        super().__init__(spec, **kwargs)

    @property
    def options(self) -> dict:
        opts: dict = {
            "temperature": BOOK_OPTIONS["temperature"],
            "seed": BOOK_OPTIONS["seed"],
        }
        if self.structured:
            schema = dict(SCORE_SCHEMA, additionalProperties=False)
            opts["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "judge_score", "strict": True, "schema": schema},
            }
        return opts

    def _headers(self) -> dict:
        headers = super()._headers()
        key = os.environ.get(API_KEY_ENV)
        if key:
            check_key_destination(self.spec.url)  # the key may have been set since __init__
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def probe(self) -> ServerInfo:
        def listing() -> tuple[int, bytes]:
            conn, resp = self._open("GET", "/v1/models", None)
            try:
                if resp.status >= 500:
                    raise RetryableError(f"HTTP {resp.status} {resp.reason}")
                return resp.status, resp.read() if resp.status == 200 else b""
            except (OSError, http.client.HTTPException) as exc:
                raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                conn.close()

        status, body = self._with_retries(
            "model listing (/v1/models)", listing, retry_refused=False
        )
        if status in (401, 403):
            raise self._client_error(status, "", "model listing")
        # Not every server lists models (or lists the one it serves under another name), so
        # the listing is informative only: the chat requests decide.
        try:
            obj = json.loads(body.decode("utf-8")) if body else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = {}
        data = obj.get("data") if isinstance(obj, dict) else None
        if isinstance(data, list):
            self.info.listed_models = [str(m.get("id")) for m in data if isinstance(m, dict)]
        return self.info

    def _client_error(self, status: int, text: str, what: str) -> JudgeError:
        if status in (401, 403):
            return JudgeError(
                f"{self.describe()} refused the API key (HTTP {status}: {text}): "
                "set OPENAI_API_KEY to a valid key"
            )
        return super()._client_error(status, text, what)

    def _chat_once(self, prompt: str) -> str:
        payload = {"model": self.spec.model, "messages": [{"role": "user", "content": prompt}]}
        payload.update(self.options)
        payload["stream"] = self.stream
        conn, resp = self._open("POST", "/v1/chat/completions", payload)
        try:
            self._check_status(resp, "chat request")
            if not self.stream:
                obj = loads_json(self._read_all(resp), "chat")
                self._raise_error(obj)
                self._remember(obj.get("model"), obj.get("system_fingerprint"))
                try:
                    content = obj["choices"][0]["message"].get("content")
                except (KeyError, IndexError, TypeError, AttributeError) as exc:
                    raise RetryableError(f"unexpected chat answer: {str(obj)[:120]!r}") from exc
                return content if isinstance(content, str) else ""
            return self._read_events(resp)
        finally:
            conn.close()

    def _read_events(self, resp) -> str:
        pieces: list[str] = []
        total = [0]
        finished = False
        for line in self._lines(resp):
            if not line or line.startswith(":"):
                continue  # event separator or SSE comment (keep-alive)
            if not line.startswith("data:"):
                continue  # other SSE fields (event:, id:, retry:) carry nothing we need
            data = line[len("data:") :].strip()
            if data == "[DONE]":
                return "".join(pieces)
            obj = loads_json(data, "chat stream")
            self._raise_error(obj)
            self._remember(obj.get("model"), obj.get("system_fingerprint"))
            for choice in obj.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content")
                if isinstance(piece, str):
                    append_piece(pieces, total, piece)
                if choice.get("finish_reason"):
                    finished = True
        if finished:
            return "".join(pieces)  # some servers close without [DONE] after finish_reason
        raise RetryableError("the event stream ended before [DONE]")

    @staticmethod
    def _raise_error(obj) -> None:
        if not isinstance(obj, dict):
            raise RetryableError(f"unexpected chat answer: {str(obj)[:120]!r}")
        if obj.get("error"):
            raise RetryableError(f"the server reported an error: {obj['error']}")
