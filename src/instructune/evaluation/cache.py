"""The judge's cache: one JSONL line per judgement (score and raw replies), on top of the LLM
client's cache (``instructune.llm.cache``: appended and synced line by line, keyed by backend,
model with digest, options, prompt version and prompt), so an interrupted run resumes and a
re-run costs nothing.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from instructune.llm.cache import JsonlCache, request_key, sha256_text

__all__ = ["Judgement", "JudgementCache", "judgement_key", "sha256_text"]


def judgement_key(
    *, backend: str, model: str, digest: str | None, options: dict, prompt_version: str, prompt: str
) -> str:
    """The cache key of one judgement (a sha256 hex digest)."""
    return request_key(
        backend=backend,
        model=model,
        digest=digest,
        options=options,
        version=prompt_version,
        prompt=prompt,
    )


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


def _judgement_of(obj: dict) -> Judgement | None:
    score = obj["score"]
    if not (score is None or (isinstance(score, int) and not isinstance(score, bool))):
        return None
    return Judgement(score=score, replies=[str(r) for r in obj.get("replies", [])])


class JudgementCache(JsonlCache):
    """Judgements on disk, keyed by :func:`judgement_key`; safe to share between threads."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path, _judgement_of)

    def put(self, key: str, judgement: Judgement, **context) -> None:  # type: ignore[override]
        """Record a judgement: in memory, and as one appended, flushed and synced line."""
        super().put(key, judgement, asdict(judgement), **context)
