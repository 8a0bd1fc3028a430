"""Ollama's native API: ``POST /api/chat``, ``POST /api/generate`` (``raw`` for completions),
``GET /api/tags`` (the pulled models with their digests), ``POST /api/show`` (the template).

Ollama streams one JSON object per line (NDJSON), each with a piece of the answer
(``message.content`` for chat, ``response`` for generate), until an object with ``"done": true``.
"""

from __future__ import annotations

from instructune.llm.client import (
    LLMClient,
    LLMError,
    RetryableError,
    ServerInfo,
    append_piece,
    loads_json,
)

OLLAMA_HELP = (
    "Start Ollama with `ollama serve` (or the desktop app) and pull the model with "
    "`ollama pull {model}`; pass --url if it listens elsewhere."
)


class OllamaClient(LLMClient):
    """Ollama's native API (``/api/chat`` and raw ``/api/generate``)."""

    help_text = OLLAMA_HELP

    def request_options(self, extra: dict | None = None) -> dict:
        opts: dict = {"options": {**self.gen_options, **(extra or {})}}
        if self.schema is not None:
            opts["format"] = self.schema
        return opts

    def probe(self) -> ServerInfo:
        tags = self._with_retries(
            "model listing (/api/tags)",
            lambda: self._request_json("GET", "/api/tags", None, "model listing"),
            retry_refused=False,
        )
        models = tags.get("models") if isinstance(tags, dict) else None
        if not isinstance(models, list):
            raise LLMError(f"{self.describe()}: /api/tags did not list models; is it Ollama?")
        names = [str(m.get("name") or m.get("model")) for m in models if isinstance(m, dict)]
        self.info.listed_models = names
        wanted = self.spec.model
        full = wanted if ":" in wanted else f"{wanted}:latest"
        for entry in models:
            if isinstance(entry, dict) and (entry.get("name") or entry.get("model")) in (
                wanted,
                full,
            ):
                self.info.digest = entry.get("digest")
                self.info.reported_model = entry.get("name") or entry.get("model")
                return self.info
        have = ", ".join(names) or "none"
        raise LLMError(
            f"Ollama at {self.spec.url} has no model {wanted!r} (it has: {have}). "
            f"Pull it with `ollama pull {wanted}`."
        )

    def chat_template(self) -> str | None:
        obj = self._with_retries(
            "model details (/api/show)",
            lambda: self._request_json(
                "POST", "/api/show", {"model": self.spec.model}, "model details"
            ),
        )
        template = obj.get("template") if isinstance(obj, dict) else None
        return template if isinstance(template, str) and template else None

    def _client_error(self, status: int, text: str, what: str) -> LLMError:
        if status == 404 and "not found" in text.lower():
            return LLMError(
                f"Ollama at {self.spec.url}: {text}. Pull the model with "
                f"`ollama pull {self.spec.model}`."
            )
        return super()._client_error(status, text, what)

    def _chat_once(self, messages: list[dict], options: dict | None) -> str:
        payload = {"model": self.spec.model, "messages": messages}
        return self._post("/api/chat", payload, options, "chat", _chat_piece)

    def _complete_once(self, prompt: str, options: dict | None) -> str:
        # raw: Ollama applies no template, so the prompt reaches the model exactly as given.
        payload = {"model": self.spec.model, "prompt": prompt, "raw": True}
        return self._post("/api/generate", payload, options, "completion", _generate_piece)

    def _post(self, path: str, payload: dict, options: dict | None, what: str, piece_of) -> str:
        payload.update(self.request_options(options))
        payload["stream"] = self.stream
        conn, resp = self._open("POST", path, payload)
        try:
            self._check_status(resp, f"{what} request")
            if not self.stream:
                obj = loads_json(self._read_all(resp), what)
                _raise_error(obj)
                self._remember(obj.get("model"))
                return piece_of(obj)
            pieces: list[str] = []
            total = [0]
            for line in self._lines(resp):
                if not line:
                    continue
                obj = loads_json(line, f"{what} stream")
                _raise_error(obj)
                append_piece(pieces, total, piece_of(obj))
                if obj.get("done"):
                    self._remember(obj.get("model"))
                    return "".join(pieces)
            raise RetryableError("the stream ended before Ollama said it was done")
        finally:
            conn.close()


def _raise_error(obj) -> None:
    if not isinstance(obj, dict):
        raise RetryableError(f"unexpected answer: {str(obj)[:120]!r}")
    if obj.get("error"):
        raise RetryableError(f"Ollama reported an error: {obj['error']}")


def _chat_piece(obj: dict) -> str:
    message = obj.get("message") or {}
    content = message.get("content", "") if isinstance(message, dict) else ""
    return content if isinstance(content, str) else ""


def _generate_piece(obj: dict) -> str:
    text = obj.get("response", "")
    return text if isinstance(text, str) else ""
