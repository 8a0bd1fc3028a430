"""The continuous-batching engine: one thread owns the model and decodes every request (a
server's clients, or a data set's prompts) in one shared, continuously refilled batch.

A request that arrives while others are decoding joins the batch at the next step (its prompt is
prefilled then), a finished or cancelled one leaves it at once, and each keeps its own sampling
settings and seeded generator, so what a request gets does not depend on its neighbours: greedy
answers match ``generate`` run on the prompt alone (up to near-ties, which ``stats()`` counts)
and a seeded sampled request draws the same tokens as alone.

Public names: ``Engine``, ``EngineRequest``, ``EngineEvent``, ``QueueFullError``,
``EngineError``.

Usage::

    engine = Engine(loaded, max_batch=8, max_queue=64)
    engine.start()
    req = engine.submit(encode_prompt(loaded.tokenizer, prompt), max_new_tokens=128)
    for ev in req.events():          # or: async for ev in req.aevents()
        print(ev.text, end="")
    engine.close()
"""

from __future__ import annotations

import collections
import itertools
import math
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from instructune.generation.base import GenerationError
from instructune.generation.continuous import ContinuousBatch
from instructune.generation.decoding import context_length_of, model_device_dtype
from instructune.generation.requests import (
    EngineError,
    EngineEvent,
    EngineFinish,
    EngineRequest,
    QueueFullError,
)
from instructune.generation.sampling import Sampler, prompt_generators
from instructune.generation.text import fit_context

if TYPE_CHECKING:
    from instructune.checkpoints.load import LoadedModel

__all__ = ["Engine", "EngineError", "EngineEvent", "EngineRequest", "QueueFullError"]

# Greedy choices whose top-2 logits differ by less than this may flip between a request decoded
# alone and in a batch (the padded batch sums in another order); stats() counts them.
NEAR_TIE = 1e-4
# repeat_penalty looks at this many of the latest tokens (prompt included), as llama.cpp and
# Ollama do by default (repeat_last_n = 64).
REPEAT_WINDOW = 64


def _retry_after(queued: int, max_batch: int, mean_request_s: float) -> int:
    """Seconds until a place in the queue is likely free: the queue ahead drains a batch's
    worth of requests per mean request time. At least 1 (HTTP's Retry-After is whole seconds)."""
    return max(1, math.ceil(mean_request_s * queued / max(1, max_batch)))


class Engine:
    """Decodes every submitted request in one continuously refilled batch, in one thread.

    Args:
        loaded: the model and tokenizer to serve (a ``checkpoints.load.LoadedModel``).
        max_batch: the most requests decoded together; later ones wait in the queue.
        max_queue: the most requests waiting; ``submit`` raises ``QueueFullError`` past it.
    """

    def __init__(self, loaded: LoadedModel, max_batch: int = 8, max_queue: int = 64):
        if max_batch < 1:
            raise GenerationError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise GenerationError(f"max_queue must be >= 0, got {max_queue}")
        self.loaded = loaded
        self.model = loaded.model
        # The engine owns the model from now on: decoding needs eval mode (no dropout).
        self.model.eval()
        self.tokenizer = loaded.tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.device, _ = model_device_dtype(self.model)
        self.context_length = context_length_of(self.model)
        self._embedding_rows = int(self.model.output_weight.shape[0])
        self._batch = ContinuousBatch(self.model, pad_id=self.tokenizer.pad_id, max_rows=max_batch)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[EngineRequest] = collections.deque()
        self._running: list[EngineRequest] = []  # the batch's rows, in row order
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._closed = False
        self._counts = collections.Counter()
        self._busy_s = 0.0
        self._mean_request_s = 1.0

    # -- the client side ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread that owns the model and decodes (once)."""
        with self._lock:
            if self._closed or self._closing:
                raise EngineError("the engine is closed; make a new one")
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._run, name="instructune-engine", daemon=True
            )
            self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop the thread after its current step; running and queued requests finish with
        ``"cancelled"``; later ``submit`` calls raise ``EngineError``."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        with self._lock:
            if thread is None or not thread.is_alive():
                self._cancel_all()
            self._closed = True

    def __enter__(self) -> Engine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        repeat_penalty: float = 1.0,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
    ) -> EngineRequest:
        """Queue one encoded prompt; its answer comes as the returned request's events.

        Settings are those of ``generate`` (``seed``: the generator of this request alone, so
        the same seed samples the same answer under any load; ``stop_ids`` None means the
        tokenizer's end token), plus the penalties the serving APIs have: ``repeat_penalty``
        (Ollama/llama.cpp: a token among the last 64, prompt included, has a positive logit
        divided by it and a negative one multiplied) and ``frequency_penalty`` / ``presence_penalty``
        (OpenAI: subtracted per earlier occurrence / once, for tokens of the answer so far).

        Raises:
            GenerationError: a bad setting, or a prompt that with ``max_new_tokens`` does not
                fit the model's context (``ContextLengthError``); the message names it.
            QueueFullError: ``max_queue`` requests already wait.
            EngineError: the engine is closed.
        """
        if self._closing or self._closed:
            raise EngineError("the engine is closed; no new requests")
        prompt = self._check_prompt(prompt_ids, max_new_tokens)
        sampler = Sampler(temperature, top_k, top_p)
        if not (repeat_penalty > 0 and math.isfinite(repeat_penalty)):
            raise GenerationError(f"repeat_penalty must be > 0, got {repeat_penalty}")
        for name, value in (
            ("frequency_penalty", frequency_penalty),
            ("presence_penalty", presence_penalty),
        ):
            if not -2 <= value <= 2:
                raise GenerationError(f"{name} must be between -2 and 2, got {value}")
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        stops = [s for s in (stop_strings or []) if s]
        if stop_ids is None:
            end_ids = {self.tokenizer.eos_id}
        else:
            end_ids = {int(t) for t in ([stop_ids] if isinstance(stop_ids, int) else stop_ids)}
        generator = None if sampler.greedy else prompt_generators(seed, 1, self.device)[0]
        with self._lock:
            if self._closing or self._closed:
                raise EngineError("the engine is closed; no new requests")
            if len(self._queue) >= self.max_queue:
                self._counts["rejected"] += 1
                wait = _retry_after(len(self._queue), self.max_batch, self._mean_request_s)
                raise QueueFullError(
                    f"the server is busy: {len(self._queue)} requests wait (the limit is "
                    f"{self.max_queue}); retry in {wait} s",
                    wait,
                )
            request = EngineRequest(
                self.tokenizer,
                self._wake_up,
                next(self._ids),
                prompt,
                max_new_tokens=max_new_tokens,
                sampler=sampler,
                generator=generator,
                stop_ids=end_ids,
                stop_strings=stops,
                repeat_penalty=float(repeat_penalty),
                frequency_penalty=float(frequency_penalty),
                presence_penalty=float(presence_penalty),
            )
            self._queue.append(request)
            self._counts["submitted"] += 1
            self._wake.notify_all()
        return request

    def stats(self) -> dict[str, Any]:
        """Counters: ``running``, ``queued``, ``max_batch``, ``max_queue``, ``submitted``,
        ``finished`` (any reason), ``cancelled``, ``failed`` (the model raised), ``rejected``
        (queue full), ``steps`` (model steps), ``prefills``, ``joined_running`` (requests that
        joined a batch already decoding), ``tokens`` (generated), ``near_ties`` (greedy choices
        whose top-2 logits were closer than 1e-4), ``max_running`` (the largest batch so far),
        ``prefix_reused_tokens`` (prompt tokens whose keys/values were copied from an earlier
        prompt's, not run again), ``cache_relayouts`` (times the cache buffers were allocated and
        the running rows copied) and ``busy_s`` (seconds spent in steps)."""
        with self._lock:
            return {
                "running": len(self._running),
                "queued": len(self._queue),
                "max_batch": self.max_batch,
                "max_queue": self.max_queue,
                **{
                    k: self._counts[k]
                    for k in (
                        "submitted",
                        "finished",
                        "cancelled",
                        "failed",
                        "rejected",
                        "steps",
                        "prefills",
                        "joined_running",
                        "tokens",
                        "near_ties",
                        "max_running",
                    )
                },
                "prefix_reused_tokens": self._batch.reused_tokens,
                "cache_relayouts": self._batch.relayouts,
                "busy_s": round(self._busy_s, 6),
            }

    # -- checks ------------------------------------------------------------------------------

    def _check_prompt(self, prompt_ids: Sequence[int], max_new_tokens: int) -> list[int]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise GenerationError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        try:
            ids = [int(t) for t in prompt_ids]
        except (TypeError, ValueError):
            raise GenerationError("the prompt must be a list of token ids") from None
        bad = next((t for t in ids if not 0 <= t < self._embedding_rows), None)
        if bad is not None:
            raise GenerationError(
                f"token id {bad} is outside the model's vocabulary (0..{self._embedding_rows - 1})"
            )
        return fit_context(
            ids,
            index=0,
            context_length=self.context_length,
            max_new_tokens=max_new_tokens,
            context="error",
            bos_id=None,
        )

    # -- the engine thread -------------------------------------------------------------------

    def _wake_up(self) -> None:
        with self._lock:
            self._wake.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closing or self._queue or self._running):
                    self._wake.wait()
                if self._closing:
                    break
            self.step()
        with self._lock:
            self._cancel_all()

    def _cancel_all(self) -> None:
        """Finish every running and queued request with ``"cancelled"`` (the lock is held)."""
        for request in [*self._running, *self._queue]:
            request._finish("cancelled")
            self._counts["finished"] += 1
            self._counts["cancelled"] += 1
        self._queue.clear()
        if self._running:
            self._batch.remove(list(range(len(self._running))))
        self._running = []

    def step(self) -> bool:
        """One engine step: drop cancelled requests, let queued ones join (prefilled), run the
        model once for the batch, and give each row its next token. Returns whether there was
        anything to do.

        The engine thread calls this in a loop; without ``start()`` a caller may drive the
        engine itself (tests do, to decide exactly when requests join).
        """
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            raise EngineError("step() drives an engine that was not start()ed; this one runs")
        started = time.perf_counter()
        with self._lock:
            self._drop([j for j, r in enumerate(self._running) if r.cancelled], "cancelled")
            for request in [r for r in self._queue if r.cancelled]:
                self._queue.remove(request)
                request._finish("cancelled")
                self._counts["finished"] += 1
                self._counts["cancelled"] += 1
            joining: list[EngineRequest] = []
            while self._queue and len(self._running) + len(joining) < self.max_batch:
                request = self._queue.popleft()
                request.admitted_at = started
                if request.max_new_tokens == 0:
                    request._finish("length")
                    self._counts["finished"] += 1
                    continue
                joining.append(request)
            if joining and self._running:
                self._counts["joined_running"] += len(joining)
        if not joining and not self._running:
            return False
        try:
            logits, prefill_s = self._batch.step([r.prompt_ids for r in joining])
            with self._lock:
                for request in joining:
                    request.prefill_s = prefill_s
                self._running.extend(joining)
                self._counts["prefills"] += bool(joining)
                self._counts["steps"] += 1
                self._counts["max_running"] = max(self._counts["max_running"], len(self._running))
            tokens = self._choose(logits)
            self._batch.accept(torch.tensor(tokens, dtype=torch.long, device=self.device))
        except Exception as exc:  # the model failed (out of memory, ...): fail this batch only
            self._fail(list(dict.fromkeys([*self._running, *joining])), exc)
            return True
        with self._lock:
            done = [j for j, (r, t) in enumerate(zip(self._running, tokens, strict=True))
                    if r._take_token(t)]  # fmt: skip
            self._counts["tokens"] += len(tokens)
            self._drop(done, None)
            self._busy_s += time.perf_counter() - started
        return True

    def run_until_done(self) -> Iterator[EngineRequest]:
        """Drive an engine that was not ``start()``ed in the caller's thread until every
        submitted request has finished; yield each request as it finishes (any reason)."""
        with self._lock:
            waiting = [*self._running, *self._queue]
        while waiting:
            if not self.step():
                raise EngineError(f"{len(waiting)} requests neither run nor wait in the engine")
            still = []
            for request in waiting:
                if request.finish_reason is None:
                    still.append(request)
                else:
                    yield request
            waiting = still

    def _drop(self, rows: list[int], reason: EngineFinish | None) -> None:
        """Remove batch ``rows`` (lock held); finish them with ``reason`` (None: already)."""
        if not rows:
            return
        order = self._batch.remove(rows)
        for j in rows:
            request = self._running[j]
            if reason is not None:
                request._finish(reason)
            self._counts["finished"] += 1
            self._counts["cancelled"] += request.finish_reason == "cancelled"
            if request.admitted_at is not None:
                spent = time.perf_counter() - request.admitted_at
                # A running mean of request times, for Retry-After.
                self._mean_request_s += 0.1 * (spent - self._mean_request_s)
        # The batch filled the holes with its last rows: the requests follow their rows.
        self._running = [self._running[i] for i in order]

    def _fail(self, requests: list[EngineRequest], exc: Exception) -> None:
        error = EngineError(f"generation failed: {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        with self._lock:
            for request in requests:
                request.finish_reason = "cancelled"
                request._push(error)
                self._counts["finished"] += 1
                self._counts["failed"] += 1
            self._batch.reset()
            self._running = []

    # -- choosing tokens ---------------------------------------------------------------------

    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor) -> list[int]:
        """One token per running row, each with its request's own settings and generator."""
        logits = logits.float()
        vocab = self.tokenizer.vocab_size
        if vocab is not None and logits.shape[-1] > vocab:
            # Embedding rows beyond the tokenizer's vocabulary are padding; never pick them.
            logits[:, vocab:] = -math.inf
        tokens: list[int] = [0] * len(self._running)
        greedy: list[int] = []
        for j, request in enumerate(self._running):
            self._penalise(logits, j, request)
            if request.sampler.greedy:
                greedy.append(j)
            else:
                row = request.sampler.choose(logits[j : j + 1], [request.generator])
                tokens[j] = int(row.item())
        if greedy:
            if len(greedy) == len(tokens):
                rows = logits
            else:
                rows = logits[torch.tensor(greedy, dtype=torch.long, device=logits.device)]
            top2 = torch.topk(rows, 2, dim=-1).values
            with self._lock:
                self._counts["near_ties"] += int(((top2[:, 0] - top2[:, 1]) < NEAR_TIE).sum())
            # argmax (the first of equal maxima), as generate chooses, not topk's order.
            chosen = rows.argmax(dim=-1).tolist()
            for j, token in zip(greedy, chosen, strict=True):
                tokens[j] = int(token)
        return tokens

    @staticmethod
    def _penalise(logits: torch.Tensor, j: int, request: EngineRequest) -> None:
        """Apply the request's repeat / frequency / presence penalties to row ``j``."""
        if request.repeat_penalty != 1.0:
            window = (request.prompt_ids + request.new_ids)[-REPEAT_WINDOW:]
            seen = torch.tensor(sorted(set(window)), dtype=torch.long, device=logits.device)
            values = logits[j, seen]
            p = request.repeat_penalty
            logits[j, seen] = torch.where(values > 0, values / p, values * p)
        if (request.frequency_penalty or request.presence_penalty) and request.new_ids:
            ids = torch.tensor(request.new_ids, dtype=torch.long, device=logits.device)
            seen, counts = torch.unique(ids, return_counts=True)
            logits[j, seen] -= (
                request.frequency_penalty * counts.to(logits.dtype) + request.presence_penalty
            )
