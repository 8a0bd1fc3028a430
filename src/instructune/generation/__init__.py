"""Text generation: one batched, KV-cached ``generate()``, a streaming ``stream()``, sampling.

One decoding loop serves every caller. The KV cache is an option of that loop, not a second
copy of it: ``use_cache=False`` recomputes the whole sequence for every new token, as the book's
``generate`` does, and exists as the baseline the benchmark compares against.

Batching: prompts are sorted by length, each batch is left-padded, and the model gets an
``attention_mask`` and ``position_ids`` so that every row sees exactly what it would see alone
(real tokens start at position 0, padding is never attended to). Rows stop on their own (end
token, stop string, token budget); finished rows are dropped from the batch, so a batch costs
what its still-running rows cost. Responses are cut by token ids at the prompt length, never by
slicing decoded text.

Modules, one job each (each states its public names; none imports another's private ones):

- ``base``: ``GenerationResult``, ``FinishReason``, ``GenerationError``, ``ContextLengthError``.
- ``sampling``: ``Sampler`` (greedy / temperature / top-k / top-p), ``prompt_generators``
  (one seeded generator per prompt).
- ``decoding``: ``BatchDecoder``, the batched, KV-cached decoding loop, and its model helpers.
- ``text``: fitting prompts to the context, stop strings, results.
- ``api``: ``generate()`` and ``stream()``.
- ``engine``: ``Engine``, the continuous-batching decoder: ``submit()`` encoded prompts from
  any thread, read each request's ``events()`` (or ``aevents()`` under asyncio), ``cancel()``
  when a client goes away. ``serve`` shares one between its clients.
- ``requests``: ``EngineRequest`` and ``EngineEvent`` (one request's state and answer pieces),
  the errors ``EngineError`` and ``QueueFullError``; all re-exported by ``engine``.
- ``continuous``: ``ContinuousBatch``, the KV-cached batch the engine decodes, which rows join
  (after their prefill) and leave between steps.
- ``refill``: ``generate_continuous`` and ``decode_as_completed``: many prompts on the engine,
  a finished row refilled from the queue at once instead of waiting for the batch's longest.
- ``answering``: ``answer_records()`` (the book's section 7.7, the one answering loop, on
  ``refill``), and what it answers with: ``stop_ids_for()``, ``style_and_stops()``.

Prompts are encoded by ``encode_prompt`` (defined in ``instructune.tokenization.base``, the one
encoder training uses too, and exported here because prompts for ``generate`` start there).
"""

from __future__ import annotations

from instructune.generation.answering import answer_records, stop_ids_for, style_and_stops
from instructune.generation.api import generate, stream
from instructune.generation.base import (
    ContextLengthError,
    FinishReason,
    GenerationError,
    GenerationResult,
)
from instructune.tokenization.base import encode_prompt

__all__ = [
    "ContextLengthError",
    "FinishReason",
    "GenerationError",
    "GenerationResult",
    "answer_records",
    "encode_prompt",
    "generate",
    "stop_ids_for",
    "stream",
    "style_and_stops",
]
