"""``run_finetune(cfg)``: the chapter-7 job end to end (see :mod:`instructune.pipeline`)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructune.config import FinetuneConfig
from instructune.pipeline.data import build_loop_data, load_splits
from instructune.pipeline.messages import _info, _warn
from instructune.pipeline.model import load_for_training, resolve_precision
from instructune.pipeline.outputs import answer_test_split, evaluate_outputs, prompt_ids
from instructune.pipeline.run_dir import (
    METRICS_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    RunDirError,
    _read_run_json,
    prepare_run_dir,
)
from instructune.utils.io import atomic_write_json


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _peak_memory(device) -> dict[str, Any]:
    import torch

    from instructune.training.metrics import peak_rss_bytes

    out: dict[str, Any] = {"ru_maxrss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def loop_settings(cfg: FinetuneConfig, *, precision: str, quiet: bool):
    """The loop's share of the settings, with the precision resolved."""
    from instructune.training.loop import LoopSettings

    return LoopSettings(
        epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        lr=cfg.lr,
        lr_schedule=cfg.lr_schedule,
        warmup_steps=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        grad_clip=cfg.grad_clip,
        precision=precision,
        eval_every=cfg.eval_every,
        eval_batches=cfg.eval_batches,
        checkpoint_every=cfg.checkpoint_every,
        keep=cfg.keep,
        quiet=quiet,
    )


def run_finetune(
    cfg: FinetuneConfig, *, resume: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the whole fine-tuning job into ``cfg.out`` and return a summary (also in run.json).

    With ``resume=True`` it continues the run in ``cfg.out`` from its newest valid checkpoint
    with the same data order and random state. Raises InstructuneError subclasses for bad
    input, ``TrainingDiverged`` on a NaN/inf loss and ``TrainingInterrupted`` (a
    KeyboardInterrupt) after saving a checkpoint on Ctrl-C.
    """
    import torch

    from instructune.config import format_config
    from instructune.training import distributed as dist
    from instructune.training.loop import (
        TrainingDiverged,
        TrainingInterrupted,
        eval_batches_from,
        evaluate_loss,
        make_optimizer,
    )
    from instructune.training.loop import train as train_loop
    from instructune.training.metrics import MetricsLog, environment, read_metrics
    from instructune.training.state import (
        TrainProgress,
        latest_valid_checkpoint,
        load_checkpoint,
    )
    from instructune.utils.devices import pick_device

    cfg.validate()
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    info = dist.init_distributed(device)
    device = dist.device_for(info, device)
    quiet = cfg.quiet or not info.is_main
    say = log or _info(quiet)
    out = Path(cfg.out)
    if info.is_main:
        prepare_run_dir(out, overwrite=cfg.overwrite, resume=resume)
    dist.barrier(info)
    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cpu":
        say("note: bf16 autocast on CPU; fast only where the CPU has bf16 matrix instructions")
    say(format_config(cfg))
    say(
        f"device {device}, precision {precision}, {torch.get_num_threads()} threads, "
        f"{info.world_size} process(es)"
    )

    # --- data and model -------------------------------------------------------------------
    t0 = time.perf_counter()
    _seed_everything(cfg.seed)
    train_records, val_records, test_records = load_splits(cfg)
    loaded = load_for_training(cfg, device)
    model, tokenizer = loaded.model, loaded.tokenizer
    saved_format = getattr(loaded, "prompt_format", None)
    style = cfg.style or (saved_format.style if saved_format is not None else "alpaca")
    timings["load_s"] = time.perf_counter() - t0
    say(
        f"data: {len(train_records)} train, {len(val_records)} val, {len(test_records)} test "
        f"records; model {loaded.source} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
        f"parameters), style {style}"
    )

    from instructune.data.prompts import prompt_format_for

    t0 = time.perf_counter()
    prompt_format = prompt_format_for(tokenizer, style)
    data = build_loop_data(cfg, tokenizer, style, train_records, val_records, info.world_size)
    timings["tokenize_s"] = time.perf_counter() - t0

    if cfg.activation_checkpointing:
        model.gradient_checkpointing = True
    optimizer = make_optimizer(
        model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        device=device,
        in_backward=cfg.optimizer_in_backward,
    )
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    settings = loop_settings(cfg, precision=precision, quiet=quiet)

    # --- fresh start or resume ------------------------------------------------------------
    progress = TrainProgress()
    metrics_path = out / METRICS_FILE
    run_info: dict[str, Any] = {
        "status": "running",
        "config": cfg.to_dict(),
        "style": style,
        "precision": precision,
        "device": str(device),
        "world_size": info.world_size,
        "seed": cfg.seed,
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": None,
    }
    if resume:
        ckpt = latest_valid_checkpoint(out, warn=_warn)
        if ckpt is None:
            raise RunDirError(f"{out} has no usable checkpoint to resume from")
        progress, state = load_checkpoint(ckpt, model=model, optimizer=optimizer, scaler=scaler)
        if not state.get("optimizer_restored"):
            _warn(f"warning: {ckpt} has no optimizer state; AdamW starts afresh from there")
        if info.is_main:
            from instructune.training.metrics import truncate_metrics

            truncate_metrics(metrics_path, progress.step)
            previous = _read_run_json(out)
            run_info["started"] = previous.get("started", run_info["started"])
        run_info["resumed_from"] = str(ckpt)
        say(f"resuming from {ckpt} (step {progress.step}, epoch {progress.epoch + 1})")
    if info.is_main:
        atomic_write_json(out / RUN_FILE, run_info)
    metrics = MetricsLog(metrics_path if info.is_main else None)

    # The book prints the losses before training (5 batches each).
    if progress.step == 0:
        t0 = time.perf_counter()
        first_train = eval_batches_from(data.order(0), cfg.batch_size, cfg.eval_batches)
        first_val = data.val_batches[: cfg.eval_batches]
        kw = dict(device=device, precision=precision, info=info)
        train_loss = evaluate_loss(model, data.items, first_train, data.collate, **kw)
        val_loss = evaluate_loss(model, data.val_items, first_val, data.collate, **kw)
        timings["initial_eval_s"] = time.perf_counter() - t0
        say(f"Training loss: {train_loss:.4f}")
        say("Validation loss: " + ("n/a" if val_loss is None else f"{val_loss:.4f}"))
        metrics.write(
            {
                "kind": "eval",
                "step": 0,
                "epoch": 0.0,
                "tokens_seen": 0,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "lr": cfg.lr,
                "tokens_per_s": 0.0,
            }
        )

    def sample_after_epoch(epoch: int) -> None:
        if not val_records or quiet:
            return
        from instructune.data.prompts import extract_response, format_prompt
        from instructune.generation import generate

        prompt = format_prompt(val_records[0], style, chat_template=tokenizer.chat_template)
        result = generate(
            model,
            tokenizer,
            [prompt_ids(tokenizer, prompt)],
            max_new_tokens=min(cfg.max_new_tokens, 64),
            stop_ids=[tokenizer.eos_id],
            stop_strings=prompt_format.stop_strings,
        )[0]
        say(f"epoch {epoch + 1} sample ({prompt!r}):\n  {extract_response(result.text, style)!r}")

    t0 = time.perf_counter()
    try:
        result = train_loop(
            model,
            optimizer,
            data,
            settings,
            device=device,
            progress=progress,
            info=info,
            run_dir=out if info.is_main else None,
            metrics=metrics,
            scaler=scaler,
            compile_model=cfg.compile,
            on_epoch_end=sample_after_epoch if cfg.sample_every_epoch else None,
        )
    except (TrainingDiverged, TrainingInterrupted) as exc:
        if info.is_main:  # run.json says how the run ended; --resume continues either way
            status = "diverged" if isinstance(exc, TrainingDiverged) else "interrupted"
            atomic_write_json(out / RUN_FILE, {**run_info, "status": status})
        raise
    finally:
        metrics.close()
    timings["train_s"] = time.perf_counter() - t0
    dist.barrier(info)
    dist.shutdown(info)
    summary: dict[str, Any] = {
        "out": str(out),
        "steps": result.progress.step,
        "epochs": result.progress.epoch,
        "tokens_seen": result.progress.tokens_seen,
        "supervised_tokens": result.progress.supervised_tokens,
        "train_loss": result.progress.last_train_loss,
        "val_loss": result.progress.last_val_loss,
        "best_val_loss": result.progress.best_val_loss,
        "best_step": result.progress.best_step,
        "supervised_tokens_per_s": (
            result.progress.supervised_tokens / result.progress.train_seconds
            if result.progress.train_seconds
            else None
        ),
    }
    if not info.is_main:
        return summary

    # --- outputs ----------------------------------------------------------------------------
    from instructune.checkpoints import save_model
    from instructune.training.plots import plot_losses

    t0 = time.perf_counter()
    save_model(out, model, tokenizer, loaded.config, prompt_format)
    plot_losses(read_metrics(metrics_path), out)
    timings["save_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    responses, finish = answer_test_split(
        model,
        tokenizer,
        test_records,
        style=style,
        prompt_format=prompt_format,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.gen_batch_size,
        limit=cfg.test_limit,
        out_path=out / RESPONSES_FILE,
        quiet=quiet,
    )
    timings["generate_s"] = time.perf_counter() - t0
    summary["responses"] = len(responses)
    summary["finish_reasons"] = finish
    summary["ended_with_eos_share"] = finish.get("eos", 0) / len(responses) if responses else None

    t0 = time.perf_counter()
    summary["evaluation"] = evaluate_outputs(cfg, responses, out, say)
    timings["evaluate_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    run_info.update(
        status="finished",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        timings={k: round(v, 3) for k, v in timings.items()},
        train_seconds_total=round(result.progress.train_seconds, 3),
        peak_memory=_peak_memory(device),
        results=summary,
    )
    atomic_write_json(out / RUN_FILE, run_info)
    summary["timings"] = run_info["timings"]
    say(f"done in {timings['total_s']:.0f} s: model, responses and metrics in {out}")
    return summary
