"""benchmarks/recipe.py scores a run on the validation split that run was trained beside."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import recipe as bench  # noqa: E402  (benchmarks/recipe.py, found through sys.path)


def _records(n: int, tag: str) -> list[dict]:
    return [{"instruction": f"{tag} {i}", "input": "", "output": f"answer {i}"} for i in range(n)]


def _write(path: Path, records: list[dict]) -> str:
    path.write_text(json.dumps(records))
    return str(path)


def test_validation_records_are_the_last_records_of_the_book_split(tmp_path):
    data = _write(tmp_path / "all.json", _records(40, "all"))
    val = bench.validation_records({"data": data, "val_data": None, "split_shuffle_seed": None})
    # 40 records: 34 train, 4 test, then validation.
    assert [r["instruction"] for r in val] == ["all 38", "all 39"]


def test_validation_records_follow_the_runs_split_seed(tmp_path):
    data = _write(tmp_path / "all.json", _records(40, "all"))
    plain = bench.validation_records({"data": data, "split_shuffle_seed": None})
    shuffled = bench.validation_records({"data": data, "split_shuffle_seed": 7})
    assert len(shuffled) == 2 and shuffled != plain


def test_a_separate_validation_file_is_scored_not_a_split_of_the_training_file(tmp_path):
    # The training file here is a subset of the book's training split: splitting it again
    # would score the model on records it was trained on.
    data = _write(tmp_path / "train.json", _records(40, "train"))
    val_file = _write(tmp_path / "val.json", _records(3, "held out"))
    val = bench.validation_records({"data": data, "val_data": val_file})
    assert [r["instruction"] for r in val] == ["held out 0", "held out 1", "held out 2"]
