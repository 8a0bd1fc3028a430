"""``instructune generate``: one streamed prompt, and a whole file answered resumably."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instructune.cli.main import main
from instructune.data.prompts import extract_response, format_prompt, prompt_format_for
from instructune.generation import answer_records, generate, stop_ids_for

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Rewrite politely.", "input": "Give me the salt.", "output": "May I..."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Translate to French.", "input": "Good night, sleep well.", "output": "..."},
    {"instruction": "Give an antonym.", "input": "cold", "output": "hot"},
    {"instruction": "Summarise.", "input": "A long day of meetings ended late.", "output": "..."},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 saved the way a fine-tuned model is, with its prompt format."""
    from instructune.checkpoints import save_model
    from instructune.models import build_model, get_config
    from instructune.tokenization.gpt2 import GPT2Tokenizer

    torch.manual_seed(0)
    cfg = get_config("gpt2", n_layers=2, emb_dim=64, n_heads=4, context_length=256)
    model = build_model(cfg)
    tokenizer = GPT2Tokenizer()
    directory = tmp_path_factory.mktemp("tiny-gpt2")
    save_model(directory, model, tokenizer, cfg, prompt_format_for(tokenizer, "alpaca"))
    return directory


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from instructune.checkpoints import load_model

    return load_model(tiny_dir)


def expected_answers(loaded, records, max_new_tokens):
    prompts = [format_prompt(r, "alpaca") for r in records]
    results = generate(
        loaded.model, loaded.tokenizer, prompts, max_new_tokens=max_new_tokens,
        stop_ids=stop_ids_for(loaded), stop_strings=loaded.prompt_format.stop_strings,
    )  # fmt: skip
    return [extract_response(r.text, "alpaca") for r in results]


def test_prompt_is_wrapped_and_streamed_to_stdout(tiny_dir, tiny, capsys):
    assert tiny.prompt_format is not None and tiny.prompt_format.style == "alpaca"
    code = main(["generate", "--model", str(tiny_dir), "--prompt", "Name a colour.",
                 "--max-new-tokens", "12", "--device", "cpu"])  # fmt: skip
    assert code == 0
    prompt = format_prompt({"instruction": "Name a colour.", "input": ""}, "alpaca")
    (want,) = generate(
        tiny.model, tiny.tokenizer, [prompt], max_new_tokens=12,
        stop_strings=tiny.prompt_format.stop_strings,
    )  # fmt: skip
    assert want.text
    assert capsys.readouterr().out == want.text + "\n"


def test_raw_prompt_and_sampling_flags(tiny_dir, tiny, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Once upon a time", "--raw",
            "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "40", "--seed", "3"]  # fmt: skip
    assert main(args) == 0
    (want,) = generate(
        tiny.model, tiny.tokenizer, ["Once upon a time"], max_new_tokens=8, temperature=0.8,
        top_k=40, seed=3,
    )  # fmt: skip
    assert capsys.readouterr().out == want.text + "\n"


def test_random_registry_model(capsys):
    torch.manual_seed(0)
    args = ["generate", "--model", "gpt2", "--init", "random", "--raw", "--prompt", "Hello",
            "--max-new-tokens", "3"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    from instructune.checkpoints import load_model

    torch.manual_seed(0)
    loaded = load_model("gpt2", init="random")
    (want,) = generate(loaded.model, loaded.tokenizer, ["Hello"], max_new_tokens=3)
    assert out == want.text + "\n"


def test_data_file_is_answered_beside_the_input(tiny_dir, tiny, tmp_path, capsys):
    data = tmp_path / "test.json"
    data.write_text(json.dumps(RECORDS, indent=1), encoding="utf-8")
    before = data.read_bytes()
    args = ["generate", "--model", str(tiny_dir), "--data", str(data), "--max-new-tokens", "10",
            "--batch-size", "4", "--quiet"]  # fmt: skip
    assert main(args) == 0
    assert data.read_bytes() == before  # the input is never touched
    out = json.loads((tmp_path / "test.responses.json").read_text(encoding="utf-8"))
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in out] == RECORDS
    answers = [r["model_response"] for r in out]
    assert answers == expected_answers(tiny, RECORDS, 10)
    assert all(answers) and len(set(answers)) > 1


def test_data_run_resumes_and_only_answers_what_is_missing(tiny_dir, tiny, tmp_path):
    data, out_path = tmp_path / "in.json", tmp_path / "answers.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    # A run killed after its first batch: half the records answered (with a marker we would
    # never generate), the rest without an answer yet.
    partial = [dict(r, model_response=f"KEPT {i}") for i, r in enumerate(RECORDS[:3])]
    out_path.write_text(json.dumps(partial + RECORDS[3:]), encoding="utf-8")
    args = ["generate", "--model", str(tiny_dir), "--data", str(data), "--out", str(out_path),
            "--max-new-tokens", "10", "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = json.loads(out_path.read_text(encoding="utf-8"))
    assert [r["model_response"] for r in out[:3]] == ["KEPT 0", "KEPT 1", "KEPT 2"]
    assert [r["model_response"] for r in out[3:]] == expected_answers(tiny, RECORDS[3:], 10)


def test_out_may_not_be_the_input(tiny_dir, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    before = data.read_bytes()
    args = ["generate", "--model", str(tiny_dir), "--data", str(data), "--out", str(data)]
    assert main(args) == 1
    assert "is the input file" in capsys.readouterr().err
    assert data.read_bytes() == before


def test_out_written_for_other_data_is_refused(tiny_dir, tmp_path, capsys):
    data, out_path = tmp_path / "in.json", tmp_path / "out.json"
    data.write_text(json.dumps(RECORDS), encoding="utf-8")
    other = [dict(r, model_response="x") for r in RECORDS]
    other[2]["instruction"] = "Something else entirely."
    out_path.write_text(json.dumps(other), encoding="utf-8")
    args = ["generate", "--model", str(tiny_dir), "--data", str(data), "--out", str(out_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "record 2" in err and "'instruction'" in err and str(out_path) in err


def test_answer_records_library_call(tiny):
    records = [dict(r) for r in RECORDS[:3]]
    out = answer_records(tiny, records, max_new_tokens=6, batch_size=2, progress=False)
    assert all("model_response" not in r for r in records)  # the inputs are not changed
    assert [r["model_response"] for r in out] == expected_answers(tiny, records, 6)


def test_a_sampled_run_resumed_gives_what_one_run_gives(tiny, tmp_path):
    # Record i samples with seed + i, so its answer does not depend on which batch it fell in
    # (a resumed run batches only the records still missing).
    options = dict(max_new_tokens=8, temperature=1.0, top_k=50, seed=5, progress=False)
    whole = answer_records(tiny, RECORDS, batch_size=2, out_path=tmp_path / "a.json", **options)
    out_path = tmp_path / "b.json"
    partial = [whole[0], whole[3]]  # answers of a run that ended early (longest prompts first)
    out_path.write_text(json.dumps(partial[:1] + RECORDS[1:3] + partial[1:] + RECORDS[4:]))
    resumed = answer_records(tiny, RECORDS, batch_size=2, out_path=out_path, **options)
    assert resumed == whole
    again = answer_records(tiny, RECORDS, batch_size=4, **options)
    assert again == whole


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_dtype_auto_is_bf16_only_where_the_cpu_computes_it(
    tiny_dir, tiny, capsys, monkeypatch, fast_bf16
):
    """--dtype auto decodes in bf16 on a CPU that lists AVX512-BF16 (a bf16 copy's answer),
    and in fp32 on one without (this machine's flags are replaced for the test)."""
    import copy

    from instructune.utils import devices

    flags = {"avx2", "avx512_bf16"} if fast_bf16 else {"avx2"}
    monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    assert devices.resolve_dtype("auto", torch.device("cpu")) == (
        torch.bfloat16 if fast_bf16 else torch.float32
    )
    args = ["generate", "--model", str(tiny_dir), "--prompt", "Name a colour.", "--raw",
            "--max-new-tokens", "6", "--device", "cpu", "--dtype", "auto"]  # fmt: skip
    assert main(args) == 0
    model = copy.deepcopy(tiny.model).to(torch.bfloat16 if fast_bf16 else torch.float32)
    (want,) = generate(model, tiny.tokenizer, ["Name a colour."], max_new_tokens=6)
    assert capsys.readouterr().out == want.text + "\n"


def test_an_unknown_dtype_is_one_clear_line(tiny_dir, capsys):
    args = ["generate", "--model", str(tiny_dir), "--prompt", "x", "--dtype", "fp8"]
    assert main(args) != 0
    assert "--dtype: unknown dtype 'fp8'; choose one of auto, fp32, bf16, fp16" in (
        capsys.readouterr().err
    )
