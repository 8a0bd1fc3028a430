"""A JSONL cache of judgements, so an interrupted run resumes and a re-run costs nothing.

One line per judgement, appended and flushed as soon as the judge has answered. The key is the
sha256 of the backend, the judge model (with the digest the server reports, when it reports
one), the options, the prompt version and the sha256 of the full prompt; change any of these and
the old lines simply stop matching. A line cut short by a crash (the last one) is dropped and
cut off the file before anything is appended; other unreadable lines are skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def judgement_key(
    *, backend: str, model: str, digest: str | None, options: dict, prompt_version: str, prompt: str
) -> str:
    """The cache key of one judgement (a sha256 hex digest)."""
    ident = {
        "backend": backend,
        "model": model,
        "digest": digest,
        "options": options,
        "prompt_version": prompt_version,
        "prompt_sha256": sha256_text(prompt),
    }
    return sha256_text(json.dumps(ident, sort_keys=True, separators=(",", ":")))


@dataclass
class Judgement:
    """The outcome of judging one prompt.

    ``score`` is ``None`` when neither the reply nor the reply to the firmer retry prompt held an
    integer from 0 to 100; ``replies`` keeps every raw reply (one or two).
    """

    score: int | None
    replies: list[str] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return len(self.replies)


class JudgementCache:
    """Judgements on disk, keyed by :func:`judgement_key`; safe to share between threads."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._entries: dict[str, Judgement] = {}
        self._lock = threading.Lock()
        self.skipped_lines = 0
        self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> Judgement | None:
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
                    f"{self.path}: line {number} is not a judgement; skipped", stacklevel=3
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

    @staticmethod
    def _parse(raw: bytes) -> tuple[str, Judgement] | None:
        try:
            obj = json.loads(raw.decode("utf-8"))
            key = obj["key"]
            score = obj["score"]
            replies = obj.get("replies", [])
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            return None
        if not isinstance(key, str) or not (score is None or isinstance(score, int)):
            return None
        return key, Judgement(score=score, replies=[str(r) for r in replies])

    def put(self, key: str, judgement: Judgement, **context) -> None:
        """Record a judgement: in memory, and as one appended, flushed and synced line."""
        line = json.dumps({"key": key, **asdict(judgement), **context}, ensure_ascii=False)
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            self._entries[key] = judgement
