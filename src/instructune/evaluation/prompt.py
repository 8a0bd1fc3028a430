"""The judge's prompt and the parsing of its reply.

The prompt is the book's (Build a Large Language Model From Scratch, section 7.8, the
``generate_model_scores`` function): the record's Alpaca-style input, the reference output and
the model's response, each between backticks, followed by the request for an integer from 0 to
100. The book's options are seed 123, temperature 0 and a 2,048-token context.
"""

from __future__ import annotations

import json
import math
import re

# Bump when the prompt text, the retry text or the parsing changes, so that the cache and the
# reports keep runs with different prompts apart.
PROMPT_VERSION = "book-7.8/1"

# Book, section 7.8 (the backticks are part of the text the judge sees).
JUDGE_TEMPLATE = (
    "Given the input `{input}` and correct output `{output}`, score the model response "
    "`{response}` on a scale from 0 to 100, where 100 is the best score. "
    "Respond with the integer number only."
)

# Sent once when the first reply held no usable score.
RETRY_SUFFIX = (
    "\n\nYour previous reply did not contain a valid score. Reply with a single integer "
    "between 0 and 100 (for example: 85) and nothing else."
)

# Book's options for Ollama; OpenAI-compatible servers get seed and temperature (no num_ctx).
BOOK_OPTIONS = {"seed": 123, "temperature": 0, "num_ctx": 2048}

# JSON schema for structured replies (Ollama's ``format``, OpenAI's ``response_format``).
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer"}},
    "required": ["score"],
}

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def judge_input_text(record: dict) -> str:
    """The record as the book shows it to the judge: the Alpaca preamble, the instruction and
    the input, without the response marker (the data module's ``format_input``)."""
    from instructune.data.prompts import format_input

    return format_input(record)


def build_judge_prompt(record: dict, response: str) -> str:
    """The book's judge prompt for one record and one model response."""
    return JUDGE_TEMPLATE.format(
        input=judge_input_text(record), output=record.get("output", ""), response=response
    )


def retry_prompt(prompt: str) -> str:
    """The firmer prompt sent once after a reply without a usable score."""
    return prompt + RETRY_SUFFIX


def parse_score(reply: str) -> int | None:
    """The score in a judge's reply, or ``None`` when it holds none from 0 to 100.

    A JSON object with an integer ``score`` (structured output) is read first; otherwise the
    first number in the text counts (``85``, ``Score: 85``, ``85/100``, ``**85**``). A decimal
    such as ``85.5`` is rounded to the nearest integer. A first number outside 0-100 makes the
    reply unusable rather than letting a later number count, since the judge said something else.
    """
    text = reply.strip()
    if text.startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "score" in obj:
            value = obj["score"]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return _in_range(value)
            if isinstance(value, str):
                return parse_score(value)
            return None
    match = _NUMBER.search(text)
    return _in_range(float(match.group())) if match else None


def _in_range(value: float) -> int | None:
    if not math.isfinite(value):
        return None
    score = int(math.floor(value + 0.5))
    return score if 0 <= score <= 100 else None


def estimate_tokens(text: str) -> int:
    """A rough upper estimate of the judge's token count for ``text``, without its tokenizer.

    English prose runs at about 4 UTF-8 bytes per token in the Llama 3 and GPT-4 tokenizers and
    about 0.75 words per token; taking the larger of the two estimates errs on the side of a
    warning for code, numbers and non-English text, which tokenise less densely.
    """
    by_bytes = len(text.encode("utf-8")) / 4
    by_words = len(text.split()) / 0.75
    return math.ceil(max(by_bytes, by_words))
