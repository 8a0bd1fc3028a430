"""Prompts in, text out: fitting prompts to the context, stop strings, results.

Responses are cut by token ids at the prompt length, never by slicing decoded text. Prompts are
encoded by ``instructune.tokenization.base.encode_prompt``, the one encoder training uses too.

Public names: ``fit_context``, ``stop_checker``, ``held_back`` and ``make_result``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from instructune.generation.base import (
    ContextLengthError,
    FinishReason,
    GenerationError,
    GenerationResult,
)

_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete multi-byte character


def fit_context(
    ids: list[int],
    *,
    index: int,
    context_length: int | None,
    max_new_tokens: int,
    context: str,
    bos_id: int | None,
) -> list[int]:
    """Prompt ``index``'s ids, fitted so that they plus ``max_new_tokens`` fit
    ``context_length``: cropped from the left (keeping a leading ``bos_id``, with a warning)
    when ``context == "crop"``, refused with ``ContextLengthError`` when ``"error"``."""
    if not ids:
        raise GenerationError(f"prompt {index} is empty: the model needs at least one token")
    if context_length is None:
        return ids
    room = context_length - max_new_tokens
    if room < 1:
        raise ContextLengthError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
            f"of {context_length} tokens; lower max_new_tokens"
        )
    if len(ids) <= room:
        return ids
    if context == "error":
        raise ContextLengthError(
            f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's context length of {context_length}. Shorten the prompt, lower "
            f"max_new_tokens, or crop the prompt (context='crop')"
        )
    keep_bos = bos_id is not None and ids[0] == bos_id and room > 1
    kept = ([bos_id] if keep_bos else []) + ids[len(ids) - room + keep_bos :]
    dropped = len(ids) - len(kept)
    warnings.warn(
        f"prompt {index}: dropped its first {dropped} of {len(ids)} tokens so that it plus "
        f"max_new_tokens={max_new_tokens} fits the model's context length of {context_length}",
        stacklevel=4,
    )
    return kept


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((pos for s in stop_strings if (pos := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def make_result(
    tokenizer: Any,
    new_ids: list[int],
    finish: FinishReason,
    stop_strings: Sequence[str],
    prompt_tokens: int,
) -> GenerationResult:
    """The ``GenerationResult`` for one finished prompt: its new ids decoded, and for a stop
    string (``finish == "stop"``) the text and ids cut before it."""
    text = tokenizer.decode(new_ids)
    ids = list(new_ids)
    if finish == "stop":
        text, _ = _cut_at_stop(text, stop_strings)
        # Keep the shortest run of tokens whose text still holds the answer before the stop.
        while ids and tokenizer.decode(ids[:-1]).startswith(text):
            ids.pop()
    return GenerationResult(text, ids, finish, prompt_tokens)


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many characters at the end of ``text`` a stream must not yield yet: an incomplete
    multi-byte character (U+FFFD) or the start of what may become a stop string."""
    end = len(text)
    while end and text[end - 1] == _REPLACEMENT:
        end -= 1
    longest = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, end), longest, -1):
            if text.endswith(s[:k], 0, end):
                longest = k
                break
    return len(text) - end + longest


def stop_checker(
    tokenizer: Any, stop_strings: list[str]
) -> Callable[[int, list[int]], bool] | None:
    """A ``BatchDecoder`` ``stop_check``: True once a row's new text holds a stop string; None
    when there are no stop strings."""
    if not stop_strings:
        return None
    longest = max(len(s) for s in stop_strings)

    def check(_: int, ids: list[int]) -> bool:
        # A new stop string must end within the last token's text, so look only at the tail
        # (decoding a few tokens is cheap; decoding the whole answer every step is not).
        tail = tokenizer.decode(ids[-(longest + 8) :])
        return any(s in tail for s in stop_strings)

    return check
