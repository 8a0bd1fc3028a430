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
from helpers import tiny_finetune_args

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
    )


def start(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "instructune", *args],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
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
    proc = start(args_for(out), tmp_path / "log1.txt")
    wait_for(out / "checkpoints" / "step-000003" / "manifest.json", proc)
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
    proc = start(args_for(out), tmp_path / "log1.txt")
    wait_for(out / "checkpoints" / "step-000006" / "manifest.json", proc)
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
    proc = start(args_for(out), tmp_path / "log1.txt")
    wait_for(out / "checkpoints" / "step-000003" / "manifest.json", proc)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    log = (tmp_path / "log1.txt").read_text()
    assert "interrupted: checkpoint saved" in log and f"--resume {out}" in log
    last_step = max(r["step"] for r in read_metrics(out / "metrics.jsonl"))
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts[-1].name == f"step-{last_step:06d}"  # saved where it stopped
    assert (ckpts[-1] / "optimizer.pt").exists()

    run_to_end(["finetune", "--resume", str(out), "--quiet"], tmp_path / "log2.txt")
    assert without_timings(read_metrics(out / "metrics.jsonl")) == reference
