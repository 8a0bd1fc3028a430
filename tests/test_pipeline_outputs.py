"""The pipeline's answers: the test split (resumable, finish reasons kept) and the epoch sample.

Both run ``generation.answer_records``. The model is a tiny random GPT-2 saved without a prompt
format, as a base model being fine-tuned is: stop strings come from the style, the end token
from the tokenizer.
"""

from __future__ import annotations

import json

import pytest
import torch

import instructune.generation.answering as answering
from instructune.data.prompts import extract_response, format_prompt, prompt_format_for
from instructune.generation import encode_prompt, generate
from instructune.generation.refill import decode_as_completed
from instructune.pipeline.outputs import answer_test_split, answering_state_path, sample_answer

RECORDS = [
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Rewrite politely.", "input": "Give me the salt.", "output": "May I..."},
    {"instruction": "What is 2 + 2?", "input": "", "output": "4"},
    {"instruction": "Translate to French.", "input": "Good night, sleep well.", "output": "..."},
    {"instruction": "Give an antonym.", "input": "cold", "output": "hot"},
    {"instruction": "Summarise.", "input": "A long day of meetings ended late.", "output": "..."},
]
OPTIONS = dict(style="alpaca", max_new_tokens=6, batch_size=2, quiet=True)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny GPT-2 saved with no prompt format (a base model)."""
    from instructune.checkpoints import save_model
    from instructune.models import build_model, get_config
    from instructune.tokenization.gpt2 import GPT2Tokenizer

    torch.manual_seed(0)
    cfg = get_config("gpt2", n_layers=2, emb_dim=64, n_heads=4, context_length=256)
    directory = tmp_path_factory.mktemp("tiny-base")
    save_model(directory, build_model(cfg), GPT2Tokenizer(), cfg)
    return directory


@pytest.fixture
def loaded(base_dir):
    """The base model loaded afresh (a test may change its weights)."""
    from instructune.checkpoints import load_model

    model = load_model(base_dir)
    assert model.prompt_format is None
    return model


class CountPrompts:
    """Wraps the real ``decode_as_completed`` in ``answer_records``, counting the prompts it is
    given; with ``kill_at`` it raises KeyboardInterrupt when that answer comes (a kill between
    two saves: with ``batch_size=2``, the 4th answer comes after the first two were saved and
    before the 3rd and 4th are)."""

    def __init__(self, kill_at: int | None = None):
        self.prompts = 0
        self.calls = 0
        self.kill_at = kill_at

    def __call__(self, loaded, prompts, **kwargs):
        self.calls += 1
        self.prompts += len(prompts)
        return self._answers(loaded, prompts, **kwargs)

    def _answers(self, loaded, prompts, **kwargs):
        for n, item in enumerate(decode_as_completed(loaded, prompts, **kwargs), 1):
            if n == self.kill_at:
                raise KeyboardInterrupt
            yield item


def the_old_loop(loaded, records, max_new_tokens):
    """What the pipeline answered before it used answer_records (and must still answer)."""
    tok = loaded.tokenizer
    prompts = [encode_prompt(tok, format_prompt(r, "alpaca")) for r in records]
    results = generate(
        loaded.model, tok, prompts, max_new_tokens=max_new_tokens, stop_ids=[tok.eos_id],
        stop_strings=prompt_format_for(tok, "alpaca").stop_strings,
    )  # fmt: skip
    return [extract_response(r.text, "alpaca") for r in results]


def test_an_interrupted_test_split_resumes_only_the_missing_records(loaded, tmp_path, monkeypatch):
    first = tmp_path / "a.json"
    whole, whole_finish = answer_test_split(loaded, RECORDS, out_path=first, **OPTIONS)
    assert [r["model_response"] for r in whole] == the_old_loop(loaded, RECORDS, 6)
    assert sum(whole_finish.values()) == len(RECORDS) and "unknown" not in whole_finish
    text = first.read_text(encoding="utf-8")
    assert json.loads(text) == whole and text.startswith("[\n    {")  # the book's indent=4
    assert [{k: v for k, v in r.items() if k != "model_response"} for r in whole] == RECORDS

    out = tmp_path / "b.json"
    killed = CountPrompts(kill_at=4)
    monkeypatch.setattr(answering, "decode_as_completed", killed)
    with pytest.raises(KeyboardInterrupt):
        answer_test_split(loaded, RECORDS, out_path=out, **OPTIONS)
    partial = json.loads(out.read_text(encoding="utf-8"))
    assert sum("model_response" in r for r in partial) == 2  # the first batch only

    resumed_run = CountPrompts()
    monkeypatch.setattr(answering, "decode_as_completed", resumed_run)
    resumed, finish = answer_test_split(loaded, RECORDS, out_path=out, **OPTIONS)
    assert resumed_run.prompts == len(RECORDS) - 2
    assert resumed == whole and finish == whole_finish
    assert out.read_bytes() == first.read_bytes()

    # Nothing left to answer: no generation at all, and the finish reasons are still known.
    again_run = CountPrompts()
    monkeypatch.setattr(answering, "decode_as_completed", again_run)
    again, again_finish = answer_test_split(loaded, RECORDS, out_path=out, **OPTIONS)
    assert again_run.calls == 0 and again == whole and again_finish == whole_finish


def test_answers_of_other_weights_or_records_are_not_kept(loaded, tmp_path, monkeypatch):
    out = tmp_path / "responses.json"
    answer_test_split(loaded, RECORDS, out_path=out, **OPTIONS)
    assert answering_state_path(out) == tmp_path / "responses.state.json"
    assert answering_state_path(out).is_file()

    # Another --test-limit: other records, so every answer is made again (no DataError).
    fewer = CountPrompts()
    monkeypatch.setattr(answering, "decode_as_completed", fewer)
    answered, _ = answer_test_split(loaded, RECORDS, out_path=out, limit=4, **OPTIONS)
    assert fewer.prompts == 4 and len(answered) == 4

    # The model trained further (a finished run extended): its old answers are not its own.
    with torch.no_grad():
        loaded.model.blocks[0].attn.proj.weight.add_(0.01)
    trained = CountPrompts()
    monkeypatch.setattr(answering, "decode_as_completed", trained)
    answered, _ = answer_test_split(loaded, RECORDS, out_path=out, limit=4, **OPTIONS)
    assert trained.prompts == 4
    assert [r["model_response"] for r in answered] == the_old_loop(loaded, RECORDS[:4], 6)


def test_finish_reasons_of_kept_answers_come_from_the_side_file(loaded, tmp_path):
    out = tmp_path / "responses.json"
    _, finish = answer_test_split(loaded, RECORDS, out_path=out, **OPTIONS)
    state_path = answering_state_path(out)
    state = json.loads(state_path.read_text(encoding="utf-8"))
    assert sorted(state["finish_reasons"], key=int) == [str(i) for i in range(len(RECORDS))]
    # Change one kept answer's saved reason: the count must read it, not recompute it.
    old = state["finish_reasons"]["3"][0]
    new = "eos" if old != "eos" else "length"
    state["finish_reasons"]["3"][0] = new
    state_path.write_text(json.dumps(state), encoding="utf-8")
    _, again = answer_test_split(loaded, RECORDS, out_path=out, **OPTIONS)
    assert again[new] == finish.get(new, 0) + 1 and again.get(old, 0) == finish[old] - 1
    # A saved reason for an answer that is no longer the one in responses.json is not used.
    answers = json.loads(out.read_text(encoding="utf-8"))
    answers[0]["model_response"] += " (edited)"
    out.write_text(json.dumps(answers), encoding="utf-8")
    _, edited = answer_test_split(loaded, RECORDS, out_path=out, **OPTIONS)
    assert edited["unknown"] == 1 and sum(edited.values()) == len(RECORDS)


def test_sample_answer_is_the_old_epoch_sample(loaded):
    record = RECORDS[1]
    got = sample_answer(loaded, record, style="alpaca", max_new_tokens=8)
    assert got == the_old_loop(loaded, [record], 8)[0]
    assert "model_response" not in record
