"""Crash and resume: SIGKILL or Ctrl-C a real run, resume it, get the same losses bit for bit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_GPT2, default_sigint, tiny_finetune_args

from instructune.training.metrics import read_metrics, without_timings

pytestmark = pytest.mark.slow


def args_for(out: Path) -> list[str]:
    return tiny_finetune_args(
        out,
        "--batch-size",
        "4",
        "--epochs",
        "3",
        "--lr",
        "1e-3",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--checkpoint-every",
        "3",
        "--max-new-tokens",
        "4",
        "--test-limit",
        "1",
        "--no-evaluate",
        "--max-length",
        "128",  # the tiny model's context length
    )


# The child runs `instructune` with one change: after writing the checkpoint of step
# PAUSE_AT_STEP it writes PAUSE_MARKER and waits until PAUSE_RELEASE exists. A test signals it
# while it waits, so the signal lands at that exact point however slow the machine is (a test
# that polled for the checkpoint and then signalled could find the run already finished).
CHILD = """
import os, sys, time
from pathlib import Path
import instructune.training.loop as loop
from instructune.cli.main import main

pause_at = int(os.environ.get("PAUSE_AT_STEP", "0"))
saved = loop.save_checkpoint

def save_then_wait(run_dir, *, progress, **kw):
    path = saved(run_dir, progress=progress, **kw)
    if progress.step == pause_at:
        Path(os.environ["PAUSE_MARKER"]).write_text(str(path))
        while not Path(os.environ["PAUSE_RELEASE"]).exists():
            time.sleep(0.01)
    return path

loop.save_checkpoint = save_then_wait
sys.exit(main(sys.argv[1:]))
"""


def start(args: list[str], log: Path, *, pause_at: int = 0) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "PAUSE_AT_STEP": str(pause_at),
        "PAUSE_MARKER": str(log.with_suffix(".paused")),
        "PAUSE_RELEASE": str(log.with_suffix(".release")),
    }
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-c", CHILD, *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=default_sigint,
        )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll the file system (not a timer) until ``path`` exists."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {path} appeared")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.005)


def start_and_pause(args: list[str], log: Path, step: int) -> subprocess.Popen:
    """Start a run and return once it waits right after saving the checkpoint of ``step``."""
    proc = start(args, log, pause_at=step)
    wait_for(log.with_suffix(".paused"), proc)
    return proc


def release(log: Path) -> None:
    log.with_suffix(".release").write_text("go")


def run_to_end(args: list[str], log: Path) -> None:
    proc = start(args, log)
    assert proc.wait(timeout=300) == 0, log.read_text()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The metrics of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run_to_end(args_for(out), out.parent / "log.txt")
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 25))
    return without_timings(records)


def test_sigkill_then_resume_reaches_the_same_losses_bit_for_bit(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_and_pause(args_for(out), tmp_path / "log1.txt", 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads((out / "run.json").read_text())["status"] == "running"  # really cut short
    killed_at = max(r["step"] for r in read_metrics(out / "metrics.jsonl"))
    assert killed_at < 24

    run_to_end(["finetune", "--resume", str(out), "--quiet"], tmp_path / "log2.txt")
    assert without_timings(read_metrics(out / "metrics.jsonl")) == reference
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished"
    assert Path(run["resumed_from"]).name.startswith("step-")


def test_corrupt_latest_checkpoint_resumes_from_the_previous_one(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_and_pause(args_for(out), tmp_path / "log1.txt", 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    latest = ckpts[-1]
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as by a full disk
    run_to_end(["finetune", "--resume", str(out), "--quiet"], tmp_path / "log2.txt")
    log = (tmp_path / "log2.txt").read_text()
    assert f"skipping checkpoint {latest}" in log
    run = json.loads((out / "run.json").read_text())
    assert Path(run["resumed_from"]).name == ckpts[-2].name
    # Same data order and random state; only AdamW's moments are lost with the newest
    # checkpoint (they are kept only there), so the steps up to the older checkpoint match.
    resumed = without_timings(read_metrics(out / "metrics.jsonl"))
    step = int(ckpts[-2].name.split("-")[1])
    assert [r for r in resumed if r["step"] <= step] == [r for r in reference if r["step"] <= step]
    assert [r["step"] for r in resumed if r["kind"] == "step"] == list(range(1, 25))


def test_ctrl_c_saves_a_checkpoint_then_resume_matches(reference, tmp_path):
    out = tmp_path / "run"
    proc = start_and_pause(args_for(out), tmp_path / "log1.txt", 3)
    proc.send_signal(signal.SIGINT)
    release(tmp_path / "log1.txt")  # the step ends; the loop sees the flag and stops there
    assert proc.wait(timeout=120) == 130
    log = (tmp_path / "log1.txt").read_text()
    assert "interrupted: checkpoint saved" in log and f"--resume {out}" in log
    last_step = max(r["step"] for r in read_metrics(out / "metrics.jsonl"))
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts[-1].name == f"step-{last_step:06d}"  # saved where it stopped
    assert (ckpts[-1] / "optimizer.pt").exists()

    run_to_end(["finetune", "--resume", str(out), "--quiet"], tmp_path / "log2.txt")
    assert without_timings(read_metrics(out / "metrics.jsonl")) == reference


def test_sigkill_then_resume_with_dropout_reaches_the_same_losses_bit_for_bit(tmp_path):
    """The tests above train without dropout: with no random state restored they would pass
    too. Here every step draws dropout masks, so only a restored random state matches."""

    def dropout_args(out: Path) -> list[str]:
        overrides = f"{TINY_GPT2},drop_rate=0.2"
        return [*args_for(out), "--model-overrides", overrides]

    ref = tmp_path / "ref"
    run_to_end(dropout_args(ref), tmp_path / "ref.txt")
    reference = without_timings(read_metrics(ref / "metrics.jsonl"))
    out = tmp_path / "run"
    proc = start_and_pause(dropout_args(out), tmp_path / "log1.txt", 3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) < 24
    run_to_end(["finetune", "--resume", str(out), "--quiet"], tmp_path / "log2.txt")
    assert without_timings(read_metrics(out / "metrics.jsonl")) == reference
