"""``instructune dpo`` end to end on a tiny random GPT-2 and 40 preference pairs.

- the step-0 evaluation: loss ln 2 and margin 0 (fp32, no dropout), and every output file;
- the cached reference log-probabilities equal a recomputation on the starting model;
- killed after a checkpoint, ``--resume`` ends bit for bit where an uninterrupted run ends,
  reading the reference back instead of recomputing it;
- LoRA: the reference is the same weights with the adapter off (the full run's reference);
- two gloo processes under torchrun end with one process's weights (within 1e-6).

The pairs are the fixture's instructions: ``chosen`` is the record's output and ``rejected``
the same words reversed, so the two differ in every record.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FIXTURES, TINY_GPT2
from safetensors.torch import load_file

from instructune.cli.main import main
from instructune.training.metrics import read_metrics, without_timings

STEPS = 3


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    records = json.loads((FIXTURES / "instructions-40.json").read_text(encoding="utf-8"))
    pairs = [
        {**r, "chosen": r["output"], "rejected": " ".join(reversed(r["output"].split())) + "."}
        for r in records
    ]
    path = tmp_path_factory.mktemp("pairs") / "pairs.json"
    path.write_text(json.dumps(pairs), encoding="utf-8")
    return path


def dpo_args(data: Path, out: Path, *extra: str) -> list[str]:
    """A 3-step run (global batch 4, a checkpoint and an evaluation after each step)."""
    return [
        "dpo", "--model", "gpt2", "--init", "random", "--model-overrides", TINY_GPT2,
        "--data", str(data), "--out", str(out), "--threads", "1", "--quiet",
        "--batch-size", "4", "--max-steps", str(STEPS), "--max-length", "128", "--lr", "1e-3",
        "--eval-every", "1", "--eval-batches", "2", "--checkpoint-every", "1",
        "--max-new-tokens", "4", "--test-limit", "2", "--gen-batch-size", "2",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def full_run(pairs_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    assert main(dpo_args(pairs_file, out)) == 0
    return out


def evals(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]


def test_step_0_is_ln_2_with_margin_0_and_every_output_is_written(full_run):
    first = evals(full_run)[0]
    assert first["step"] == 0
    for side in ("train", "val"):
        assert abs(first[f"{side}_loss"] - math.log(2)) < 1e-6
        assert abs(first[f"{side}_margin"]) < 1e-6
        assert first[f"{side}_accuracy"] == 0
    # An evaluation after every step, each with the loss, both rewards, margin and accuracy.
    assert [r["step"] for r in evals(full_run)] == list(range(STEPS + 1))
    last = evals(full_run)[-1]
    assert last["val_margin"] == pytest.approx(
        last["val_chosen_reward"] - last["val_rejected_reward"], abs=1e-6
    )
    assert last["train_loss"] < math.log(2)  # lr 1e-3 on a tiny model: it learns at once
    for name in (
        "model.safetensors", "instructune.json", "loss.png", "margin.png", "responses.json",
        "responses-reference.json", "eval/scores.json", "eval-reference/scores.json",
        "compare.json", "compare.txt", "reference-logprobs.safetensors",
    ):  # fmt: skip
        assert (full_run / name).is_file(), name
    run = json.loads((full_run / "run.json").read_text())
    assert run["status"] == "finished" and run["reference"]["reused"] is False
    assert run["results"]["val_margin_start"] == first["val_margin"]
    cmp = json.loads((full_run / "compare.json").read_text())
    assert cmp["a"].endswith("eval-reference/scores.json") and cmp["pairs"][0]["paired"] == 2
    answers = json.loads((full_run / "responses.json").read_text())
    reference = json.loads((full_run / "responses-reference.json").read_text())
    assert [r["instruction"] for r in answers] == [r["instruction"] for r in reference]


def test_the_cached_reference_equals_a_recomputation_on_the_starting_model(full_run):
    from functools import partial

    from instructune.config import DpoConfig
    from instructune.data.collate import collate_pairs
    from instructune.data.dataset import tokenize_pair
    from instructune.pipeline.dpo import load_preference_splits
    from instructune.pipeline.model import load_for_training
    from instructune.pipeline.run_dir import load_run_config
    from instructune.training.dpo import reference_logprobs
    from instructune.training.state import seed_everything

    cfg = load_run_config(full_run, DpoConfig)
    seed_everything(cfg.seed)
    train, val, _ = load_preference_splits(cfg)
    loaded = load_for_training(cfg, torch.device("cpu"))
    pairs = [tokenize_pair(r, loaded.tokenizer, "alpaca") for r in train + val]
    sides = partial(collate_pairs, pad_id=loaded.tokenizer.pad_id, max_length=128)
    chosen, rejected = reference_logprobs(loaded.model, (sides([p]) for p in pairs))
    cached = load_file(full_run / "reference-logprobs.safetensors")
    # One pair a batch here, four in the run: padding changes the sums' rounding only.
    torch.testing.assert_close(cached["chosen"], chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached["rejected"], rejected, rtol=0, atol=1e-5)


# SIGKILL right after the step-2 checkpoint is on disk: a crash at a fixed point, no race.
_DIE_AFTER_STEP_2 = """
import os, signal, sys
import instructune.training.loop as loop

save = loop.save_checkpoint

def save_then_die(run_dir, **kw):
    path = save(run_dir, **kw)
    if kw["progress"].step == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

loop.save_checkpoint = save_then_die
from instructune.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a fresh interpreter runs the first part
def test_resume_after_a_kill_is_bit_exact_and_reads_the_reference_back(
    full_run, pairs_file, tmp_path
):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_STEP_2, *dpo_args(pairs_file, out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert not (out / "model.safetensors").exists()
    cache = out / "reference-logprobs.safetensors"
    written = cache.stat().st_mtime_ns

    assert main(["dpo", "--resume", str(out), "--quiet"]) == 0
    assert cache.stat().st_mtime_ns == written
    run = json.loads((out / "run.json").read_text())
    assert run["reference"]["reused"] is True and run["resumed_from"].endswith("step-000002")
    assert (out / "model.safetensors").read_bytes() == (full_run / "model.safetensors").read_bytes()
    assert without_timings(read_metrics(out / "metrics.jsonl")) == without_timings(
        read_metrics(full_run / "metrics.jsonl")
    )


def test_lora_reference_is_the_starting_model_with_the_adapter_off(full_run, pairs_file, tmp_path):
    out = tmp_path / "lora"
    assert main(dpo_args(pairs_file, out, "--lora-rank", "2", "--max-steps", "1")) == 0
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    # The same random base (same seed) as the full run: the same reference, no second copy.
    lora_ref = load_file(out / "reference-logprobs.safetensors")
    full_ref = load_file(full_run / "reference-logprobs.safetensors")
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(lora_ref[side], full_ref[side], rtol=0, atol=0)
    first, last = evals(out)[0], evals(out)[-1]
    assert abs(first["val_loss"] - math.log(2)) < 1e-6 and abs(first["val_margin"]) < 1e-6
    assert last["train_margin"] > 0  # the adapter moved the policy away from the reference
    assert (out / "responses-reference.json").is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two fresh interpreters
def test_two_processes_under_torchrun_match_one(full_run, pairs_file, tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed beside this Python")
    out = tmp_path / "ddp"
    args = dpo_args(pairs_file, out, "--batch-size", "2")  # 2 x 2 processes: the same 4 pairs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            torchrun, "--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "instructune", *args,
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    one = load_file(full_run / "model.safetensors")
    two = load_file(out / "model.safetensors")
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)


def test_each_job_resumes_only_its_own_runs(full_run, tmp_path, capsys):
    """finetune --resume on a DPO run (and dpo --resume on a fine-tuning run) is refused with
    the command that continues it, before anything in the run changes."""
    from helpers import tiny_finetune_args

    before = (full_run / "run.json").read_bytes()
    assert main(["finetune", "--resume", str(full_run)]) != 0
    assert (
        f"holds an `instructune dpo` run; continue it with `instructune dpo --resume {full_run}`"
        in (capsys.readouterr().err)
    )
    assert (full_run / "run.json").read_bytes() == before
    ft = tmp_path / "ft"
    args = ("--max-steps", "1", "--max-length", "128", "--max-new-tokens", "4", "--test-limit", "1")
    assert main(tiny_finetune_args(ft, *args)) == 0
    capsys.readouterr()
    assert main(["dpo", "--resume", str(ft)]) != 0
    assert "holds an `instructune finetune` run" in capsys.readouterr().err
