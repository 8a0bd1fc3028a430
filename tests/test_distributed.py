"""Two processes under torchrun (gloo, one thread each) train like one with the same batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_finetune_args

from instructune.training.metrics import read_metrics

pytestmark = pytest.mark.slow


def common(out: Path) -> list[str]:
    return tiny_finetune_args(
        out,
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--checkpoint-every",
        "4",
        "--max-new-tokens",
        "4",
        "--test-limit",
        "2",
        "--no-evaluate",
        "--max-length",
        "128",  # the tiny model's context length
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], log: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    with open(log, "wb") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
    assert code == 0, log.read_text()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "ddp"
    # One process: micro-batch 4 x 2 accumulation = 8 records a step.
    run(
        [sys.executable, "-m", "instructune", *common(single), "--grad-accum", "2"],
        tmp_path / "single.log",
    )
    # Two processes: micro-batch 4 each = 8 records a step.
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
    ]
    run([*torchrun, "-m", "instructune", *common(multi)], tmp_path / "ddp.log")

    a, b = read_metrics(single / "metrics.jsonl"), read_metrics(multi / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in a] == [(r["kind"], r["step"]) for r in b]
    assert len([r for r in a if r["kind"] == "step"]) == 8  # 34 records // 8 = 4, twice
    for x, y in zip(a, b, strict=True):
        assert x["tokens_seen"] == y["tokens_seen"]
        for key in ("loss", "train_loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=1e-4), (x["step"], key)
    assert json.loads((multi / "run.json").read_text())["world_size"] == 2
    # Only rank 0 wrote files: one metrics line per event, one set of outputs.
    assert (multi / "model.safetensors").exists() and (multi / "responses.json").exists()
    assert not list(multi.glob("*.tmp"))
