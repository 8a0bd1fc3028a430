"""A JSONL cache of LLM replies, so an interrupted run resumes and a re-run costs nothing.

One line per answered request, appended, flushed and synced as soon as the server has answered:
``{"key": ..., **value, **context}``. The key is the sha256 of the backend, the model (with the
digest the server reports, when it reports one), the request's options, a caller's version tag
and the sha256 of the prompt; change any of these and the old lines simply stop matching. A line
cut short by a crash (the last one) is cut off the file before anything is appended; other
unreadable lines are skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def request_key(
    *, backend: str, model: str, digest: str | None, options: dict, version: str, prompt: str
) -> str:
    """The cache key of one request (a sha256 hex digest); ``prompt`` may be any text that
    identifies what was sent (a chat message, a raw completion prompt, a JSON of messages)."""
    ident = {
        "backend": backend,
        "model": model,
        "digest": digest,
        "options": options,
        "prompt_version": version,
        "prompt_sha256": sha256_text(prompt),
    }
    return sha256_text(json.dumps(ident, sort_keys=True, separators=(",", ":")))


def client_key(client, prompt: str, *, version: str, options: dict | None = None) -> str:
    """:func:`request_key` for a probed client and the per-request ``options``."""
    return request_key(
        backend=client.spec.backend,
        model=client.spec.model,
        digest=client.info.digest,
        options=client.request_options(options),
        version=version,
        prompt=prompt,
    )


class JsonlCache:
    """Cached values (dicts) on disk, keyed by :func:`request_key`; safe to share between
    threads. ``parse(obj)`` turns one line's object into a value, or None if it is not one."""

    def __init__(self, path: str | os.PathLike, parse: Callable[[dict], object] | None = None):
        self.path = Path(path)
        self._parse_value = parse or (lambda obj: obj)
        self._entries: dict[str, object] = {}
        self._lock = threading.Lock()
        self.skipped_lines = 0
        self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str):
        return self._entries.get(key)

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        *complete, partial = data.split(b"\n")  # ``partial``: bytes after the last newline
        for number, raw in enumerate(complete, start=1):
            if not raw.strip():
                continue
            entry = self._parse(raw)
            if entry is None:
                self.skipped_lines += 1
                warnings.warn(
                    f"{self.path}: line {number} is not a cache entry; skipped", stacklevel=3
                )
                continue
            self._entries[entry[0]] = entry[1]
        if partial.strip():
            entry = self._parse(partial)
            if entry is not None:  # a whole line that only lacks its newline (hand-edited)
                self._entries[entry[0]] = entry[1]
                with open(self.path, "ab") as f:
                    f.write(b"\n")
                return
        if partial:
            # A crash mid-write left a partial last line: cut it so appends start cleanly.
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(partial))

    def _parse(self, raw: bytes) -> tuple[str, object] | None:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("key"), str):
            return None
        try:
            value = self._parse_value(obj)
        except (KeyError, TypeError, ValueError):
            return None
        return None if value is None else (obj["key"], value)

    def put(self, key: str, value, fields: dict, **context) -> None:
        """Record ``value`` (whose JSON form is ``fields``): in memory, and as one appended,
        flushed and synced line."""
        line = json.dumps({"key": key, **fields, **context}, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._entries[key] = value


def _reply_of(obj: dict) -> str | None:
    reply = obj.get("reply")
    return reply if isinstance(reply, str) else None


class ReplyCache(JsonlCache):
    """Raw reply texts: what the data commands cache (``{"key", "reply", ...}`` lines)."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, _reply_of)

    def put_reply(self, key: str, reply: str, **context) -> None:
        self.put(key, reply, {"reply": reply}, **context)


def cached_call(cache: ReplyCache | None, key: str, call: Callable[[], str], **context) -> str:
    """``call()``'s reply, served from ``cache`` when there and recorded there when new."""
    if cache is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit
    reply = call()
    if cache is not None:
        cache.put_reply(key, reply, **context)
    return reply
