"""The book's fine-tuning job on one GPU (issue 14, item 7): prints figures; not a test.

Runs ``instructune finetune --preset book`` (GPT-2 medium, AdamW lr 5e-5, weight decay 0.1,
batch 8, 2 epochs, train/validation loss on 5 batches every 5 steps) from random weights
(``--init random``: the GPU machine has no hub access; the speed is the same as from the
pretrained ones) on the book's ``instruction-data.json``, each configuration in its own process,
and prints per configuration:

* the two epochs' wall time in the loop (evaluations every 5 steps included, as in the book's
  ``train_model_simple``, whose 0.86 min on an A100 is the reference) and per epoch,
* the optimizer steps' own time and supervised tokens/s,
* supervised MFU = 6 * N * supervised tokens/s / the card's bf16 matmul peak, with N the
  weight-matrix parameters including the head (GPT-2 medium: 353.5M), the peak measured in
  this process (8192^3 bf16 products, mean of 10 after 3 warm-ups),
* peak GPU memory (torch.cuda.max_memory_allocated) and the end-to-end time of the command
  (model set-up, training, saving, answering the test split).

    python benchmarks/gpu.py --data ../shared/data/instruction-data.json --out /tmp/gpu
    python benchmarks/gpu.py --profile --configs bf16,fp16,fp32 --test-limit 8

``--compile`` is left out of the defaults: the book's batches have a new length almost every
step, and on an H200 two steps of a compiled GPT-2 medium took 118 s (recompilations).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"

# name -> extra finetune flags
CONFIGS = {
    "bf16": ["--precision", "bf16"],
    "bf16-compile": ["--precision", "bf16", "--compile"],
    "fp16": ["--precision", "fp16"],
    "fp32": ["--precision", "fp32"],
}


def gpu_lines() -> tuple[list[str], float]:
    """The card, the versions and its measured bf16 / fp32 (no TF32) matmul peaks."""
    import torch

    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)

    def peak(dtype: torch.dtype, n: int = 8192, repeats: int = 10) -> float:
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            a @ b
        end.record()
        torch.cuda.synchronize()
        return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3)

    bf16 = peak(torch.bfloat16)
    fp32 = peak(torch.float32, n=4096)
    lines = [
        f"GPU: {props.name}, {props.multi_processor_count} SMs, "
        f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}",
        f"matmul peak (this process): bf16 {bf16 / 1e12:.0f} TFLOP/s, "
        f"fp32 (TF32 off) {fp32 / 1e12:.1f} TFLOP/s",
    ]
    return lines, bf16


def n_matmul_params(model: str) -> int:
    import torch

    from instructune.models import build_model, get_config
    from instructune.training.metrics import count_matmul_params

    with torch.device("meta"):
        return count_matmul_params(build_model(get_config(model)))


def run_config(name: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / name
    cmd = [
        sys.executable,
        "-m",
        "instructune",
        "finetune",
        "--preset",
        "book",
        "--model",
        args.model,
        "--init",
        "random",
        "--device",
        "cuda",
        "--data",
        args.data,
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        "--test-limit",
        str(args.test_limit),
        *CONFIGS[name],
    ]
    if args.epochs is not None:
        cmd += ["--epochs", str(args.epochs)]
    if args.max_steps is not None:
        cmd += ["--max-steps", str(args.max_steps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"name": name, "error": f"exit {proc.returncode}\n{tail}"}
    info = json.loads((out / "run.json").read_text())
    return {
        "name": name,
        "command_s": wall,
        "loop_s": info["timings"]["train_s"],
        "steps_s": info["train_seconds_total"],
        "info": info,
    }


def profile_steps(args: argparse.Namespace, steps: int = 5) -> None:
    """torch.profiler over ``steps`` training steps of the book's batches (bf16 autocast), after
    3 warm-up steps: wall time per step against the GPU's busy time, and the top kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from instructune.checkpoints import load_model
    from instructune.data.collate import make_collate
    from instructune.data.dataset import tokenize_records
    from instructune.data.records import load_records, split_records
    from instructune.data.sampling import batch_order
    from instructune.training.loop import autocast_context
    from instructune.training.loss import IGNORE_INDEX, SupervisedLoss
    from instructune.training.optim import make_optimizer

    dev = torch.device("cuda")
    torch.manual_seed(123)
    loaded = load_model(args.model, init="random")
    model = loaded.model.to(dev).train()
    train, _test, _val = split_records(load_records(args.data))
    items = tokenize_records(train, loaded.tokenizer, "alpaca")
    collate = make_collate(pad_id=loaded.tokenizer.pad_id, max_length=1024)
    order = batch_order([len(i) for i in items], 8, seed=123, epoch=0)
    loss_module = SupervisedLoss(model)
    optimizer = make_optimizer(model, lr=5e-5, weight_decay=0.1, device=dev)

    def step(batch: list[int]) -> None:
        inputs, targets = collate([items[i] for i in batch])
        count = int((targets != IGNORE_INDEX).sum())
        with autocast_context(dev, "bf16"):
            loss = loss_module(inputs.to(dev), targets.to(dev), grad_scale=1.0 / count)
        (loss / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the loop reads the loss every step

    for batch in order[:3]:
        step(batch)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for batch in order[3 : 3 + steps]:
            step(batch)
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6 / steps
    launches = sum(e.count for e in events if e.self_device_time_total > 0) / steps
    print(
        f"profile, {steps} steps of {args.model} bf16: {wall * 1e3:.1f} ms per step, GPU busy "
        f"{busy * 1e3:.1f} ms ({busy / wall:.0%}), about {launches:.0f} kernels per step"
    )
    print(events.table(sort_by="self_device_time_total", row_limit=12), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--model", default="gpt2-medium")
    p.add_argument("--configs", default="bf16,fp16")
    p.add_argument("--profile", action="store_true", help="profile 5 bf16 steps first")
    p.add_argument("--epochs", type=int, default=None, help="default: the book's 2")
    p.add_argument("--test-limit", type=int, default=110, help="test records answered")
    p.add_argument("--max-steps", type=int, default=None, help="a short smoke run")
    p.add_argument("--out", default="runs/gpu-bench")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("skipped: no CUDA device (torch.cuda.is_available() is False)")
        return
    lines, bf16_peak = gpu_lines()
    for line in lines:
        print(line, flush=True)
    if args.profile:
        profile_steps(args)
    n = n_matmul_params(args.model)
    print(f"{args.model}: N = {n / 1e6:.1f}M weight-matrix parameters (head included)")
    print(
        f"{'config':14} {'2-epoch loop s':>14} {'s/epoch':>8} {'steps s':>8} {'sup tok/s':>10} "
        f"{'MFU bf16':>9} {'peak GiB':>9} {'command s':>10} {'val loss':>9}",
        flush=True,
    )
    for name in args.configs.split(","):
        r = run_config(name, args)
        if "error" in r:
            print(f"{name:14} FAILED: {r['error']}", flush=True)
            continue
        info = r["info"]
        train = info["results"]
        sup_s = train.get("supervised_tokens_per_s") or 0.0
        epochs = info["config"]["epochs"]
        peak = info["peak_memory"].get("cuda_max_allocated_bytes") or 0
        mfu = 6 * n * sup_s / bf16_peak
        print(
            f"{name:14} {r['loop_s']:14.1f} {r['loop_s'] / epochs:8.1f} {r['steps_s']:8.1f} "
            f"{sup_s:10.0f} {mfu:9.1%} {peak / 2**30:9.2f} {r['command_s']:10.1f} "
            f"{train.get('val_loss') or float('nan'):9.3f}",
            flush=True,
        )
        print(f"  timings: {json.dumps(info['timings'])}", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
