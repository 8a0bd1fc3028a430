"""The run directory: its file names, preparing it for a run, and reading a run's settings back."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from instructune.config import FinetuneConfig
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


def _read_run_json(out: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
