"""Optional embedding similarity: cosine similarity of sentence embeddings, response vs reference.

Used only when ``sentence-transformers`` is installed *and* the model is already on disk (nothing
is downloaded: the hub is put offline for the load). Otherwise the metric is skipped and the
reason is recorded in the report.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class EmbeddingResult:
    """Per-pair similarities (``None`` when skipped) and what was used, or why not."""

    similarities: list[float] | None
    model: str | None
    reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "available": self.similarities is not None,
            "model": self.model,
            "reason": self.reason,
        }


def embedding_similarity(
    responses: Sequence[str], references: Sequence[str], *, model: str | None = None
) -> EmbeddingResult:
    """Cosine similarity of each response with its reference, or a reason for skipping."""
    name = model or os.environ.get("INSTRUCTUNE_EMBEDDING_MODEL") or DEFAULT_MODEL
    if importlib.util.find_spec("sentence_transformers") is None:
        return EmbeddingResult(
            None,
            None,
            "skipped: sentence-transformers is not installed (pip install it and "
            f"place {name} in the Hugging Face cache to get embedding similarity)",
        )
    if not responses:
        return EmbeddingResult([], name)
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})  # never download from here
    try:
        from sentence_transformers import SentenceTransformer

        encoder = SentenceTransformer(name, device="cpu")
        a = encoder.encode(list(responses), normalize_embeddings=True, convert_to_numpy=True)
        b = encoder.encode(list(references), normalize_embeddings=True, convert_to_numpy=True)
    except Exception as exc:  # any load failure means "not available here": say why, go on
        return EmbeddingResult(
            None, None, f"skipped: the embedding model {name} is not available locally ({exc})"
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return EmbeddingResult([float(x) for x in (a * b).sum(axis=1)], name)
