"""Ollama's native chat API (``POST /api/chat``): the book's judge set-up.

Ollama streams one JSON object per line (NDJSON), each with a piece of ``message.content``,
until an object with ``"done": true``; ``/api/tags`` lists the pulled models with their digests.
"""

from __future__ import annotations

from instructune.evaluation.clients import (
    JudgeClient,
    JudgeError,
    RetryableError,
    ServerInfo,
    append_piece,
    loads_json,
)
from instructune.evaluation.prompt import BOOK_OPTIONS, SCORE_SCHEMA

OLLAMA_HELP = (
    "Start Ollama with `ollama serve` (or the desktop app) and pull the judge with "
    "`ollama pull {model}`; pass --url if it listens elsewhere."
)


class OllamaClient(JudgeClient):
    """Ollama's native chat API (``POST /api/chat``), the book's judge set-up."""

    help_text = OLLAMA_HELP

    @property
    def options(self) -> dict:
        opts: dict = {"options": dict(BOOK_OPTIONS)}
        if self.structured:
            opts["format"] = SCORE_SCHEMA
        return opts

    def probe(self) -> ServerInfo:
        tags = self._with_retries(
            "model listing (/api/tags)",
            lambda: self._request_json("GET", "/api/tags", None, "model listing"),
            retry_refused=False,
        )
        models = tags.get("models") if isinstance(tags, dict) else None
        if not isinstance(models, list):
            raise JudgeError(f"{self.describe()}: /api/tags did not list models; is it Ollama?")
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
        raise JudgeError(
            f"Ollama at {self.spec.url} has no model {wanted!r} (it has: {have}). "
            f"Pull it with `ollama pull {wanted}`."
        )

    def _client_error(self, status: int, text: str, what: str) -> JudgeError:
        if status == 404 and "not found" in text.lower():
            return JudgeError(
                f"Ollama at {self.spec.url}: {text}. Pull the model with "
                f"`ollama pull {self.spec.model}`."
            )
        return super()._client_error(status, text, what)

    def _chat_once(self, prompt: str) -> str:
        payload = {"model": self.spec.model, "messages": [{"role": "user", "content": prompt}]}
        payload.update(self.options)
        payload["stream"] = self.stream
        conn, resp = self._open("POST", "/api/chat", payload)
        try:
            self._check_status(resp, "chat request")
            if not self.stream:
                obj = loads_json(self._read_all(resp), "chat")
                self._raise_stream_error(obj)
                self._remember(obj.get("model"))
                return _ollama_content(obj)
            pieces: list[str] = []
            total = [0]
            for line in self._lines(resp):
                if not line:
                    continue
                obj = loads_json(line, "chat stream")
                self._raise_stream_error(obj)
                append_piece(pieces, total, _ollama_content(obj))
                if obj.get("done"):
                    self._remember(obj.get("model"))
                    return "".join(pieces)
            raise RetryableError("the stream ended before Ollama said it was done")
        finally:
            conn.close()

    @staticmethod
    def _raise_stream_error(obj) -> None:
        if isinstance(obj, dict) and obj.get("error"):
            raise RetryableError(f"Ollama reported an error: {obj['error']}")


def _ollama_content(obj) -> str:
    if not isinstance(obj, dict):
        raise RetryableError(f"unexpected chat answer: {str(obj)[:120]!r}")
    message = obj.get("message") or {}
    content = message.get("content", "") if isinstance(message, dict) else ""
    return content if isinstance(content, str) else ""
