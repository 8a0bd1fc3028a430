"""Metrics that need no judge, and the statistics the reports use.

Every text metric compares a model's response with the record's reference ``output``:

- ``exact_match``: 1.0 when the two are equal after :func:`normalize_text`, else 0.0.
- ``token_f1``: the harmonic mean of precision and recall over the multiset of normalised tokens.
- ``rouge_l``: the F-measure (beta = 1) of the longest common subsequence of normalised tokens.
- ``length_ratio``: response words / reference words (raw whitespace split; ``None`` when the
  reference is empty), so 1.0 means "as long as the reference".

The normalisation is the one SQuAD's evaluation script made common: lowercase, drop ASCII and
Unicode punctuation, drop the articles "a", "an" and "the", collapse whitespace.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

NORMALISATION = (
    "lowercase; punctuation removed (Unicode category P*); articles a/an/the removed; "
    "whitespace collapsed"
)
TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "length_ratio")

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_text(text: str) -> str:
    """Lowercase, strip punctuation and the articles a/an/the, and collapse whitespace."""
    text = text.lower()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    return normalize_text(text).split()


def exact_match(response: str, reference: str) -> float:
    """1.0 when both texts are equal after normalisation, else 0.0."""
    return float(normalize_text(response) == normalize_text(reference))


def token_f1(response: str, reference: str) -> float:
    """F1 over the bag of normalised tokens (two empty texts agree: 1.0)."""
    pred, ref = _tokens(response), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(response: str, reference: str) -> float:
    """ROUGE-L F-measure on normalised tokens (beta = 1; two empty texts agree: 1.0)."""
    pred, ref = _tokens(response), _tokens(reference)
    if not pred or not ref:
        return float(pred == ref)
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def length_ratio(response: str, reference: str) -> float | None:
    """Response words per reference word; ``None`` when the reference has no words."""
    ref = len(reference.split())
    return len(response.split()) / ref if ref else None


def text_metrics(response: str, reference: str) -> dict[str, float | None]:
    """All the judge-free metrics of one response, keyed as in :data:`TEXT_METRICS`."""
    return {
        "exact_match": exact_match(response, reference),
        "token_f1": token_f1(response, reference),
        "rouge_l": rouge_l(response, reference),
        "length_ratio": length_ratio(response, reference),
    }


def mean_of(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not ``None`` (``None`` when there are none)."""
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else None


# ---------------------------------------------------------------- correlation


def _ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks from 1, ties sharing their average rank (what Spearman's rho needs)."""
    x = np.asarray(values, dtype=float)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=float)
    sorted_x = x[order]
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r; NaN when either side is constant or fewer than two pairs."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"pearson: {len(a)} values against {len(b)}")
    if len(a) < 2:
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson's r of the (tie-averaged) ranks."""
    if len(x) != len(y):
        raise ValueError(f"spearman: {len(x)} values against {len(y)}")
    return pearson(_ranks(x), _ranks(y))


# ---------------------------------------------------------------- bootstrap


def bootstrap_ci(
    values: Sequence[float],
    statistic: Callable[[np.ndarray], np.ndarray] | str = "mean",
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 123,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic`` ("mean", "median" or a function that
    reduces the last axis); seeded, so a report is reproducible. ``None`` for no values."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return None
    if isinstance(statistic, str):
        statistic = {"mean": lambda a: a.mean(axis=-1), "median": lambda a: np.median(a, axis=-1)}[
            statistic
        ]
    rng = np.random.default_rng(seed)
    samples = x[rng.integers(0, x.size, size=(n_resamples, x.size))]
    stats = statistic(samples)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(stats, [alpha, 1 - alpha])
    return float(low), float(high)
