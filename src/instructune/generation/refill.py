"""Many prompts on the engine: a finished row is refilled from the queue at once, instead of the
batch waiting for its longest answer.

With a static batch (``generate``), every batch costs as many steps as its longest answer, and
the rows that finished early sit idle; answering a data set whose answers vary in length (the
book's test split), the engine keeps ``max_batch`` rows busy until the queue runs dry. The
answers are the same: the engine gives each prompt what it gets alone.

Public names: ``decode_as_completed`` (results as each prompt finishes: what a resumable
answering loop saves from) and ``generate_continuous`` (all results, in prompt order).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

from instructune.generation.base import GenerationError, GenerationResult
from instructune.generation.decoding import eval_mode
from instructune.generation.engine import Engine
from instructune.generation.text import fit_context

if TYPE_CHECKING:
    from instructune.checkpoints.load import LoadedModel
    from instructune.generation.requests import EngineRequest


def _seeds(seed: int | Sequence[int] | None, count: int) -> list[int | None]:
    if isinstance(seed, int):
        return [seed + i for i in range(count)]
    if seed is None:
        return [None] * count
    seeds = [int(s) for s in seed]
    if len(seeds) != count:
        raise GenerationError(f"seed: got {len(seeds)} seeds for {count} prompts")
    return seeds


def _result(request: EngineRequest) -> GenerationResult:
    events = list(request.events())
    return GenerationResult(
        text="".join(e.text for e in events),
        token_ids=[t for e in events for t in e.token_ids],
        finish_reason=events[-1].finish_reason,  # type: ignore[arg-type]
        prompt_tokens=len(request.prompt_ids),
    )


def decode_as_completed(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_batch: int = 16,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
    stop_ids: Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    context: Literal["crop", "error"] = "crop",
) -> Iterator[tuple[int, GenerationResult]]:
    """Decode encoded ``prompts`` with continuous refill; yield ``(index, result)`` as each one
    finishes (so not in order).

    The options are ``generate``'s (prompt i samples with seed ``seed + i``, or ``seed[i]``;
    ``context="crop"`` keeps a too-long prompt's end), and each result is what ``generate``
    returns for that prompt alone (greedy: up to near-ties); ``max_batch`` is the most prompts
    decoded together. Runs in the caller's thread; the model is back in its mode afterwards.
    """
    seeds = _seeds(seed, len(prompts))
    # The mode is recorded before the engine puts the model in eval mode, so it comes back.
    with eval_mode(loaded.model):
        engine = Engine(loaded, max_batch=max_batch, max_queue=max(1, len(prompts)))
        tokenizer = loaded.tokenizer
        requests = {}
        # Longest prompts first: prompts that join together are prefilled as one padded batch,
        # and neighbours in this order have similar lengths (little padding).
        for i in sorted(range(len(prompts)), key=lambda i: -len(prompts[i])):
            prompt = prompts[i]
            fitted = fit_context(
                [int(t) for t in prompt],
                index=i,
                context_length=engine.context_length,
                max_new_tokens=max_new_tokens,
                context=context,
                bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
            )
            request = engine.submit(
                fitted,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seeds[i],
                stop_ids=stop_ids,
                stop_strings=stop_strings,
            )
            requests[request.id] = i
        for request in engine.run_until_done():
            yield requests[request.id], _result(request)


def generate_continuous(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], **options
) -> list[GenerationResult]:
    """One ``GenerationResult`` per encoded prompt, in order: ``decode_as_completed``'s (same
    options), collected."""
    results: list[GenerationResult | None] = [None] * len(prompts)
    for i, result in decode_as_completed(loaded, prompts, **options):
        results[i] = result
    return results  # type: ignore[return-value]
