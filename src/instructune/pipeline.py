"""The book's chapter 7 as one job: data -> model -> train -> answer the test split -> evaluate.

``run_finetune(cfg)`` writes into ``cfg.out``:

- the model (``save_model``: config.json, model.safetensors, tokenizer files,
  generation_config.json, instructune.json with the prompt format),
- ``metrics.jsonl`` (see ``instructune.training.metrics``), ``loss.png`` and ``loss.pdf``,
- ``responses.json``: the test records, each with ``model_response`` (the book's format),
- ``run.json``: every setting, library versions, timings, peak memory and the results,
- ``checkpoints/``: training checkpoints (``--resume`` continues from the newest valid one),
- ``scores.json`` and the evaluation report (when the evaluation module is installed).
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructune.config import FinetuneConfig
from instructune.errors import InstructuneError
from instructune.utils.io import atomic_write_json

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
RESPONSES_FILE = "responses.json"
# What --overwrite removes before a fresh run (other outputs are replaced atomically).
_RUN_STATE = ("checkpoints", METRICS_FILE, RUN_FILE, RESPONSES_FILE)


class RunDirError(InstructuneError):
    """The output directory is in the way (exists without --overwrite, or nothing to resume)."""


def _info(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            print(message, flush=True)

    return log


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- run directory


def prepare_run_dir(out: Path, *, overwrite: bool, resume: bool) -> None:
    """Refuse to touch an existing non-empty directory unless --overwrite (or --resume)."""
    if resume:
        if not (out / RUN_FILE).exists():
            raise RunDirError(f"{out} holds no {RUN_FILE}: there is no run to resume there")
        return
    if out.exists() and not out.is_dir():
        raise RunDirError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(
                f"{out} already exists and is not empty; pass --overwrite to replace its run, "
                f"--resume {out} to continue it, or choose another --out"
            )
        for name in _RUN_STATE:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def load_run_config(run_dir: str | os.PathLike) -> FinetuneConfig:
    """The settings a run was started with (from its run.json), for ``--resume``."""
    import json

    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path} to resume the run: {exc}") from None
    cfg = FinetuneConfig.from_dict(data.get("config", {}), source=str(path))
    cfg.out = str(run_dir)
    return cfg


# ---------------------------------------------------------------------------- data


def load_splits(cfg: FinetuneConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test) records: the book's 85/10/5 split, or separate val/test files."""
    from instructune.data.records import split_records
    from instructune.data.sources import load_source

    def load(source: str) -> list[dict]:
        records = load_source(source)
        for issue in getattr(records, "warnings", []):
            _warn(f"warning: {issue}")
        return list(records)

    if cfg.val_data is None and cfg.test_data is None:
        train, test, val = split_records(load(cfg.data), shuffle_seed=cfg.split_shuffle_seed)
    else:
        train = load(cfg.data)
        val = load(cfg.val_data) if cfg.val_data else []
        test = load(cfg.test_data) if cfg.test_data else []
    return list(train), list(val), list(test)


# ---------------------------------------------------------------------------- model


def parse_overrides(text: str) -> dict[str, Any]:
    """``"n_layers=2,emb_dim=64,qkv_bias=false"`` -> a dict of typed values."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise InstructuneError(f"model override {part!r} is not NAME=VALUE")
        key, value = (s.strip() for s in part.split("=", 1))
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
        elif lowered in ("none", "null"):
            out[key] = None
        else:
            for cast in (int, float):
                try:
                    out[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                out[key] = value
    return out


def load_for_training(cfg: FinetuneConfig, device):
    """``load_model`` for the run; with ``model_overrides`` a smaller random model of that name.

    Returns a LoadedModel-like object (model, tokenizer, config, prompt_format, source).
    """
    import torch

    from instructune.checkpoints import load_model

    if not cfg.model_overrides:
        return load_model(cfg.model, init=cfg.init, device=device, dtype=torch.float32)
    if cfg.init != "random":
        raise InstructuneError(
            "model_overrides change the model's shape, so they need --init random "
            f"(got --init {cfg.init} for {cfg.model})"
        )
    from instructune.models import build_model, get_config

    model_cfg = get_config(cfg.model, **cfg.model_overrides)
    if model_cfg.arch == "gpt2":
        from instructune.tokenization import load_tokenizer

        tokenizer = load_tokenizer("gpt2")
    else:  # the tokenizer of the full-size model of that name
        tokenizer = load_model(cfg.model, init="random", device="meta").tokenizer
    model = build_model(model_cfg, device=device, dtype=torch.float32)
    return types.SimpleNamespace(
        model=model, tokenizer=tokenizer, config=model_cfg, prompt_format=None, source=cfg.model
    )


def resolve_precision(precision: str, device) -> str:
    """auto -> fp32 on CPU/MPS (the book's numbers), bf16 on CUDA that has it, else fp16."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


# ---------------------------------------------------------------------------- the job


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


def build_loop_data(
    cfg: FinetuneConfig,
    tokenizer,
    style: str,
    train_records: list[dict],
    val_records: list[dict],
    world_size: int = 1,
):
    """Tokenise once and describe the batches: the loop's ``LoopData``.

    One optimizer step takes a global batch of ``batch_size x grad_accum x world_size``
    records from the pure ``batch_order`` (shuffled, or length-grouped; the last incomplete
    batch dropped, as the book's ``drop_last=True``); validation batches are in file order.
    """
    from instructune.data.collate import make_collate
    from instructune.data.dataset import tokenize_records
    from instructune.data.sampling import batch_order
    from instructune.training.loop import LoopData

    train_items = tokenize_records(train_records, tokenizer, style)
    val_items = tokenize_records(val_records, tokenizer, style)
    collate = make_collate(
        pad_id=tokenizer.pad_id, max_length=cfg.max_length, mask_prompt=cfg.mask_instructions
    )
    lengths = [len(item) for item in train_items]
    global_batch = cfg.batch_size * cfg.grad_accum * world_size

    def order(epoch: int) -> list[list[int]]:
        return batch_order(
            lengths,
            global_batch,
            seed=cfg.seed,
            epoch=epoch,
            shuffle=True,
            group_by_length=cfg.group_by_length,
            drop_last=True,
        )

    val_lengths = [len(i) for i in val_items]
    val_batches = batch_order(
        val_lengths, cfg.batch_size, seed=cfg.seed, shuffle=False, drop_last=False
    )
    return LoopData(train_items, val_items, collate, order, val_batches)


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


def _read_run_json(out: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as training saw them: BOS once when the tokenizer adds one (a chat template
    may already have rendered it as text)."""
    ids = list(tokenizer.encode(prompt))
    if tokenizer.add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
    return ids


def answer_test_split(
    model,
    tokenizer,
    records: list[dict],
    *,
    style: str,
    prompt_format,
    max_new_tokens: int,
    batch_size: int,
    out_path: Path,
    limit: int | None = None,
    quiet: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Greedy answers for the test records (the book's 7.7), saved as responses.json.

    Returns the records with ``model_response`` and a count of finish reasons
    (``eos``: the model emitted its end token before ``max_new_tokens``).
    """
    from instructune.data.prompts import extract_response, format_prompt
    from instructune.generation import generate

    records = records[:limit] if limit is not None else records
    prompts = [
        prompt_ids(tokenizer, format_prompt(r, style, chat_template=tokenizer.chat_template))
        for r in records
    ]
    results = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="answering test split", unit="record", disable=quiet)
    for start in range(0, len(prompts), batch_size):
        results += generate(
            model,
            tokenizer,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            stop_ids=[tokenizer.eos_id],
            stop_strings=prompt_format.stop_strings,
            batch_size=batch_size,
        )
        bar.update(min(batch_size, len(prompts) - start))
    bar.close()
    out = []
    finish: dict[str, int] = {}
    for record, result in zip(records, results, strict=True):
        out.append({**record, "model_response": extract_response(result.text, style)})
        finish[result.finish_reason] = finish.get(result.finish_reason, 0) + 1
    atomic_write_json(out_path, out, indent=4)
    return out, finish


def evaluate_outputs(
    cfg: FinetuneConfig, responses: list[dict], out: Path, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """Text metrics (and the judge when configured) via the evaluation module, if present."""
    if not cfg.evaluate or not responses:
        return None
    try:
        from instructune.evaluation import evaluate_responses
    except ImportError:
        say("evaluation skipped: instructune.evaluation.evaluate_responses is not available")
        return None
    try:
        return evaluate_responses(
            responses, out_dir=out, judge=cfg.judge, url=cfg.judge_url, quiet=cfg.quiet
        )
    except InstructuneError as exc:
        if cfg.judge is None:
            raise
        # The judge is optional: keep the text metrics when it cannot be reached.
        _warn(f"warning: the judge failed ({exc}); scoring with text metrics only")
        return evaluate_responses(responses, out_dir=out, judge=None, quiet=cfg.quiet)
