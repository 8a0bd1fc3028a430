"""A few DPO steps on the embedded SmolLM2-135M-Instruct (already instruction-tuned, so no
fine-tune first) with a slice of the book's preference data: the validation margin rises."""

from __future__ import annotations

import json
import math
import time

import pytest

from instructune.checkpoints.resolve import embedded_gguf_path
from instructune.config import DpoConfig, resolve_config
from instructune.errors import ModelLoadError
from instructune.pipeline.dpo import run_dpo
from instructune.training.metrics import read_metrics

pytestmark = [pytest.mark.embedded, pytest.mark.shared]


def test_dpo_steps_on_the_embedded_model_raise_the_validation_margin(tmp_path):
    try:
        embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    from conftest import SHARED_DATA

    source = SHARED_DATA / "instruction-data-with-preference.json"
    if not source.exists():
        pytest.skip(f"{source} is absent (it sits beside the checkout in dev sessions)")
    records = json.loads(source.read_text(encoding="utf-8"))

    def size(record: dict) -> int:
        return len(record["instruction"] + record["input"] + record["chosen"] + record["rejected"])

    def shortest(part: list[dict], n: int) -> list[dict]:
        # The shortest pairs of a split keep the model's CPU time within the test's budget.
        return sorted(part, key=size)[:n]

    # The book's split of the 1,100 records: train 0-934, test 935-1044, validation 1045-.
    parts = {
        "train": shortest(records[:935], 6),
        "test": shortest(records[935:1045], 1),
        "val": shortest(records[1045:], 4),
    }
    files = {}
    for name, part in parts.items():
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(part), encoding="utf-8")
    flags = {
        "data": str(files["train"]),
        "val_data": str(files["val"]),
        "test_data": str(files["test"]),
        "out": str(tmp_path / "run"),
        "batch_size": 2,
        "max_steps": 3,
        "lr": 5e-5,  # ten times the book's: 3 steps of 2 pairs must show the trend
        "max_length": 96,
        "eval_every": 1,
        "eval_batches": 2,
        "test_limit": 0,  # answering is tested on tiny models; here it would double the time
        "evaluate": False,
        "sample_every_epoch": False,
        "quiet": True,
        "threads": 2,
    }
    started = time.perf_counter()
    run_dpo(resolve_config(flags=flags, config_class=DpoConfig))
    seconds = time.perf_counter() - started
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    margins = [(r["step"], round(r["val_margin"], 4)) for r in evals]
    print(f"\nvalidation margin by step {margins}, {seconds:.0f} s")
    assert evals[0]["step"] == 0 and abs(evals[0]["val_loss"] - math.log(2)) < 1e-5
    assert [r["step"] for r in evals] == [0, 1, 2, 3]
    values = [r["val_margin"] for r in evals]
    assert values == sorted(values) and values[-1] > values[0] + 0.5  # rising at every step
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
