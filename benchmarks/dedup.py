"""Near-duplicate detection at Alpaca scale (52,002 records): time, peak memory, pairs, and
recall against the book's dense method on a 5,000-record sample.

The records are made, seeded, from the book's instruction data (../shared/data, when present)
and the demo's records: each new record starts from a random record, sometimes spliced with the
words of a second one, then gets a few random word edits (drop, swap, repeat, a word from
elsewhere) and case/punctuation noise, so near duplicates exist at many distances.

    .venv/bin/python benchmarks/dedup.py [--n 52002] [--sample 5000] [--key instruction]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import time
from pathlib import Path

from instructune.data.dedup import exact_pairs, field_texts, near_duplicate_pairs
from instructune.data.sources import demo_path

BOOK_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "instruction-data.json"


def base_records() -> list[dict]:
    records = json.loads(demo_path().read_text(encoding="utf-8"))
    if BOOK_DATA.exists():
        records += json.loads(BOOK_DATA.read_text(encoding="utf-8"))
    return [r for r in records if isinstance(r.get("instruction"), str)]


def _perturb(words: list[str], vocab: list[str], rng: random.Random) -> list[str]:
    words = list(words)
    for _ in range(rng.randint(0, 6)):
        if not words:
            break
        k = rng.randrange(len(words))
        edit = rng.random()
        if edit < 0.3 and len(words) > 2:
            del words[k]
        elif edit < 0.5 and k + 1 < len(words):
            words[k], words[k + 1] = words[k + 1], words[k]
        elif edit < 0.6:
            words.insert(k, words[k])
        elif edit < 0.8:
            words[k] = rng.choice(vocab)
        else:
            words.insert(k, rng.choice(vocab))
    return words


def _noisy(text: str, rng: random.Random) -> str:
    if rng.random() < 0.3:
        text = text.lower()
    if rng.random() < 0.3:
        text = text.rstrip(".?!") + rng.choice([".", "?", "!", ""])
    return text


def synthetic_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` perturbed records (seeded) built from the book's and the demo's records."""
    rng = random.Random(seed)
    bases = base_records()
    split = {key: [r.get(key, "").split() for r in bases] for key in ("instruction", "output")}
    vocab = sorted({w for words in split["instruction"] for w in words})
    out = []
    for _ in range(n):
        a, b = rng.randrange(len(bases)), rng.randrange(len(bases))
        rec = {}
        for key in ("instruction", "output"):
            words = split[key][a]
            if rng.random() < 0.5:  # splice: the start of one record, the end of another
                other = split[key][b]
                words = (
                    words[: rng.randint(1, max(1, len(words)))]
                    + other[rng.randint(0, max(0, len(other) - 1)) :]
                )
            rec[key] = _noisy(" ".join(_perturb(words, vocab, rng)), rng)
        rec["input"] = bases[a].get("input", "") if rng.random() < 0.6 else ""
        out.append(
            {"instruction": rec["instruction"], "input": rec["input"], "output": rec["output"]}
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=52002)
    ap.add_argument("--sample", type=int, default=5000)
    ap.add_argument("--key", default="instruction")
    ap.add_argument("--threshold", type=float, default=0.75)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    records = synthetic_records(args.n, args.seed)
    texts = field_texts(records, args.key)
    start = time.perf_counter()
    pairs = near_duplicate_pairs(texts, args.threshold)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    # After the peak is read: the machine lines import torch and run a matmul probe.
    from machine import machine_lines

    for line in machine_lines():
        print(line)
    print(
        f"{args.n} records ({args.key!r}, threshold {args.threshold}): {len(pairs)} pairs in "
        f"{elapsed:.1f} s, peak RSS {peak_mb:.0f} MB"
    )

    sample = texts[: args.sample]
    start = time.perf_counter()
    exact = {(p.first, p.second) for p in exact_pairs(sample, args.threshold)}
    dense_s = time.perf_counter() - start
    start = time.perf_counter()
    found = {(p.first, p.second) for p in near_duplicate_pairs(sample, args.threshold)}
    sparse_s = time.perf_counter() - start
    recall = len(exact & found) / len(exact) if exact else 1.0
    print(
        f"sample of {len(sample)}: dense (book) {len(exact)} pairs in {dense_s:.1f} s; "
        f"block-wise {len(found)} pairs in {sparse_s:.1f} s; recall {recall:.4f}, "
        f"extra {len(found - exact)}"
    )


if __name__ == "__main__":
    main()
