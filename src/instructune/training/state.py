"""Training checkpoints: atomic, verified, pruned, and complete enough to resume bit for bit.

A checkpoint is a directory ``checkpoints/step-000050/`` holding

- ``model.safetensors``: the weights (tied tensors stored once),
- ``optimizer.pt``: the optimizer (and gradient scaler) state, only in the newest checkpoint,
- ``rng.pt``: the random states of Python, NumPy, torch and CUDA of process 0, and
  ``rng-rank1.pt``, ``rng-rank2.pt``, ... those of the other processes under torchrun,
- ``state.json``: the progress (step, epoch, batches done in the epoch, tokens seen, losses),
- ``manifest.json``: size and sha256 of each of the files above, written last.

It is written into a temporary directory and renamed into place, so a crash leaves either the
old set or the new one; a disk without room for it stops the run with a :class:`StorageError`
before anything is written (or, should the space go while writing, once the partial directory
is removed). On load the manifest is checked; a checkpoint whose files are missing,
truncated or altered is skipped with a warning, and the one before it is used. The data order
needs no state: it is a pure function of (seed, epoch), so a resumed run recomputes it and
skips the batches already done.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from instructune.errors import InstructuneError, StorageError
from instructune.utils.io import (
    atomic_write_json,
    format_bytes,
    free_bytes,
    is_disk_full,
    sha256_file,
)

CHECKPOINT_DIR = "checkpoints"
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng.pt"  # rank 0's; rank r > 0 has rng_file(r)
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
BEST_FILE = "best.json"


class CheckpointError(InstructuneError):
    """No usable checkpoint (all missing or corrupt); the message says where it looked."""


@dataclass
class TrainProgress:
    """Where training stands after ``step`` optimizer steps.

    ``batches_done`` counts global batches finished in ``epoch``; with the pure batch order
    that is all a resumed run needs to continue with the same data. ``tokens_seen`` counts
    input positions as the book does (``input_batch.numel()``), padding included;
    ``supervised_tokens`` counts targets that carry a loss.
    """

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    tokens_seen: int = 0
    supervised_tokens: int = 0
    train_seconds: float = 0.0
    last_train_loss: float | None = None
    last_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainProgress:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


# ---------------------------------------------------------------------------- random states

# Rank r > 0 seeds seed + r * _RANK_SEED_STRIDE (mod 2**32): a large prime, so that the streams
# of nearby seeds and ranks (seed 1 rank 1, seed 2 rank 0) do not coincide.
_RANK_SEED_STRIDE = 1_000_003


def rank_seed(seed: int, rank: int = 0) -> int:
    """The seed of process ``rank``: ``seed`` itself for rank 0 (a single-process run is
    unchanged), ``(seed + 1_000_003 * rank) % 2**32`` for the others."""
    if rank == 0:
        return seed
    return (seed + _RANK_SEED_STRIDE * rank) % 2**32


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed Python, NumPy and torch (every CUDA device too) with ``rank_seed(seed, rank)``.

    Each process of a torchrun run gets its own stream, so dropout masks differ across
    processes instead of repeating; the data order does not use these generators. A random
    initialisation must still be the same everywhere (the loss before training is measured
    before DistributedDataParallel copies rank 0's weights), so a run seeds in two steps::

        seed_everything(seed)             # every process: the same initial weights
        model = build_model(...)
        if rank:                          # then a stream of its own (rank 0 keeps going)
            seed_everything(seed, rank)
    """
    value = rank_seed(seed, rank)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def rng_file(rank: int) -> str:
    """The checkpoint file holding process ``rank``'s random states."""
    return RNG_FILE if rank == 0 else f"rng-rank{rank}.pt"


def capture_rng() -> dict[str, Any]:
    """Random states of Python, NumPy, torch (and CUDA when present), torch.load-safe."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- writing


def _step_name(step: int) -> str:
    return f"step-{step:06d}"


def _fsync_dir(path: Path) -> None:
    if sys.platform.startswith("win"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(directory: Path, files: list[str]) -> None:
    manifest = {
        "format": "instructune-checkpoint/1",
        "files": {
            name: {
                "size": (directory / name).stat().st_size,
                "sha256": sha256_file(directory / name),
            }
            for name in files
        },
    }
    atomic_write_json(directory / MANIFEST_FILE, manifest)


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    progress: TrainProgress,
    scaler: Any = None,
    keep: int = 2,
    extra: dict[str, Any] | None = None,
    rng_states: list[dict[str, Any]] | None = None,
) -> Path:
    """Write ``run_dir/checkpoints/step-NNNNNN`` atomically, then prune to the last ``keep``.

    ``rng_states``: every process's :func:`capture_rng`, in rank order (default: this
    process's alone); each goes to its own file, listed in the manifest. The best checkpoint
    by validation loss is never pruned (``checkpoints/best.json`` names it); optimizer state
    is kept only in the newest checkpoint.
    """
    from safetensors.torch import save_model

    root = Path(run_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / _step_name(progress.step)
    opt_state = None
    if optimizer is not None:
        opt_state = {"optimizer": optimizer.state_dict()}
        if scaler is not None:
            opt_state["scaler"] = scaler.state_dict()
    needed = _checkpoint_bytes(model, opt_state)
    if free_bytes(root) < needed:
        raise _no_room(root, progress.step, needed)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if rng_states is None:
        rng_states = [capture_rng()]
    files = [MODEL_FILE, STATE_FILE]
    try:
        save_model(model, str(tmp / MODEL_FILE))
        for rank, rng in enumerate(rng_states):
            _torch_save(rng, tmp / rng_file(rank))
            files.append(rng_file(rank))
        if opt_state is not None:
            _torch_save(opt_state, tmp / OPTIMIZER_FILE)
            files.append(OPTIMIZER_FILE)
        state = {"progress": progress.to_dict(), "rng_ranks": len(rng_states), **(extra or {})}
        atomic_write_json(tmp / STATE_FILE, state)
        _write_manifest(tmp, files)  # last: a checkpoint without a manifest is incomplete
        _fsync_dir(tmp)
    except BaseException as exc:
        # torch.save's zip writer reports a full disk only as "unexpected pos", so the space
        # left when the write failed (before the partial directory goes) says what happened.
        full = isinstance(exc, Exception) and (
            isinstance(exc, StorageError) or is_disk_full(exc) or free_bytes(root) < 1 << 20
        )
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise _no_room(root, progress.step, needed) from exc
        raise
    if final.exists():  # the same step saved again (e.g. Ctrl-C right after a checkpoint)
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _update_best(root, final, progress)
    prune_checkpoints(root, keep=keep)
    return final


def _checkpoint_bytes(model: nn.Module, opt_state: dict[str, Any] | None) -> int:
    """About the bytes a checkpoint of ``model`` and its optimizer state takes on disk.

    The weights (tied tensors counted once) and the optimizer's state tensors, plus 1 MiB for
    the random states, the JSON files and the headers.
    """
    seen: set[int] = set()

    def tensor_bytes(obj: Any) -> int:
        if torch.is_tensor(obj):
            if obj.data_ptr() in seen:
                return 0
            seen.add(obj.data_ptr())
            return obj.numel() * obj.element_size()
        if isinstance(obj, dict):
            return sum(tensor_bytes(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(tensor_bytes(v) for v in obj)
        return 0

    # The optimizer state nests (the in-backward optimizer's: a list of state dicts).
    return (1 << 20) + tensor_bytes(model.state_dict()) + tensor_bytes(opt_state)


def _no_room(root: Path, step: int, needed: int) -> StorageError:
    """The error for a checkpoint that does not fit: the folder, the sizes, what was kept."""
    saved = [p.name for p in list_checkpoints(root.parent)]
    what_now = (
        f"The checkpoints saved before it ({', '.join(saved)}) are intact: free some space and "
        f"continue the run with --resume {root.parent}."
        if saved
        else "Free some space (or checkpoint less often) and run again."
    )
    return StorageError(
        f"not enough space to save the checkpoint of step {step} in {root}: it needs about "
        f"{format_bytes(needed)} and its disk has {format_bytes(free_bytes(root))} free. "
        + what_now
    )


def _update_best(root: Path, path: Path, progress: TrainProgress) -> None:
    val = progress.last_val_loss
    if val is None:
        return
    best_file = root / BEST_FILE
    current = _read_json(best_file)
    if (
        current is None
        or not (root / current.get("name", "")).is_dir()
        or val < current["val_loss"]
    ):
        atomic_write_json(best_file, {"name": path.name, "step": progress.step, "val_loss": val})


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under ``run_dir/checkpoints``, oldest first."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint with the lowest validation loss, when one is recorded and still there."""
    root = Path(run_dir) / CHECKPOINT_DIR
    info = _read_json(root / BEST_FILE)
    if info is None or not (root / info["name"]).is_dir():
        return None
    return root / info["name"]


def prune_checkpoints(root: Path, *, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints and the best; optimizer state only in the newest."""
    found = list_checkpoints(root.parent)
    best = best_checkpoint(root.parent)
    keep_set = set(found[-keep:])
    if best is not None:
        keep_set.add(best)
    for path in found:
        if path not in keep_set:
            shutil.rmtree(path, ignore_errors=True)
    for path in found[:-1]:
        if path in keep_set and (path / OPTIMIZER_FILE).exists():
            # Manifest first, then the file: a kill between the two leaves a complete, valid
            # checkpoint (an unlisted optimizer file), never a manifest naming a missing file.
            listed = (_read_json(path / MANIFEST_FILE) or {}).get("files", {})
            files = [n for n in listed if n != OPTIMIZER_FILE and (path / n).exists()]
            _write_manifest(path, files)
            (path / OPTIMIZER_FILE).unlink()
    for pattern in (".tmp-*", ".old-*"):  # left by a crash during a save
        for stale in root.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


# ---------------------------------------------------------------------------- reading


def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Problems with a checkpoint directory (empty when its manifest matches every file)."""
    path = Path(path)
    manifest = _read_json(path / MANIFEST_FILE)
    if manifest is None:
        return [f"{path / MANIFEST_FILE} is missing or unreadable (the save did not finish)"]
    problems = []
    for name, info in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != info["size"]:
            problems.append(f"{file} has {file.stat().st_size} bytes, expected {info['size']}")
        elif sha256_file(file) != info["sha256"]:
            problems.append(f"{file} does not match its sha256 (corrupt)")
    for name in (MODEL_FILE, STATE_FILE):
        if name not in manifest.get("files", {}):
            problems.append(f"{path} has no {name}")
    return problems


def latest_valid_checkpoint(run_dir: str | os.PathLike, *, warn=print) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; corrupt ones are reported."""
    for path in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        warn(f"warning: skipping checkpoint {path}: " + "; ".join(problems))
    return None


def load_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scaler: Any = None,
    restore_random: bool = True,
    rank: int | None = None,
) -> tuple[TrainProgress, dict[str, Any]]:
    """Load weights (and optimizer, scaler, RNG states) from a checkpoint directory.

    Returns the progress and the rest of ``state.json``. When the checkpoint has no optimizer
    state (an older one, used because the newest was corrupt) the optimizer starts afresh and
    ``state["optimizer_restored"]`` is False. Each process restores its own random states:
    those of ``rank`` (default: this process's rank in the running process group, else 0);
    CheckpointError when the checkpoint has none for it.
    """
    from safetensors.torch import load_model

    path = Path(path)
    problems = verify_checkpoint(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is unusable: " + "; ".join(problems))
    state = _read_json(path / STATE_FILE) or {}
    state["optimizer_restored"] = False
    listed = (_read_json(path / MANIFEST_FILE) or {}).get("files", {})
    rank = _current_rank() if rank is None else rank
    rng_name = rng_file(rank)
    if restore_random and rng_name not in listed:  # refuse before changing anything
        raise CheckpointError(
            f"checkpoint {path} has no random state for process {rank} ({rng_name}): it was "
            f"saved by {state.get('rng_ranks', 1)} process(es); resume with as many."
        )
    missing, unexpected = load_model(model, str(path / MODEL_FILE), strict=False)
    if unexpected or missing:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if optimizer is not None and OPTIMIZER_FILE in listed:  # only files the manifest vouches for
        opt_state = torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(opt_state["optimizer"])
        if scaler is not None and "scaler" in opt_state:
            scaler.load_state_dict(opt_state["scaler"])
        state["optimizer_restored"] = True
    if restore_random:
        restore_rng(torch.load(path / rng_name, map_location="cpu", weights_only=True))
    return TrainProgress.from_dict(state.get("progress", {})), state


def _current_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
