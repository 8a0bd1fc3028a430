"""``instructune data ...`` end to end, in-process and (for start-up imports) in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from instructune.cli.main import main

BOOK_50_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nIdentify the correct spelling of the following "
    "word.\n\n### Input:\nOcassion\n\n### Response:\n"
)


@pytest.fixture
def data40(fixtures):
    return str(fixtures / "instructions-40.json")


def run_py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_help_and_data_commands_do_not_import_torch(data40, tmp_path):
    code = f"""
import sys
from instructune.cli.main import main
try:
    main(["--help"])
except SystemExit:
    pass
assert main(["data", "validate", {data40!r}]) == 0
assert main(["data", "split", {data40!r}, "--out", {str(tmp_path)!r}]) == 0
assert main(["data", "show", {data40!r}, "3"]) == 0
assert main(["data", "inspect", {data40!r}]) == 0
heavy = [m for m in ("torch", "transformers") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    proc = run_py(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("ok")


def test_console_script_runs(data40):
    proc = subprocess.run(
        [sys.executable, "-m", "instructune", "data", "validate", data40],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "40 valid records" in proc.stdout


def test_validate_reports_warnings_and_errors(tmp_path, capsys):
    a = {"instruction": "Capital of Peru?", "input": "", "output": "Lima."}
    good = tmp_path / "d.json"
    good.write_text(json.dumps([a, a, {**a, "output": "Cusco."}]))
    assert main(["data", "validate", str(good)]) == 0
    out, err = capsys.readouterr()
    assert "3 valid records, 2 warnings (1 duplicates, 1 conflicting outputs)" in out
    assert "warning:" in err and "record 1" in err and "record 2" in err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(a) + "\n" + json.dumps({"instruction": "x"}) + "\nnot json\n")
    assert main(["data", "validate", str(bad)]) == 1
    out, err = capsys.readouterr()
    assert "error:" in err and "line 2: field 'output': is missing" in err and "line 3" in err
    assert main(["data", "validate", str(bad), "--skip-invalid"]) == 0
    out, err = capsys.readouterr()
    assert "1 valid records" in out and "skipped 2 invalid: line 2, line 3" in out
    assert "skipped:" in err


def test_errors_exit_non_zero_with_the_message(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert main(["data", "validate", str(empty)]) == 1
    assert "empty.json: the file is empty" in capsys.readouterr().err
    assert main(["data", "show", str(tmp_path / "nope.json"), "0"]) == 1
    assert "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "inspect", str(empty), "--batch-size", "0"])


def test_split_writes_three_files(data40, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["data", "split", data40, "--out", str(out)]) == 0
    assert "34 / 4 / 2" in capsys.readouterr().out
    records = json.loads(open(data40).read())
    parts = [json.loads((out / f"{n}.json").read_text()) for n in ("train", "test", "val")]
    assert parts[0] == records[:34] and parts[1] == records[34:38] and parts[2] == records[38:]
    assert sorted(p.name for p in out.iterdir()) == ["test.json", "train.json", "val.json"]
    assert main(["data", "split", data40, "--out", str(out), "--seed", "3"]) == 0
    shuffled = json.loads((out / "train.json").read_text())
    assert shuffled != records[:34] and len(shuffled) == 34
    assert main(["data", "split", data40, "--out", str(out), "--train", "0.95"]) == 1


def test_show_prints_the_exact_prompt(fixtures, capsys):
    book = str(fixtures / "book-examples.json")
    assert main(["data", "show", book, "0", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"prompt": BOOK_50_PROMPT, "response": "The correct spelling is 'Occasion.'"}
    assert main(["data", "show", book, "0"]) == 0
    text = capsys.readouterr().out
    assert f"--- prompt ---\n{BOOK_50_PROMPT}--- response ---\n" in text
    assert "The correct spelling is 'Occasion.'\n--- end ---" in text
    assert main(["data", "show", book, "1", "--style", "phi3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["prompt"] == (
        "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>:\n"
    )
    assert main(["data", "show", book, "2"]) == 1
    assert "no record 2; it has 2" in capsys.readouterr().err


def test_show_chat_style_needs_a_template(data40, fixtures, capsys):
    tok = str(fixtures / "tiny-tokenizer")
    assert main(["data", "show", data40, "0", "--style", "chat", "--tokenizer", tok, "--json"]) == 0
    prompt = json.loads(capsys.readouterr().out)["prompt"]
    assert prompt == (
        "<|im_start|>user\nWhat is the opposite of 'ancient'?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert main(["data", "show", data40, "0", "--style", "chat"]) == 1
    assert "has none" in capsys.readouterr().err
    assert main(["data", "inspect", data40, "--style", "chat", "--tokenizer", tok, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["style"] == "chat" and report["records"] == 40
    assert report["prompt_lengths"]["min"] > 5


def test_system_turns_reach_the_chat_style_and_are_counted_for_the_others(
    fixtures, tmp_path, capsys
):
    lines = []
    for i in range(20):
        turns = [
            {"role": "user", "content": f"What is {i} plus one?"},
            {"role": "assistant", "content": f"{i + 1}"},
        ]
        if i % 4 == 0:
            turns.insert(0, {"role": "system", "content": "Answer with digits."})
        lines.append(json.dumps({"messages": turns}))
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(lines) + "\n")
    tok = str(fixtures / "tiny-tokenizer")
    assert main(["data", "show", str(data), "0", "--style", "chat", "--tokenizer", tok,
                 "--json"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert json.loads(out)["prompt"] == (
        "<|im_start|>system\nAnswer with digits.<|im_end|>\n"
        "<|im_start|>user\nWhat is 0 plus one?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert err == ""
    assert main(["data", "show", str(data), "0"]) == 0
    out, err = capsys.readouterr()
    assert "Answer with digits." not in out
    assert "1 of 1 records have a system turn, which the alpaca style cannot express" in err
    assert main(["data", "inspect", str(data), "--style", "phi3"]) == 0
    assert "5 of 20 records have a system turn, which the phi3 style" in capsys.readouterr().err
    assert main(["data", "inspect", str(data), "--style", "chat", "--tokenizer", tok]) == 0
    assert "system turn" not in capsys.readouterr().err


def test_inspect_prints_every_figure(data40, capsys):
    assert main(["data", "inspect", data40, "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    for text in (
        "records: 40",
        "split (train/test/val): 34 / 4 / 2",
        "sequence: min",
        "median",
        "p95",
        "shuffled batches (the book):",
        "length-grouped batches:",
        "duplicates: 0",
        "empty outputs: 0",
        "longer than 1024 tokens: 0",
    ):
        assert text in out
    assert main(["data", "inspect", data40, "--json", "--max-length", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["records"] == 40 and report["too_long"]
    assert report["padding_grouped"] <= report["padding_shuffled"]


def test_fetch_demo_and_offline_error(capsys, monkeypatch):
    assert main(["data", "fetch", "demo"]) == 0
    out = capsys.readouterr().out
    assert "shipped with instructune" in out and "sha256 " in out
    monkeypatch.setenv("INSTRUCTUNE_OFFLINE", "1")
    assert main(["data", "fetch", "book"]) == 1
    err = capsys.readouterr().err
    assert "nothing is cached" in err and "local path" in err
