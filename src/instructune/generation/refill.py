"""``generate_continuous``: ``generate`` for many prompts on the serving engine, which refills a
finished row from the queue at once instead of waiting for the batch's longest answer.

With a static batch (``generate``), every batch costs as many steps as its longest answer, and
the rows that finished early sit idle; answering a data set whose answers vary in length (the
book's test split), the engine keeps ``max_batch`` rows busy until the queue runs dry. The
answers are the same: the engine gives each prompt what it gets alone.

Public name: ``generate_continuous``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from instructune.generation.base import GenerationError, GenerationResult
from instructune.generation.text import fit_context
from instructune.serving.engine import Engine

if TYPE_CHECKING:
    from instructune.checkpoints.load import LoadedModel


def generate_continuous(
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
) -> list[GenerationResult]:
    """One ``GenerationResult`` per encoded prompt, in order, decoded with continuous refill.

    The options are ``generate``'s (prompt i samples with seed ``seed + i``, or ``seed[i]``),
    and the results are what ``generate`` returns for each prompt (greedy: up to near-ties);
    ``max_batch`` is the most prompts decoded together. Runs in the caller's thread.
    """
    if isinstance(seed, int):
        seeds: list[int | None] = [seed + i for i in range(len(prompts))]
    elif seed is None:
        seeds = [None] * len(prompts)
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != len(prompts):
            raise GenerationError(f"seed: got {len(seeds)} seeds for {len(prompts)} prompts")
    engine = Engine(loaded, max_batch=max_batch, max_queue=max(1, len(prompts)))
    tokenizer = loaded.tokenizer
    requests = []
    for i, prompt in enumerate(prompts):
        fitted = fit_context(
            [int(t) for t in prompt],
            index=i,
            context_length=engine.context_length,
            max_new_tokens=max_new_tokens,
            context=context,
            bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
        )
        requests.append(
            engine.submit(
                fitted,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seeds[i],
                stop_ids=stop_ids,
                stop_strings=stop_strings,
            )
        )
    while engine.step():
        pass
    results = []
    for request in requests:
        events = list(request.events())
        results.append(
            GenerationResult(
                text="".join(e.text for e in events),
                token_ids=[t for e in events for t in e.token_ids],
                finish_reason=events[-1].finish_reason,  # type: ignore[arg-type]
                prompt_tokens=len(request.prompt_ids),
            )
        )
    return results
