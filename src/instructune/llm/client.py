"""The project's one LLM client: any Ollama-style or OpenAI-compatible server, torch-free.

The backends are ``ollama.py`` (``/api/chat``, ``/api/generate``) and ``openai.py``
(``/v1/chat/completions``, ``/v1/completions``). Both speak HTTP through the standard library
(``http.client``) and read streamed answers as they arrive: Ollama sends one JSON object per
line (NDJSON) until ``"done": true``; OpenAI's servers send server-sent events (``data: {...}``
lines) until ``data: [DONE]``.

Failures split in two. Connection errors, time-outs, dropped streams, malformed answers and
HTTP 5xx/429 are retried with exponential back-off (the server may come back); anything else
(an unknown model, a refused API key) raises :class:`LLMError` at once, saying what to do.

Generation options are given in Ollama's vocabulary (``temperature``, ``seed``, ``top_p``,
``num_predict``, ``num_ctx``, ``stop``); the OpenAI client maps the ones its API has.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from instructune.errors import InstructuneError

BACKENDS = ("ollama", "openai")
DEFAULT_URLS = {"ollama": "http://127.0.0.1:11434", "openai": "http://127.0.0.1:8000"}
MAX_REPLY_CHARS = 65536  # far beyond any answer these commands ask for: a runaway stream
_MAX_BACKOFF = 30.0


class LLMError(InstructuneError):
    """The server refused a request in a way retrying cannot fix; the message says what to do."""


class LLMUnavailableError(LLMError):
    """Nothing answered at the server's address, or it kept failing after every retry."""


class RetryableError(Exception):
    """A failure worth another try (connection, time-out, 5xx, a broken stream); the clients
    raise it inside one attempt and :meth:`LLMClient._with_retries` catches it."""

    def __init__(self, message: str, *, refused: bool = False, timed_out: bool = False):
        super().__init__(message)
        self.refused = refused
        self.timed_out = timed_out


@dataclass(frozen=True)
class LLMSpec:
    """Which model to ask: ``backend`` ("ollama" | "openai"), ``model`` and base ``url``."""

    backend: str
    model: str
    url: str

    @property
    def label(self) -> str:
        return f"{self.backend}:{self.model}"


def parse_llm(text: str, url: str | None = None, *, flag: str = "--llm") -> LLMSpec:
    """``"ollama:llama3"`` or ``"openai:MODEL"`` (plus an optional URL) -> :class:`LLMSpec`.

    Without a URL, Ollama is looked for at http://127.0.0.1:11434 (its default) and an
    OpenAI-compatible server at http://127.0.0.1:8000 (vLLM's default port). ``flag`` names
    the option in error messages (``--judge`` for ``evaluate``).
    """
    backend, sep, model = text.partition(":")
    backend = backend.strip().lower()
    if not sep or backend not in BACKENDS or not model.strip():
        raise InstructuneError(
            f"{flag} {text!r}: expected 'ollama:MODEL' or 'openai:MODEL' (e.g. ollama:llama3)"
        )
    base = (url or DEFAULT_URLS[backend]).rstrip("/")
    parts = urllib.parse.urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InstructuneError(f"--url {base!r}: expected http://HOST:PORT or https://HOST")
    return LLMSpec(backend=backend, model=model.strip(), url=base)


@dataclass
class ServerInfo:
    """What the server says about itself, recorded in result files and cache keys."""

    digest: str | None = None  # Ollama's model digest (sha256), when it reports one
    reported_model: str | None = None  # the model name the server puts in its answers
    fingerprint: str | None = None  # OpenAI's system_fingerprint, when sent
    listed_models: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "digest": self.digest,
            "reported_model": self.reported_model,
            "system_fingerprint": self.fingerprint,
        }


@dataclass
class RequestStats:
    """Requests sent and failed tries retried, for progress lines (updated under a lock)."""

    requests: int = 0
    retries: int = 0


class LLMClient:
    """Shared plumbing of both backends: one connection per request, retries, time-outs.

    Args:
        spec: which server and model.
        options: generation options (Ollama's names); a request may add its own on top.
        schema: a JSON schema the reply must follow (the server's structured output), or None;
            ``schema_name`` names it where the API wants a name (OpenAI's ``json_schema``).
        timeout: seconds to wait for the server's next bytes before giving up on a request
            (a whole request is also abandoned after ten times this).
        retries: further tries after a retryable failure; back-off starts at ``backoff``
            seconds and doubles (capped at 30 s).
        stream: read the answer as it streams or ask for it in one piece.
    """

    help_text = ""

    def __init__(
        self,
        spec: LLMSpec,
        *,
        options: dict | None = None,
        schema: dict | None = None,
        schema_name: str = "reply",
        timeout: float = 120.0,
        retries: int = 4,
        backoff: float = 1.0,
        stream: bool = True,
    ):
        self.spec = spec
        self.gen_options = dict(options or {})
        self.schema = schema
        self.schema_name = schema_name
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.stream = stream
        self.info = ServerInfo()
        self.stats = RequestStats()
        self._lock = threading.Lock()

    # -- the public surface

    @property
    def options(self) -> dict:
        """What every chat request sends besides the messages and ``stream`` (recorded, and
        part of the cache key)."""
        return self.request_options()

    def request_options(self, extra: dict | None = None) -> dict:
        """The wire options of one request: the client's options with ``extra`` on top."""
        raise NotImplementedError

    def probe(self) -> ServerInfo:
        """Check that the server answers (and, for Ollama, knows the model); fills ``info``."""
        raise NotImplementedError

    def chat(self, prompt: str | list[dict], options: dict | None = None) -> str:
        """Send one user message (or a whole message list); return the whole reply text."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self._with_retries("chat request", lambda: self._chat_once(messages, options))

    def complete(self, prompt: str, options: dict | None = None) -> str:
        """Raw completion: ``prompt`` goes to the model as it is, no chat template applied."""
        return self._with_retries(
            "completion request", lambda: self._complete_once(prompt, options)
        )

    def chat_template(self) -> str | None:
        """The served model's chat template as the server reports it, or None if it cannot."""
        return None

    def describe(self) -> str:
        return f"{self.spec.label} at {self.spec.url}"

    # -- plumbing

    def _chat_once(self, messages: list[dict], options: dict | None) -> str:
        raise NotImplementedError

    def _complete_once(self, prompt: str, options: dict | None) -> str:
        raise NotImplementedError

    def _help(self) -> str:
        return self.help_text.format(model=self.spec.model)

    def _with_retries(self, what: str, attempt_fn, *, retry_refused: bool = True):
        delay = self.backoff
        last: RetryableError | None = None
        for attempt in range(self.retries + 1):
            with self._lock:
                self.stats.requests += 1
                if attempt:
                    self.stats.retries += 1
            try:
                return attempt_fn()
            except RetryableError as exc:
                last = exc
                if exc.refused and not retry_refused:
                    break
            if attempt < self.retries:
                time.sleep(delay)
                delay = min(delay * 2, _MAX_BACKOFF)
        assert last is not None
        if last.refused:
            raise LLMUnavailableError(
                f"nothing is listening at {self.spec.url} ({self.spec.label}). {self._help()}"
            )
        hint = (
            f" Raise --timeout (now {self.timeout:g} s) if the server is just slow."
            if last.timed_out
            else ""
        )
        raise LLMUnavailableError(
            f"{self.describe()}: the {what} failed after {self.retries + 1} tries; last error: "
            f"{last}.{hint}"
        )

    def _headers(self) -> dict:
        return {"Content-Type": "application/json", "Accept": "*/*"}

    def _open(self, method: str, path: str, payload: dict | None):
        """Send one request; return (connection, response), mapping failures to retryable ones."""
        parts = urllib.parse.urlsplit(self.spec.url)
        conn_cls = (
            http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        )
        conn = conn_cls(parts.hostname, parts.port, timeout=self.timeout)
        body = None if payload is None else json.dumps(payload).encode("utf-8")
        try:
            conn.request(method, parts.path.rstrip("/") + path, body=body, headers=self._headers())
            resp = conn.getresponse()
        except ConnectionRefusedError as exc:
            conn.close()
            raise RetryableError(f"connection refused ({exc})", refused=True) from exc
        except TimeoutError as exc:
            conn.close()
            raise RetryableError(f"no answer within {self.timeout:g} s", timed_out=True) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise RetryableError(f"{type(exc).__name__}: {exc}") from exc
        return conn, resp

    def _error_text(self, resp) -> str:
        try:
            raw = resp.read(4096).decode("utf-8", "replace")
        except (OSError, http.client.HTTPException):
            return ""
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return raw.strip()
        err = obj.get("error") if isinstance(obj, dict) else None
        if isinstance(err, dict):
            return str(err.get("message") or err)
        return str(err or raw).strip()

    def _check_status(self, resp, what: str) -> None:
        if resp.status < 400:
            return
        text = self._error_text(resp)
        if resp.status >= 500 or resp.status in (408, 429):
            raise RetryableError(f"HTTP {resp.status} {resp.reason}: {text}".rstrip(": "))
        raise self._client_error(resp.status, text, what)

    def _client_error(self, status: int, text: str, what: str) -> LLMError:
        return LLMError(f"{self.describe()} refused the {what}: HTTP {status}: {text}")

    def _request_json(self, method: str, path: str, payload: dict | None, what: str) -> dict:
        conn, resp = self._open(method, path, payload)
        try:
            self._check_status(resp, what)
            return loads_json(self._read_all(resp), what)
        finally:
            conn.close()

    def _read_all(self, resp) -> str:
        try:
            return resp.read().decode("utf-8")
        except TimeoutError as exc:
            raise RetryableError(f"no answer within {self.timeout:g} s", timed_out=True) from exc
        except (OSError, http.client.HTTPException, UnicodeDecodeError) as exc:
            raise RetryableError(f"answer cut short ({type(exc).__name__}: {exc})") from exc

    def _lines(self, resp):
        """Yield the decoded lines of a streamed answer, enforcing the time-outs."""
        deadline = time.monotonic() + 10 * self.timeout
        while True:
            try:
                raw = resp.readline()
            except TimeoutError as exc:
                raise RetryableError(
                    f"the stream stalled for {self.timeout:g} s", timed_out=True
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                raise RetryableError(f"stream cut short ({type(exc).__name__}: {exc})") from exc
            if not raw:
                return
            if time.monotonic() > deadline:
                raise RetryableError(
                    f"the answer took more than {10 * self.timeout:g} s", timed_out=True
                )
            try:
                yield raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise RetryableError(f"undecodable stream ({exc})") from exc

    def _remember(self, model: str | None = None, fingerprint: str | None = None) -> None:
        with self._lock:
            if model:
                self.info.reported_model = model
            if fingerprint:
                self.info.fingerprint = fingerprint


def loads_json(text: str, what: str):
    """Parse JSON from the server; malformed JSON is a retryable failure."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RetryableError(
            f"malformed JSON in the {what} answer ({exc}): {text[:120]!r}"
        ) from exc


def append_piece(pieces: list[str], total: list[int], piece: str) -> None:
    """Collect one streamed piece, refusing replies that grow without bound."""
    pieces.append(piece)
    total[0] += len(piece)
    if total[0] > MAX_REPLY_CHARS:
        raise RetryableError(f"the reply grew past {MAX_REPLY_CHARS} characters")


def make_client(spec: LLMSpec, **kwargs) -> LLMClient:
    """The client for ``spec.backend`` (keyword arguments as for :class:`LLMClient`)."""
    # Imported here: the backends subclass LLMClient, so they import this module.
    if spec.backend == "ollama":
        from instructune.llm.ollama import OllamaClient

        return OllamaClient(spec, **kwargs)
    from instructune.llm.openai import OpenAIClient

    return OpenAIClient(spec, **kwargs)
