"""Preference records for DPO: validation with clear errors, the book's file, pairs and their batch."""

from __future__ import annotations

import json

import pytest

from instructune.data.collate import collate_pairs
from instructune.data.dataset import tokenize_pair
from instructune.data.records import load_preference_records, load_records, split_records
from instructune.errors import DataError
from instructune.tokenization.gpt2 import GPT2Tokenizer

PAIR = {
    "instruction": "Rewrite politely.",
    "input": "Give me the salt.",
    "output": "Could you pass the salt?",
    "chosen": "Could you please pass me the salt?",
    "rejected": "Pass the salt.",
}


def test_the_books_preference_file_loads_and_splits_85_10_5(shared_data):
    records = load_preference_records(shared_data / "instruction-data-with-preference.json")
    assert len(records) == 1100 and not records.skipped
    train, test, val = split_records(records)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert all(r["chosen"].strip() and r["rejected"].strip() for r in records)


def test_bad_preference_records_are_named_by_file_record_and_field(tmp_path):
    bad = [
        PAIR,
        {**PAIR, "chosen": "  "},
        {k: v for k, v in PAIR.items() if k != "rejected"},
        {**PAIR, "input": 3},
    ]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_preference_records(path)
    text = str(err.value)
    assert "3 invalid record(s)" in text
    assert f"{path}: record 1: field 'chosen': is empty" in text
    assert f"{path}: record 2: field 'rejected': is missing" in text
    assert f"{path}: record 3: field 'input': must be a string" in text
    kept = load_preference_records(path, skip_invalid=True)
    assert kept == [PAIR] and len(kept.skipped) == 3
    # Instruction data without chosen/rejected is not preference data, and the other way round
    # the instruction loader still wants its output.
    with pytest.raises(DataError, match="field 'chosen': is missing"):
        load_preference_records([{"instruction": "x", "output": "y"}])
    with pytest.raises(DataError, match="field 'output': is missing"):
        load_records([{k: v for k, v in PAIR.items() if k != "output"}])


def test_duplicate_and_conflicting_pairs_are_warned_about():
    other = {**PAIR, "rejected": "No."}
    loaded = load_preference_records([PAIR, dict(PAIR), other])
    assert [w.where for w in loaded.duplicates] == ["record 1"]
    assert [w.where for w in loaded.conflicts] == ["record 2"]
    assert "different pair" in loaded.conflicts[0].message


def test_pairs_share_the_prompt_and_batch_to_the_longest_of_both_sides():
    tok = GPT2Tokenizer()
    short = {**PAIR, "chosen": "Yes.", "rejected": "No, never, not in a thousand years."}
    pairs = [tokenize_pair(PAIR, tok), tokenize_pair(short, tok)]
    for chosen, rejected in pairs:
        assert chosen.prompt_len == rejected.prompt_len
        assert chosen.ids[: chosen.prompt_len] == rejected.ids[: rejected.prompt_len]
        assert chosen.ids[-1] == rejected.ids[-1] == tok.eos_id
    (ci, ct), (ri, rt) = collate_pairs(pairs, pad_id=tok.pad_id)
    longest = max(len(s) for pair in pairs for s in pair) - 1  # inputs drop the last id
    assert ci.shape == ri.shape == (2, longest)
    for targets, side in ((ct, 0), (rt, 1)):
        for b, pair in enumerate(pairs):
            seq = pair[side]
            supervised = (targets[b] != -100).nonzero().flatten().tolist()
            # Exactly the response and its end token are targets, nothing of the prompt.
            assert supervised == list(range(seq.prompt_len - 1, len(seq) - 1))
            assert targets[b, supervised].tolist() == seq.ids[seq.prompt_len :]
