"""DPO with cached reference log-probabilities against a naive DPO (prints figures; not a test).

- ``cached`` (instructune's way): the reference's log-probabilities of every pair are computed
  once before training (reported apart, as ``reference_s``); a step is one forward and
  backward of the policy over the stacked chosen and rejected rows (``training.dpo.DpoLoss``).
- ``naive`` (the book's notebook's way): a second full copy of the model is the reference and
  runs, without gradients, in every step.

Both take the same batches of the book's preference data (``instruction-data-with-preference
.json``; default: ``../shared/data/``), the same AdamW (lr 5e-6, weight decay 0.01: the book's),
the same seed, and the same loss arithmetic (``pair_losses``). Each mode runs in its own process,
so its peak resident memory (ru_maxrss) is its own; the final losses of the two must agree (the
same reference values, however obtained).

    python benchmarks/dpo.py                                    # embedded model, 5 steps, batch 4
    python benchmarks/dpo.py --model gpt2 --init random --steps 3
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "instruction-data-with-preference.json"


def one_run(mode: str, args: argparse.Namespace) -> dict:
    """Train ``args.steps`` DPO steps in this process the ``mode`` way; returns the figures."""
    import torch

    from instructune.checkpoints import load_model
    from instructune.data.collate import collate_pairs
    from instructune.data.dataset import tokenize_pair
    from instructune.data.records import load_preference_records
    from instructune.training.dpo import (
        PairItem,
        collate_dpo,
        pair_losses,
        reference_logprobs,
        sequence_logprobs,
    )
    from instructune.training.metrics import peak_rss_bytes

    torch.set_num_threads(args.threads)
    torch.manual_seed(123)
    loaded = load_model(args.model, init=args.init, log=None)
    model, tok = loaded.model, loaded.tokenizer
    records = list(load_preference_records(args.data))[: args.steps * args.batch_size]
    pairs = [tokenize_pair(r, tok, "alpaca") for r in records]
    batches = [list(range(i, i + args.batch_size)) for i in range(0, len(pairs), args.batch_size)]
    length = args.max_length
    out: dict = {"mode": mode, "reference_s": 0.0}
    if mode == "cached":
        t0 = time.perf_counter()
        sides = [collate_pairs([pairs[i] for i in b], pad_id=tok.pad_id, max_length=length)
                 for b in batches]  # fmt: skip
        chosen, rejected = reference_logprobs(model, sides)
        out["reference_s"] = time.perf_counter() - t0
        items = [PairItem(c, r, float(chosen[i]), float(rejected[i]))
                 for i, (c, r) in enumerate(pairs)]  # fmt: skip
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
        items = [PairItem(c, r, 0.0, 0.0) for c, r in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.01)
    model.train()
    step_s, losses = [], []
    for batch in batches:
        inputs, targets, ref_c, ref_r = collate_dpo(
            [items[i] for i in batch], pad_id=tok.pad_id, max_length=length
        )
        t0 = time.perf_counter()
        if mode == "naive":  # the reference runs every step
            with torch.no_grad():
                ref = sequence_logprobs(reference, inputs, targets)
            ref_c, ref_r = ref[: len(batch)], ref[len(batch) :]
        losses_b, _, _ = pair_losses(model, (inputs, targets, ref_c, ref_r), beta=0.1)
        loss = losses_b.mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_s.append(time.perf_counter() - t0)
        losses.append(float(loss))
    # The first step warms the allocator and kernels up: it is reported, not averaged.
    steady = step_s[1:] or step_s
    out.update(
        steps=len(step_s),
        s_per_step=sum(steady) / len(steady),
        first_step_s=step_s[0],
        losses=[round(v, 6) for v in losses],
        peak_rss_mib=(peak_rss_bytes() or 0) / 2**20,
        params_m=sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--init", default="pretrained", choices=("pretrained", "random"))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mode", choices=("cached", "naive"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode:  # a child process: one mode, figures as JSON on the last line
        print(json.dumps(one_run(args.mode, args)))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import machine_lines

    print("\n".join(machine_lines()))
    print(
        f"model {args.model} ({args.init}), {args.steps} steps of {args.batch_size} pairs, "
        f"max length {args.max_length}, {args.threads} threads, data {args.data}"
    )
    results = []
    for mode in ("cached", "naive"):
        child = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        proc = subprocess.run(child, capture_output=True, text=True, check=True)
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print(
        f"{'mode':<8} {'s/step':>8} {'first step s':>13} {'reference s':>12} {'peak RSS MiB':>13}"
    )
    for r in results:
        print(
            f"{r['mode']:<8} {r['s_per_step']:>8.3f} {r['first_step_s']:>13.3f} "
            f"{r['reference_s']:>12.3f} {r['peak_rss_mib']:>13.0f}"
        )
    cached, naive = results
    pairs = zip(cached["losses"], naive["losses"], strict=True)
    worst = max(abs(a - b) for a, b in pairs)
    print(
        f"cached / naive: {cached['s_per_step'] / naive['s_per_step']:.2f}x the time per step, "
        f"{cached['peak_rss_mib'] - naive['peak_rss_mib']:+.0f} MiB peak RSS; "
        f"the largest difference in a step's loss {worst:.2e}"
    )


if __name__ == "__main__":
    main()
