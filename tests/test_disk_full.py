"""A full disk, for real: a small tmpfs mounted for the test (root only; skipped otherwise).

A run that cannot save its checkpoint stops with one line naming the folder, the sizes and the
way on; nothing partial is left and the checkpoints before it stay loadable, so the run resumes
once there is room. A model or data file that does not fit leaves the old file as it was.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers import tiny_finetune_args

from instructune.cli.main import main
from instructune.errors import StorageError
from instructune.training.metrics import read_metrics, without_timings
from instructune.training.state import (
    TrainProgress,
    list_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from instructune.utils.io import atomic_write_bytes, free_bytes, is_disk_full


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A fresh tmpfs of ``size`` (as mount's ``size=``: 64k, 30m) at ``where``."""
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(
            f"a full disk is made as a small tmpfs, and mounting one failed here "
            f"(it needs root): {mounted.stderr.strip()}"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "--lazy", str(where)], check=True)


def test_a_file_that_does_not_fit_leaves_the_old_one_and_says_where(tmp_path):
    with tmpfs(tmp_path / "disk", "64k") as disk:
        target = disk / "answers.json"
        atomic_write_bytes(target, b"the old answers")
        with pytest.raises(StorageError) as err:
            atomic_write_bytes(target, b"x" * 200_000)
        message = str(err.value)
        assert str(target) in message and "no space left" in message and "free" in message
        assert target.read_bytes() == b"the old answers"
        assert [p.name for p in disk.iterdir()] == ["answers.json"]  # no temporary file left


def test_safetensors_and_python_report_a_full_disk_in_ways_it_recognises(tmp_path):
    from safetensors.torch import save_file

    with tmpfs(tmp_path / "disk", "64k") as disk:
        with pytest.raises(Exception) as from_rust:  # safetensors' own exception type
            save_file({"w": torch.zeros(100_000)}, str(disk / "w.safetensors"))
        assert not isinstance(from_rust.value, OSError)
        assert is_disk_full(from_rust.value)
        with pytest.raises(OSError) as from_python:
            (disk / "big").write_bytes(b"x" * 200_000)
        assert is_disk_full(from_python.value)
    assert not is_disk_full(PermissionError(13, "Permission denied"))
    assert not is_disk_full(RuntimeError("unexpected pos 704 vs 598"))


def test_a_disk_that_fills_while_a_checkpoint_is_written_leaves_the_earlier_one(tmp_path):
    model = torch.nn.Linear(64, 64)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 64)).sum().backward()
    optimizer.step()
    with tmpfs(tmp_path / "disk", "2m") as disk:
        first = save_checkpoint(
            disk, model=model, optimizer=optimizer, progress=TrainProgress(step=1)
        )
        # The room check before writing passes (the weights and the optimizer fit); a random
        # state far larger than any real one then fills the disk inside torch.save, which
        # says only "unexpected pos".
        huge_rng = [{"python": torch.zeros(1_000_000)}]
        with pytest.raises(StorageError, match="checkpoint of step 2 in .*step-000001"):
            save_checkpoint(
                disk,
                model=model,
                optimizer=optimizer,
                progress=TrainProgress(step=2),
                rng_states=huge_rng,
            )
        assert list_checkpoints(disk) == [first]
        assert verify_checkpoint(first) == []
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step-000001"]


def finetune_args(out: Path) -> list[str]:
    return tiny_finetune_args(
        out,
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--checkpoint-every",
        "3",
        "--test-limit",
        "1",
        "--max-new-tokens",
        "2",
        "--no-evaluate",
        "--max-length",
        "128",  # the tiny model's context length
    )


@pytest.mark.slow
def test_a_checkpoint_without_room_stops_the_run_in_one_line_then_it_resumes(tmp_path, capsys):
    # The same run on a roomy disk: what the resumed run must reproduce.
    assert main(finetune_args(tmp_path / "roomy")) == 0
    one_checkpoint = sum(
        f.stat().st_size for f in list_checkpoints(tmp_path / "roomy")[-1].iterdir()
    )
    capsys.readouterr()

    with tmpfs(tmp_path / "disk", "200m") as disk:
        run = disk / "run"
        # Room for the run's files and its first checkpoint, not for a second beside it.
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free_bytes(disk) - int(1.5 * one_checkpoint)))

        assert main(finetune_args(run)) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0, err  # one line, no traceback
        assert err.startswith("error: not enough space to save the checkpoint of step 6 in ")
        assert str(run / "checkpoints") in err
        assert "step-000003" in err and f"--resume {run}" in err
        saved = list_checkpoints(run)
        assert [p.name for p in saved] == ["step-000003"]
        assert verify_checkpoint(saved[0]) == []  # complete: its manifest matches every file
        assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
        assert json.loads((run / "run.json").read_text())["status"] == "disk full"

        filler.unlink()  # the user frees some space
        assert main(["finetune", "--resume", str(run), "--quiet", "--threads", "1"]) == 0
        assert without_timings(read_metrics(run / "metrics.jsonl")) == without_timings(
            read_metrics(tmp_path / "roomy" / "metrics.jsonl")
        )
        assert json.loads((run / "run.json").read_text())["status"] == "finished"
