"""Tokenise instruction records once (chapter 7.3), keeping where each prompt ends.

Torch-free: a list of :class:`TokenizedRecord` is what a ``DataLoader`` iterates over, and
:mod:`instructune.data.collate` turns a batch of them into tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from instructune.data.prompts import format_example
from instructune.tokenization.base import Tokenizer, encode_prompt


@dataclass(frozen=True)
class TokenizedRecord:
    """One training sequence.

    Attributes:
        ids: ``[bos]`` (when the tokenizer adds one) + prompt ids + response ids + ``[eos]``.
        prompt_len: how many ids come before the response (BOS included); masking the prompt
            ignores the targets that predict ``ids[1:prompt_len]``.
    """

    ids: list[int]
    prompt_len: int

    def __len__(self) -> int:
        return len(self.ids)


def tokenize_record(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
) -> TokenizedRecord:
    """Tokenise one record: prompt and response separately, then concatenated (exercise 7.2).

    Tokenising the two parts separately fixes the boundary between them, so the prompt mask is
    exact; the response is followed by the tokenizer's end token as an id.
    """
    if style == "chat" and chat_template is None:
        chat_template = tokenizer.chat_template
    prompt, response = format_example(record, style, chat_template=chat_template)
    if tokenizer.add_bos and tokenizer.bos_id is None:
        raise ValueError(f"{tokenizer.name}: add_bos is set but bos_id is None")
    prompt_ids = encode_prompt(tokenizer, prompt)
    ids = prompt_ids + tokenizer.encode(response) + [tokenizer.eos_id]
    return TokenizedRecord(ids=ids, prompt_len=len(prompt_ids))


def tokenize_pair(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
) -> tuple[TokenizedRecord, TokenizedRecord]:
    """A preference record (``chosen``, ``rejected``) as two sequences with the same prompt:
    each is ``tokenize_record`` of the record with that response as its ``output``."""
    chosen = tokenize_record(
        {**record, "output": record["chosen"]}, tokenizer, style, chat_template=chat_template
    )
    rejected = tokenize_record(
        {**record, "output": record["rejected"]}, tokenizer, style, chat_template=chat_template
    )
    return chosen, rejected


def tokenize_records(
    records: Iterable[Mapping[str, Any]],
    tokenizer: Tokenizer,
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
) -> list[TokenizedRecord]:
    """Tokenise every record once (the book's ``InstructionDataset`` does this in ``__init__``).

    For ``style="chat"`` the tokenizer's own chat template is used unless one is given.
    """
    return [
        tokenize_record(record, tokenizer, style, chat_template=chat_template) for record in records
    ]
