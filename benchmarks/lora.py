"""LoRA against full fine-tuning on the embedded model (prints figures; not a test).

Both runs are ``instructune finetune`` (the whole pipeline, ``run_finetune``) on the shipped
demo data with the same seed, data order, batches and learning rate, for the same number of
optimizer steps; only ``--lora-rank`` differs. Each runs in its own process, so its peak
resident memory (ru_maxrss) is its own. Printed per run: trainable parameters, peak memory,
seconds per optimizer step (training time / steps, evaluations excluded) and the validation
loss after the last step.

    python benchmarks/lora.py                       # 20 steps, rank 16, batch 8, length 256
    python benchmarks/lora.py --steps 5 --batch-size 4 --lr-lora 1e-3
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one_run(mode: str, out: Path, args: argparse.Namespace) -> dict:
    """A fine-tuning run in this process; returns the figures."""
    from instructune.config import resolve_config
    from instructune.pipeline import run_finetune

    flags = {
        "model": "smollm2-135m-instruct",
        "data": "demo",
        "out": str(out),
        "max_steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "eval_every": args.steps,
        "eval_batches": args.eval_batches,
        "checkpoint_every": None,
        "test_limit": 0,
        "evaluate": False,
        "sample_every_epoch": False,
        "quiet": True,
        "threads": args.threads,
        "lr": args.lr_lora if mode == "lora" else args.lr_full,
    }
    if mode == "lora":
        flags.update(lora_rank=args.rank, lora_targets=args.targets)
    run_finetune(resolve_config(flags=flags))
    run = json.loads((out / "run.json").read_text())
    results = run["results"]
    lora = run.get("lora") or {}
    total = lora.get("total_parameters")
    if total is None:  # full fine-tuning trains every parameter
        from instructune.models import build_model, get_config

        meta = build_model(get_config("smollm2-135m-instruct"), device="meta")
        total = sum(p.numel() for p in meta.parameters())
    return {
        "mode": mode,
        "trainable": lora.get("trainable_parameters", total),
        "total": total,
        "peak_rss_mb": run["peak_memory"]["ru_maxrss_bytes"] / 2**20,
        "s_per_step": run["train_seconds_total"] / results["steps"],
        "val_loss": results["val_loss"],
        "lr": flags["lr"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--lr-full", type=float, default=5e-5, help="the book's")
    # LoRA trains far fewer weights from a zero update; the usual rates are 10-20x larger.
    p.add_argument("--lr-lora", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--one", choices=["full", "lora"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:  # a child: one run, its figures as JSON on the last line
        print(json.dumps(one_run(args.one, Path(args.out), args)))
        return

    from machine import machine_lines

    for line in machine_lines():
        print(line)
    print(
        f"smollm2-135m-instruct (embedded), demo data, {args.steps} steps, batch "
        f"{args.batch_size}, max length {args.max_length}, LoRA rank {args.rank} on "
        f"{args.targets} (alpha = rank)"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("full", "lora"):
            argv = [sys.executable, __file__, "--one", mode, "--out", str(Path(tmp) / mode)]
            for name in ("steps", "rank", "targets", "batch_size", "max_length", "eval_batches",
                         "lr_full", "lr_lora", "threads"):  # fmt: skip
                value = getattr(args, name)
                if value is not None:
                    argv += [f"--{name.replace('_', '-')}", str(value)]
            done = subprocess.run(argv, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{mode} run failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    head = f"{'':6} {'trainable':>12} {'share':>7} {'peak RSS':>9} {'s/step':>7} {'val loss':>9}"
    print(head + "  lr")
    for r in rows:
        print(
            f"{r['mode']:6} {r['trainable']:>12,} {100 * r['trainable'] / r['total']:>6.2f}% "
            f"{r['peak_rss_mb']:>7.0f}MB {r['s_per_step']:>7.2f} {r['val_loss']:>9.4f}  {r['lr']:g}"
        )


if __name__ == "__main__":
    main()
