"""The trained prompt format as the templates other engines read: Jinja and Go.

An exported model must be prompted exactly as it was fine-tuned, or it rambles and never stops.
The engines each have their own template language: llama.cpp reads a Jinja
``tokenizer.chat_template`` from the GGUF, Ollama a Go ``text/template`` TEMPLATE from the
Modelfile. Neither is written by hand here: both are derived from ``format_prompt`` itself, by
rendering records whose fields are unique marker strings and cutting the result at the markers.
What lies between the markers is the style's fixed text; :func:`check_prompt_pieces` proves
that the pieces put together give ``format_prompt`` back.

One exchange of an engine's chat is one record. The engines pass a user message, not an
instruction and an input, so :func:`chat_message` says what that message is for a record: the
instruction, followed by the input with the style's own joining text (``"\\n\\n### Input:\\n"``
for alpaca). Typing an instruction alone in Ollama therefore gives a no-input training prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from instructune.data.prompts import (
    PromptFormat,
    format_prompt,
    get_style,
    render_chat_template,
    system_message,
    user_message,
    with_system_prompt,
)
from instructune.errors import InstructuneError

# Markers that no prompt style's fixed text contains.
_INSTRUCTION = "\x00INSTRUCTION\x00"
_INPUT = "\x00INPUT\x00"
_SYSTEM = "\x00SYSTEM\x00"


@dataclass(frozen=True)
class PromptPieces:
    """A prompt format's fixed text around the user message (and the system turn).

    A prompt is ``prefix + message + suffix`` without a system turn and
    ``system_prefix + system + system_suffix + message + suffix`` with one.
    ``input_joiner`` joins a record's instruction and input into the message (single-prompt
    styles); chat templates take the message as the record's ``user_message``.
    ``system_prompt`` is the trained one (``PromptFormat.system_prompt``), which ``prefix``
    then contains.
    """

    style: str
    prefix: str
    suffix: str
    input_joiner: str | None = None
    system_prefix: str | None = None
    system_suffix: str | None = None
    system_prompt: str | None = None


def _cut(text: str, *markers: str) -> list[str]:
    """``text`` split at each marker in turn (each must occur exactly once)."""
    pieces = []
    for marker in markers:
        if text.count(marker) != 1:
            raise InstructuneError(
                f"the prompt format does not place {marker.strip(chr(0)).lower()} exactly once; "
                "no template can be generated for it"
            )
        head, text = text.split(marker)
        pieces.append(head)
    return [*pieces, text]


def prompt_pieces(fmt: PromptFormat, chat_template: str | None = None) -> PromptPieces:
    """The fixed text of ``fmt``'s prompts, found by rendering marker records."""
    style = get_style(fmt.style)
    if style.system_turn:
        if not chat_template:
            raise InstructuneError(f"prompt style {fmt.style!r} needs the tokenizer's template")
        plain = render_chat_template(
            chat_template,
            with_system_prompt([{"role": "user", "content": _INSTRUCTION}], fmt.system_prompt),
        )
        prefix, suffix = _cut(plain, _INSTRUCTION)
        with_system = render_chat_template(
            chat_template,
            [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": _INSTRUCTION}],
        )
        system_prefix, system_suffix, suffix_2 = _cut(with_system, _SYSTEM, _INSTRUCTION)
        if suffix_2 != suffix:
            raise InstructuneError(
                "the chat template ends a prompt differently with and without a system turn; "
                "no Ollama template can be generated for it"
            )
        return PromptPieces(
            fmt.style, prefix, suffix, None, system_prefix, system_suffix, fmt.system_prompt
        )
    plain = format_prompt({"instruction": _INSTRUCTION, "input": ""}, fmt.style)
    prefix, suffix = _cut(plain, _INSTRUCTION)
    both = format_prompt({"instruction": _INSTRUCTION, "input": _INPUT}, fmt.style)
    prefix_2, joiner, suffix_2 = _cut(both, _INSTRUCTION, _INPUT)
    if (prefix_2, suffix_2) != (prefix, suffix):
        raise InstructuneError(
            f"the {fmt.style} prompt changes around the instruction when there is an input; "
            "no template can be generated for it"
        )
    return PromptPieces(fmt.style, prefix, suffix, input_joiner=joiner)


def chat_message(record: Mapping[str, Any], pieces: PromptPieces) -> dict[str, str]:
    """The user message (and system turn) an engine gets for ``record``: ``{"prompt", "system"}``.

    The exported templates render these into exactly ``format_prompt(record)``.
    """
    if pieces.input_joiner is None:
        return {"prompt": user_message(record), "system": system_message(record)}
    text = str(record.get("instruction") or "")
    inp = record.get("input") or ""
    return {"prompt": text + (pieces.input_joiner + inp if inp else ""), "system": ""}


def render_pieces(pieces: PromptPieces, prompt: str, system: str = "") -> str:
    """What the generated templates render for one user message (the reference for tests)."""
    if system and pieces.system_prefix is not None:
        return pieces.system_prefix + system + pieces.system_suffix + prompt + pieces.suffix
    return pieces.prefix + prompt + pieces.suffix


def check_prompt_pieces(
    pieces: PromptPieces, records: list[Mapping[str, Any]], chat_template: str | None
) -> None:
    """Fail unless the pieces rebuild ``format_prompt`` for every record (a cheap self-check)."""
    for index, record in enumerate(records):
        message = chat_message(record, pieces)
        want = format_prompt(
            record,
            pieces.style,
            chat_template=chat_template,
            system_prompt=pieces.system_prompt,
        )
        if render_pieces(pieces, message["prompt"], message["system"]) != want:
            raise InstructuneError(
                f"record {index}: the generated template does not reproduce its prompt"
            )


# --- Jinja: tokenizer.chat_template ------------------------------------------------------------


def _jinja_literal(text: str) -> str:
    # A JSON string is a valid Jinja string literal with the same escapes (\n, \", \uXXXX).
    return "{{ " + json.dumps(text) + " }}"


def jinja_chat_template(fmt: PromptFormat, chat_template: str | None = None) -> str:
    """The GGUF's ``tokenizer.chat_template``: renders a user message as the trained prompt.

    The ``chat`` style was trained with the tokenizer's own template, which is kept as it is,
    behind a line that opens a conversation without a system turn with the trained system
    prompt, when the model has one. For single-prompt styles each user turn becomes the
    style's prompt and each assistant turn its text and the end token; system turns are left
    out, as the style leaves them out.
    """
    if get_style(fmt.style).system_turn:
        if not chat_template:
            raise InstructuneError(f"prompt style {fmt.style!r} needs the tokenizer's template")
        if fmt.system_prompt is None:
            return chat_template
        system = "[{'role': 'system', 'content': " + json.dumps(fmt.system_prompt) + "}]"
        return (
            # No whitespace control: the template's own text is kept exactly.
            "{% set messages = (" + system + " if messages | length == 0 or "
            "messages[0]['role'] != 'system' else []) + messages %}" + chat_template
        )
    pieces = prompt_pieces(fmt)
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        + _jinja_literal(pieces.prefix)
        + "{{ message['content'] }}"
        + _jinja_literal(pieces.suffix)
        + "{%- elif message['role'] == 'assistant' -%}"
        "{{ message['content'] }}{{ eos_token }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


# --- Go text/template: Ollama's TEMPLATE -------------------------------------------------------


def _go_literal(text: str) -> str:
    # Literal text is copied as it is; only an opening delimiter must be written as an action.
    return text.replace("{{", '{{ "{{" }}')


def ollama_template(pieces: PromptPieces) -> str:
    """Ollama's TEMPLATE (Go ``text/template``) for the prompt format.

    ``.System`` is used where the style has a system turn; ``.Response`` comes last, where
    Ollama cuts the template while the model answers.
    """
    if pieces.system_prefix is not None:
        head = (
            "{{ if .System }}"
            + _go_literal(pieces.system_prefix)
            + "{{ .System }}"
            + _go_literal(pieces.system_suffix or "")
            + "{{ else }}"
            + _go_literal(pieces.prefix)
            + "{{ end }}"
        )
    else:
        head = _go_literal(pieces.prefix)
    return head + "{{ .Prompt }}" + _go_literal(pieces.suffix) + "{{ .Response }}"
