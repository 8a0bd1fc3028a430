"""Figures printed by ``instructune data inspect``."""

from __future__ import annotations

import pytest

from instructune.data.inspection import LengthStats, format_report, inspect_records
from instructune.data.records import load_records
from instructune.tokenization.gpt2 import GPT2Tokenizer


def test_length_stats_nearest_rank():
    stats = LengthStats.of(list(range(1, 101)))
    assert (stats.min, stats.median, stats.p95, stats.max) == (1, 50.5, 95, 100)
    assert LengthStats.of([7]).p95 == 7
    assert LengthStats.of([3, 1, 2]).median == 2


def test_inspect_flags_and_padding(fixtures):
    records = load_records(
        [
            {"instruction": "Say hi.", "output": "Hi."},
            {"instruction": "Say hi.", "output": "Hi."},
            {"instruction": "Say hi.", "output": "Hello."},
            {"instruction": "Say nothing.", "output": ""},
            *[
                {"instruction": f"Count to {n}.", "output": " ".join(map(str, range(n)))}
                for n in range(1, 40)
            ],
        ]
    )
    tok = GPT2Tokenizer()
    report = inspect_records(records, tok, batch_size=4, max_length=60, split="all")
    assert report.records == 43 and report.split == {"train": 36, "test": 4, "val": 3}
    assert len(report.duplicates) == 1 and len(report.conflicts) == 1
    assert report.empty_outputs == [3]
    assert report.too_long and all(i >= 4 for i in report.too_long)
    assert 0 <= report.padding_grouped < report.padding_shuffled < 1
    text = format_report(report)
    assert "empty outputs: 1" in text and "record 3" in text and "duplicates: 1" in text
    with pytest.raises(ValueError, match="split must be"):
        inspect_records(records, tok, split="dev")
