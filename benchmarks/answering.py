"""Answering a data set: continuous refill against static batches and transformers' loop.

Prints figures; it is not a test. On the embedded ``smollm2-135m-instruct`` (not fine-tuned)
and the book's 110 test-split prompts (records 935..1044, Alpaca format), greedy,
``max_new_tokens`` 256, stopping at the end token, with the same maximum batch for both of ours:

1. static batches: ``generate(..., batch_size=B)``, what ``answer_records`` ran before issue 10
   (prompts sorted by length, each batch decoded until its longest answer ends);
2. continuous refill: ``generation.refill.generate_continuous(..., max_batch=B)``, what
   ``answer_records`` runs now (a finished row takes the next prompt at once);
3. transformers' ``generate``, one prompt at a time (our saved copy of the same weights).

Wall time, new tokens/s, the ratios (targets: refill >= 1.5x static in the same process, >= 5x
transformers), and whether the greedy answers are identical (a difference is reported with the
top-two logits where it starts: at a near-tie, or not).

Usage (from the repository root):

    .venv/bin/python benchmarks/answering.py                  # 110 prompts, batch 16
    .venv/bin/python benchmarks/answering.py --hf-prompts 32  # transformers on 32 of them
    .venv/bin/python benchmarks/answering.py --quick          # 24 prompts, 64 tokens
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from generation import (
    DEFAULT_DATA,
    EMBEDDED,
    TEST_SPLIT,
    first_difference,
    hf_generate,
    hf_model,
    test_prompts,
)
from machine import machine_lines


def report_differences(loaded, ids, ours, theirs, label: str) -> None:
    same = sum(o == t for o, t in zip(ours, theirs, strict=True))
    print(f"  identical greedy answers, {label}: {same} of {len(ours)}")
    for k, (o, t) in enumerate(zip(ours, theirs, strict=True)):
        if o != t:
            step, first, second = first_difference(loaded, ids[k], o, t)
            tie = ", a near-tie" if first - second <= 1e-4 else ""
            print(
                f"    record {TEST_SPLIT[0] + k}: differs from step {step}; top two logits "
                f"{first:.6f} / {second:.6f} (gap {first - second:.2e}{tie})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="24 prompts, 64 new tokens")
    parser.add_argument("--data-file", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--prompts", type=int, help="test-split prompts (default all 110)")
    parser.add_argument("--batch-size", type=int, default=16, help="the maximum batch (16)")
    parser.add_argument("--max-new-tokens", type=int, help="default 256 (--quick: 64)")
    parser.add_argument(
        "--hf-prompts",
        type=int,
        help="answer only the first N with transformers and compare rates (default: all; 0: skip)",
    )
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from instructune.checkpoints import load_model, save_model
    from instructune.generation import encode_prompt, generate
    from instructune.generation.refill import generate_continuous

    count = args.prompts or (24 if args.quick else TEST_SPLIT[1] - TEST_SPLIT[0])
    max_new = args.max_new_tokens or (64 if args.quick else 256)
    batch = args.batch_size
    prompts = test_prompts(args.data_file, count)
    count = len(prompts)
    print("instructune answering benchmark" + (" (--quick)" if args.quick else ""))
    for line in machine_lines():
        print(line)
    print(
        f"workload: {EMBEDDED}, {count} test-split prompts (Alpaca), greedy, max_new_tokens "
        f"{max_new}, stop at the end token, maximum batch {batch}"
    )

    loaded = load_model(EMBEDDED)
    tok = loaded.tokenizer
    ids = [encode_prompt(tok, p) for p in prompts]
    options = dict(max_new_tokens=max_new, stop_ids=[tok.eos_id])
    generate(loaded.model, tok, ids[:2], max_new_tokens=4)  # warm-up

    start = time.perf_counter()
    static = generate(loaded.model, tok, ids, batch_size=batch, **options)
    static_s = time.perf_counter() - start
    start = time.perf_counter()
    refill = generate_continuous(loaded, ids, max_batch=batch, **options)
    refill_s = time.perf_counter() - start
    new_tokens = sum(len(r.token_ids) for r in refill)
    longest = max(len(r.token_ids) for r in refill)
    print(
        f"  answers: {new_tokens} new tokens, {new_tokens / count:.0f} per prompt on average, "
        f"the longest {longest}"
    )
    print(
        f"  static batches (batch {batch}):    {static_s:7.1f} s  "
        f"({sum(len(r.token_ids) for r in static) / static_s:6.1f} new tok/s)"
    )
    print(
        f"  continuous refill (max {batch}): {refill_s:7.1f} s  ({new_tokens / refill_s:6.1f} new tok/s)"
    )
    print(f"  refill / static: x{static_s / refill_s:.2f} (target >= 1.5)")
    report_differences(
        loaded,
        ids,
        [r.token_ids for r in refill],
        [r.token_ids for r in static],
        "refill vs static",
    )

    hf_count = count if args.hf_prompts is None else min(args.hf_prompts, count)
    if hf_count == 0:
        print("  transformers: skipped (--hf-prompts 0)")
        return 0
    with tempfile.TemporaryDirectory(prefix="instructune-bench-") as tmp:
        directory = Path(tmp) / "smollm2"
        save_model(directory, loaded.model, tok, loaded.config, loaded.prompt_format)
        hf = hf_model(directory)
        hf_generate(hf, ids[0], max_new_tokens=4, eos_id=None, pad_id=tok.pad_id)  # warm-up
        start = time.perf_counter()
        theirs = [
            hf_generate(hf, p, max_new_tokens=max_new, eos_id=tok.eos_id, pad_id=tok.pad_id)
            for p in ids[:hf_count]
        ]
        hf_s = time.perf_counter() - start
    hf_tokens = sum(len(t) for t in theirs)
    print(
        f"  transformers, one at a time:    {hf_s:7.1f} s  ({hf_tokens / hf_s:6.1f} new tok/s)"
        + (f" on the first {hf_count} prompts" if hf_count < count else "")
    )
    if hf_count == count:
        ratio = hf_s / refill_s
        how = "wall time"
    else:
        # Rates, not times: a subset's answers are not the whole set's length.
        ratio = (new_tokens / refill_s) / (hf_tokens / hf_s)
        how = f"new tokens/s (transformers on {hf_count} of {count})"
    print(f"  refill / transformers: x{ratio:.2f} by {how} (target >= 5)")
    report_differences(
        loaded,
        ids[:hf_count],
        [r.token_ids for r in refill[:hf_count]],
        theirs,
        "refill vs transformers",
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
