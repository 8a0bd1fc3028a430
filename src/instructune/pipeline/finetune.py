"""``run_finetune(cfg)``: the chapter-7 job as the stages it runs.

    start -> set_up -> train -> save -> answer -> evaluate

- ``start``: the machine (device, processes, precision), the run directory, and the date the
  run's prompts see (saved in run.json, so a resume on another day formats them alike).
- ``set_up``: data, model, tokenised batches, optimizer; on ``--resume`` the newest valid
  checkpoint restored (a finished run with a later end set is extended).
- ``train``: the book's initial losses, then the training loop to the last step.
- ``save``: the model (loadable by ``load_model`` and transformers) and the loss plot.
- ``answer``: the test split's answers (resumable: a run killed while answering continues).
- ``evaluate``: scores, and the final run.json.

Each stage is a function of :class:`Run`, the state handed from one stage to the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructune.config import ConfigError, FinetuneConfig
from instructune.errors import StorageError
from instructune.pipeline.data import build_loop_data, global_batch, load_splits
from instructune.pipeline.messages import _info, _warn
from instructune.pipeline.model import load_for_training, resolve_max_length, resolve_precision
from instructune.pipeline.outputs import answer_test_split, evaluate_outputs, sample_answer
from instructune.pipeline.run_dir import (
    METRICS_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    RunDirError,
    check_same_batches,
    prepare_run_dir,
    prompt_date_of,
    read_run_json,
)
from instructune.utils.io import atomic_write_json

if TYPE_CHECKING:
    import torch

    from instructune.checkpoints.load import LoadedModel
    from instructune.training.distributed import DistInfo
    from instructune.training.loop import LoopData, LoopSettings
    from instructune.training.state import TrainProgress


def run_finetune(
    cfg: FinetuneConfig, *, resume: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the whole fine-tuning job into ``cfg.out`` and return a summary (also in run.json).

    With ``resume=True`` it continues the run in ``cfg.out`` from its newest valid checkpoint
    with the same data order, random state and prompt date; a finished run whose ``epochs`` or
    ``max_steps`` now end later is trained on to the new end. Raises InstructuneError
    subclasses for bad input, ``TrainingDiverged`` on a NaN/inf loss and
    ``TrainingInterrupted`` (a KeyboardInterrupt) after saving a checkpoint on Ctrl-C.
    """
    from instructune.data.prompts import use_prompt_date

    run = start(cfg, resume=resume, log=log)
    # Chat templates may print today's date (strftime_now): every prompt of the run, in
    # training, samples and answers, sees the run's own date instead.
    with use_prompt_date(run.prompt_date):
        set_up(run)
        summary = train(run)
        if not run.info.is_main:  # the other processes only train
            return summary
        save(run)
        responses = answer(run, summary)
        evaluate(run, summary, responses)
    return summary


@dataclass
class Run:
    """The state one stage hands to the next. ``start`` fills the first group, ``set_up``
    the second (they are unset before it runs)."""

    cfg: FinetuneConfig
    resume: bool
    out: Path
    device: torch.device
    info: DistInfo
    precision: str
    quiet: bool
    say: Callable[[str], None]
    prompt_date: datetime.date
    previous: dict[str, Any]  # the resumed run's run.json; {} for a fresh run
    started: float  # time.perf_counter() at the start
    timings: dict[str, float] = field(default_factory=dict)
    lora_base: str | None = None  # a LoRA run: the base its adapter names (set_up sets it)
    # What the loop minimises (start sets finetune's supervised loss, which the dpo job
    # replaces), and what a job adds to run.json (DPO: its reference log-probabilities).
    objective: Any = None
    job_info: dict[str, Any] = field(default_factory=dict)

    loaded: LoadedModel = field(init=False)  # prompt_format: the run's, saved with the model
    style: str = field(init=False)
    train_records: list[dict] = field(init=False)
    val_records: list[dict] = field(init=False)
    test_records: list[dict] = field(init=False)
    data: LoopData = field(init=False)
    settings: LoopSettings = field(init=False)
    optimizer: Any = field(init=False)
    scaler: Any = field(init=False)  # GradScaler for fp16, else None
    progress: TrainProgress = field(init=False)
    total_steps: int = field(init=False)
    run_info: dict[str, Any] = field(init=False)  # what run.json holds


# ------------------------------------------------------------------------------ start


def start(
    cfg: FinetuneConfig, *, resume: bool = False, log: Callable[[str], None] | None = None
) -> Run:
    """The machine, the run directory and the run's prompt date; nothing heavy is loaded.

    On resume, the run's run.json is read and a changed number of processes or global
    batch is refused here, before anything is written.
    """
    import torch

    from instructune.config import format_config
    from instructune.training import distributed as dist
    from instructune.training.loop import SupervisedObjective
    from instructune.utils.devices import pick_device

    cfg.validate()
    if not cfg.prompt_gradient and (not cfg.mask_instructions or cfg.loss_average != "token"):
        raise ConfigError(
            "setting 'prompt_gradient': off needs mask_instructions (a loss on the answers "
            "alone) and loss_average token"
        )
    started = time.perf_counter()
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
    previous: dict[str, Any] = {}
    if resume:
        previous = read_run_json(out)
        check_same_batches(
            previous, world_size=info.world_size, global_batch=global_batch(cfg, info.world_size)
        )
    # Rank 0's date for every process: a fresh run started at midnight must not split it.
    ordinal = prompt_date_of(previous).toordinal() if info.is_main else 0
    prompt_date = datetime.date.fromordinal(dist.sum_ints([ordinal], info, device)[0])

    precision = resolve_precision(cfg.precision, device)
    if precision == "bf16" and device.type == "cpu":
        say("note: bf16 autocast on CPU; fast only where the CPU has bf16 matrix instructions")
    say(format_config(cfg))
    say(
        f"device {device}, precision {precision}, {torch.get_num_threads()} threads, "
        f"{info.world_size} process(es), prompt date {prompt_date.isoformat()}"
    )
    return Run(
        cfg=cfg,
        resume=resume,
        out=out,
        device=device,
        info=info,
        precision=precision,
        quiet=quiet,
        say=say,
        prompt_date=prompt_date,
        previous=previous,
        started=started,
        objective=SupervisedObjective(
            per_record=cfg.loss_average == "record", fixed_prompts=not cfg.prompt_gradient
        ),
    )


# ------------------------------------------------------------------------------ set_up


def set_up(
    run: Run,
    *,
    load_data: Callable[[FinetuneConfig], tuple[list, list, list]] = load_splits,
    make_data: Callable[[Run, int], LoopData] | None = None,
) -> None:
    """Data, model, tokenised batches and optimizer; on resume, the checkpoint restored.

    Writes run.json (status "running"). Raises ConfigError for a ``max_length`` longer than
    the model's context, before any tokenising or training. Another job (DPO) passes its own
    ``load_data`` (config -> train, val, test records) and ``make_data`` (the run with its
    model and records, and the max length -> the loop's data); both run before a checkpoint
    is restored, on the starting weights.
    """
    import torch

    from instructune.data.prompts import (
        multi_turn_notice,
        prompt_format_for,
        system_turn_notice,
        trained_system_prompt,
    )
    from instructune.training.loop import make_optimizer
    from instructune.training.metrics import environment
    from instructune.training.state import TrainProgress, seed_everything

    cfg, info = run.cfg, run.info
    t0 = time.perf_counter()
    # Every rank starts from the same seed, so random initial weights agree before DDP copies
    # rank 0's; afterwards the other ranks switch to their own stream (their dropout masks).
    seed_everything(cfg.seed)
    run.train_records, run.val_records, run.test_records = load_data(cfg)
    loaded = load_for_training(cfg, run.device)
    # Before the processes' streams part: every rank draws the same adapter init.
    lora_info = _apply_lora(run, loaded)
    _freeze(run, loaded, lora_info)
    if info.rank:
        seed_everything(cfg.seed, info.rank)
    max_length = resolve_max_length(cfg.max_length, loaded)
    saved_format = loaded.prompt_format
    run.style = cfg.style or (saved_format.style if saved_format is not None else "alpaca")
    # Not given: a model trained with a system prompt is trained on with it.
    system_prompt = (
        cfg.system_prompt
        if cfg.system_prompt is not None
        else trained_system_prompt(saved_format, run.style)
    )
    run.timings["load_s"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in loaded.model.parameters())
    run.say(
        f"data: {len(run.train_records)} train, {len(run.val_records)} val, "
        f"{len(run.test_records)} test records; model {loaded.source} ({n_params / 1e6:.1f}M "
        f"parameters; weights: {loaded.weights}), style {run.style}, max length {max_length}"
    )
    for notice in (
        system_turn_notice(run.train_records, run.style),
        multi_turn_notice(run.train_records, run.style),
    ):
        if notice is not None and info.is_main:
            _warn(notice)

    t0 = time.perf_counter()
    # Answers and samples are prompted as the saved model will be: with the run's format.
    run.loaded = dataclasses.replace(
        loaded, prompt_format=prompt_format_for(loaded.tokenizer, run.style, system_prompt)
    )
    if make_data is not None:
        run.data = make_data(run, max_length)
    else:
        run.data = build_loop_data(
            cfg,
            loaded.tokenizer,
            run.style,
            run.train_records,
            run.val_records,
            info.world_size,
            max_length=max_length,
            system_prompt=system_prompt,
        )
    run.timings["tokenize_s"] = time.perf_counter() - t0

    if cfg.activation_checkpointing:
        loaded.model.gradient_checkpointing = True
    run.optimizer = make_optimizer(
        loaded.model,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        device=run.device,
        in_backward=cfg.optimizer_in_backward,
    )
    run.scaler = torch.amp.GradScaler(run.device.type) if run.precision == "fp16" else None
    run.settings = loop_settings(cfg, precision=run.precision, quiet=run.quiet)
    run.total_steps = _last_step(cfg, len(run.data.order(0)))
    run.progress = TrainProgress()
    run.run_info = {
        "status": "running",
        "config": cfg.to_dict(),
        "style": run.style,
        "model": {"source": loaded.source, "weights": loaded.weights},
        "lora": lora_info,
        "max_length": max_length,
        "prompt_date": run.prompt_date.isoformat(),
        "precision": run.precision,
        "device": str(run.device),
        "world_size": info.world_size,
        "global_batch": global_batch(cfg, info.world_size),
        "seed": cfg.seed,
        "environment": environment(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "resumed_from": None,
        **run.job_info,
    }
    if run.resume:
        _restore(run)
    if info.is_main:
        atomic_write_json(run.out / RUN_FILE, run.run_info)


def _freeze(run: Run, loaded: LoadedModel, lora_info: dict[str, Any] | None) -> None:
    """``freeze_blocks``: fix the embeddings and the lowest blocks (full fine-tuning only)."""
    from instructune.models.freeze import freeze_lower_blocks
    from instructune.models.lora import count_parameters

    blocks = run.cfg.freeze_blocks
    if blocks is None:
        return
    if lora_info is not None:
        raise ConfigError(
            "setting 'freeze_blocks' is for full fine-tuning; LoRA already keeps every base "
            "weight fixed (leave out --freeze-blocks or --lora-rank)"
        )
    try:
        freeze_lower_blocks(loaded.model, blocks)
    except ValueError as exc:
        raise ConfigError(f"setting 'freeze_blocks': {exc}") from None
    trainable, total = count_parameters(loaded.model)
    run.say(
        f"training blocks {blocks}-{len(loaded.model.blocks) - 1} only (the embeddings"
        f"{' and blocks 0-' + str(blocks - 1) if blocks else ''} fixed): {trainable:,} trainable "
        f"of {total:,} parameters ({100 * trainable / total:.2f}%)"
    )


def _apply_lora(run: Run, loaded: LoadedModel) -> dict[str, Any] | None:
    """A LoRA run: adapters on the loaded model (or the adapter it was loaded with), the base
    they will name, and the parameter counts (printed; returned for run.json). None for full
    fine-tuning.

    A model loaded from an adapter directory trains that adapter further: ``--lora-*``
    settings must then match it (ConfigError otherwise). A random-init base cannot be loaded
    again by name, so it is saved in ``out/base`` (the main process) for the adapter to name.
    """
    from instructune.checkpoints.adapter import is_adapter_dir, read_adapter_config
    from instructune.checkpoints.load import RANDOM_INIT
    from instructune.checkpoints.native import save_model
    from instructune.models.lora import (
        LoraSettings,
        apply_lora,
        count_parameters,
        lora_settings,
        parse_targets,
    )

    cfg = run.cfg
    existing = lora_settings(loaded.model)
    if existing is None and cfg.lora_rank is None:
        return None
    if existing is not None:
        asked = (
            cfg.lora_rank,
            cfg.lora_alpha,
            parse_targets(cfg.lora_targets),
        )
        have = (existing.rank, existing.lora_alpha, existing.targets)
        if cfg.lora_rank is not None and (
            asked[0] != have[0]
            or (asked[1] is not None and asked[1] != have[1])
            or asked[2] != have[2]
        ):
            raise ConfigError(
                f"{cfg.model} is a LoRA adapter (r={existing.rank}, alpha={existing.lora_alpha:g},"
                f" targets {','.join(existing.targets)}): leave out --lora-* to train it further,"
                " or merge it first (instructune merge) to train a new adapter on the result"
            )
        settings = existing
        run.lora_base = read_adapter_config(cfg.model)[1]
    else:
        settings = LoraSettings(
            rank=cfg.lora_rank,
            alpha=cfg.lora_alpha,
            dropout=cfg.lora_dropout,
            targets=parse_targets(cfg.lora_targets),
        )
        if loaded.weights == RANDOM_INIT:
            base_dir = run.out / "base"
            if run.info.is_main:
                save_model(base_dir, loaded.model, loaded.tokenizer, loaded.config)
            run.lora_base = str(base_dir.resolve())
        elif Path(cfg.model).expanduser().exists() and not is_adapter_dir(cfg.model):
            run.lora_base = str(Path(cfg.model).expanduser().resolve())
        else:
            run.lora_base = cfg.model
        apply_lora(loaded.model, settings)
    trainable, total = count_parameters(loaded.model)
    run.say(
        f"LoRA r={settings.rank} alpha={settings.lora_alpha:g} dropout={settings.dropout:g} on "
        f"{','.join(settings.targets)}: {trainable:,} trainable of {total:,} parameters "
        f"({100 * trainable / total:.2f}%)"
    )
    return {
        "rank": settings.rank,
        "alpha": settings.lora_alpha,
        "dropout": settings.dropout,
        "targets": list(settings.targets),
        "base": run.lora_base,
        "trainable_parameters": trainable,
        "total_parameters": total,
    }


def _last_step(cfg: FinetuneConfig, steps_per_epoch: int) -> int:
    """The optimizer step the settings end at: ``max_steps`` if set, else whole epochs."""
    return cfg.max_steps if cfg.max_steps is not None else cfg.epochs * steps_per_epoch


def _restore(run: Run) -> None:
    """Load the newest valid checkpoint into the run: weights, optimizer, random state, step.

    A run that had reached its end and now has a later one (more ``epochs`` or ``max_steps``)
    is extended: it trains on from there (``answer`` then answers again: the answers it had
    were written by other weights).
    """
    from instructune.training.metrics import truncate_metrics
    from instructune.training.state import latest_valid_checkpoint, load_checkpoint

    out, info = run.out, run.info
    ckpt = latest_valid_checkpoint(out, warn=_warn)
    if ckpt is None:
        raise RunDirError(f"{out} has no usable checkpoint to resume from")
    progress, state = load_checkpoint(
        ckpt, model=run.loaded.model, optimizer=run.optimizer, scaler=run.scaler, rank=info.rank
    )
    if not state.get("optimizer_restored"):
        _warn(f"warning: {ckpt} has no optimizer state; AdamW starts afresh from there")
    if progress.step > run.total_steps:
        raise ConfigError(
            f"the run in {out} has trained {progress.step} steps; its settings now end at step "
            f"{run.total_steps}, and a run cannot be shortened. Set epochs/max_steps to end at "
            f"step {progress.step} or later (or use the model it saved: --model {out})"
        )
    config_class = type(run.cfg)
    old_cfg = config_class.from_dict(run.previous.get("config", {}), source=str(out / RUN_FILE))
    old_end = _last_step(old_cfg, len(run.data.order(0)))
    run.progress = progress
    run.run_info["started"] = run.previous.get("started", run.run_info["started"])
    run.run_info["resumed_from"] = str(ckpt)
    if old_end <= progress.step < run.total_steps:
        run.say(f"extending the finished run from step {progress.step} to step {run.total_steps}")
        run.run_info["extended_from_step"] = progress.step
        if run.cfg.lr_schedule != "constant":
            run.say(f"note: the {run.cfg.lr_schedule} schedule now runs to step {run.total_steps}")
    else:
        run.say(f"resuming from {ckpt} (step {progress.step}, epoch {progress.epoch + 1})")
    if info.is_main:
        truncate_metrics(out / METRICS_FILE, progress.step)


def loop_settings(cfg: FinetuneConfig, *, precision: str, quiet: bool) -> LoopSettings:
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


# ------------------------------------------------------------------------------ train


def train(run: Run) -> dict[str, Any]:
    """The initial losses (fresh runs), then the loop to the last step; the run's summary.

    On TrainingDiverged, TrainingInterrupted or a full disk (StorageError), run.json's status
    says so before it is raised.
    """
    from instructune.training import distributed as dist
    from instructune.training.loop import TrainingDiverged, TrainingInterrupted
    from instructune.training.loop import train as train_loop
    from instructune.training.metrics import MetricsLog

    cfg, info = run.cfg, run.info
    metrics = MetricsLog(run.out / METRICS_FILE if info.is_main else None)
    try:
        if run.progress.step == 0:
            _initial_losses(run, metrics)
        t0 = time.perf_counter()
        result = train_loop(
            run.loaded.model,
            run.optimizer,
            run.data,
            run.settings,
            device=run.device,
            progress=run.progress,
            info=info,
            run_dir=run.out if info.is_main else None,
            metrics=metrics,
            scaler=run.scaler,
            compile_model=cfg.compile,
            on_epoch_end=(lambda epoch: _sample(run, epoch)) if cfg.sample_every_epoch else None,
            objective=run.objective,
        )
        run.timings["train_s"] = time.perf_counter() - t0
    except (TrainingDiverged, TrainingInterrupted, StorageError) as exc:
        if info.is_main:  # run.json says how the run ended; --resume continues either way
            status = (
                "diverged"
                if isinstance(exc, TrainingDiverged)
                else "disk full"
                if isinstance(exc, StorageError)
                else "interrupted"
            )
            # On a full disk even this small file may not fit: the error above says more.
            with contextlib.suppress(StorageError):
                atomic_write_json(run.out / RUN_FILE, {**run.run_info, "status": status})
        raise
    finally:
        metrics.close()
    dist.barrier(info)
    dist.shutdown(info)
    p = result.progress
    return {
        "out": str(run.out),
        "steps": p.step,
        "epochs": p.epoch,
        "tokens_seen": p.tokens_seen,
        "supervised_tokens": p.supervised_tokens,
        "train_loss": p.last_train_loss,
        "val_loss": p.last_val_loss,
        "best_val_loss": p.best_val_loss,
        "best_step": p.best_step,
        "supervised_tokens_per_s": (
            p.supervised_tokens / p.train_seconds if p.train_seconds else None
        ),
    }


def _initial_losses(run: Run, metrics: Any) -> None:
    """The book prints the losses before training (on ``eval_batches`` batches each), with
    the run's objective (DPO: ln 2 and a margin of 0, the policy being the reference)."""
    from instructune.training.loop import eval_batches_from, eval_record

    cfg, data, objective = run.cfg, run.data, run.objective
    t0 = time.perf_counter()
    first_train = eval_batches_from(data.order(0), cfg.batch_size, cfg.eval_batches)
    first_val = data.val_batches[: cfg.eval_batches]
    kw = dict(device=run.device, precision=run.precision, info=run.info)
    model = run.loaded.model
    train_m = objective.evaluate(model, data.items, first_train, data.collate, **kw)
    val_m = objective.evaluate(model, data.val_items, first_val, data.collate, **kw)
    run.timings["initial_eval_s"] = time.perf_counter() - t0
    for name in train_m:
        label = "loss" if name == "loss" else name.replace("_", " ")
        for where, value in (("Training", train_m[name]), ("Validation", val_m[name])):
            run.say(f"{where} {label}: " + ("n/a" if value is None else f"{value:.4f}"))
    metrics.write(eval_record(0, 0.0, 0, train_m, val_m, lr=cfg.lr, tokens_per_s=0.0))


def _sample(run: Run, epoch: int) -> None:
    """After each epoch, the model's answer to the first validation record (the book's 7.6)."""
    if not run.val_records or run.quiet:
        return
    record = run.val_records[0]
    text = sample_answer(
        run.loaded, record, style=run.style, max_new_tokens=min(run.cfg.max_new_tokens, 64)
    )
    run.say(f"epoch {epoch + 1} sample ({record.get('instruction', '')!r}):\n  {text!r}")


# ------------------------------------------------------------------------------ save


def save(run: Run) -> None:
    """The fine-tuned model with its tokenizer and prompt format (a LoRA run: the adapter
    alone, naming its base), and the loss plot."""
    from instructune.checkpoints import save_model
    from instructune.training.metrics import read_metrics
    from instructune.training.plots import plot_losses

    t0 = time.perf_counter()
    loaded = run.loaded
    if run.lora_base is not None:  # the adapter alone, in PEFT's format (see checkpoints.adapter)
        from instructune.checkpoints.adapter import save_adapter

        fmt = loaded.prompt_format
        save_adapter(run.out, loaded.model, loaded.config, base=run.lora_base, prompt_format=fmt)
    else:
        save_model(run.out, loaded.model, loaded.tokenizer, loaded.config, loaded.prompt_format)
    plot_losses(read_metrics(run.out / METRICS_FILE), run.out)
    run.timings["save_s"] = time.perf_counter() - t0


# ------------------------------------------------------------------------------ answer


def answer(run: Run, summary: dict[str, Any]) -> list[dict]:
    """Greedy answers for the test split into responses.json (continuing a partial one)."""
    t0 = time.perf_counter()
    summary["answer_dtype"] = answer_in_dtype(run, run.loaded.model)
    responses, finish = answer_test_split_as(run, run.loaded, RESPONSES_FILE)
    run.timings["generate_s"] = time.perf_counter() - t0
    summary["responses"] = len(responses)
    summary["finish_reasons"] = finish
    summary["ended_with_eos_share"] = finish.get("eos", 0) / len(responses) if responses else None
    return responses


def answer_test_split_as(
    run: Run, loaded: LoadedModel, filename: str
) -> tuple[list[dict], dict[str, int]]:
    """``loaded``'s greedy answers to the run's test split, with the run's answer settings,
    into ``filename`` in the run directory (continuing a partial one)."""
    return answer_test_split(
        loaded,
        run.test_records,
        style=run.style,
        max_new_tokens=run.cfg.max_new_tokens,
        batch_size=run.cfg.gen_batch_size,
        out_path=run.out / filename,
        limit=run.cfg.test_limit,
        quiet=run.quiet,
    )


def answer_in_dtype(run: Run, model: torch.nn.Module) -> str:
    """Cast ``model`` in place to ``--answer-dtype`` (its weights are saved by now: answering
    is all that is left for them); returns the dtype's name."""
    from instructune.generation.decoding import model_device_dtype
    from instructune.utils.devices import resolve_dtype

    dtype = resolve_dtype(run.cfg.answer_dtype, run.device)
    if model_device_dtype(model)[1] != dtype:
        model.to(dtype)
        run.say(f"answering the test split with {str(dtype).removeprefix('torch.')} weights")
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------ evaluate


def evaluate(run: Run, summary: dict[str, Any], responses: list[dict]) -> None:
    """Score the answers, then write the final run.json (status "finished")."""
    t0 = time.perf_counter()
    summary["evaluation"] = evaluate_outputs(run.cfg, responses, run.out, run.say)
    run.timings["evaluate_s"] = time.perf_counter() - t0
    finish(run, summary)


def finish(run: Run, summary: dict[str, Any]) -> None:
    """The final run.json (status "finished", timings, peak memory, results) and model card."""
    run.timings["total_s"] = time.perf_counter() - run.started
    timings = {k: round(v, 3) for k, v in run.timings.items()}
    run.run_info.update(
        status="finished",
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        timings=timings,
        train_seconds_total=round(run.progress.train_seconds, 3),
        peak_memory=_peak_memory(run.device),
        results=summary,
    )
    atomic_write_json(run.out / RUN_FILE, run.run_info)
    # The model card, now with the final losses and metrics (save() wrote a first one).
    from instructune.checkpoints.model_card import card_from_run, write_model_card

    loaded = run.loaded
    write_model_card(run.out, card_from_run(run.run_info, loaded.config, loaded.prompt_format))
    summary["timings"] = timings
    run.say(f"done in {run.timings['total_s']:.0f} s: model, responses and metrics in {run.out}")


def _peak_memory(device: torch.device) -> dict[str, Any]:
    import torch

    from instructune.training.metrics import peak_rss_bytes

    out: dict[str, Any] = {"ru_maxrss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out
