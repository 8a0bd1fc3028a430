"""``instructune data dedup / generate / rewrite / prefer``.

``dedup`` against the book's dense method (the book's data, and 5,000 records of the benchmark's
synthetic data). The LLM commands against the scripted fault server of the evaluation tests
(tests/judge_server.py: 500s, stalls, garbage, dropped connections), killed with SIGKILL and
resumed; and against ``instructune serve`` (a tiny random chat model, and the embedded SmolLM2).
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from judge_server import BAD_JSON, DROP, OK, JudgeServer, Reply, error

from instructune.cli.main import main
from instructune.data.dedup import KEYS, exact_pairs, field_texts, near_duplicate_pairs
from instructune.data.magpie import cut_instruction, pre_query_from_template
from instructune.data.preference import politeness_choices, preference_prompt
from instructune.data.sources import demo_path
from instructune.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DEMO = json.loads(demo_path().read_text(encoding="utf-8"))
STALL = Reply("stall", delay=2.0)  # longer than the --timeout the commands get here
FAULTS = {1: error(500), 3: DROP, 5: BAD_JSON, 7: STALL}
LLM_ARGS = ["--timeout", "0.5", "--backoff", "0.01", "--retries", "4", "--quiet"]


def _same_pairs(a, b) -> bool:
    return [(p.first, p.second) for p in a] == [(p.first, p.second) for p in b] and all(
        abs(p.similarity - q.similarity) < 1e-9 for p, q in zip(a, b, strict=True)
    )


# --- dedup


def test_dedup_gives_the_book_methods_pairs_on_the_book_data(shared_data):
    records = json.loads((shared_data / "instruction-data.json").read_text(encoding="utf-8"))
    for key in KEYS:
        texts = field_texts(records, key)
        exact = exact_pairs(texts)
        assert exact and _same_pairs(near_duplicate_pairs(texts, block_rows=256), exact), key
        # True record indices: both texts are there and not trivially short.
        assert all(len(texts[p.first]) > 1 and len(texts[p.second]) > 1 for p in exact)


def test_dedup_gives_the_book_methods_pairs_on_5000_synthetic_records():
    spec = importlib.util.spec_from_file_location("bench_dedup", ROOT / "benchmarks" / "dedup.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    texts = field_texts(bench.synthetic_records(5000, seed=0), "instruction")
    exact = exact_pairs(texts)
    assert len(exact) > 1000  # the perturbed copies make many near duplicates
    assert _same_pairs(near_duplicate_pairs(texts), exact)


def test_dedup_skips_empty_and_one_character_texts_and_keeps_true_indices():
    texts = ["", "What's the capital of Italy?", "x", "", "what is the capital of italy", "x"]
    [pair] = near_duplicate_pairs(texts)
    assert (pair.first, pair.second) == (1, 4) and pair.similarity > 0.75
    assert _same_pairs(exact_pairs(texts), [pair])
    with pytest.raises(DataError, match=r"record 1: field 'input'"):
        field_texts([{"input": ""}, {"instruction": "no input"}], "input")


def test_the_dedup_command_prints_pairs_and_lists_what_it_drops(tmp_path, capsys):
    records = [
        {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome."},
        {"instruction": "Name the largest planet.", "input": "", "output": "Jupiter."},
        {"instruction": "What's the capital city of Italy?", "input": "", "output": "Rome!"},
        {"instruction": "what is the capital of italy", "input": "", "output": "It is Rome."},
    ]
    src = tmp_path / "data.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "clean.json"
    assert main(["data", "dedup", str(src), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 near-duplicate pairs" in printed and "wrote 2 of 4" in printed
    assert json.loads(out.read_text()) == records[:2]
    dropped = json.loads((tmp_path / "clean.dropped.json").read_text())
    assert [(d["index"], d["duplicate_of"]) for d in dropped] == [(2, 0), (3, 0)]
    assert dropped[0]["record"] == records[2] and dropped[0]["similarity"] > 0.75


# --- generate (Magpie)

SMOLLM2_LIKE = (  # the shape of SmolLM2's template: a default system turn when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_the_pre_query_is_the_templates_opening_of_a_user_turn():
    assert pre_query_from_template(SMOLLM2_LIKE) == (
        "<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n<|im_start|>user\n"
    )
    go = "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>{{ end }}"
    assert pre_query_from_template(go) == "<|start_header_id|>user<|end_header_id|>\n\n"
    assert cut_instruction(" Name a fruit.<|im_end|>\n<|im_start|>assistant\nApple") == (
        "Name a fruit."
    )


def _distinct_instructions(n: int) -> list[str]:
    """``n`` demo instructions of which no two are near duplicates."""
    pool = sorted({r["instruction"] for r in DEMO})
    chosen: list[str] = []
    for text in pool:
        if not near_duplicate_pairs([*chosen, text]) and len(text) > 20:
            chosen.append(text)
        if len(chosen) == n:
            return chosen
    raise AssertionError("not enough distinct instructions")


INSTRUCTIONS = _distinct_instructions(40)


def magpie_reply(seed: int) -> str:
    """What the scripted model 'writes' after the pre-query for a seed: mostly distinct
    instructions; seed 3 repeats seed 1, seed 5 nearly repeats seed 2, seed 6 is unusable."""
    if seed == 3:
        text = INSTRUCTIONS[1]
    elif seed == 5:
        text = INSTRUCTIONS[2] + " now"
    elif seed == 6:
        text = "Hi"
    else:
        text = INSTRUCTIONS[seed]
    return f"{text}<|im_end|>\n<|im_start|>assistant\nrambling on"


def magpie_script(faults=FAULTS, hold=None):
    """Request i: a fault from ``faults``, else the seeded answer; ``hold`` = (index, arrived,
    release) keeps request ``index`` waiting until the test releases it."""

    def script(i: int, body: dict) -> Reply:
        if hold is not None and i == hold[0]:
            hold[1].set()
            hold[2].wait(60)
        if i in faults:
            return faults[i]
        seed = (body.get("options") or {}).get("seed", body.get("seed"))
        if "prompt" in body:
            return Reply("ok", text=magpie_reply(seed))
        return Reply("ok", text=f"Answer {seed}: done.")

    return script


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_generate_skips_duplicates_and_survives_faults(tmp_path, capsys, backend):
    out = tmp_path / "magpie.jsonl"
    with JudgeServer(script=magpie_script(), template=SMOLLM2_LIKE) as server:
        argv = ["data", "generate", "--llm", f"{backend}:llama3", "--url", server.url]
        argv += ["--n", "5", "--out", str(out), *LLM_ARGS]
        if backend == "openai":  # OpenAI servers report no template
            argv += ["--pre-query", "<|im_start|>user\n"]
        assert main(argv) == 0
        completions = [r["body"] for r in server.chat_requests if "prompt" in r["body"]]
    summary = capsys.readouterr().out
    assert "wrote 5 of 5" in summary and "8 attempts" in summary
    assert "1 duplicates, 1 near duplicates, 1 invalid" in summary
    records = _lines(out)
    assert [r["instruction"] for r in records] == [INSTRUCTIONS[i] for i in (0, 1, 2, 4, 7)]
    assert [r["output"] for r in records] == [f"Answer {s}: done." for s in (0, 1, 2, 4, 7)]
    if backend == "ollama":
        # The opening keeps the template's default system turn, sent raw.
        assert completions[0]["prompt"].startswith("<|im_start|>system\n")
        assert completions[0]["prompt"].endswith("<|im_start|>user\n") and completions[0]["raw"]


def test_generate_killed_with_sigkill_resumes_to_the_same_records(tmp_path):
    """The CLI in a child process; the server holds request 9 until the child is killed."""
    fresh = tmp_path / "fresh.jsonl"
    with JudgeServer(script=magpie_script(faults={})) as server:
        argv = ["data", "generate", "--llm", "ollama:llama3", "--url", server.url, "--n", "6"]
        argv += ["--pre-query", "<|im_start|>user\n", *LLM_ARGS]
        assert main([*argv, "--out", str(fresh)]) == 0
        needed = len(server.chat_requests)
    out = tmp_path / "killed.jsonl"
    hold = (9, threading.Event(), threading.Event())
    with JudgeServer(script=magpie_script(hold=hold)) as server:
        argv[argv.index("--url") + 1] = server.url
        child = subprocess.Popen(
            [sys.executable, "-m", "instructune", *argv, "--out", str(out)],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        try:
            assert hold[1].wait(60), "the child never reached request 9"
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            hold[2].set()
        partial = _lines(out)
        assert 0 < len(partial) < 6
        assert main([*argv, "--out", str(out)]) == 0
        asked_again = [r["body"] for r in server.chat_requests[10:]]
    assert _lines(out) == _lines(fresh)  # nothing lost, nothing twice, same order
    # The answers received before the kill (requests 0-8, four of them faults) came from the
    # cache: the server was asked only for the rest.
    assert len(asked_again) == needed - (9 - len(FAULTS))


def test_generate_gives_up_on_a_model_that_repeats_itself(tmp_path, capsys):
    out = tmp_path / "same.jsonl"
    same = Reply("ok", text=INSTRUCTIONS[0] + "<|im_end|>")
    with JudgeServer(script=lambda i, body: same) as server:
        argv = ["data", "generate", "--llm", "ollama:llama3", "--url", server.url, "--n", "3"]
        argv += ["--pre-query", "<|im_start|>user\n", "--max-attempts", "4", "--out", str(out)]
        assert main([*argv, *LLM_ARGS]) == 1
    captured = capsys.readouterr()
    assert "wrote 1 of 3" in captured.out and "3 duplicates" in captured.out
    assert "gave up after 4 attempts" in captured.err
    assert len(_lines(out)) == 1


# --- rewrite and prefer


def test_rewrite_fills_the_field_through_faults_and_lists_what_it_left_out(tmp_path, capsys):
    records = [dict(r) for r in DEMO[:6]]
    src = tmp_path / "src.json"
    src.write_text(json.dumps(records))
    template = tmp_path / "t.txt"
    template.write_text("Make passive: {instruction}")

    def scorer(prompt: str) -> str:
        return "" if "record 4" in prompt else "PASSIVE " + prompt.removeprefix("Make passive: ")

    records[4]["instruction"] = "record 4 gets an empty reply"
    src.write_text(json.dumps(records))
    out = tmp_path / "out.jsonl"
    with JudgeServer(scorer=scorer, script=[OK, error(503), DROP, BAD_JSON, STALL]) as server:
        argv = ["data", "rewrite", str(src), "--llm", "openai:m", "--url", server.url]
        argv += ["--prompt", str(template), "--into", "passive", "--out", str(out)]
        assert main([*argv, *LLM_ARGS, "--workers", "2"]) == 0
    assert "wrote 5 of 6 records" in capsys.readouterr().out
    written = _lines(out)
    kept = [r for i, r in enumerate(records) if i != 4]
    assert written == [{**r, "passive": "PASSIVE " + r["instruction"]} for r in kept]
    side = _lines(tmp_path / "out.skipped.jsonl")
    assert side == [{"index": 4, "reason": "the model's reply was empty"}]
    # A template field the records lack is an error naming the record and the field.
    template.write_text("{nope}")
    argv = ["data", "rewrite", str(src), "--llm", "openai:m", "--url", "http://127.0.0.1:9"]
    argv += ["--prompt", str(template), "--into", "x", "--out", str(tmp_path / "o.jsonl")]
    assert main(argv) == 1
    assert "record 0: the prompt template needs field 'nope'" in capsys.readouterr().err


def polite_scorer(prompt: str) -> str:
    return "IMPOLITE version" if "more impolite." in prompt else "POLITE version"


def test_prefer_is_the_books_recipe_and_resumes_after_sigkill(tmp_path):
    records = DEMO[:8]
    src = tmp_path / "src.json"
    src.write_text(json.dumps(records))
    out = tmp_path / "pref.jsonl"
    hold = (5, threading.Event(), threading.Event())

    def script(i: int, body: dict) -> Reply:
        if i == hold[0]:
            hold[1].set()
            hold[2].wait(60)
        return {1: error(500), 2: DROP}.get(i, OK)

    with JudgeServer(scorer=polite_scorer, script=script) as server:
        argv = ["data", "prefer", str(src), "--llm", "ollama:llama3", "--url", server.url]
        argv += ["--out", str(out), "--seed", "7", *LLM_ARGS]
        child = subprocess.Popen(
            [sys.executable, "-m", "instructune", *argv],
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        try:
            assert hold[1].wait(60)
            child.send_signal(signal.SIGKILL)
            child.wait(30)
        finally:
            hold[2].set()
        assert len(_lines(out)) < len(records)
        assert main(argv) == 0
        first_prompt = server.prompts[0]
    choices = politeness_choices(len(records), 7)
    rng = random.Random(7)  # drawn in record order, as the book's loop draws them
    assert choices == [rng.choice(["polite", "impolite"]) for _ in records]
    assert set(choices) == {"polite", "impolite"}
    assert first_prompt == preference_prompt(records[0], choices[0])
    written = _lines(out)
    assert [r["instruction"] for r in written] == [r["instruction"] for r in records]
    for rec, choice, w in zip(records, choices, written, strict=True):
        rewrite = "POLITE version" if choice == "polite" else "IMPOLITE version"
        expected = (rewrite, rec["output"]) if choice == "polite" else (rec["output"], rewrite)
        assert (w["chosen"], w["rejected"], w["politeness"]) == (*expected, choice)


def test_a_server_that_goes_away_stops_the_job_and_a_rerun_finishes_it(tmp_path, capsys):
    src = tmp_path / "src.json"
    src.write_text(json.dumps(DEMO[:5]))
    out = tmp_path / "pref.jsonl"
    argv = ["data", "prefer", str(src), "--llm", "openai:m", "--out", str(out), *LLM_ARGS]
    dying = lambda i, body: OK if i < 2 else error(503)  # noqa: E731
    with JudgeServer(scorer=polite_scorer, script=dying) as server:
        assert main([*argv, "--url", server.url]) == 1
    captured = capsys.readouterr()
    assert "wrote 2 of 5" in captured.out and "run the same command again" in captured.err
    with JudgeServer(scorer=polite_scorer) as server:
        assert main([*argv, "--url", server.url]) == 0
        assert len(server.chat_requests) == 3  # only the records not written yet
    assert "wrote 5 of 5" in capsys.readouterr().out
    assert [r["instruction"] for r in _lines(out)] == [r["instruction"] for r in DEMO[:5]]


def test_the_book_preference_prompt_is_word_for_word():
    rec = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert preference_prompt(rec, "polite") == (
        "Given the input `Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\n\n### Instruction:\nName a color.` and correct "
        "output `Blue.`, slightly rewrite the output to be more polite.Keep the modification "
        "minimal.Only return return the generated response and nothing else."
    )


# --- against `instructune serve`


@pytest.fixture(scope="module")
def chatty(tmp_path_factory):
    """``instructune serve``'s app on 127.0.0.1 serving a tiny random Llama with a ChatML
    template (tests/fixtures/tiny-tokenizer), saved as a fine-tuned model is saved."""
    import torch
    from helpers import Server

    from instructune.checkpoints import save_model
    from instructune.data.prompts import prompt_format_for
    from instructune.models import build_model, get_config
    from instructune.serving.app import create_app
    from instructune.serving.models import ModelRegistry, load_served
    from instructune.tokenization import load_tokenizer

    torch.manual_seed(0)
    tok = load_tokenizer(ROOT / "tests" / "fixtures" / "tiny-tokenizer")
    cfg = get_config(
        "smollm2-135m",
        vocab_size=tok.vocab_size,
        n_kv_heads=1,
        tie_embeddings=True,
        n_layers=2,
        emb_dim=32,
        n_heads=2,
        hidden_dim=64,
        context_length=1024,
    )
    path = save_model(
        tmp_path_factory.mktemp("chatty") / "m",
        build_model(cfg),
        tok,
        cfg,
        prompt_format_for(tok, "chat"),
    )
    with Server(create_app(ModelRegistry([load_served("chatty", str(path))]))) as server:
        yield server


def test_the_commands_against_instructune_serve(chatty, tmp_path, capsys):
    """A random model writes nonsense, but every file is valid and every count adds up."""
    llm = ["--llm", "ollama:chatty", "--url", chatty.url, "--max-tokens", "12", "--quiet"]
    out = tmp_path / "gen.jsonl"
    code = main(["data", "generate", *llm, "--n", "2", "--out", str(out), "--max-attempts", "8"])
    summary = capsys.readouterr().out
    written = _lines(out) if out.exists() else []
    assert f"wrote {len(written)} of 2" in summary and code == (0 if len(written) == 2 else 1)
    assert all(set(r) == {"instruction", "input", "output"} for r in written)
    src = tmp_path / "src.json"
    src.write_text(json.dumps(DEMO[:3]))
    for command, extra, field in (
        ("rewrite", ["--prompt", "passive-voice", "--into", "passive"], "passive"),
        ("prefer", [], "chosen"),
    ):
        out = tmp_path / f"{command}.jsonl"
        assert main(["data", command, str(src), *llm, *extra, "--out", str(out)]) == 0
        done = _lines(out)
        side = tmp_path / f"{command}.skipped.jsonl"
        left_out = _lines(side) if side.exists() else []
        assert (
            len(done) + len(left_out) == 3 and f"wrote {len(done)} of 3" in capsys.readouterr().out
        )
        assert all(isinstance(r[field], str) and r[field] for r in done)


@pytest.mark.embedded
def test_generate_with_the_embedded_model_through_serve(tmp_path, capsys):
    """SmolLM2-135M-Instruct served as `instructune serve smollm2-135m-instruct` serves it; the
    opening comes from its own chat template (rendered here: the server prompts it in its saved
    format, so /api/show has no chat template to offer) and keeps the default system turn."""
    from helpers import Server

    from instructune.serving.app import create_app
    from instructune.serving.models import ModelRegistry, load_served, parse_model_specs

    [(name, spec)] = parse_model_specs(["smollm2-135m-instruct"])
    served = load_served(name, spec, max_batch=2)
    pre_query = pre_query_from_template(served.loaded.tokenizer.chat_template)
    assert pre_query.startswith("<|im_start|>system\n") and pre_query.endswith("user\n")
    out = tmp_path / "gen.jsonl"
    with Server(create_app(ModelRegistry([served]))) as server:
        argv = ["data", "generate", "--llm", f"openai:{name}", "--url", server.url, "--n", "2"]
        argv += ["--pre-query", pre_query, "--max-tokens", "24", "--out", str(out), "--quiet"]
        assert main(argv) == 0
    assert "wrote 2 of 2" in capsys.readouterr().out
    records = _lines(out)
    assert len(records) == 2 and all(r["instruction"] and r["output"] for r in records)
    assert records[0]["instruction"] != records[1]["instruction"]
