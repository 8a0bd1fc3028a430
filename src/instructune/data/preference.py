"""Preference pairs for DPO, the book's recipe (chapter 7's bonus notebook
``create-preference-data-ollama.ipynb``, *Build a Large Language Model From Scratch*).

For each record a model is asked to rewrite the reference output to be slightly more "polite"
or more "impolite", chosen at random; the politer text becomes ``chosen`` and the other
``rejected``: the rewrite when the choice was "polite", the original otherwise. The prompt text
is the book's, word for word (its missing spaces and doubled "return" included, so results can
be compared with the book's); the choices come from ``random.Random(seed)``, drawn once for all
records in order, so a resumed run makes the same choices.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence

from instructune.data.prompts import format_input
from instructune.data.rewrite import JobResult, Step, run_record_job
from instructune.llm.cache import ReplyCache
from instructune.llm.client import LLMClient

PREFERENCE_VERSION = "book-preference/1"
POLITENESS = ("polite", "impolite")


def preference_prompt(record: dict, politeness: str) -> str:
    """The book's rewrite prompt (``format_input`` is the book's Alpaca-style input text)."""
    return (
        f"Given the input `{format_input(record)}` "
        f"and correct output `{record['output']}`, "
        f"slightly rewrite the output to be more {politeness}."
        "Keep the modification minimal."
        "Only return return the generated response and nothing else."
    )


def politeness_choices(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(POLITENESS) for _ in range(n)]


def preference_record(record: dict, politeness: str, reply: str) -> dict | str:
    """The record with ``chosen`` and ``rejected`` (and the choice made), or why it is left out."""
    text = reply.strip()
    if not text:
        return "the model's reply was empty"
    if text == record["output"].strip():
        return "the rewrite equals the original output (no preference to learn)"
    if politeness == "polite":
        chosen, rejected = text, record["output"]
    else:
        chosen, rejected = record["output"], text
    return {**record, "chosen": chosen, "rejected": rejected, "politeness": politeness}


def make_preferences(
    records: Sequence[dict],
    *,
    source: str,
    out: str | os.PathLike,
    client: LLMClient,
    cache: ReplyCache | None,
    seed: int = 123,
    workers: int = 1,
    quiet: bool = False,
) -> JobResult:
    """Write ``records`` with ``chosen``/``rejected`` to ``out`` (JSONL; resumable, cached)."""
    choices = politeness_choices(len(records), seed)
    return run_record_job(
        records,
        source=source,
        out=out,
        client=client,
        plan=lambda i, rec: Step(preference_prompt(rec, choices[i])),
        finish=lambda i, rec, reply: preference_record(rec, choices[i], reply),
        version=PREFERENCE_VERSION,
        cache=cache,
        workers=workers,
        quiet=quiet,
    )
