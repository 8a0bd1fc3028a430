"""``run_finetune(resume=True)`` at its edges: another number of processes or global batch, a
shorter end, a run killed while answering its test split, and the run's fixed prompt date."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FIXTURES, save_tiny_llama, tiny_config, tiny_finetune_args

from instructune.config import ConfigError, apply_overrides
from instructune.pipeline import (
    RunDirError,
    check_same_batches,
    load_run_config,
    run_finetune,
)
from instructune.training.metrics import read_metrics, without_timings


def tiny_cfg(out: Path, **settings):
    """A 2-step run of a tiny random GPT-2 (global batch 4), a checkpoint after each step."""
    shape = dict(max_steps=2, lr=1e-3, eval_every=1, checkpoint_every=1, test_limit=2)
    return tiny_config(out, **{**shape, **settings})


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("short") / "run"
    run_finetune(tiny_cfg(out))
    return out


def copy_run(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out)
    return out


def files_of(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


# ------------------------------------------------------------------ processes and global batch


def test_check_same_batches_names_what_changed():
    saved = {"world_size": 1, "config": {"batch_size": 4, "grad_accum": 2}}  # no global_batch:
    check_same_batches(saved, world_size=1, global_batch=8)  # an older run.json; derived
    with pytest.raises(RunDirError, match="processes: 1 then, 2 now") as exc:
        check_same_batches(saved, world_size=2, global_batch=16)
    assert "global batch: 8 records then, 16 now" in str(exc.value)
    with pytest.raises(RunDirError, match="global batch: 8 records then, 4 now"):
        check_same_batches({**saved, "global_batch": 8}, world_size=1, global_batch=4)
    # Two processes with half the micro-batch keep the global batch, but not the process count.
    with pytest.raises(RunDirError, match="processes: 1 then, 2 now") as exc:
        check_same_batches(saved, world_size=2, global_batch=8)
    assert "records then" not in str(exc.value)


def test_resume_with_another_process_count_is_refused_before_anything_changes(short_run, tmp_path):
    out = copy_run(short_run, tmp_path)
    run = json.loads((out / "run.json").read_text())
    run["world_size"] = 2  # as if trained under torchrun --nproc_per_node=2
    (out / "run.json").write_text(json.dumps(run))
    before = files_of(out)
    with pytest.raises(RunDirError, match="processes: 2 then, 1 now"):
        run_finetune(load_run_config(out), resume=True)
    assert files_of(out) == before


def test_resume_with_another_global_batch_is_refused(short_run, tmp_path):
    out = copy_run(short_run, tmp_path)
    before = files_of(out)
    cfg = apply_overrides(load_run_config(out), {"batch_size": 8})
    with pytest.raises(RunDirError, match="global batch: 4 records then, 8 now"):
        run_finetune(cfg, resume=True)
    assert files_of(out) == before


def test_a_run_cannot_be_resumed_to_an_earlier_end(short_run, tmp_path):
    out = copy_run(short_run, tmp_path)
    cfg = apply_overrides(load_run_config(out), {"max_steps": 1})
    with pytest.raises(ConfigError, match="has trained 2 steps; its settings now end at step 1"):
        run_finetune(cfg, resume=True)


# ------------------------------------------------------------------ killed while answering

# Runs `instructune finetune` and SIGKILLs the process right after responses.json has been
# saved with two answers: a crash at a fixed point of the answering, with no timing race.
_DIE_AFTER_TWO_ANSWERS = """
import os, signal, sys
import instructune.utils.io as io

write = io.atomic_write_json

def write_then_die(path, obj, *args, **kwargs):
    result = write(path, obj, *args, **kwargs)
    if os.path.basename(os.fspath(path)) == "responses.json":
        if sum("model_response" in r for r in obj) >= 2:
            os.kill(os.getpid(), signal.SIGKILL)
    return result

io.atomic_write_json = write_then_die
from instructune.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow  # a fresh interpreter runs the first part
def test_killed_while_answering_resumes_its_answers_without_training_again(tmp_path):
    from instructune.cli.main import main

    out = tmp_path / "run"
    args = tiny_finetune_args(
        out, "--batch-size", "4", "--max-steps", "2", "--max-length", "128",
        "--max-new-tokens", "6", "--gen-batch-size", "1", "--no-evaluate",
    )  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _DIE_AFTER_TWO_ANSWERS, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    partial = json.loads((out / "responses.json").read_text())
    done = [i for i, r in enumerate(partial) if "model_response" in r]
    assert len(partial) == 4 and len(done) == 2  # the 4 test records, 2 answered
    # Mark the kept answers: an answer generated again would not say this.
    for i in done:
        partial[i]["model_response"] = f"kept answer {i}"
    (out / "responses.json").write_text(json.dumps(partial))
    metrics = read_metrics(out / "metrics.jsonl")
    checkpoints = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}

    assert main(["finetune", "--resume", str(out), "--quiet"]) == 0
    # No training: the same metrics, the same checkpoints, untouched.
    assert read_metrics(out / "metrics.jsonl") == metrics
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == checkpoints
    answers = json.loads((out / "responses.json").read_text())
    for i, record in enumerate(answers):
        if i in done:
            assert record["model_response"] == f"kept answer {i}"
        else:
            assert isinstance(record["model_response"], str)
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["results"]["responses"] == 4
    assert sum(run["results"]["finish_reasons"].values()) == 4


# ------------------------------------------------------------------ the prompt date

DAY_ONE, DAY_TWO = datetime.date(2026, 11, 27), datetime.date(2027, 3, 4)


@pytest.fixture
def dated_model_dir(tmp_path) -> Path:
    """A tiny random Llama whose chat template prints today's date (as Llama 3's does)."""

    from instructune.tokenization import load_tokenizer

    tok_dir = tmp_path / "tok"
    shutil.copytree(FIXTURES / "tiny-tokenizer", tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{{ '<|im_start|>system\\nToday is ' + strftime_now('%d %B %Y') + '.<|im_end|>\\n' }}"
        + config["chat_template"]
    )
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tok_dir)
    return save_tiny_llama(tmp_path / "base", tokenizer, context_length=512)


def test_a_resume_on_another_day_keeps_the_runs_prompt_date(dated_model_dir, tmp_path, monkeypatch):
    from instructune.data.prompts import format_prompt, use_prompt_date
    from instructune.pipeline import run_dir
    from instructune.tokenization import load_tokenizer

    record = json.loads((FIXTURES / "instructions-40.json").read_text())[0]
    template = load_tokenizer(dated_model_dir).chat_template
    with use_prompt_date(DAY_ONE):
        assert "Today is 27 November 2026." in format_prompt(record, "chat", chat_template=template)

    def chat_cfg(out: Path, **settings):
        over = dict(model=str(dated_model_dir), init="pretrained", model_overrides={},
                    style="chat", max_length=None, test_limit=1)  # fmt: skip
        return tiny_cfg(out, **{**over, **settings})

    def steps(out: Path) -> list[dict]:
        records = without_timings(read_metrics(out / "metrics.jsonl"))
        return [r for r in records if r["kind"] == "step"]

    monkeypatch.setattr(run_dir, "today", lambda: DAY_ONE)
    reference = tmp_path / "reference"
    run_finetune(chat_cfg(reference, max_steps=4))

    out = tmp_path / "resumed"
    run_finetune(chat_cfg(out, max_steps=2))
    monkeypatch.setattr(run_dir, "today", lambda: DAY_TWO)  # the next session, another day
    run_finetune(apply_overrides(load_run_config(out), {"max_steps": 4}), resume=True)
    assert json.loads((out / "run.json").read_text())["prompt_date"] == "2026-11-27"
    assert steps(out) == steps(reference)

    # The date does reach the prompts: a run started on the second day trains on other tokens.
    other = tmp_path / "other-day"
    run_finetune(chat_cfg(other, max_steps=1))
    assert json.loads((other / "run.json").read_text())["prompt_date"] == "2027-03-04"
    assert steps(other)[0]["loss"] != steps(reference)[0]["loss"]
