"""Training throughput, model FLOPs utilisation and peak memory (prints figures; not a test).

For each (model, batching, precision) it runs a few optimizer steps of instructune's training
step (fused supervised-only cross-entropy, fused AdamW) on the book's training split and prints
positions/s, supervised tokens/s (targets != -100), the padding share, seconds per step split
into data / forward / backward / optimizer, peak resident memory, and

    supervised MFU = 6 * N * supervised tokens/s / matmul peak of the row's precision

with N the weight-matrix parameters including the output head (123.5M for gpt2) and the peak
the median of 3 torch.mm of 4096x4096 in the same process with the same threads, in the row's
own precision (a bf16 row also prints its share of the fp32 peak). Each configuration runs in
its own process, so its ru_maxrss is its own. ``--step-peak`` also times one such product after
every step and prints the median of each step's MFU against the probe after it.

Where the CPU has fast bf16, the bf16 rows run, and bf16's training loss is compared with
fp32's over the first 50 steps of the book's shuffled batches (``--curve-steps``): the largest
gap step by step, against the issue's 2%. Elsewhere both print why they are skipped.

Note: the fused loss computes the output head's gradient during the forward pass, so part of
what is "backward" in a textbook loop shows up under "forward" here.

For gpt2 in fp32 it also runs the reference in the same invocation, on the same batches:
transformers' ``GPT2LMHeadModel`` (eager attention, ``F.cross_entropy`` on the full logits,
``torch.optim.AdamW``), and prints ours/transformers. With ``--profile``, one line per
configuration gives the share of self CPU time in matmuls, attention, normalisation,
activations, the fused loss, the optimizer and the rest.

    python benchmarks/training.py --quick                 # gpt2, few steps
    python benchmarks/training.py                         # gpt2 + embedded, fp32 + bf16
    python benchmarks/training.py --memory                # gpt2-medium: memory vs speed
    python benchmarks/training.py --profile --steps 2     # torch.profiler table per config
    python benchmarks/training.py --models gpt2 --precisions fp32 --batching grouped --step-peak
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_line

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"


# ---------------------------------------------------------------------------- one configuration


def _load(model_name: str, overrides: dict | None = None):
    """The model of a configuration: the embedded model's real weights, else random weights
    (seeded, so every process of a configuration starts from the same ones); ``overrides``
    shrink a GPT-2 (the tests' tiny configurations)."""
    import torch

    from instructune.checkpoints import load_model
    from instructune.pipeline.model import random_resized

    torch.manual_seed(123)
    if model_name == "smollm2-135m-instruct":
        return load_model(model_name)
    if overrides:
        return random_resized(model_name, overrides)
    return load_model(model_name, init="random")


def _step_batches(items, order: list[list[int]], spec: dict) -> list[list[int]]:
    """The batches a configuration runs: one untimed warm-up step, then ``steps`` timed ones.

    With ``longest`` (--memory) the warm-up is the batch of the longest records, so the peak
    memory covers the worst batch of the epoch, and the timed steps are the book's shuffled
    batches, so positions/s is the rate of a real epoch."""
    if not spec.get("longest"):
        return order[: spec["steps"] + 1]
    ranked = sorted(range(len(items)), key=lambda i: -len(items[i]))
    return [ranked[: spec["batch_size"]], *order[: spec["steps"]]]


def _batches(loaded, data: Path, batch_size: int, grouped: bool, max_length: int):
    from instructune.data.collate import make_collate
    from instructune.data.dataset import tokenize_records
    from instructune.data.records import load_records, split_records
    from instructune.data.sampling import batch_order

    train, _test, val = split_records(load_records(data))
    tok = loaded.tokenizer
    items = tokenize_records(train, tok, "alpaca")
    val_items = tokenize_records(val, tok, "alpaca")
    collate = make_collate(pad_id=tok.pad_id, max_length=max_length)
    order = batch_order(
        [len(i) for i in items], batch_size, seed=123, epoch=0, group_by_length=grouped
    )
    return items, val_items, collate, order


# Where a training step's time goes: each op's self CPU time, by the region it ran in (the fused
# loss and the optimizer step are labelled regions) or else by what the op is.
PROFILE_CATEGORIES = {
    "matmuls": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax", "efficient_attention"),
    "normalisation": ("layer_norm", "rms_norm", "aten::rsqrt", "aten::pow", "aten::mean"),
    "activations": ("gelu", "silu", "aten::tanh", "aten::sigmoid"),
}


def profile_shares(events) -> dict[str, float]:
    """Seconds of self CPU time per category: fused loss, optimizer, matmuls, attention,
    normalisation, activations, the rest."""
    totals: dict[str, float] = {}
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        region, parent = None, e.cpu_parent
        while parent is not None and region is None:
            if parent.name == "fused_loss":
                region = "fused loss"
            elif parent.name.startswith("Optimizer.step"):
                region = "optimizer"
            parent = parent.cpu_parent
        if region is None:
            region = next(
                (c for c, keys in PROFILE_CATEGORIES.items() if any(k in e.name for k in keys)),
                "rest",
            )
        totals[region] = totals.get(region, 0.0) + e.self_cpu_time_total / 1e6
    return totals


def _label_loss_region() -> None:
    """Run the fused loss inside a profiler region named ``fused_loss`` (this process only)."""
    import torch

    from instructune.training import loss

    plain = loss.linear_cross_entropy_sum

    def labelled(*args, **kwargs):
        with torch.profiler.record_function("fused_loss"):
            return plain(*args, **kwargs)

    loss.linear_cross_entropy_sum = labelled


def _lockstep_wait(spec: dict) -> None:
    """--lockstep: wait for the driver's go before each step, and before the work after the
    last one, so that nothing overlaps the other process's steps (see ``_lockstep``)."""
    if spec.get("lockstep"):
        sys.stdin.readline()


def _lockstep_done(spec: dict) -> None:
    if spec.get("lockstep"):
        print("step done", flush=True)


def run_transformers(spec: dict) -> dict:
    """The reference: transformers' ``GPT2LMHeadModel`` (eager attention, GPT-2 small or medium
    shape, dropout 0 as the book's chapter 7), ``F.cross_entropy`` on the full logits and
    ``torch.optim.AdamW`` (lr 5e-5, weight decay 0.1), on the same batches as ours."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from instructune.training.loss import IGNORE_INDEX

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(123)
    loaded = _load("gpt2")  # the tokenizer and batches only
    shape = {"gpt2": {}, "gpt2-medium": {"n_embd": 1024, "n_layer": 24, "n_head": 16}}
    config = GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape[spec["model"]])
    model = GPT2LMHeadModel._from_config(config, attn_implementation="eager").train()
    del loaded.model
    items, _val, collate, order = _batches(
        loaded, Path(spec["data"]), spec["batch_size"], spec["grouped"], spec["max_length"]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1)
    seconds = 0.0
    positions = supervised = 0
    for n, batch in enumerate(_step_batches(items, order, spec)):
        _lockstep_wait(spec)
        t0 = time.perf_counter()
        inputs, targets = collate([items[i] for i in batch])
        logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if n > 0:  # the first step warms up
            seconds += time.perf_counter() - t0
            positions += inputs.numel()
            supervised += int((targets != IGNORE_INDEX).sum())
        _lockstep_done(spec)
    _lockstep_wait(spec)
    return {
        "positions_per_s": positions / seconds,
        "supervised_per_s": supervised / seconds,
        "peak_rss_bytes": __import__("resource").getrusage(0).ru_maxrss * 1024,
    }


def run_one(spec: dict) -> dict:
    """Time ``spec["steps"]`` optimizer steps of one configuration; return the figures."""
    if spec.get("transformers"):
        return run_transformers(spec)
    import contextlib

    import torch

    from instructune.training.loop import (
        autocast_context,
        evaluate_loss,
        make_optimizer,
        step_heap,
    )
    from instructune.training.loss import IGNORE_INDEX, SupervisedLoss
    from instructune.training.metrics import (
        MatmulProbe,
        count_matmul_params,
        matmul_peak_flops,
        peak_rss_bytes,
        supervised_mfu,
    )

    torch.set_num_threads(spec["threads"])
    if spec.get("profile"):
        _label_loss_region()
    loaded = _load(spec["model"], spec.get("model_overrides"))
    model = loaded.model
    model.train()
    model.gradient_checkpointing = spec.get("checkpointing", False)  # bool or a block count
    if spec.get("no_packing"):
        model.packs_sequences = False  # padded batches, as before packing
    items, val_items, collate, order = _batches(
        loaded, Path(spec["data"]), spec["batch_size"], spec["grouped"], spec["max_length"]
    )
    batches = _step_batches(items, order, spec)
    loss_module = SupervisedLoss(model)
    optimizer = make_optimizer(
        model,
        lr=5e-5,
        weight_decay=0.1,
        device=torch.device("cpu"),
        in_backward=spec.get("in_backward", False),
    )
    times = {"data": 0.0, "forward": 0.0, "backward": 0.0, "optimizer": 0.0}
    positions = supervised = 0
    losses = []  # each step's mean supervised loss, the warm-up step's first
    n_params = count_matmul_params(model)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["precision"]]
    peak_n = spec.get("peak_n", 4096)
    # --step-peak: one product after every step, in this process's turn, untimed. A shared
    # VM's speed drifts by 15% and more over minutes, so a peak probed once at the end can
    # meet a faster or slower moment than the steps did.
    step_probe = MatmulProbe(dtype, peak_n) if spec.get("step_peak") else None
    step_mfus = []
    profiler = None
    # As instructune's training loop keeps freed memory (--mmap-heap: glibc's defaults).
    heap = step_heap(torch.device("cpu"), model, optimizer)
    if spec.get("mmap_heap"):
        heap = contextlib.nullcontext()
    with heap:
        for n, batch in enumerate(batches):
            _lockstep_wait(spec)
            timed = n > 0
            if timed and spec.get("profile") and profiler is None:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
                profiler.__enter__()
            t0 = time.perf_counter()
            inputs, targets = collate([items[i] for i in batch])
            count = int((targets != IGNORE_INDEX).sum())
            t1 = time.perf_counter()
            with autocast_context(torch.device("cpu"), spec["precision"]):
                loss_sum = loss_module(inputs, targets, grad_scale=1.0 / count)
            t2 = time.perf_counter()
            (loss_sum / count).backward()
            t3 = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            t4 = time.perf_counter()
            losses.append(float(loss_sum.detach()) / count)
            if timed and step_probe is not None:  # inside this process's turn, untimed
                flops = 6 * n_params * count / (t4 - t0)
                step_mfus.append(flops / step_probe.flops())
            _lockstep_done(spec)
            if timed:
                times["data"] += t1 - t0
                times["forward"] += t2 - t1
                times["backward"] += t3 - t2
                times["optimizer"] += t4 - t3
                positions += inputs.numel()
                supervised += count
    _lockstep_wait(spec)  # the other process's last step runs alone
    shares = None
    if profiler is not None:
        profiler.__exit__(None, None, None)
        print(
            profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15),
            file=sys.stderr,
        )
        shares = profile_shares(profiler.events())
    steps = len(batches) - 1
    total = sum(times.values())
    val_batches = [
        list(range(i, min(i + spec["batch_size"], len(val_items))))
        for i in range(0, len(val_items), spec["batch_size"])
    ][:5]
    val_loss = None
    if not spec.get("longest"):
        val_loss = evaluate_loss(
            model,
            val_items,
            val_batches,
            collate,
            device=torch.device("cpu"),
            precision=spec["precision"],
        )
    peak32 = matmul_peak_flops(torch.float32, n=peak_n)
    # MFU against the peak of the precision the row trains in (the bf16 target is a
    # share of the bf16 peak), and against the fp32 peak too, which compares the rows.
    peak = peak32 if dtype == torch.float32 else matmul_peak_flops(dtype, n=peak_n)
    return {
        **{k: spec[k] for k in ("model", "precision", "grouped", "batch_size", "threads")},
        "checkpointing": spec.get("checkpointing", False),
        "steps": steps,
        "n_params": n_params,
        "positions_per_s": positions / total,
        "supervised_per_s": supervised / total,
        "padding_share": 1 - supervised / positions,
        "s_per_step": {k: v / steps for k, v in times.items()},
        "peak_rss_bytes": peak_rss_bytes(),
        "fp32_peak_flops": peak32,
        "peak_flops": peak,
        "mfu": supervised_mfu(n_params, supervised / total, peak),
        "mfu_fp32_peak": supervised_mfu(n_params, supervised / total, peak32),
        "step_mfus": step_mfus,
        "losses": losses,
        "val_loss": val_loss,
        "longest_batch_positions": max(len(items[i]) for i in batches[0]) * len(batches[0]),
        "profile_shares": shares,
    }


# ---------------------------------------------------------------------------- driver


def _child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--run-one", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"configuration {spec} failed:\n{result.stderr[-3000:]}")
    if spec.get("profile"):
        print(result.stderr)
    r = json.loads(result.stdout.strip().splitlines()[-1])
    if r.get("profile_shares"):  # absent for transformers' reference
        shares = r["profile_shares"]
        total = sum(shares.values())
        order = ("matmuls", "attention", "normalisation", "activations", "fused loss")
        parts = [f"{k} {shares.get(k, 0.0) / total:.0%}" for k in (*order, "optimizer", "rest")]
        print(
            f"profile {spec['model']} {spec['precision']} "
            f"{'grouped' if spec['grouped'] else 'shuffled'}: self CPU time {total:.1f} s over "
            f"{r['steps']} steps: " + ", ".join(parts)
        )
    return r


def _lockstep(spec: dict) -> tuple[dict, dict]:
    """Ours and the reference in two processes that take turns, one optimizer step each.

    Each process keeps its own heap, as in separate runs, but the machine's speed, which
    drifts by 15% and more over minutes on a shared VM, is the same for both within a pair of
    steps. Returns (ours, reference)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    specs = ({**spec, "lockstep": True}, {**spec, "lockstep": True, "transformers": True})
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for k, one in enumerate(specs):
            with open(Path(tmp) / f"stderr{k}", "w") as err:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, __file__, "--run-one", json.dumps(one)],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        text=True,
                        env=env,
                    )
                )

        def failed(k: int) -> SystemExit:
            procs[1 - k].kill()
            tail = (Path(tmp) / f"stderr{k}").read_text()[-3000:]
            return SystemExit(f"configuration {specs[k]} failed:\n{tail}")

        for _step in range(spec["steps"] + 1):  # the warm-up step too
            for k, proc in enumerate(procs):
                proc.stdin.write("go\n")
                proc.stdin.flush()
                while (line := proc.stdout.readline()) != "step done\n":
                    if not line:
                        raise failed(k)
        results = []
        for k, proc in enumerate(procs):
            out, _ = proc.communicate()
            if proc.returncode != 0:
                raise failed(k)
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results[0], results[1]


def _print_row(r: dict) -> None:
    s = r["s_per_step"]
    val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else "-"
    print(
        f"{r['model']:<22} {r['precision']:<5} {'grouped' if r['grouped'] else 'shuffled':<9}"
        f"{r['positions_per_s']:>9.0f} {r['supervised_per_s']:>9.0f} {r['padding_share']:>6.1%}"
        f"  {s['data']:.3f}/{s['forward']:.3f}/{s['backward']:.3f}/{s['optimizer']:.3f}"
        f" {r['peak_rss_bytes'] / 1e9:>6.2f} {r['mfu']:>6.1%} {val:>8}",
        flush=True,
    )
    notes = []
    if r["precision"] != "fp32":
        notes.append(
            f"MFU against this process's {r['precision']} peak {r['peak_flops'] / 1e9:.1f} "
            f"GFLOP/s; {r['mfu_fp32_peak']:.1%} of its fp32 peak {r['fp32_peak_flops'] / 1e9:.1f}"
        )
    if r["step_mfus"]:
        m = sorted(r["step_mfus"])
        notes.append(
            f"against a probe after each step: median {statistics.median(m):.1%} "
            f"(steps {m[0]:.1%} to {m[-1]:.1%})"
        )
    for note in notes:
        print(f"{'':<4}{note}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the book's instruction-data.json")
    p.add_argument("--models", default="gpt2,smollm2-135m-instruct")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batching", default="shuffled,grouped")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per configuration")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--quick", action="store_true", help="gpt2 only, 3 steps")
    p.add_argument(
        "--memory",
        action="store_true",
        help="gpt2-medium fp32: peak memory and speed against the book-style reference",
    )
    p.add_argument(
        "--checkpoint-blocks",
        default="24,16,0",
        help="--memory: how many of the 24 blocks recompute their activations, one run each",
    )
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top ops")
    p.add_argument(
        "--no-in-backward",
        action="store_true",
        help="--memory: a plain fused AdamW step instead of the step inside backward",
    )
    p.add_argument("--force-bf16", action="store_true", help="run bf16 even on CPUs without it")
    p.add_argument(
        "--no-transformers", action="store_true", help="skip transformers' reference (gpt2)"
    )
    p.add_argument(
        "--no-packing", action="store_true", help="train on padded batches (before packing)"
    )
    p.add_argument(
        "--mmap-heap",
        action="store_true",
        help="leave glibc's malloc at its defaults: large buffers unmapped when freed and "
        "faulted in again every step (before instructune kept freed memory, utils/heap.py)",
    )
    p.add_argument(
        "--lockstep",
        action="store_true",
        help="gpt2 fp32: ours and transformers' reference in two processes taking turns step "
        "by step (the ratio is then robust to the machine's drifting speed)",
    )
    p.add_argument(
        "--step-peak",
        action="store_true",
        help="also time one 4096x4096 product after every step and print the median of each "
        "step's MFU against the probe after it (robust to the machine's drifting speed)",
    )
    p.add_argument(
        "--curve-steps",
        type=int,
        default=50,
        help="bf16 against fp32: compare the training loss over this many steps of the book's "
        "shuffled batches, per model (0: skip; needs a CPU with fast bf16 or --force-bf16)",
    )
    p.add_argument("--run-one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.run_one:
        print(json.dumps(run_one(json.loads(args.run_one))))
        return 0
    if not Path(args.data).exists():
        raise SystemExit(
            f"{args.data} not found; pass --data PATH to the book's instruction-data.json"
        )

    import torch

    from instructune.training.metrics import matmul_peak_flops

    torch.set_num_threads(args.threads)
    print(cpu_line())
    print(f"torch {torch.__version__}, {args.threads} threads")
    peak32 = matmul_peak_flops(torch.float32)
    # A CPU without bf16 instructions emulates bf16 matmuls ~50x slower than fp32; one small
    # probe avoids minutes of 4096^3 bf16 products that would only confirm it.
    probe16 = matmul_peak_flops(torch.bfloat16, n=512, repeats=1)
    slow_bf16 = probe16 < 0.5 * peak32 and not args.force_bf16
    if slow_bf16:
        print(
            f"matmul peak (median of 3 mm 4096x4096): fp32 {peak32 / 1e9:.1f} GFLOP/s; bf16 "
            f"{probe16 / 1e9:.2f} GFLOP/s on a 512x512 probe ({probe16 / peak32:.3f}x fp32):"
        )
        print(
            "  this CPU lacks fast bf16 matmuls (no AVX512-BF16/AMX), so the bf16 rows are "
            "skipped (--force-bf16 runs them anyway)"
        )
    else:
        peak16 = matmul_peak_flops(torch.bfloat16)
        print(
            f"matmul peak (median of 3 mm 4096x4096): fp32 {peak32 / 1e9:.1f} GFLOP/s, "
            f"bf16 {peak16 / 1e9:.1f} GFLOP/s ({peak16 / peak32:.2f}x)"
        )

    base = {
        "data": args.data,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "max_length": args.max_length,
        "profile": args.profile,
        "no_packing": args.no_packing,
        "mmap_heap": args.mmap_heap,
        "step_peak": args.step_peak,
        # --force-bf16 on a CPU that emulates bf16: a 4096^3 bf16 probe would take minutes.
        "peak_n": 1024 if args.force_bf16 and probe16 < 0.5 * peak32 else 4096,
    }
    if args.memory:
        return _memory(args, base)

    models = ["gpt2"] if args.quick else args.models.split(",")
    steps = 3 if args.quick else args.steps
    print(
        f"{'model':<22} {'prec':<5} {'batches':<9}{'pos/s':>9} {'sup/s':>9} {'pad':>6}"
        f"  data/fwd/bwd/opt s      {'RSS GB':>6} {'MFU':>6} {'val loss':>8}"
    )
    results = []
    for model in models:
        for grouped in [b == "grouped" for b in args.batching.split(",")]:
            for precision in args.precisions.split(","):
                if precision == "bf16" and slow_bf16:
                    continue
                spec = {
                    **base,
                    "model": model,
                    "precision": precision,
                    "grouped": grouped,
                    "steps": steps,
                }
                with_reference = (
                    model == "gpt2" and precision == "fp32" and not args.no_transformers
                )
                if with_reference and args.lockstep:
                    r, ref = _lockstep(spec)
                else:
                    r = _child(spec)
                results.append(r)
                _print_row(r)
                if not with_reference:
                    continue
                if not args.lockstep:  # the reference after ours, on the same batches
                    ref = _child({**spec, "transformers": True, "profile": False})
                print(
                    f"{'  transformers (eager)':<28}{'grouped' if grouped else 'shuffled':<9}"
                    f"{ref['positions_per_s']:>9.0f} {ref['supervised_per_s']:>9.0f}"
                    f"{'':>36}{ref['peak_rss_bytes'] / 1e9:>6.2f}   ours/transformers "
                    f"x{r['supervised_per_s'] / ref['supervised_per_s']:.2f} (target 1.5"
                    f"{'; in lock step' if args.lockstep else ''})",
                    flush=True,
                )
    if not args.quick and args.curve_steps > 0 and "bf16" in args.precisions.split(","):
        loss_curves(models, base, args.curve_steps, skip_reason=NO_FAST_BF16 if slow_bf16 else None)
    for model in models:
        for grouped in (False, True):
            pair = {
                r["precision"]: r
                for r in results
                if r["model"] == model and r["grouped"] == grouped
            }
            if "fp32" in pair and "bf16" in pair:
                a, b = pair["fp32"], pair["bf16"]
                rel = abs(b["val_loss"] - a["val_loss"]) / a["val_loss"]
                print(
                    f"{model} {'grouped' if grouped else 'shuffled'}: bf16/fp32 supervised "
                    f"tokens/s {b['supervised_per_s'] / a['supervised_per_s']:.2f}x; val loss "
                    f"differs by {rel:.2%}"
                )
    return 0


NO_FAST_BF16 = (
    "this CPU has no AVX512-BF16 or AMX, so torch emulates bf16 matmuls ~50x slower than fp32 "
    "and the two runs would take hours; the comparison runs where bf16 is fast (--force-bf16 "
    "runs it anyway)"
)


def curve_gap(reference: list[float], other: list[float]) -> tuple[float, int, float]:
    """How far ``other`` strays from ``reference``, step by step, as a share of the reference:
    (the largest gap, the step where it is, the mean gap)."""
    if not reference or len(reference) != len(other):
        raise ValueError(f"curves of {len(reference)} and {len(other)} steps")
    gaps = [abs(b - a) / abs(a) for a, b in zip(reference, other, strict=True)]
    worst = max(range(len(gaps)), key=gaps.__getitem__)
    return gaps[worst], worst, statistics.mean(gaps)


def loss_curves(models: list[str], base: dict, steps: int, *, skip_reason: str | None) -> None:
    """Issue 14.3's quality check: the training loss of bf16 autocast against fp32 over the
    first ``steps`` steps of the book's shuffled batches, same weights, same batches, each in
    its own process; target: within 2% at every step."""
    print(f"\nbf16 against fp32: training loss over the first {steps} steps (target: within 2%)")
    if skip_reason:
        print(f"  skipped: {skip_reason}")
        return
    for model in models:
        spec = {**base, "model": model, "grouped": False, "steps": steps - 1, "profile": False}
        fp32 = _child({**spec, "precision": "fp32"})["losses"]
        bf16 = _child({**spec, "precision": "bf16"})["losses"]
        worst, at, mean = curve_gap(fp32, bf16)
        marks = sorted({0, steps // 4, steps // 2, 3 * steps // 4, steps - 1})
        print(
            f"  {model}: largest gap {worst:.2%} (step {at}), mean {mean:.2%} -> "
            f"{'within' if worst <= 0.02 else 'NOT within'} 2%"
        )
        for name, curve in (("fp32", fp32), ("bf16", bf16)):
            points = ", ".join(f"{k}: {curve[k]:.3f}" for k in marks)
            print(f"    {name} loss at steps {points}", flush=True)


def _memory(args, base: dict) -> int:
    """gpt2-medium fp32 full fine-tuning: peak memory against speed, beside the book-style
    reference (transformers' model, padded batches, full logits, AdamW) in the same run."""
    steps = args.steps
    spec = {**base, "model": "gpt2-medium", "precision": "fp32", "grouped": False}
    spec.update(longest=True, steps=steps)
    print(
        f"gpt2-medium fp32, batch {args.batch_size}: the warm-up step is the batch of the longest "
        f"records (the epoch's peak), then {steps} timed steps of the book's shuffled batches"
    )
    print(f"{'configuration':<52} {'peak RSS GB':>11} {'pos/s':>7} {'s/step':>7}")
    ref = None
    if not args.no_transformers:
        ref = _child({**spec, "transformers": True})
        print(
            f"{'book-style reference (transformers, AdamW, no recompute)':<52} "
            f"{ref['peak_rss_bytes'] / 1e9:>11.2f} {ref['positions_per_s']:>7.1f}",
            flush=True,
        )
    optimizer = "AdamW step" if args.no_in_backward else "AdamW inside backward"
    for blocks in [int(b) for b in args.checkpoint_blocks.split(",")]:
        r = _child({**spec, "in_backward": not args.no_in_backward, "checkpointing": blocks})
        label = f"instructune, {optimizer}, {blocks}/24 blocks recomputed"
        line = (
            f"{label:<52} {r['peak_rss_bytes'] / 1e9:>11.2f} {r['positions_per_s']:>7.1f} "
            f"{sum(r['s_per_step'].values()):>7.1f}"
        )
        if ref is not None:
            line += (
                f"   memory x{r['peak_rss_bytes'] / ref['peak_rss_bytes']:.2f} (target <= 0.6), "
                f"speed x{r['positions_per_s'] / ref['positions_per_s']:.2f} (target >= 1)"
            )
        print(line, flush=True)
    epoch_positions = _epoch_positions(args)
    print(f"a full epoch of shuffled batches is {epoch_positions} positions")
    return 0


def _epoch_positions(args) -> int:
    from instructune.data.dataset import tokenize_records
    from instructune.data.records import load_records, split_records
    from instructune.data.sampling import batch_order
    from instructune.tokenization import load_tokenizer

    tok = load_tokenizer("gpt2")
    train, _, _ = split_records(load_records(args.data))
    lengths = [min(len(i), args.max_length + 1) - 1 for i in tokenize_records(train, tok, "alpaca")]
    return sum(
        max(lengths[i] for i in b) * len(b)
        for b in batch_order(lengths, args.batch_size, seed=123, epoch=0)
    )


if __name__ == "__main__":
    raise SystemExit(main())
