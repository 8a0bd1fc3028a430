"""Any OpenAI-compatible server (llama.cpp's server, vLLM, ``instructune serve``, OpenAI):
``POST /v1/chat/completions``, ``POST /v1/completions`` (raw completion), ``GET /v1/models``.

Streamed answers are server-sent events: ``data: {json}`` lines whose ``choices[0]`` carries a
piece of the answer (``delta.content`` for chat, ``text`` for completions), ending with
``data: [DONE]``. The API key, when one is needed, comes from ``OPENAI_API_KEY`` only, and is
sent only over https or to a loopback address: plain http to another host would put it on the
network in clear text.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import urllib.parse

from instructune.llm.client import (
    LLMClient,
    LLMError,
    LLMSpec,
    RetryableError,
    ServerInfo,
    append_piece,
    loads_json,
)

OPENAI_HELP = (
    "Start an OpenAI-compatible server there (for example `llama-server -m MODEL.gguf "
    "--port 8000` or `vllm serve MODEL --port 8000`), or pass --url; the API key, if one is "
    "needed, is read from OPENAI_API_KEY."
)

API_KEY_ENV = "OPENAI_API_KEY"

# Ollama's option names -> OpenAI's request fields (the options OpenAI's API has).
_OPTION_NAMES = {
    "temperature": "temperature",
    "seed": "seed",
    "top_p": "top_p",
    "num_predict": "max_tokens",
    "stop": "stop",
}


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
        LLMError: the key is set and ``url`` is plain http to another host (checked before
            any connection is made).
    """
    if not os.environ.get(API_KEY_ENV):
        return
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" or is_loopback(parts.hostname or ""):
        return
    raise LLMError(
        f"{API_KEY_ENV} is set and --url {url} is plain http to {parts.hostname}, so the key "
        "would cross the network unencrypted; nothing was sent. Use an https:// URL, a "
        f"loopback address (127.0.0.1, localhost), or unset {API_KEY_ENV} for a server that "
        "needs no key"
    )


class OpenAIClient(LLMClient):
    """Any OpenAI-compatible server (chat completions and raw completions).

    ``url`` is the server's root (``/v1`` is appended) or may already end in ``/v1``.
    """

    help_text = OPENAI_HELP

    def __init__(self, spec: LLMSpec, **kwargs):
        if spec.url.endswith("/v1"):
            spec = LLMSpec(spec.backend, spec.model, spec.url[: -len("/v1")])
        check_key_destination(spec.url)
        super().__init__(spec, **kwargs)

    def request_options(self, extra: dict | None = None) -> dict:
        merged = {**self.gen_options, **(extra or {})}
        opts = {_OPTION_NAMES[k]: v for k, v in merged.items() if k in _OPTION_NAMES}
        if self.schema is not None:
            schema = dict(self.schema, additionalProperties=False)
            opts["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": self.schema_name, "strict": True, "schema": schema},
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
        # the listing is informative only: the requests decide.
        try:
            obj = json.loads(body.decode("utf-8")) if body else {}
        except (UnicodeDecodeError, json.JSONDecodeError):
            obj = {}
        data = obj.get("data") if isinstance(obj, dict) else None
        if isinstance(data, list):
            self.info.listed_models = [str(m.get("id")) for m in data if isinstance(m, dict)]
        return self.info

    def _client_error(self, status: int, text: str, what: str) -> LLMError:
        if status in (401, 403):
            return LLMError(
                f"{self.describe()} refused the API key (HTTP {status}: {text}): "
                "set OPENAI_API_KEY to a valid key"
            )
        return super()._client_error(status, text, what)

    def _chat_once(self, messages: list[dict], options: dict | None) -> str:
        payload = {"model": self.spec.model, "messages": messages}
        return self._post("/v1/chat/completions", payload, options, "chat", _chat_piece)

    def _complete_once(self, prompt: str, options: dict | None) -> str:
        payload = {"model": self.spec.model, "prompt": prompt}
        return self._post("/v1/completions", payload, options, "completion", _text_piece)

    def _post(self, path: str, payload: dict, options: dict | None, what: str, piece_of) -> str:
        payload.update(self.request_options(options))
        payload["stream"] = self.stream
        conn, resp = self._open("POST", path, payload)
        try:
            self._check_status(resp, f"{what} request")
            if not self.stream:
                obj = loads_json(self._read_all(resp), what)
                _raise_error(obj)
                self._remember(obj.get("model"), obj.get("system_fingerprint"))
                try:
                    return piece_of(obj["choices"][0], whole=True)
                except (KeyError, IndexError, TypeError, AttributeError) as exc:
                    raise RetryableError(f"unexpected {what} answer: {str(obj)[:120]!r}") from exc
            return self._read_events(resp, what, piece_of)
        finally:
            conn.close()

    def _read_events(self, resp, what: str, piece_of) -> str:
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
            obj = loads_json(data, f"{what} stream")
            _raise_error(obj)
            self._remember(obj.get("model"), obj.get("system_fingerprint"))
            for choice in obj.get("choices") or []:
                if not isinstance(choice, dict):
                    continue
                append_piece(pieces, total, piece_of(choice, whole=False))
                if choice.get("finish_reason"):
                    finished = True
        if finished:
            return "".join(pieces)  # some servers close without [DONE] after finish_reason
        raise RetryableError("the event stream ended before [DONE]")


def _raise_error(obj) -> None:
    if not isinstance(obj, dict):
        raise RetryableError(f"unexpected answer: {str(obj)[:120]!r}")
    if obj.get("error"):
        raise RetryableError(f"the server reported an error: {obj['error']}")


def _chat_piece(choice: dict, *, whole: bool) -> str:
    part = choice["message"] if whole else (choice.get("delta") or {})
    content = part.get("content") if isinstance(part, dict) else None
    return content if isinstance(content, str) else ""


def _text_piece(choice: dict, *, whole: bool) -> str:
    text = choice.get("text")
    return text if isinstance(text, str) else ""
