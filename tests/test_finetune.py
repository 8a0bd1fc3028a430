"""`instructune finetune` end to end on a tiny random GPT-2 and a 40-record file."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import save_tiny_llama, tiny_finetune_args

from instructune.cli.main import main


def tiny_args(out, *extra: str) -> list[str]:
    return tiny_finetune_args(
        out,
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--eval-every",
        "3",
        "--eval-batches",
        "2",
        "--max-new-tokens",
        "8",
        "--max-length",
        "128",
        "--checkpoint-every",
        "4",
        "--lr",
        "1e-3",
        *extra,
    )


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One complete tiny run, shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(tiny_args(out)) == 0
    return out


def test_every_output_file(finished_run):
    out = finished_run
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "instructune.json",
        "metrics.jsonl",
        "loss.png",
        "loss.pdf",
        "responses.json",
        "run.json",
    ):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list(out.glob("vocab.json")) or list(out.glob("tokenizer.json"))

    # instructune.json: the prompt format travels with the weights.
    fmt = json.loads((out / "instructune.json").read_text())
    assert fmt["style"] == "alpaca" and fmt["eos_id"] == 50256 and fmt["add_bos"] is False

    # responses.json: the 4 test records (40 -> 34/4/2), in order, with model_response.
    records = json.loads((tiny_fixture_path()).read_text())
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses) == 4
    for got, want in zip(responses, records[34:38], strict=True):
        assert {k: got[k] for k in want} == want
        assert isinstance(got["model_response"], str)

    # metrics.jsonl: a step line for each of the 2 x 8 steps, evals on the book's cadence.
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if r["kind"] == "step"]
    evals = [r for r in lines if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert [r["step"] for r in evals] == [0, 1, 4, 7, 10, 13, 16]
    for r in steps:
        assert set(r) >= {"step", "epoch", "tokens_seen", "loss", "lr", "tokens_per_s"}
    assert steps[-1]["epoch"] == 2.0 and steps[-1]["tokens_seen"] > steps[0]["tokens_seen"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]  # it learned something

    # run.json: every setting, versions, timings, peak memory, results.
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished"
    assert run["config"]["batch_size"] == 4 and run["config"]["model_overrides"]["n_layers"] == 2
    assert run["model"] == {"source": "gpt2", "weights": "random init"}
    assert run["world_size"] == 1 and run["global_batch"] == 4 and run["max_length"] == 128
    assert run["prompt_date"] == run["started"][:10]
    assert run["environment"]["versions"]["torch"]
    assert run["timings"]["train_s"] > 0 and run["timings"]["total_s"] >= run["timings"]["train_s"]
    assert run["peak_memory"]["ru_maxrss_bytes"] > 10_000_000
    assert run["results"]["steps"] == 16
    assert sum(run["results"]["finish_reasons"].values()) == 4

    # Checkpoints: every 4 steps and at the end, the last 2 kept (plus the best).
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts[-2:] == ["step-000012", "step-000016"]
    assert (out / "checkpoints" / "step-000016" / "optimizer.pt").exists()


@pytest.mark.slow  # two runs of 8 steps, each answering the test split
def test_a_finished_run_extended_to_more_epochs_continues_the_same_run(finished_run, tmp_path):
    """One epoch, then ``--resume`` with two: the steps after the first epoch are those of the
    two-epoch run, bit for bit (the optimizer's moments and the random state carried over)."""
    from instructune.config import apply_overrides
    from instructune.pipeline import load_run_config, run_finetune
    from instructune.training.metrics import read_metrics, without_timings

    out = tmp_path / "one-epoch"
    assert main(tiny_args(out, "--epochs", "1")) == 0
    stale = json.loads((out / "responses.json").read_text())
    for record in stale:  # answers of the one-epoch model must not survive the extension
        record["model_response"] = "stale"
    (out / "responses.json").write_text(json.dumps(stale))
    weights_before = (out / "model.safetensors").read_bytes()

    lines: list[str] = []
    cfg = apply_overrides(load_run_config(out), {"epochs": 2})
    summary = run_finetune(cfg, resume=True, log=lines.append)
    assert "extending the finished run from step 8 to step 16" in lines
    assert summary["steps"] == 16

    def kind(records: list[dict], name: str) -> list[dict]:
        return [r for r in without_timings(records) if r["kind"] == name]

    extended = read_metrics(out / "metrics.jsonl")
    reference = read_metrics(finished_run / "metrics.jsonl")
    assert kind(extended, "step") == kind(reference, "step")
    # The evaluations of the longer run, plus the one that ended the first run (step 8).
    assert [r["step"] for r in kind(extended, "eval")] == [0, 1, 4, 7, 8, 10, 13, 16]
    assert [r for r in kind(extended, "eval") if r["step"] != 8] == kind(reference, "eval")

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["results"]["steps"] == 16
    assert run["config"]["epochs"] == 2 and run["extended_from_step"] == 8
    assert (out / "model.safetensors").read_bytes() != weights_before
    responses = json.loads((out / "responses.json").read_text())
    assert len(responses) == 4 and all(r["model_response"] != "stale" for r in responses)
    assert (out / "checkpoints" / "step-000016").is_dir()


def tiny_fixture_path():
    from pathlib import Path

    return Path(__file__).parent / "fixtures" / "instructions-40.json"


def test_a_finished_run_is_a_model_for_a_second_stage(finished_run, fixtures, tmp_path):
    from instructune.checkpoints import load_model

    loaded = load_model(finished_run)
    assert loaded.prompt_format.style == "alpaca"
    assert loaded.config.n_layers == 2 and loaded.config.emb_dim == 32
    stage2 = tmp_path / "stage2"
    args = tiny_args(stage2, "--max-steps", "2")
    i = args.index("--model")
    args[i + 1] = str(finished_run)
    for flag in ("--init", "--model-overrides"):  # the directory is a pretrained model now
        j = args.index(flag)
        del args[j : j + 2]
    assert main(args) == 0
    first = [json.loads(x) for x in (finished_run / "metrics.jsonl").read_text().splitlines()]
    second = [json.loads(x) for x in (stage2 / "metrics.jsonl").read_text().splitlines()]
    # Stage 2 starts where stage 1 ended, not from random weights (initial loss ~10.8).
    assert second[0]["step"] == 0
    assert second[0]["val_loss"] == pytest.approx(first[-1]["val_loss"], abs=1e-4)
    assert second[0]["val_loss"] < first[0]["val_loss"] - 0.5


def test_phi3_style_travels_with_the_model(fixtures, tmp_path):
    from instructune.checkpoints import load_model
    from instructune.generation import answer_records

    out = tmp_path / "phi3"
    assert main(tiny_args(out, "--style", "phi3", "--max-steps", "1")) == 0
    assert json.loads((out / "instructune.json").read_text())["style"] == "phi3"
    loaded = load_model(out)
    records = json.loads(tiny_fixture_path().read_text())[:3]
    kw = dict(max_new_tokens=6, progress=False)
    default = answer_records(loaded, records, **kw)
    phi3 = answer_records(loaded, records, style="phi3", **kw)
    alpaca = answer_records(loaded, records, style="alpaca", **kw)
    texts = [[r["model_response"] for r in rs] for rs in (default, phi3, alpaca)]
    assert texts[0] == texts[1]  # no flag: prompted in phi3
    assert texts[0] != texts[2]  # (and the prompt style does change the answers)


def test_existing_dir_is_not_overwritten_without_flag(finished_run, fixtures, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    before = (out / "model.safetensors").read_bytes()
    assert main(tiny_args(out, "--max-steps", "1")) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert main(tiny_args(out, "--max-steps", "1", "--overwrite")) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["results"]["steps"] == 1
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-000001"]


@pytest.mark.embedded
@pytest.mark.slow
def test_embedded_model_fine_tunes_and_its_validation_loss_falls(fixtures, tmp_path):
    out = tmp_path / "smol"
    args = [
        "finetune",
        "--data",
        str(fixtures / "instructions-40.json"),
        "--out",
        str(out),
        "--threads",
        "2",
        "--quiet",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--lr",
        "1e-4",
        "--eval-every",
        "3",
        "--eval-batches",
        "1",
        "--max-length",
        "128",
        "--max-new-tokens",
        "16",
        "--test-limit",
        "2",
        "--no-evaluate",
    ]
    assert main(args) == 0  # the defaults: the embedded SmolLM2-135M-Instruct
    evals = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    assert [r["step"] for r in evals] == [0, 1, 4]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.1
    fmt = json.loads((out / "instructune.json").read_text())
    assert fmt["eos_token"] == "<|im_end|>" and fmt["eos_id"] == 2 and fmt["add_bos"] is False
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["model"] == "smollm2-135m-instruct"


@pytest.fixture
def bos_model_dir(bos_tokenizer_dir, tmp_path):
    """A tiny random Llama saved with a tokenizer that adds a beginning-of-sequence token."""

    from instructune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(bos_tokenizer_dir)
    assert tokenizer.add_bos and tokenizer.bos_id is not None
    return save_tiny_llama(tmp_path / "base", tokenizer)


@pytest.mark.parametrize("style", ["alpaca", "chat"])
def test_bos_appears_exactly_once_in_training_and_generation(
    bos_model_dir, fixtures, tmp_path, style
):
    from instructune.checkpoints import load_model
    from instructune.data.dataset import tokenize_records
    from instructune.data.prompts import format_prompt
    from instructune.generation import encode_prompt

    out = tmp_path / "tuned"
    assert (
        main(
            [
                "finetune",
                "--model",
                str(bos_model_dir),
                "--data",
                str(fixtures / "instructions-40.json"),
                "--out",
                str(out),
                "--style",
                style,
                "--max-steps",
                "1",
                "--batch-size",
                "4",
                "--threads",
                "1",
                "--quiet",
                "--max-new-tokens",
                "4",
                "--test-limit",
                "2",
                "--no-evaluate",
            ]
        )
        == 0
    )
    loaded = load_model(out)
    fmt, tok = loaded.prompt_format, loaded.tokenizer
    assert fmt.add_bos is True and fmt.bos_id == tok.bos_id and fmt.style == style
    records = json.loads(tiny_fixture_path().read_text())[:5]

    def one_bos(ids: list[int]) -> bool:
        # This tiny tokenizer's BOS is also its chat turn marker (<|im_start|>), so in the chat
        # style it recurs at the assistant turn; what must not happen is BOS twice at the start.
        if style == "alpaca":
            return ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
        return ids[0] == tok.bos_id and ids[1] != tok.bos_id

    # What training saw (the pipeline tokenises with tokenize_records) ...
    for item in tokenize_records(records, tok, style):
        assert one_bos(item.ids), item.ids[:6]
    # ... and what generation sends for the same records with the saved prompt format.
    for record in records:
        prompt = format_prompt(record, fmt.style, chat_template=tok.chat_template)
        ids = encode_prompt(tok, prompt, add_bos=fmt.add_bos)
        assert one_bos(ids), ids[:6]


@pytest.mark.slow  # the judge client retries with back-off before it gives up
def test_unreachable_judge_falls_back_to_text_metrics(fixtures, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "judged"
    args = tiny_args(out, "--max-steps", "1", "--judge", "ollama:llama3",
                     "--judge-url", f"http://127.0.0.1:{port}")  # fmt: skip
    assert main(args) == 0
    assert "the judge failed" in capsys.readouterr().err
    assert (out / "scores.json").exists()
    run = json.loads((out / "run.json").read_text())
    assert run["results"]["evaluation"]["judge"] is None


def test_answer_dtype_answers_with_the_saved_weights_cast(tmp_path):
    """--answer-dtype bf16: the saved model stays fp32, and the test answers are those of the
    saved weights cast to bf16."""
    import torch
    from helpers import tiny_config
    from safetensors.torch import load_file

    from instructune.checkpoints import load_model
    from instructune.pipeline import answer_test_split, run_finetune

    out = tmp_path / "run"
    summary = run_finetune(tiny_config(out, answer_dtype="bf16", test_limit=3, max_new_tokens=6))
    assert summary["answer_dtype"] == "bfloat16"
    assert all(w.dtype == torch.float32 for w in load_file(out / "model.safetensors").values())
    answered = json.loads((out / "responses.json").read_text())
    records = [{k: v for k, v in r.items() if k != "model_response"} for r in answered]
    loaded = load_model(out, dtype=torch.bfloat16)
    again, _ = answer_test_split(
        loaded, records, style="alpaca", max_new_tokens=6, batch_size=16,
        out_path=tmp_path / "again.json", quiet=True,
    )  # fmt: skip
    assert [r["model_response"] for r in again] == [r["model_response"] for r in answered]
