"""Loading, validation and the book's split; every bad-input case."""

from __future__ import annotations

import json

import pytest

from instructune.data.records import LoadResult, load_records, split_records
from instructune.errors import DataError


def write(path, text: str | bytes):
    if isinstance(text, str):
        text = text.encode("utf-8")
    path.write_bytes(text)
    return path


GOOD = [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
    {"instruction": "Add.", "input": "2 and 3", "output": "5", "id": 7, "tags": ["math"]},
    {"instruction": "Name a colour.", "output": "Blue."},
]


def test_json_list_loads_with_defaults_and_extra_keys(tmp_path):
    result = load_records(write(tmp_path / "d.json", json.dumps(GOOD)))
    assert isinstance(result, LoadResult) and isinstance(result, list)
    assert result[1] == GOOD[1]  # other keys kept untouched
    assert result[2] == {"instruction": "Name a colour.", "output": "Blue.", "input": ""}
    assert result.warnings == [] and result.skipped == []
    assert result.locations == ["record 0", "record 1", "record 2"]
    assert result.records == list(result)


def test_fixtures_are_valid(fixtures):
    result = load_records(fixtures / "instructions-40.json")
    assert len(result) == 40 and result.warnings == []
    assert len(load_records(fixtures / "book-examples.json")) == 2


def test_book_data_is_valid(shared_data):
    book = load_records(shared_data / "instruction-data.json")
    assert len(book) == 1100 and book.skipped == []


def test_jsonl_with_alpaca_and_chat_lines(tmp_path):
    lines = [
        json.dumps(GOOD[0]),
        "",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "Capital of France?"},
                    {"role": "assistant", "content": "Paris."},
                ],
                "id": "c1",
            }
        ),
        json.dumps(
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"},
                ]
            }
        ),
    ]
    result = load_records(write(tmp_path / "d.jsonl", "\n".join(lines) + "\n"))
    assert result[1] == {
        "instruction": "Capital of France?",
        "input": "",
        "output": "Paris.",
        "id": "c1",
    }
    assert result[2] == {"instruction": "2+2?", "input": "", "output": "4", "system": "Be brief."}
    assert result.locations == ["line 1", "line 3", "line 4"]


@pytest.mark.parametrize(
    "messages, field, problem",
    [
        ([], "messages", "non-empty list"),
        ("hi", "messages", "non-empty list"),
        ([{"role": "user", "content": "a"}], "messages", "turns must be"),
        (
            [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
            "messages",
            "turns must be",
        ),
        # Several exchanges are accepted (tests/test_multiturn.py); turns out of order are not.
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "assistant", "content": "c"},
                {"role": "assistant", "content": "d"},
            ],
            "messages[2].role",
            "must be 'user'",
        ),
        ([{"role": "bot", "content": "a"}], "messages[0].role", "must be system"),
        ([{"role": "user", "content": 3}], "messages[0].content", "must be a string"),
        (["x"], "messages[0]", "must be an object"),
    ],
)
def test_bad_chat_lines(tmp_path, messages, field, problem):
    path = write(tmp_path / "chat.jsonl", json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError) as info:
        load_records(path)
    assert f"chat.jsonl: line 1: field {field!r}: " in str(info.value)
    assert problem in str(info.value)


@pytest.mark.parametrize(
    "record, field, problem",
    [
        ({"input": "", "output": "x"}, "instruction", "is missing"),
        ({"instruction": "  ", "output": "x"}, "instruction", "is empty"),
        ({"instruction": 5, "output": "x"}, "instruction", "must be a string, not a number"),
        ({"instruction": "x"}, "output", "is missing"),
        ({"instruction": "x", "output": None}, "output", "must be a string, not null"),
        ({"instruction": "x", "output": ["a"]}, "output", "must be a string, not a list"),
        (
            {"instruction": "x", "input": {"a": 1}, "output": "y"},
            "input",
            "must be a string, not an object",
        ),
        ("just text", "-", "must be an object, not a string"),
        (3, "-", "must be an object, not a number"),
    ],
)
def test_invalid_records_name_file_record_and_field(tmp_path, record, field, problem):
    path = write(tmp_path / "bad.json", json.dumps([GOOD[0], record]))
    with pytest.raises(DataError) as info:
        load_records(path)
    assert f"bad.json: record 1: field {field!r}: {problem}" in str(info.value)
    assert "--skip-invalid" in str(info.value)
    # The same record in JSONL is named by its line number.
    jsonl = write(tmp_path / "bad.jsonl", json.dumps(GOOD[0]) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"bad.jsonl: line 3: field '{field}'"):
        load_records(jsonl)


def test_skip_invalid_drops_and_reports(tmp_path):
    data = [GOOD[0], {"instruction": "x"}, GOOD[1], {"output": 1}, GOOD[2]]
    result = load_records(write(tmp_path / "d.json", json.dumps(data)), skip_invalid=True)
    assert list(result) == [GOOD[0], GOOD[1], {**GOOD[2], "input": ""}]
    assert result.skipped_locations == ["record 1", "record 3"]
    assert [(i.where, i.field) for i in result.skipped] == [
        ("record 1", "output"),
        ("record 3", "instruction"),
        ("record 3", "output"),
    ]
    lines = json.dumps(GOOD[0]) + "\n{broken\n" + json.dumps(GOOD[1]) + "\n"
    result = load_records(write(tmp_path / "d.jsonl", lines), skip_invalid=True)
    assert len(result) == 2 and result.skipped_locations == ["line 2"]
    assert "not valid JSON" in result.skipped[0].message


def test_all_invalid_records_are_listed_in_the_error(tmp_path):
    data = [{"instruction": "x"}] * 25
    with pytest.raises(DataError) as info:
        load_records(write(tmp_path / "d.json", json.dumps(data)))
    text = str(info.value)
    assert "25 invalid record(s)" in text and "record 19" in text and "and 5 more" in text
    with pytest.raises(DataError, match="no valid records"):
        load_records(tmp_path / "d.json", skip_invalid=True)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"  \n\n", "the file is empty"),
        (b"[]", "the list of records is empty"),
        (
            b'{"instruction": "x", "output": "y"}',
            "top level must be a list of records, not an object",
        ),
        (b'"text"', "top level must be a list of records, not a string"),
        (b'[{"instruction": "x",\n "output": }]', "line 2, column 12: not valid JSON"),
        (
            b'{"instruction": "x", "output": "y"}\n{"instruction": "z", "output": "w"}\n',
            "line 2, column 1: not valid JSON \\(Extra data\\) \\(one record a line",
        ),
        (b'[{"instruction": "caf\xe9", "output": "y"}]', "line 1: not valid UTF-8"),
        (b'[{"instruction": "x", "output": "y"}]\n\n[\xff]', "line 3: not valid UTF-8"),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = write(tmp_path / "bad.json", content)
    with pytest.raises(DataError, match=message) as info:
        load_records(path)
    assert str(path) in str(info.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a directory"):
        load_records(tmp_path)


def test_bom_is_accepted_with_a_warning(tmp_path):
    result = load_records(write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps(GOOD).encode()))
    assert len(result) == 3
    [warning] = result.warnings
    assert (
        warning.code == "bom" and "byte-order mark" in str(warning) and "bom.json" in str(warning)
    )


def test_duplicates_and_conflicts_are_warned_separately(tmp_path):
    a = {"instruction": "Capital of Peru?", "input": "", "output": "Lima."}
    conflict = {**a, "output": "Cusco."}
    data = [a, GOOD[0], a, conflict, dict(a), {**conflict}]
    result = load_records(write(tmp_path / "d.json", json.dumps(data)))
    assert len(result) == 6  # nothing is dropped
    assert [str(w) for w in result.duplicates] == [
        f"{tmp_path / 'd.json'}: record 2: field 'instruction, input, output': duplicates record 0",
        f"{tmp_path / 'd.json'}: record 4: field 'instruction, input, output': duplicates record 0",
        f"{tmp_path / 'd.json'}: record 5: field 'instruction, input, output': duplicates record 3",
    ]
    assert [str(w) for w in result.conflicts] == [
        f"{tmp_path / 'd.json'}: record 3: field 'output': same instruction and input as record 0 "
        "but a different output"
    ]
    # Same instruction with a different input is neither.
    other = load_records([a, {**a, "input": "x", "output": "Other."}])
    assert other.warnings == []


def test_unknown_suffix_is_sniffed(tmp_path):
    assert len(load_records(write(tmp_path / "data", json.dumps(GOOD)))) == 3
    lines = "\n".join(json.dumps(r) for r in GOOD)
    assert len(load_records(write(tmp_path / "data.txt", lines))) == 3


def test_in_memory_records():
    assert load_records(GOOD)[2]["input"] == ""
    with pytest.raises(DataError, match="<records>: record 0: field 'output'"):
        load_records([{"instruction": "x"}])
    with pytest.raises(DataError, match="empty"):
        load_records([])


# --- split --------------------------------------------------------------------------------------


def test_book_split_bit_for_bit(shared_data):
    data = json.loads((shared_data / "instruction-data.json").read_text())
    train, test, val = split_records(data)
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    # The book's own code.
    train_portion = int(len(data) * 0.85)
    test_portion = int(len(data) * 0.1)
    assert train == data[:train_portion]
    assert test == data[train_portion : train_portion + test_portion]
    assert val == data[train_portion + test_portion :]


@pytest.mark.parametrize("n", [0, 1, 7, 20, 40, 99, 100, 101, 333, 1000, 1100, 52002])
def test_split_sizes_follow_the_books_arithmetic(n):
    data = list(range(n))
    train, test, val = split_records(data)
    assert len(train) == int(n * 0.85) and len(test) == int(n * 0.1)
    assert train + test + val == data


def test_seeded_shuffle_split(fixtures):
    records = load_records(fixtures / "instructions-40.json")
    a = split_records(records, shuffle_seed=1)
    assert a == split_records(records, shuffle_seed=1)
    assert a != split_records(records, shuffle_seed=2)
    assert [len(p) for p in a] == [34, 4, 2]
    assert sorted(r["instruction"] for p in a for r in p) == sorted(
        r["instruction"] for r in records
    )
    assert split_records(records)[0] == list(records)[:34]
    with pytest.raises(ValueError):
        split_records(records, train=0.95, test=0.1)
