"""``finetune --system-prompt``: the system turn a run trains with, saved with the model and
used wherever it is prompted (answers, generate, chat, serve), and measured by ``data inspect``.

The model is a tiny random Llama with SmolLM2's chat template, whose default system turn
("You are a helpful AI assistant named SmolLM, ...") an empty one replaces.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import ollama
import pytest
from helpers import Server, save_tiny_llama
from test_data_prompts import SMOLLM2

from instructune.checkpoints import load_model
from instructune.cli.main import main
from instructune.data.prompts import format_prompt, render_chat_template
from instructune.serving.app import create_app
from instructune.serving.models import ModelRegistry
from instructune.tokenization import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EMPTY_TURN = "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
DEFAULT_TURN = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"


@pytest.fixture(scope="module")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The fixture tokenizer with SmolLM2's template (a default system turn)."""
    out = tmp_path_factory.mktemp("tok") / "tok"
    shutil.copytree(FIXTURES / "tiny-tokenizer", out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = SMOLLM2
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    records = [
        {"instruction": f"Add one to {i}.", "input": "" if i % 3 else "Quickly.", "output": f"{i}"}
        for i in range(20)
    ]
    path = tmp_path_factory.mktemp("data") / "records.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, smollm2_tokenizer_dir, data_file) -> Path:
    """One step of chat-style training with an empty system prompt; the run directory."""
    base = save_tiny_llama(
        tmp_path_factory.mktemp("base") / "base", load_tokenizer(smollm2_tokenizer_dir)
    )
    out = tmp_path_factory.mktemp("runs") / "tuned"
    args = ["finetune", "--model", str(base), "--data", str(data_file), "--out", str(out)]
    args += ["--style", "chat", "--system-prompt", "", "--mask-instructions", "--max-steps", "1"]
    args += ["--batch-size", "4", "--threads", "1", "--quiet", "--max-new-tokens", "2"]
    assert main([*args, "--test-limit", "2", "--no-evaluate"]) == 0
    return out


def set_up_run(**settings):
    from instructune.config import resolve_config
    from instructune.pipeline import finetune

    run = finetune.start(resolve_config(flags={"quiet": True, "threads": 1, **settings}))
    finetune.set_up(run)
    return run


def test_the_run_trains_on_and_saves_its_system_prompt(tuned, data_file, tmp_path):
    assert json.loads((tuned / "instructune.json").read_text())["system_prompt"] == ""
    assert 'the one it was trained with: `""`' in (tuned / "README.md").read_text()
    # What a fresh run with the flag trains on: every sequence opens with the empty turn.
    run = set_up_run(
        model=str(tuned), data=str(data_file), out=str(tmp_path / "a"), style="chat"
    )  # ...and continuing from the tuned model keeps it without the flag.
    tok = run.loaded.tokenizer
    assert run.loaded.prompt_format.system_prompt == ""
    assert all(tok.decode(item.ids).startswith(EMPTY_TURN) for item in run.data.items)
    # None (not given) is the saved one; another text replaces it.
    run = set_up_run(
        model=str(tuned), data=str(data_file), out=str(tmp_path / "b"), system_prompt=None
    )
    assert run.loaded.prompt_format.system_prompt == ""  # none means "the saved one"
    run = set_up_run(
        model=str(tuned), data=str(data_file), out=str(tmp_path / "c"), system_prompt="Be terse."
    )
    assert tok.decode(run.data.items[0].ids).startswith("<|im_start|>system\nBe terse.<|im_end|>")


def test_answers_generate_chat_and_serve_prompt_with_it(tuned):
    from instructune.chat import ChatSession, _command
    from instructune.generation import answer_records
    from instructune.serving.models import load_served

    loaded = load_model(tuned, log=None)
    tok, template = loaded.tokenizer, loaded.tokenizer.chat_template
    record = {"instruction": "Add one to 7.", "input": "", "output": "8"}
    trained = format_prompt(record, "chat", chat_template=template, system_prompt="")
    assert trained.startswith(EMPTY_TURN)
    seen = {}
    answer_records(loaded, [record], max_new_tokens=1, progress=False, on_answered=seen.update)
    assert seen[0].prompt_tokens == len(tok.encode(trained))
    assert len(tok.encode(trained)) < len(
        tok.encode(format_prompt(record, "chat", chat_template=template))
    )

    session = ChatSession(loaded, max_new_tokens=4)
    user = [{"role": "user", "content": "Add one to 7."}]
    assert tok.decode(session.prompt_ids(user)) == trained
    assert session.trained_system == ""
    session.set_system("Be terse.")
    assert "system\nBe terse.<|im_end|>" in tok.decode(session.prompt_ids(session.messages + user))
    # /system shows and /system - clears it; the trained one then applies again.
    err = io.StringIO()
    _command(session, "/system", err)
    _command(session, "/system -", err)
    _command(session, "/system", err)
    assert err.getvalue().splitlines() == [
        "system prompt: Be terse.",
        "system prompt cleared (the trained one, '', applies again)",
        "system prompt: the trained one, ''",
    ]
    assert tok.decode(session.prompt_ids(session.messages + user)) == trained

    served = load_served("m", str(tuned))
    assert tok.decode(served.chat_ids(user)) == trained
    assert tok.decode(served.text_ids("Add one to 7.")) == trained
    assert tok.decode(served.text_ids("Hi", system="Be terse.")).startswith(
        "<|im_start|>system\nBe terse.<|im_end|>"
    )
    # Over HTTP, with Ollama's own client: /api/show gives the template it is prompted with.
    with Server(create_app(ModelRegistry([served]))) as server:
        shown = ollama.Client(host=server.url, timeout=60).show("m")
    assert shown.template.startswith("{% set messages = ([{'role': 'system', 'content': \"\"}]")
    assert render_chat_template(shown.template, user) == trained


def test_generate_prompt_uses_it(tuned, capsys, monkeypatch):
    """``generate --prompt`` on the tuned model: the empty system turn, not SmolLM2's default
    (the text it encodes is watched; everything runs for real)."""
    from instructune.generation import encode_prompt as real_encode

    seen = []

    def spy(tokenizer, text, **kwargs):
        seen.append(text)
        return real_encode(tokenizer, text, **kwargs)

    monkeypatch.setattr("instructune.generation.encode_prompt", spy)
    assert main(["generate", "--model", str(tuned), "--prompt", "Hi", "--max-new-tokens", "1"]) == 0
    assert seen and seen[0].startswith(EMPTY_TURN) and DEFAULT_TURN not in seen[0]


def test_a_style_without_a_system_turn_refuses_one(tmp_path, data_file, capsys):
    args = ["finetune", "--model", "gpt2", "--init", "random", "--data", str(data_file)]
    args += ["--out", str(tmp_path / "x"), "--style", "alpaca", "--system-prompt", "Be brief."]
    args += ["--model-overrides", "n_layers=1,emb_dim=32,n_heads=2,hidden_dim=64", "--quiet"]
    assert main(args) != 0
    assert "a system prompt needs a style with a system turn" in capsys.readouterr().err
    assert main(["data", "show", str(data_file), "0", "--system-prompt", ""]) != 0
    assert "a system prompt needs a style with a system turn" in capsys.readouterr().err


def test_data_inspect_and_show_measure_it(smollm2_tokenizer_dir, data_file, capsys):
    common = ["--style", "chat", "--tokenizer", str(smollm2_tokenizer_dir)]

    def mean_length(*extra: str) -> float:
        assert main(["data", "inspect", str(data_file), *common, *extra, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["lengths"]["mean"]

    default, empty = mean_length(), mean_length("--system-prompt", "")
    # Special tokens bound the system turn, so the saving is exactly its text's tokens.
    tok = load_tokenizer(smollm2_tokenizer_dir)
    turn = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    )
    saved = len(tok.encode(turn)) - len(tok.encode("<|im_start|>system\n"))
    assert saved > 5 and default - empty == pytest.approx(saved)
    assert (
        main(["data", "show", str(data_file), "0", *common, "--system-prompt", "", "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["prompt"].startswith(EMPTY_TURN)
