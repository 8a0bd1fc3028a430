"""Tokenise instruction records once (chapter 7.3), keeping where each response lies.

Torch-free: a list of :class:`TokenizedRecord` is what a ``DataLoader`` iterates over, and
:mod:`instructune.data.collate` turns a batch of them into tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from instructune.data.prompts import format_parts
from instructune.tokenization.base import Tokenizer, encode_prompt


@dataclass(frozen=True)
class TokenizedRecord:
    """One training sequence.

    Attributes:
        ids: ``[bos]`` (when the tokenizer adds one) + prompt ids + response ids + ``[eos]``;
            for a multi-turn conversation, prompt, response + ``[eos]`` for each answer.
        prompt_len: how many ids come before the (first) response, BOS included; masking the
            prompt ignores the targets that predict ``ids[1:prompt_len]``.
        responses: for a sequence with several answers, the ``(start, end)`` ranges of ``ids``
            holding each response and its end token; with prompt masking only the ids in these
            ranges are predicted. Empty (the usual case) means the one range
            ``(prompt_len, len(ids))``.
    """

    ids: list[int]
    prompt_len: int
    responses: tuple[tuple[int, int], ...] = ()

    def __len__(self) -> int:
        return len(self.ids)

    def response_spans(self) -> tuple[tuple[int, int], ...]:
        """The ``(start, end)`` ranges of response ids (end token included)."""
        return self.responses or ((self.prompt_len, len(self.ids)),)

    def supervised(self) -> list[bool]:
        """For each id, whether it is a response id (a target when the prompt is masked)."""
        flags = [False] * len(self.ids)
        for start, end in self.response_spans():
            flags[start:end] = [True] * (end - start)
        return flags


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> TokenizedRecord:
    """Tokenise one record: prompt and response separately, then concatenated (exercise 7.2).

    Tokenising the two parts separately fixes the boundary between them, so the prompt mask is
    exact; the response is followed by the tokenizer's end token as an id. A multi-turn record
    in the ``chat`` style is a sequence of such parts, one per assistant turn
    (``prompts.format_parts``), each part's prompt and response tokenised on their own.
    """
    if style == "chat" and chat_template is None:
        chat_template = tokenizer.chat_template
    parts = format_parts(
        record,
        style,
        chat_template=chat_template,
        end_token=tokenizer.eos_token,
        system_prompt=system_prompt,
    )
    if tokenizer.add_bos and tokenizer.bos_id is None:
        raise ValueError(f"{tokenizer.name}: add_bos is set but bos_id is None")
    ids = encode_prompt(tokenizer, parts[0][0])
    prompt_len = len(ids)
    spans = []
    for number, (prompt, response) in enumerate(parts):
        if number:
            ids += tokenizer.encode(prompt)
        start = len(ids)
        ids += tokenizer.encode(response) + [tokenizer.eos_id]
        spans.append((start, len(ids)))
    # One response keeps the plain form (no ranges): the same item as before multi-turn data.
    responses = tuple(spans) if len(spans) > 1 else ()
    return TokenizedRecord(ids=ids, prompt_len=prompt_len, responses=responses)


def tokenize_pair(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> tuple[TokenizedRecord, TokenizedRecord]:
    """A preference record (``chosen``, ``rejected``) as two sequences with the same prompt:
    each is ``tokenize_record`` of the record with that response as its ``output``."""
    chosen, rejected = (
        tokenize_record(
            {**record, "output": record[key]},
            tokenizer,
            style,
            chat_template=chat_template,
            system_prompt=system_prompt,
        )
        for key in ("chosen", "rejected")
    )
    return chosen, rejected


def tokenize_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer: Tokenizer,
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> list[TokenizedRecord]:
    """Tokenise every record once (the book's ``InstructionDataset`` does this in ``__init__``).

    For ``style="chat"`` the tokenizer's own chat template is used unless one is given, with
    ``system_prompt`` as the system turn of a record without one (None: the template's own).
    """
    return [
        tokenize_record(
            record, tokenizer, style, chat_template=chat_template, system_prompt=system_prompt
        )
        for record in records
    ]
