"""A conversation (a list of ``{"role", "content"}`` messages) as the prompt a model sees.

The terminal chat and the server both turn conversations into prompts here, so a model is
prompted the same way whichever way it is talked to, and in the style it was fine-tuned with:

* ``chat`` style: the model's own chat template renders the messages, system turns included.
* ``alpaca`` / ``phi3`` (models trained on single instructions): :func:`conversation_record`
  makes one instruction record of the conversation. The last user message is the instruction
  and the turns before it, written out as ``User: ...`` / ``Assistant: ...`` lines, are its
  ``input``, the context the instruction refers to. A one-message conversation gives exactly
  the record ``instructune generate --prompt`` answers. These styles have no place for a system
  turn (as in training, see ``prompts.system_turn_notice``): it is kept under ``system`` and
  left out of the prompt.

:func:`fit_history` drops the oldest turns until a conversation's prompt fits a token budget.

Torch-free: the server validates requests with these functions before any model work.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from instructune.data.prompts import (
    PromptFormat,
    format_prompt,
    render_chat_template,
    with_system_prompt,
)
from instructune.errors import DataError

ROLES = ("system", "user", "assistant")
# How earlier turns are labelled in the ``input`` of an alpaca/phi3 conversation record.
TRANSCRIPT_LABELS = {"user": "User", "assistant": "Assistant"}


def check_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` checked and copied as plain ``{"role", "content"}`` dicts.

    Raises:
        DataError: naming the message (``messages[2].role``) and what is wrong with it: not a
            list, a message that is not an object, an unknown role, a content that is not a
            string, or no user message to answer.
    """
    if not isinstance(messages, list | tuple):
        raise DataError(f"messages: must be a list of messages, got {type(messages).__name__}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"messages[{i}]: must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"messages[{i}].role: must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise DataError(
                f"messages[{i}].content: must be a string, got {type(content).__name__}"
            )
        checked.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in checked):
        raise DataError("messages: there is no user message to answer")
    return checked


def _last_user_index(messages: Sequence[Mapping[str, str]]) -> int:
    last = max(i for i, m in enumerate(messages) if m["role"] == "user")
    after = [m["role"] for m in messages[last + 1 :] if m["role"] != "system"]
    if after:
        # An answer is generated for the last user message; a trailing assistant turn would
        # have to be continued instead, which the instruction styles cannot express.
        raise DataError(
            f"messages[{len(messages) - 1}].role: the conversation must end with a user "
            f"message, got {after[-1]!r} after the last one"
        )
    return last


def conversation_record(messages: list[dict]) -> dict:
    """The instruction record a conversation is for a model trained on single instructions.

    The last user message is the ``instruction``; the user and assistant turns before it are
    the ``input``, one ``User: ...`` / ``Assistant: ...`` line each (``""`` when there are none,
    so a one-message conversation is the plain record). System turns are joined (blank line
    between) under ``system``, present only when there is one.

    Raises:
        DataError: the messages are malformed (see :func:`check_messages`) or do not end with
            a user message.
    """
    messages = check_messages(messages)
    last = _last_user_index(messages)
    earlier = [
        f"{TRANSCRIPT_LABELS[m['role']]}: {m['content']}"
        for m in messages[:last]
        if m["role"] != "system"
    ]
    record = {"instruction": messages[last]["content"], "input": "\n".join(earlier)}
    systems = [m["content"] for m in messages if m["role"] == "system" and m["content"]]
    if systems:
        record["system"] = "\n\n".join(systems)
    return record


def _style_of(prompt_format: PromptFormat | str | None) -> str:
    if prompt_format is None:
        return "alpaca"  # what generate and answer_records use for a model saved without one
    return prompt_format if isinstance(prompt_format, str) else prompt_format.style


def format_conversation(
    messages: list[dict],
    prompt_format: PromptFormat | str | None,
    chat_template: str | None,
) -> str:
    """The prompt text for a conversation, ending where the model's answer starts.

    Args:
        messages: ``{"role": "system" | "user" | "assistant", "content": str}`` dicts, ending
            with a user message (system turns may come anywhere).
        prompt_format: the model's ``PromptFormat`` (``LoadedModel.prompt_format``: its system
            prompt opens messages without a system turn), or a style name (``alpaca``,
            ``phi3``, ``chat``); None means ``alpaca``, as for ``generate``.
        chat_template: the tokenizer's chat template; needed by the ``chat`` style only.

    Raises:
        DataError: malformed messages, an unknown style, or ``chat`` without a template.
    """
    style = _style_of(prompt_format)
    if style != "chat":
        return format_prompt(conversation_record(messages), style)
    messages = check_messages(messages)
    _last_user_index(messages)
    if not chat_template:
        raise DataError(
            "prompt style 'chat' needs the tokenizer's chat template, and this tokenizer has "
            "none: use the alpaca or phi3 style"
        )
    if isinstance(prompt_format, PromptFormat):
        messages = with_system_prompt(messages, prompt_format.system_prompt)
    return render_chat_template(chat_template, messages, add_generation_prompt=True)


def fit_history(
    messages: list[dict],
    count_tokens: Callable[[list[dict]], int],
    budget: int,
) -> tuple[list[dict], int]:
    """Drop the oldest turns of ``messages`` until ``count_tokens(kept) <= budget``.

    Turns go oldest first, a user message together with the answers that follow it, so what is
    kept still starts with a user turn. System messages and the last user message (the one to
    answer) are always kept; when those alone exceed ``budget`` they are returned anyway, and the
    caller decides (the chat refuses the message as too long).

    Args:
        messages: the conversation, ending with the user message to answer.
        count_tokens: the prompt length in tokens of a list of messages, e.g.
            ``len(encode_prompt(tokenizer, format_conversation(m, fmt, template)))``.
        budget: the most prompt tokens allowed (context length minus the answer's tokens).

    Returns:
        ``(kept, dropped)``: the messages kept, in order, and how many were dropped.
    """
    kept = list(messages)
    dropped = 0
    while count_tokens(kept) > budget:
        turns = [i for i, m in enumerate(kept) if m["role"] != "system"]
        if len(turns) <= 1:
            break  # only the message to answer is left
        first = turns[0]
        # The first turn, and every answer up to the next user message (never the last one).
        end = next(
            (i for i in turns[1:] if kept[i]["role"] == "user"),
            turns[-1],
        )
        removed = [i for i in turns if first <= i < end]
        kept = [m for i, m in enumerate(kept) if i not in removed]
        dropped += len(removed)
    return kept, dropped
