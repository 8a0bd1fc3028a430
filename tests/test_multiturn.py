"""Multi-turn chat records: loading and checks, the tokens and targets of every assistant turn,
`data show` / `data inspect`, and a tiny fine-tuning run on a file of conversations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import save_tiny_llama
from test_data_prompts import SMOLLM2

from instructune.cli.main import main
from instructune.data.collate import collate
from instructune.data.dataset import TokenizedRecord, tokenize_pair, tokenize_record
from instructune.data.prompts import format_example, format_parts, multi_turn_notice
from instructune.data.records import load_records
from instructune.errors import DataError
from instructune.tokenization import load_tokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"

CONVERSATION = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    "id": "c7",
}
SMOLLM2_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n"
)


@pytest.fixture(scope="module")
def tok():
    """The fixture tokenizer: ChatML template (no default system turn), ``<|im_end|>`` = 2."""
    return load_tokenizer(FIXTURES / "tiny-tokenizer")


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def conversation_record(tmp_path: Path, conversation: dict = CONVERSATION) -> dict:
    return load_records(write_jsonl(tmp_path / "chat.jsonl", [conversation]))[0]


def expected_targets(pieces: list[tuple[list[int], bool]]) -> list[int]:
    """Shifted targets of ids made of ``(ids, supervised)`` pieces, with the prompt masked."""
    ids = [i for piece, _ in pieces for i in piece]
    flags = [flag for piece, flag in pieces for _ in piece]
    return [ids[j] if flags[j] else -100 for j in range(1, len(ids))]


# --- records -----------------------------------------------------------------------------------


def test_a_conversation_loads_with_its_turns_and_the_fields_of_its_last_exchange(tmp_path):
    record = conversation_record(tmp_path)
    assert record == {
        "id": "c7",
        "instruction": "And 3+3?",
        "input": "User: 2+2?\nAssistant: 4",  # the transcript the chat and server also send
        "output": "6",
        "system": "Be brief.",
        "messages": CONVERSATION["messages"],
    }
    # Written out (data split) and read again, it is the same record.
    again = load_records([record])[0]
    assert again == record


@pytest.mark.parametrize(
    "messages, field, problem",
    [
        (["user", "assistant", "user"], "messages", "ending with an assistant turn"),
        (["user", "user", "assistant"], "messages[1].role", "must be 'assistant'"),
        (["user", "assistant", "assistant"], "messages[2].role", "must be 'user'"),
        (["system", "assistant", "user", "assistant"], "messages[1].role", "must be 'user'"),
        (["user", "assistant", "system", "assistant"], "messages[2].role", "system turn may only"),
    ],
)
def test_turns_out_of_order_name_the_turn(tmp_path, messages, field, problem):
    turns = [{"role": role, "content": f"turn {i}"} for i, role in enumerate(messages)]
    good = {"instruction": "x", "output": "y"}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, {"messages": turns}])
    with pytest.raises(DataError) as info:
        load_records(path)
    assert f"bad.jsonl: line 2: field {field!r}: " in str(info.value)
    assert problem in str(info.value)


def test_empty_and_non_string_contents_are_named(tmp_path):
    turns = [dict(t) for t in CONVERSATION["messages"]]
    turns[3]["content"] = "  "
    other = [dict(t) for t in CONVERSATION["messages"]]
    other[4]["content"] = None
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"messages": turns}, {"messages": other}]))
    with pytest.raises(DataError) as info:
        load_records(path)
    text = str(info.value)
    assert "2 invalid record(s)" in text
    assert "bad.json: record 0: field 'messages[3].content': is empty" in text
    assert "bad.json: record 1: field 'messages[4].content': must be a string" in text
    # A record saved with its conversation is checked again when it is read back.
    saved = {"instruction": "a", "output": "b", "messages": turns}
    with pytest.raises(DataError, match=r"record 0: field 'messages\[3\].content'"):
        load_records([saved])


# --- tokens and targets ---------------------------------------------------------------------


def test_every_answer_is_supervised_and_nothing_else(tmp_path, tok):
    record = conversation_record(tmp_path)
    item = tokenize_record(record, tok, "chat")
    # The template's text, cut where generation would start each answer (fixture template).
    pieces = [
        (
            tok.encode(
                "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
                "<|im_start|>assistant\n"
            ),
            False,
        ),
        (tok.encode("4") + [tok.eos_id], True),
        (tok.encode("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"), False),
        (tok.encode("6") + [tok.eos_id], True),
    ]
    ids = [i for piece, _ in pieces for i in piece]
    assert tok.eos_token == "<|im_end|>"
    assert item.ids == ids
    # The same ids as the whole conversation tokenised at once: the cuts split no token.
    whole = tok.encode(
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n6<|im_end|>"
    )
    assert item.ids == whole
    first = len(pieces[0][0])
    assert item.prompt_len == first
    second = first + len(pieces[1][0]) + len(pieces[2][0])
    assert item.responses == ((first, first + 2), (second, second + 2))

    inputs, targets = collate([item], pad_id=tok.pad_id, mask_prompt=True)
    assert inputs[0].tolist() == ids[:-1]
    assert targets[0].tolist() == expected_targets(pieces)
    # A conversation is trained on its answers only, with or without prompt masking (which
    # decides it for single exchanges): the user's turns are never targets.
    _, unmasked = collate([item], pad_id=tok.pad_id)
    assert unmasked[0].tolist() == expected_targets(pieces)
    single = tokenize_record({"instruction": "Hi", "output": "Hello."}, tok, "chat")
    _, single_targets = collate([single], pad_id=tok.pad_id)
    assert single_targets[0].tolist() == single.ids[1:]


def test_a_batch_mixes_conversations_single_turns_and_padding(tmp_path, tok):
    conversation = tokenize_record(conversation_record(tmp_path), tok, "chat")
    single = tokenize_record({"instruction": "Hi", "output": "Hello."}, tok, "chat")
    assert single.responses == ()  # one answer: the item of before multi-turn data
    assert single.ids == tok.encode(
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    ) + tok.encode("Hello.") + [tok.eos_id]
    _, targets = collate([single, conversation], pad_id=tok.pad_id, mask_prompt=True)
    width = len(conversation.ids) - 1
    want_single = [-100] * (single.prompt_len - 1) + single.ids[single.prompt_len :]
    assert targets[0].tolist() == want_single + [-100] * (width - len(want_single))
    flags = conversation.supervised()
    want = [conversation.ids[j] if flags[j] else -100 for j in range(1, len(flags))]
    assert targets[1].tolist() == want
    # Truncation keeps the mask: the second answer is cut off, the first stays.
    _, cut = collate([conversation], pad_id=tok.pad_id, mask_prompt=True, max_length=40)
    assert cut[0].tolist() == want[:40]


def test_smollm2_template_keeps_its_opening_and_default_system_turn_as_prompt(tmp_path, tok):
    record = conversation_record(tmp_path, {"messages": CONVERSATION["messages"][1:]})
    parts = format_parts(record, "chat", chat_template=SMOLLM2, end_token="<|im_end|>")
    assert parts == [
        (SMOLLM2_SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", "4"),
        ("\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n", "6"),
    ]
    # The last exchange in context: what the test split is answered with, and its reference.
    assert format_example(record, "chat", chat_template=SMOLLM2) == (
        SMOLLM2_SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n",
        "6",
    )
    item = tokenize_record(record, tok, "chat", chat_template=SMOLLM2)
    supervised = [tok.decode(item.ids[a:b]) for a, b in item.response_spans()]
    assert supervised == ["4<|im_end|>", "6<|im_end|>"]


def test_trimming_and_eos_variable_templates_and_one_that_rewrites_history(tok):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello! "},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    record = {"instruction": "Bye", "input": "", "output": "Bye.", "messages": messages}
    # Llama 3 style: contents trimmed, its own end-of-turn text.
    trims = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] | trim "
        "}}{{ '<|im_end|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    assert format_parts(record, "chat", chat_template=trims, end_token="<|im_end|>") == [
        ("<|im_start|>user\nHi<|im_end|><|im_start|>assistant\n", "Hello!"),
        ("<|im_start|>user\nBye<|im_end|><|im_start|>assistant\n", "Bye."),
    ]
    # Mistral style: the answer ends with the eos_token variable, which renders empty here;
    # the end id still follows every answer.
    eos_var = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + "
        "' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
    )
    parts = format_parts(record, "chat", chat_template=eos_var, end_token="<|im_end|>")
    assert parts == [("[INST] Hi [/INST]", " Hello! "), ("[INST] Bye [/INST]", "Bye.")]
    item = tokenize_record(record, tok, "chat", chat_template=eos_var)
    assert [tok.decode(item.ids[a:b]) for a, b in item.response_spans()] == [
        " Hello! <|im_end|>",
        "Bye.<|im_end|>",
    ]
    # A template that drops earlier answers (as reasoning templates do) cannot be cut exactly.
    last_only = (
        "{% for m in messages %}{% if m['role'] == 'user' or loop.last %}{{ m['role'] + ': ' + "
        "m['content'] + '\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
    )
    with pytest.raises(DataError, match=r"messages\[1\]: the chat template does not render"):
        tokenize_record(record, tok, "chat", chat_template=last_only)


def test_alpaca_and_phi3_train_the_last_answer_with_the_transcript_as_input(tmp_path, tok):
    record = conversation_record(tmp_path)
    for style in ("alpaca", "phi3"):
        parts = format_parts(record, style)
        assert parts == [format_example(record, style)]
        assert "User: 2+2?\nAssistant: 4" in parts[0][0] and parts[0][1] == "6"
        item = tokenize_record(record, tok, style)
        assert item.responses == () and tok.decode(item.ids[item.prompt_len :]) == "6<|im_end|>"
    records = [record, {"instruction": "a", "input": "", "output": "b"}]
    assert "1 of 2 records are conversations of several exchanges" in multi_turn_notice(
        records, "alpaca"
    )
    assert multi_turn_notice(records, "chat") is None


def test_a_preference_pair_on_a_conversation_answers_its_last_turn(tmp_path, tok):
    record = {**conversation_record(tmp_path), "chosen": "Six.", "rejected": "Seven?"}
    chosen, rejected = tokenize_pair(record, tok, "chat")
    last = [tok.decode(seq.ids[seq.response_spans()[-1][0] :]) for seq in (chosen, rejected)]
    assert last == ["Six.<|im_end|>", "Seven?<|im_end|>"]
    starts = [seq.response_spans()[-1][0] for seq in (chosen, rejected)]
    assert starts[0] == starts[1] and chosen.ids[: starts[0]] == rejected.ids[: starts[1]]
    assert chosen.responses[0] == rejected.responses[0]  # the earlier answer, the same in both


@pytest.mark.embedded
def test_the_embedded_smollm2_tokenizer_and_template(tmp_path):
    from instructune.checkpoints.gguf import GGUFFile, load_gguf_tokenizer
    from instructune.checkpoints.resolve import embedded_gguf_path
    from instructune.errors import ModelLoadError

    try:
        smol = load_gguf_tokenizer(GGUFFile(embedded_gguf_path()))
    except ModelLoadError as exc:
        pytest.skip(f"embedded model not installed: {exc}")
    record = conversation_record(tmp_path, {"messages": CONVERSATION["messages"][1:]})
    item = tokenize_record(record, smol, "chat")
    text = (
        SMOLLM2_SYSTEM + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>"
    )
    assert smol.eos_token == "<|im_end|>" and not smol.add_bos
    assert item.ids == smol.encode(text)
    assert [smol.decode(item.ids[a:b]) for a, b in item.response_spans()] == [
        "4<|im_end|>",
        "6<|im_end|>",
    ]
    _, targets = collate([item], pad_id=smol.pad_id, mask_prompt=True)
    kept = [t for t in targets[0].tolist() if t != -100]
    assert smol.decode(kept) == "4<|im_end|>6<|im_end|>"
    assert sum(item.supervised()) == len(kept)


# --- show and inspect -----------------------------------------------------------------------


def test_show_and_inspect_display_every_turn(tmp_path, capsys):
    data = write_jsonl(tmp_path / "chat.jsonl", [CONVERSATION, CONVERSATION, CONVERSATION])
    tiny = str(FIXTURES / "tiny-tokenizer")
    chat = ["--style", "chat", "--tokenizer", tiny]
    assert main(["data", "show", str(data), "1", *chat]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"=== {data}: line 2 of 3, style chat ===\n--- prompt ---\n"
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n--- response 1 of 2 (then the end token <|im_end|>) ---\n4\n"
        "--- prompt ---\n\n<|im_start|>user\nAnd 3+3?<|im_end|>\n<|im_start|>assistant\n"
        "--- response 2 of 2 (then the end token <|im_end|>) ---\n6\n--- end ---\n"
    )
    assert main(["data", "show", str(data), "0", *chat, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["response"] == "6" and shown["messages"] == CONVERSATION["messages"]
    assert [p["response"] for p in shown["parts"]] == ["4", "6"]
    assert main(["data", "show", str(data), "0"]) == 0
    out, err = capsys.readouterr()
    assert "### Input:\nUser: 2+2?\nAssistant: 4\n\n### Response:\n--- response ---\n6\n" in out
    assert "1 of 1 records are conversations of several exchanges" in err

    assert main(["data", "inspect", str(data), *chat, "--tokens", "0"]) == 0
    out = capsys.readouterr().out
    assert "conversations of several exchanges: 3 (answers trained: 6)" in out
    assert "tokens of record 0 (line 1), style chat: 56 ids, 4 supervised in 2 answer(s)" in out
    view = out[out.index("tokens of record 0") :].splitlines()[2:]
    assert [line.split()[1] for line in view] == ["prompt", "TRAIN", "prompt", "TRAIN"]
    assert view[1].endswith('"4<|im_end|>"') and view[3].endswith('"6<|im_end|>"')
    assert main(["data", "inspect", str(data), *chat, "--tokens", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    segments = report["token_view"]["segments"]
    assert [s["supervised"] for s in segments] == [False, True, False, True]
    text = "".join(s["text"] for s in segments)
    assert text.endswith("And 3+3?<|im_end|>\n<|im_start|>assistant\n6<|im_end|>")
    assert main(["data", "inspect", str(data), *chat, "--tokens", "3"]) == 1
    assert "no record 3; it has 3" in capsys.readouterr().err


# --- training -------------------------------------------------------------------------------


@pytest.fixture
def chat_model_dir(tmp_path, tok) -> Path:
    """A tiny random Llama saved with the fixture tokenizer (its ChatML template)."""
    return save_tiny_llama(tmp_path / "base", tok)


def conversations(n: int) -> list[dict]:
    lines = []
    for i in range(n):
        turns = [
            {"role": "user", "content": f"What is {i} plus one?"},
            {"role": "assistant", "content": f"{i + 1}"},
            {"role": "user", "content": "And plus two?"},
            {"role": "assistant", "content": f"{i + 2}"},
        ]
        if i % 2:
            turns += [
                {"role": "user", "content": "Thanks."},
                {"role": "assistant", "content": "You are welcome."},
            ]
        lines.append({"messages": turns})
    return lines


def test_finetune_on_a_multi_turn_chat_file(chat_model_dir, tmp_path, tok):
    from instructune.config import resolve_config
    from instructune.pipeline.data import build_loop_data, load_splits

    data = write_jsonl(tmp_path / "conversations.jsonl", conversations(20))
    out = tmp_path / "tuned"
    flags = ["--style", "chat", "--mask-instructions", "--max-steps", "2", "--batch-size", "4"]
    run = ["finetune", "--model", str(chat_model_dir), "--data", str(data), "--out", str(out)]
    quiet = ["--threads", "1", "--quiet", "--max-new-tokens", "4", "--test-limit", "1"]
    assert main([*run, *flags, *quiet, "--no-evaluate"]) == 0
    steps = [
        json.loads(line)
        for line in (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(line)["kind"] == "step"
    ]
    assert len(steps) == 2 and all(s["loss"] > 0 for s in steps)
    responses = json.loads((out / "responses.json").read_text())
    # The test split's conversation is answered at its last turn, with the turns before it.
    assert responses[0]["messages"][-1]["content"] == responses[0]["output"]
    assert isinstance(responses[0]["model_response"], str)
    assert json.loads((out / "instructune.json").read_text())["style"] == "chat"

    # What the run's batches hold: every answer of each conversation and nothing else.
    cfg = resolve_config(
        flags={"model": str(chat_model_dir), "data": str(data), "mask_instructions": True}
    )
    train, val, _ = load_splits(cfg)
    loop = build_loop_data(cfg, tok, "chat", train, val, max_length=256)
    _, targets = loop.collate(loop.items[:4])
    for row, (record, item) in enumerate(zip(train[:4], loop.items[:4], strict=True)):
        kept = [t for t in targets[row].tolist() if t != -100]
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert tok.decode(kept) == "".join(a + "<|im_end|>" for a in answers)
        assert isinstance(item, TokenizedRecord) and len(item.responses) == len(answers)
