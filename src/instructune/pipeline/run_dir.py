"""The run directory: its file names, preparing it for a run, and reading a run's settings back."""

from __future__ import annotations

import datetime
import os
import shutil
from pathlib import Path
from typing import Any

from instructune.config import DpoConfig, FinetuneConfig
from instructune.errors import InstructuneError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
RESPONSES_FILE = "responses.json"
# What --overwrite removes before a fresh run (other outputs are replaced atomically).
_RUN_STATE = ("checkpoints", METRICS_FILE, RUN_FILE, RESPONSES_FILE)


class RunDirError(InstructuneError):
    """The output directory is in the way (exists without --overwrite, or nothing to resume)."""


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


def load_run_config(
    run_dir: str | os.PathLike, config_class: type[FinetuneConfig] = FinetuneConfig
) -> FinetuneConfig:
    """The settings a run was started with (from its run.json), for ``--resume``
    (``config_class``: the job's settings, DpoConfig for a DPO run)."""
    import json

    path = Path(run_dir) / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path} to resume the run: {exc}") from None
    saved = data.get("config", {})
    # Only a DPO run's settings have beta: each job resumes its own runs, not the other's.
    job = "dpo" if "beta" in saved else "finetune"
    wanted = "dpo" if issubclass(config_class, DpoConfig) else "finetune"
    if job != wanted:
        raise RunDirError(
            f"{run_dir} holds an `instructune {job}` run; continue it with "
            f"`instructune {job} --resume {run_dir}`"
        )
    cfg = config_class.from_dict(saved, source=str(path))
    cfg.out = str(run_dir)
    return cfg


def read_run_json(out: Path) -> dict[str, Any]:
    """The run.json of the run in ``out`` (to resume it); RunDirError when it cannot be read."""
    import json

    path = out / RUN_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunDirError(f"cannot read {path} to resume the run: {exc}") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is not a JSON object; it was not written by instructune")
    return data


def check_same_batches(previous: dict[str, Any], *, world_size: int, global_batch: int) -> None:
    """Refuse to resume with another number of processes or another global batch.

    The data order, and the place in it that a checkpoint records (batches done in the epoch),
    are counted in global batches of ``batch_size x grad_accum x world_size`` records, and
    every process restores its own random state. With either changed, the resumed run would
    train on other records than the ones it skips (or index past the epoch's end).
    ``previous`` is the resumed run's run.json.
    """
    old_world = previous.get("world_size")
    old_cfg = previous.get("config", {})
    old_batch = previous.get("global_batch")
    if old_batch is None and old_world is not None and "batch_size" in old_cfg:
        old_batch = old_cfg["batch_size"] * old_cfg.get("grad_accum", 1) * old_world
    changed = []
    if old_world is not None and old_world != world_size:
        changed.append(f"processes: {old_world} then, {world_size} now")
    if old_batch is not None and old_batch != global_batch:
        changed.append(f"global batch: {old_batch} records then, {global_batch} now")
    if changed:
        raise RunDirError(
            "cannot resume: the run was trained in other batches (" + "; ".join(changed) + "). "
            "The saved place in the data counts global batches of batch_size x grad_accum x "
            "processes, so resume with the run's number of processes and batch settings (or "
            "start a new run from its model: --model DIR)"
        )


def today() -> datetime.date:
    """Today's date (a function, so a test can stand in another day)."""
    return datetime.date.today()


def prompt_date_of(previous: dict[str, Any]) -> datetime.date:
    """The date a run's prompts see: the date saved in its run.json, else today.

    A run saved before ``prompt_date`` was recorded gets the day it started.
    """
    saved = previous.get("prompt_date") or str(previous.get("started", ""))[:10]
    if saved:
        try:
            return datetime.date.fromisoformat(saved)
        except ValueError:
            message = f"{RUN_FILE}: prompt_date {saved!r} is not a YYYY-MM-DD date"
            raise RunDirError(message) from None
    return today()
