"""Near-duplicate records: the book's measure, computed exactly, at Alpaca scale.

The measure is the book's (``find-near-duplicates.py`` in chapter 7's bonus material of *Build a
Large Language Model From Scratch*): each text is lowercased and stripped of punctuation
(``re.sub(r"[^\\w\\s]", "", text)``), turned into TF-IDF vectors over character 1-3-grams
(scikit-learn's ``TfidfVectorizer``, fitted on every non-empty text), and two records are near
duplicates when the cosine similarity of their vectors is above the threshold (0.75); texts of
length <= 1 are ignored. Unlike the book's script, pairs carry the records' true indices (the
book's loop indexes the matrix of non-empty texts with the indices of all records).

The book builds the dense n x n similarity matrix: 11 GB for 52,002 records. Here the same
pairs come from block-wise sparse products with a pruning bound (:func:`near_duplicate_pairs`):
columns are ordered from the most to the least common n-gram, and each row ``a`` is split into
its common part ``a_S`` (its longest run of most common n-grams whose norm ``s_a`` stays <= the
threshold) and the rest ``a_P``. Then ``cos(a, b) = M_ab + a_S.b_S`` with
``M_ab = a_P.b + a_S.b_P``, and ``a_S.b_S <= s_a s_b``. One sparse product per block of rows,
``[P | S] @ [X ; P].T``, gives ``M`` for the pairs that share one of either row's rarer n-grams;
every other pair has ``cos <= s_a s_b <= threshold**2`` and cannot match. Pairs with
``M_ab + s_a s_b`` above the threshold are confirmed with the exact cosine (``M_ab`` plus the
common parts' product). Nothing is approximated: the pairs and similarities are the dense
method's (to rounding).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from instructune.errors import DataError, InstructuneError

KEYS = ("instruction", "input", "output")
DEFAULT_THRESHOLD = 0.75
_PUNCTUATION = re.compile(r"[^\w\s]")


@dataclass(frozen=True)
class NearDuplicate:
    """Records ``first < second`` (indices in the data set) with cosine ``similarity``."""

    first: int
    second: int
    similarity: float


def preprocess(text: str) -> str:
    """The book's normalisation: lowercase, punctuation removed."""
    return _PUNCTUATION.sub("", text.lower())


def _require_sklearn():
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError:
        raise InstructuneError(
            "near-duplicate detection needs scikit-learn: pip install 'instructune[data]' "
            "(or pip install scikit-learn)"
        ) from None
    return TfidfVectorizer


def make_vectorizer():
    """The book's vectorizer: TF-IDF over character 1-3-grams (L2-normalised rows)."""
    return _require_sklearn()(stop_words=None, analyzer="char", ngram_range=(1, 3))


def field_texts(records: Sequence[dict], key: str, source: str = "<records>") -> list[str]:
    """Each record's ``key`` text; a missing or non-string field is an error naming it."""
    if key not in KEYS:
        raise InstructuneError(f"--key {key!r}: expected one of {', '.join(KEYS)}")
    texts = []
    for i, rec in enumerate(records):
        value = rec.get(key) if isinstance(rec, dict) else None
        if not isinstance(value, str):
            raise DataError(f"{source}: record {i}: field {key!r}: expected a string")
        texts.append(value)
    return texts


def _vectors(texts: Sequence[str]):
    """(indices of the non-empty texts, their TF-IDF rows, whether each is longer than 1)."""
    kept = [i for i, t in enumerate(texts) if t]
    if not kept:
        return kept, None, np.zeros(0, dtype=bool)
    matrix = make_vectorizer().fit_transform([preprocess(texts[i]) for i in kept])
    longer = np.array([len(texts[i]) > 1 for i in kept], dtype=bool)
    return kept, matrix.tocsr().astype(np.float64), longer


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 1.0:
        raise InstructuneError(f"--threshold must be between 0 and 1 (got {threshold})")


def exact_pairs(texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD) -> list[NearDuplicate]:
    """The book's method as it computes: the dense similarity matrix (the reference; n x n)."""
    _check_threshold(threshold)
    from sklearn.metrics.pairwise import cosine_similarity

    kept, matrix, longer = _vectors(texts)
    if matrix is None:
        return []
    sim = cosine_similarity(matrix)
    rows, cols = np.nonzero(np.triu(sim, k=1) > threshold)
    return [
        NearDuplicate(kept[i], kept[j], float(sim[i, j]))
        for i, j in zip(rows.tolist(), cols.tolist(), strict=True)
        if longer[i] and longer[j]
    ]


def near_duplicate_pairs(
    texts: Sequence[str], threshold: float = DEFAULT_THRESHOLD, *, block_rows: int = 1024
) -> list[NearDuplicate]:
    """The pairs of :func:`exact_pairs`, without the n x n matrix (see the module's docstring).

    Sorted by (first, second); memory grows with the block (``block_rows`` x candidates).
    """
    _check_threshold(threshold)
    kept, matrix, longer = _vectors(texts)
    if matrix is None:
        return []
    from scipy import sparse

    x, common, rare, s_norm = _split(matrix, threshold)
    # One product gives a.b minus the common parts' product, a_S.b_S (which the bound
    # covers): [a_P | a_S] . [b ; b_P] = a_P.b + a_S.b_P.
    left = sparse.hstack([rare, common], format="csr")
    right = sparse.vstack([x.T, rare.T], format="csc")  # sliced by column: pairs i < j only
    s_max = float(s_norm.max())
    pairs: list[NearDuplicate] = []
    n = x.shape[0]
    for start in range(0, n, block_rows):
        stop = min(start + block_rows, n)
        rest = (left[start:stop] @ right[:, start:].tocsr()).tocsr()
        # A cheap first cut with the block's largest s_a and the overall largest s_b, then the
        # pair's own bound on what is left.
        cut = threshold - s_norm[start:stop].max() * s_max
        at = np.flatnonzero(rest.data > cut)
        rows = np.searchsorted(rest.indptr, at, side="right") - 1 + start
        cols = rest.indices[at].astype(np.int64) + start
        partial = rest.data[at]
        del rest
        keep = (cols > rows) & (partial + s_norm[rows] * s_norm[cols] > threshold)
        keep &= longer[rows] & longer[cols]
        rows, cols, partial = rows[keep], cols[keep], partial[keep]
        if not len(rows):
            continue
        sims = partial + _row_dots(common, common, rows, cols)
        hit = sims > threshold
        for i, j, s in zip(rows[hit].tolist(), cols[hit].tolist(), sims[hit].tolist(), strict=True):
            pairs.append(NearDuplicate(kept[i], kept[j], s))
    pairs.sort(key=lambda p: (p.first, p.second))
    return pairs


def _split(matrix, threshold: float):
    """Columns ordered common-first; each row split into its common prefix and the rest."""
    from scipy import sparse

    df = np.bincount(matrix.indices, minlength=matrix.shape[1])
    order = np.argsort(-df, kind="stable")
    x = matrix[:, order].tocsr()
    x.sort_indices()
    lengths = np.diff(x.indptr)
    squares = x.data**2
    totals = np.cumsum(squares)
    before = np.concatenate(([0.0], totals))[x.indptr[:-1]]
    running = totals - np.repeat(before, lengths)
    # A hair under threshold**2, so rounding cannot push a common part's norm over the bound.
    in_common = running <= threshold**2 * (1 - 1e-9)
    s_sq = np.zeros(x.shape[0])
    rows_of = np.repeat(np.arange(x.shape[0]), lengths)
    np.maximum.at(s_sq, rows_of[in_common], running[in_common])
    # Copies of the index arrays: eliminate_zeros works in place and must not touch ``x``.
    common = sparse.csr_matrix(
        (x.data * in_common, x.indices.copy(), x.indptr.copy()), shape=x.shape
    )
    rare = sparse.csr_matrix(
        (x.data * ~in_common, x.indices.copy(), x.indptr.copy()), shape=x.shape
    )
    common.eliminate_zeros()
    rare.eliminate_zeros()
    return x, common, rare, np.sqrt(s_sq)


def _row_dots(a, b, rows: np.ndarray, cols: np.ndarray, chunk: int = 100_000) -> np.ndarray:
    """``a[rows[k]] . b[cols[k]]`` for every k, in chunks (sparse rows gathered per chunk)."""
    out = np.empty(len(rows))
    for s in range(0, len(rows), chunk):
        e = min(s + chunk, len(rows))
        prod = a[rows[s:e]].multiply(b[cols[s:e]])
        out[s:e] = np.asarray(prod.sum(axis=1)).ravel()
    return out


def second_members(pairs: Sequence[NearDuplicate]) -> list[int]:
    """The records ``--out`` drops: the second member of each pair, sorted, once each."""
    return sorted({p.second for p in pairs})


class NearDuplicateIndex:
    """Near-duplicate checks for records arriving one by one (``data generate``).

    The TF-IDF statistics are fixed when the index is made (fitted on ``corpus``), so a text's
    vector never changes as records are added; a new text is a near duplicate when its cosine
    with a text already added is above the threshold (the measure of :func:`exact_pairs`).
    """

    def __init__(self, corpus: Sequence[str], threshold: float = DEFAULT_THRESHOLD):
        _check_threshold(threshold)
        self.threshold = threshold
        self.vectorizer = make_vectorizer()
        fit_on = [preprocess(t) for t in corpus if t] or ["a"]
        self.vectorizer.fit(fit_on)
        self._rows: list = []

    def _vector(self, text: str):
        return self.vectorizer.transform([preprocess(text)]).tocsr()

    def similarity(self, text: str) -> float:
        """The highest cosine of ``text`` with the texts added so far (0.0 when none)."""
        if len(text) <= 1 or not self._rows:
            return 0.0
        from scipy import sparse

        sims = sparse.vstack(self._rows) @ self._vector(text).T
        return float(sims.max()) if sims.nnz else 0.0

    def is_near_duplicate(self, text: str) -> bool:
        return self.similarity(text) > self.threshold

    def add(self, text: str) -> None:
        if len(text) > 1:
            self._rows.append(self._vector(text))
