"""What every generation module shares: the result of one prompt and the errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from instructune.errors import InstructuneError

FinishReason = Literal["eos", "stop", "length"]


class GenerationError(InstructuneError, ValueError):
    """Bad generation settings or prompts; the message says which and what to do."""


class ContextLengthError(GenerationError):
    """A prompt plus ``max_new_tokens`` does not fit the model's context (``context="error"``)."""


@dataclass
class GenerationResult:
    """One prompt's answer.

    Attributes:
        text: the new text only (the prompt is cut off by token ids); a stop string that ended
            generation is cut from it, and the end token is not part of it.
        token_ids: the new token ids behind ``text`` (the end token excluded).
        finish_reason: ``"eos"`` (an end token), ``"stop"`` (a stop string) or ``"length"``
            (``max_new_tokens`` reached).
        prompt_tokens: how many tokens the model saw as the prompt (after any crop, BOS included).
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
