"""``data generate``: a whole instruction data set from an instruction-tuned model, the Magpie
way (Xu et al. 2024, "Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs
with Nothing"; the book's chapter 7 bonus notebook does it with Llama 3 through Ollama).

Send a chat model only the opening of a user turn, its *pre-query* (for ChatML models
``<|im_start|>user\\n``), as a raw completion: having seen that opening before every user message
in training, it writes a plausible user instruction. The reply is cut to that one instruction
(at the first end-of-turn marker); a second, ordinary chat request answers it.

The pre-query comes from ``--pre-query`` or from the served model's chat template (Ollama's
``/api/show``): a Jinja template is rendered for one user message and cut in front of it; an
Ollama Go template is recognised by its ChatML or Llama 3 markers. A rendered template keeps
any default system turn it adds when no system message is given (SmolLM2 adds "You are a helpful
AI assistant named SmolLM..."): that turn precedes every conversation the model was tuned on, so
it is part of the context Magpie relies on.

Attempt ``k`` uses the seed ``seed + k`` for both requests, so a deterministic server gives a
repeatable run. Each record is checked; exact duplicates and near duplicates (the measure of
``data dedup``, its statistics fitted once at the start of the run on the records already
written and the demo's instructions) of records already written are skipped and counted. The
output is appended record by record; a run started again replays attempts 0, 1, ... through the
reply cache (records already written are recognised) and goes on until it has N.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from instructune.data.dedup import DEFAULT_THRESHOLD, NearDuplicateIndex, preprocess
from instructune.data.rewrite import JsonlLog
from instructune.errors import DataError, InstructuneError
from instructune.llm.cache import ReplyCache, cached_call, client_key
from instructune.llm.client import LLMClient, LLMError

MAGPIE_VERSION = "magpie/1"
# Where a generated instruction ends: end-of-turn and start-of-turn markers of common templates
# (ChatML, Llama 3, Phi-3, Llama 2/Mistral, Gemma), from their published chat templates.
END_MARKERS = (
    "<|im_end|>",
    "<|im_start|>",
    "<|eot_id|>",
    "<|start_header_id|>",
    "<|end|>",
    "<|assistant|>",
    "</s>",
    "[/INST]",
    "<end_of_turn>",
    "<|endoftext|>",
)
_SENTINEL = "\x00MAGPIE-USER-MESSAGE\x00"
MIN_INSTRUCTION_CHARS = 8
MAX_INSTRUCTION_CHARS = 2000


def pre_query_from_template(template: str) -> str:
    """The text in front of a user message in ``template`` (Jinja or an Ollama Go template)."""
    if "{%" in template:  # Jinja (Hugging Face); Ollama's Go templates use {{ }} only
        from instructune.data.prompts import render_chat_template

        text = render_chat_template(
            template, [{"role": "user", "content": _SENTINEL}], add_generation_prompt=False
        )
        if _SENTINEL in text:
            return text[: text.index(_SENTINEL)]
    if "<|im_start|>" in template:
        return "<|im_start|>user\n"
    if "<|start_header_id|>" in template:
        return "<|start_header_id|>user<|end_header_id|>\n\n"
    raise InstructuneError(
        "could not find the opening of a user turn in the model's chat template; "
        "give it with --pre-query (for ChatML models: '<|im_start|>user\\n')"
    )


def cut_instruction(reply: str) -> str:
    """The first user message in a raw completion: up to the first end-of-turn marker."""
    end = len(reply)
    for marker in END_MARKERS:
        at = reply.find(marker)
        if at != -1:
            end = min(end, at)
    return reply[:end].strip()


def check_instruction(text: str) -> str | None:
    """Why ``text`` is not a usable instruction, or None when it is."""
    if len(text) < MIN_INSTRUCTION_CHARS:
        return "too short"
    if len(text) > MAX_INSTRUCTION_CHARS:
        return "too long"
    if len(text.split()) < 2:
        return "a single word"
    return None


@dataclass
class GenerateStats:
    target: int
    written: int = 0
    attempts: int = 0
    resumed: int = 0  # replayed attempts whose records were already written
    duplicates: int = 0  # exact duplicates skipped
    near_duplicates: int = 0
    invalid: int = 0
    error: BaseException | None = None

    def line(self, client: LLMClient) -> str:
        s = client.stats
        return (
            f"{self.written}/{self.target} records, {s.requests} requests, {s.retries} retries, "
            f"skipped: {self.duplicates} duplicates, {self.near_duplicates} near duplicates, "
            f"{self.invalid} invalid"
        )


def _normal(text: str) -> str:
    return " ".join(preprocess(text).split())


def generate_records(
    *,
    client: LLMClient,
    n: int,
    out: str | os.PathLike,
    cache: ReplyCache | None,
    pre_query: str | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    max_tokens: int = 256,
    threshold: float = DEFAULT_THRESHOLD,
    workers: int = 1,
    max_attempts: int | None = None,
    corpus: Sequence[str] = (),
    quiet: bool = False,
) -> GenerateStats:
    """Append Magpie records to ``out`` (JSONL) until it holds ``n`` (see the module docstring).

    Gives up after ``max_attempts`` attempts (default ``10 * n + 10``): a model that keeps
    repeating itself would otherwise run forever.
    """
    if n < 1:
        raise InstructuneError(f"--n must be at least 1 (got {n})")
    if workers < 1:
        raise InstructuneError(f"--workers must be at least 1 (got {workers})")
    if pre_query is not None and not pre_query.strip():
        raise InstructuneError("--pre-query is empty: give the opening of a user turn")
    if pre_query is None:
        template = client.chat_template()
        if not template:
            raise InstructuneError(
                f"{client.describe()} does not report a chat template; give --pre-query"
            )
        pre_query = pre_query_from_template(template)
    log = JsonlLog(out)
    written = [rec.get("instruction") for rec in log.items]
    for number, text in enumerate(written, start=1):
        if not isinstance(text, str):
            raise DataError(f"{out}: line {number}: field 'instruction': expected a string")
    index = NearDuplicateIndex([*written, *corpus], threshold)
    seen = {_normal(t) for t in written}
    for text in written:
        index.add(text)
    unreplayed = set(seen)  # written records a replayed attempt may still reproduce
    stats = GenerateStats(target=n, written=len(log))
    limit = max_attempts if max_attempts is not None else 10 * n + 10
    base = {"temperature": temperature, "num_predict": max_tokens}

    def attempt(k: int) -> tuple[str, str | None, str]:
        """(instruction, reason it is unusable or None, answer) for attempt ``k``."""
        options = {**base, "seed": seed + k}
        key = client_key(client, pre_query, version=MAGPIE_VERSION + ":q", options=options)
        raw = cached_call(cache, key, lambda: client.complete(pre_query, options), attempt=k)
        instruction = cut_instruction(raw)
        reason = check_instruction(instruction)
        if reason is not None:
            return instruction, reason, ""
        a_opts = {**base, "seed": seed + k, "temperature": 0}
        key = client_key(client, instruction, version=MAGPIE_VERSION + ":a", options=a_opts)
        answer = cached_call(cache, key, lambda: client.chat(instruction, a_opts), attempt=k)
        return instruction, None if answer.strip() else "empty answer", answer.strip()

    # Attempts run ``workers`` at a time but are decided in order, so the run is repeatable.
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="magpie")
    try:
        k = 0
        while stats.written < n and k < limit:
            batch = range(k, min(k + workers, limit))
            futures = [pool.submit(attempt, j) for j in batch]
            for fut in futures:
                if stats.written >= n:
                    break  # the batch's later attempts are not needed (they are cached)
                try:
                    instruction, reason, answer = fut.result()
                except (LLMError, DataError) as exc:
                    stats.error = exc
                    break
                stats.attempts += 1
                key = _normal(instruction)
                if reason is not None:
                    stats.invalid += 1
                elif key in unreplayed:
                    unreplayed.discard(key)
                    stats.resumed += 1
                elif key in seen:
                    stats.duplicates += 1
                elif index.is_near_duplicate(instruction):
                    stats.near_duplicates += 1
                else:
                    log.append({"instruction": instruction, "input": "", "output": answer})
                    seen.add(key)
                    index.add(instruction)
                    stats.written += 1
            if stats.error is not None:
                break
            k = batch.stop
            if not quiet:
                print("\r" + stats.line(client), end="", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if not quiet:
        print(file=sys.stderr)
    return stats
