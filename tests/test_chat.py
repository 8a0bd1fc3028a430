"""``instructune chat``: conversations as prompts, history trimming, and the terminal chat
driven through a real pseudo-terminal (pexpect), as a person would use it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from instructune.chat import STOPPED, ChatError, ChatSession, chat_loop
from instructune.cli.main import main
from instructune.data.conversation import conversation_record, fit_history, format_conversation
from instructune.data.prompts import (
    extract_response,
    format_prompt,
    prompt_format_for,
    render_chat_template,
)
from instructune.errors import DataError
from instructune.generation import GenerationError, encode_prompt, generate, stop_ids_for

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEMPLATE = json.loads((FIXTURES / "tiny-tokenizer" / "tokenizer_config.json").read_text())[
    "chat_template"
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]


def save_tiny(directory: Path, tokenizer, style: str, context_length: int) -> Path:
    """A tiny random GPT-2 for ``tokenizer``, saved as a fine-tuned model is (instructune.json)."""
    from instructune.checkpoints import save_model
    from instructune.models import build_model, get_config

    torch.manual_seed(0)
    cfg = get_config(
        "gpt2", n_layers=2, emb_dim=32, n_heads=2, hidden_dim=64,
        context_length=context_length, vocab_size=tokenizer.vocab_size,
    )  # fmt: skip
    save_model(directory, build_model(cfg), tokenizer, cfg, prompt_format_for(tokenizer, style))
    return directory


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """An alpaca-style tiny model whose context (4096) allows a long answer to interrupt."""
    from instructune.tokenization.gpt2 import GPT2Tokenizer

    return save_tiny(tmp_path_factory.mktemp("tiny-gpt2"), GPT2Tokenizer(), "alpaca", 4096)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory) -> Path:
    """The same kind of model with a 128-token context, which a second turn overflows."""
    from instructune.tokenization.gpt2 import GPT2Tokenizer

    return save_tiny(tmp_path_factory.mktemp("tiny-128"), GPT2Tokenizer(), "alpaca", 128)


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A chat-style tiny model: the fixture tokenizer with its ChatML template."""
    from instructune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(FIXTURES / "tiny-tokenizer")
    return save_tiny(tmp_path_factory.mktemp("tiny-chat"), tokenizer, "chat", 256)


def load(directory: Path):
    from instructune.checkpoints import load_model

    return load_model(directory, log=None)


def expected_answer(loaded, messages, max_new_tokens: int) -> str:
    """What the model answers to ``messages``, by ``generate`` on the conversation's prompt."""
    prompt = format_conversation(messages, loaded.prompt_format, loaded.tokenizer.chat_template)
    (result,) = generate(
        loaded.model, loaded.tokenizer, [prompt], max_new_tokens=max_new_tokens,
        stop_ids=stop_ids_for(loaded), stop_strings=loaded.prompt_format.stop_strings,
    )  # fmt: skip
    return result.text


# --- data.conversation ------------------------------------------------------------------------


def test_one_message_is_the_plain_instruction_record():
    messages = [{"role": "user", "content": "Name a colour."}]
    assert conversation_record(messages) == {"instruction": "Name a colour.", "input": ""}
    # So a one-message chat is prompted exactly as `generate --prompt` is.
    record = {"instruction": "Name a colour.", "input": ""}
    for style in ("alpaca", "phi3"):
        assert format_conversation(messages, style, None) == format_prompt(record, style)


def test_earlier_turns_are_the_input_and_the_system_turn_is_kept():
    assert conversation_record(CONVERSATION) == {
        "instruction": "Name a colour.",
        "input": "User: Hi\nAssistant: Hello!",
        "system": "Be brief.",
    }
    fmt = prompt_format_for(_Gpt2Like(), "alpaca")
    text = format_conversation(CONVERSATION, fmt, None)
    assert text.endswith(
        "### Instruction:\nName a colour.\n\n### Input:\nUser: Hi\nAssistant: Hello!\n\n"
        "### Response:\n"
    )
    assert "Be brief." not in text  # alpaca has no place for it, as in training
    assert format_conversation(CONVERSATION, None, None) == text  # no saved format: alpaca


def test_chat_style_renders_every_turn_with_the_template():
    text = format_conversation(CONVERSATION, "chat", TEMPLATE)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text == render_chat_template(TEMPLATE, CONVERSATION, add_generation_prompt=True)
    with pytest.raises(DataError, match="chat template"):
        format_conversation(CONVERSATION, "chat", None)


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ("hello", r"messages: must be a list"),
        ([{"role": "user", "content": "a"}, "b"], r"messages\[1\]: must be an object"),
        ([{"role": "tool", "content": "a"}], r"messages\[0\]\.role: must be one of"),
        ([{"role": "user", "content": None}], r"messages\[0\]\.content: must be a string"),
        ([{"role": "system", "content": "a"}], r"no user message"),
        (CONVERSATION[:3], r"messages\[2\]\.role: the conversation must end with a user"),
    ],
)
def test_malformed_conversations_name_the_message_and_field(messages, error):
    with pytest.raises(DataError, match=error):
        conversation_record(messages)
    with pytest.raises(DataError, match=error):
        format_conversation(messages, "chat", TEMPLATE)


def test_fit_history_drops_whole_oldest_exchanges_first():
    def count(messages):  # one "token" a character, to make the budget easy to reason about
        return sum(len(m["content"]) for m in messages)

    turns = [
        {"role": "system", "content": "S" * 5},
        {"role": "user", "content": "u1" * 5},
        {"role": "assistant", "content": "a1" * 5},
        {"role": "user", "content": "u2" * 5},
        {"role": "assistant", "content": "a2" * 5},
        {"role": "user", "content": "u3" * 5},
    ]
    assert fit_history(turns, count, 55) == (turns, 0)
    kept, dropped = fit_history(turns, count, 54)
    assert (kept, dropped) == ([turns[0], *turns[3:]], 2)  # u1 with its answer, never half
    kept, dropped = fit_history(turns, count, 30)
    assert (kept, dropped) == ([turns[0], turns[5]], 4)
    # Too long even alone: the system turn and the message to answer are still returned.
    assert fit_history(turns, count, 3) == ([turns[0], turns[5]], 4)


class _Gpt2Like:
    """Just enough of a tokenizer for ``prompt_format_for``."""

    eos_token, eos_id, add_bos, bos_id, chat_template = "<|endoftext|>", 50256, False, None, None


# --- ChatSession --------------------------------------------------------------------------------


def test_prompt_flag_answers_once_like_generate(gpt2_dir, capsys):
    common = ["--model", str(gpt2_dir), "--prompt", "Name a colour.", "--max-new-tokens", "12",
              "--device", "cpu"]  # fmt: skip
    assert main(["generate", *common]) == 0
    want = capsys.readouterr().out
    assert main(["chat", *common]) == 0
    assert capsys.readouterr().out == want
    assert want.strip()


def test_history_is_prompted_and_trimmed_with_a_notice(small_dir):
    loaded = load(small_dir)
    notices: list[str] = []
    # 128 tokens of context, 48 of them for the answer: a second turn with the first in its
    # input no longer fits, so the first exchange goes.
    session = ChatSession(loaded, max_new_tokens=48, notify=notices.append)
    first = "".join(session.reply("Hi"))
    assert first == expected_answer(loaded, [{"role": "user", "content": "Hi"}], 48)
    assert session.turns == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": extract_response(first, "alpaca")},
    ]
    assert not notices
    second = "".join(session.reply("Name a colour."))
    assert notices == [
        "note: dropped the 2 oldest messages of the conversation to fit the model's context "
        "of 128 tokens"
    ]
    alone = [{"role": "user", "content": "Name a colour."}]
    assert second == expected_answer(loaded, alone, 48)
    assert [m["content"] for m in session.turns] == ["Name a colour.", second.strip()]
    # A message that cannot fit even alone is refused, and the conversation is unchanged.
    before = list(session.turns)
    with pytest.raises(ChatError, match="too long"):
        session.reply("word " * 200)
    assert session.turns == before
    session.reset()
    assert session.turns == [] and session.messages == []


def test_a_stopped_answer_keeps_what_was_said(gpt2_dir):
    loaded = load(gpt2_dir)
    session = ChatSession(loaded, max_new_tokens=4000)
    pieces = session.reply("Hello")
    said = "".join(next(pieces) for _ in range(3))
    pieces.close()
    assert session.turns == [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": extract_response(said, "alpaca")},
    ]
    with pytest.raises(ChatError, match="no room"):
        ChatSession(loaded, max_new_tokens=4096)
    with pytest.raises(GenerationError, match="temperature"):
        ChatSession(loaded, max_new_tokens=8, temperature=-1)


def test_chat_style_session_sends_the_system_prompt_through_the_template(chat_dir):
    loaded = load(chat_dir)
    notices: list[str] = []
    session = ChatSession(loaded, system="Be brief.", max_new_tokens=6, notify=notices.append)
    assert session.style == "chat" and not notices  # the chat style shows the system prompt
    answer = "".join(session.reply("Hi"))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert answer == expected_answer(loaded, messages, 6)
    # The next prompt holds the system prompt and the whole exchange, as the template renders.
    nxt = [*session.messages, {"role": "user", "content": "More?"}]
    text = render_chat_template(TEMPLATE, nxt, add_generation_prompt=True)
    assert session.prompt_ids(nxt) == encode_prompt(loaded.tokenizer, text)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi")
    # An alpaca model cannot show one, and says so.
    alpaca = ChatSession(loaded, style="alpaca", max_new_tokens=6, notify=notices.append)
    alpaca.set_system("Be brief.")
    assert notices and "alpaca style has no place for a system prompt" in notices[0]


def test_chat_loop_reports_a_message_it_cannot_take_and_goes_on(small_dir):
    import io

    session = ChatSession(load(small_dir), max_new_tokens=8)
    lines = iter(["word " * 200, "   ", "/help", "/system -", "Hi", "/exit", "never read"])
    out, err = io.StringIO(), io.StringIO()
    assert chat_loop(session, read_line=lambda prompt: next(lines), out=out, err=err) == 0
    assert next(lines) == "never read"  # /exit ended it
    assert "error: the message is too long" in err.getvalue()
    assert "/reset " in err.getvalue() and "system prompt cleared" in err.getvalue()
    hi = expected_answer(session.loaded, [{"role": "user", "content": "Hi"}], 8)
    assert out.getvalue() == hi + "\n"
    assert [m["content"] for m in session.turns] == ["Hi", hi.strip()]


# --- the terminal, through a pseudo-terminal --------------------------------------------------


def spawn_chat(model_dir: Path, *args: str):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="dumb", PYTHONIOENCODING="utf-8")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "instructune", "chat", "--model", str(model_dir), "--device", "cpu", *args],
        env=env,
        encoding="utf-8",
        timeout=60,
    )
    child.expect_exact("chatting with")
    child.expect_exact(">>> ")
    return child


def on_tty(text: str) -> str:
    return text.replace("\n", "\r\n")  # the terminal's output processing (onlcr)


def test_terminal_chat_streams_answers_and_runs_commands(gpt2_dir):
    pexpect = pytest.importorskip("pexpect")
    loaded = load(gpt2_dir)
    child = spawn_chat(gpt2_dir, "--max-new-tokens", "12")
    try:
        first = expected_answer(loaded, [{"role": "user", "content": "Name a colour."}], 12)
        child.sendline("Name a colour.")
        child.expect_exact(on_tty(first) + "\r\n>>> ")
        # The second answer is prompted with the first exchange as its context.
        history = [
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": first.strip()},
            {"role": "user", "content": "Another one?"},
        ]
        second = expected_answer(loaded, history, 12)
        assert second != expected_answer(loaded, history[2:], 12)  # the history matters
        child.sendline("Another one?")
        child.expect_exact(on_tty(second) + "\r\n>>> ")
        child.sendline("/system Be brief.")
        child.expect_exact("no place for a system prompt")
        child.expect_exact("system prompt set")
        child.sendline("/system")
        child.expect_exact("system prompt: Be brief.")
        child.sendline("/reset")
        child.expect_exact("conversation reset")
        child.sendline("/nope")
        child.expect_exact("unknown command /nope")
        child.sendline("Name a colour.")  # a fresh conversation: the first answer again
        child.expect_exact(on_tty(first) + "\r\n>>> ")
        child.sendintr()  # Ctrl-C at the prompt ends the chat (/exit: see the loop's test)
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_chat(gpt2_dir):
    pexpect = pytest.importorskip("pexpect")
    loaded = load(gpt2_dir)
    # 4000 new tokens take this model several seconds: the answer is still streaming when
    # Ctrl-C arrives, which is sent only once its first words have been seen.
    start = expected_answer(loaded, [{"role": "user", "content": "Hello"}], 6)
    child = spawn_chat(gpt2_dir, "--max-new-tokens", "4000")
    try:
        child.sendline("Hello")
        child.expect_exact(on_tty(start))
        child.sendintr()
        child.expect_exact(f"{STOPPED}\r\n>>> ")
        assert child.isalive()
        child.sendline("/system")  # the chat still answers commands
        child.expect_exact("system prompt: (none)")
        child.expect_exact(">>> ")
        child.sendeof()  # Ctrl-D at the prompt ends the chat
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


@pytest.mark.embedded
def test_embedded_chat_model_is_prompted_as_in_training():
    from instructune.checkpoints import load_model
    from instructune.checkpoints.resolve import embedded_gguf_path
    from instructune.errors import ModelLoadError

    try:
        embedded_gguf_path()
    except ModelLoadError as exc:
        pytest.skip(str(exc))
    loaded = load_model("smollm2-135m-instruct", log=None)
    session = ChatSession(loaded, style="chat", system="Answer with a number.", max_new_tokens=8)
    answer = "".join(session.reply("What is 9 times 7?"))
    # The same prompt a fine-tuning record with this system turn is trained on.
    record = {"instruction": "What is 9 times 7?", "input": "", "system": "Answer with a number."}
    prompt = format_prompt(record, "chat", chat_template=loaded.tokenizer.chat_template)
    (want,) = generate(loaded.model, loaded.tokenizer, [prompt], max_new_tokens=8,
                       stop_ids=stop_ids_for(loaded))  # fmt: skip
    assert answer == want.text and answer.strip()
