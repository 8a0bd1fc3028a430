"""One request to the serving engine: its settings, decoding state and event stream.

``EngineRequest`` is what ``Engine.submit`` returns: the client reads its ``events()`` (or
``aevents()`` under asyncio) and may ``cancel()`` it; the engine thread feeds it tokens, and it
turns them into text pieces as ``stream`` does. ``EngineEvent`` is one piece.

Public names: ``EngineRequest``, ``EngineEvent``, ``EngineFinish``, ``EngineError``,
``QueueFullError`` (all re-exported by ``instructune.generation.engine``).
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

from instructune.generation.base import GenerationError
from instructune.generation.sampling import Sampler
from instructune.generation.text import held_back, make_result, stop_checker

EngineFinish = Literal["eos", "stop", "length", "cancelled"]


class EngineError(GenerationError):
    """The engine cannot take or finish a request (closed, or the model failed on a step)."""


class QueueFullError(EngineError):
    """More requests wait than ``max_queue``; ``retry_after`` is a guess in whole seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class EngineEvent:
    """A piece of one request's answer.

    Attributes:
        text: the new text since the previous event (text that may be the start of a stop
            string, or half a multi-byte character, is held back until it is known). The
            pieces of a request join to the ``text`` ``generate`` returns for it alone.
        token_ids: the new token ids since the previous event (the end token excluded): the
            fewest whose text holds the text sent so far, so an id whose text is held back
            comes with a later event. The ids of all events join to ``generate``'s
            ``token_ids``.
        finish_reason: None until the last event, then ``"eos"`` (an end token), ``"stop"``
            (a stop string, cut from the text), ``"length"`` (``max_new_tokens``) or
            ``"cancelled"`` (``cancel()`` or ``Engine.close()``).
        prompt_tokens: tokens in the prompt.
        completion_tokens: tokens the model has generated so far (an end token included: it
            took a step).
        queued_s: seconds from ``submit`` until the request joined the batch.
        prefill_s: seconds the prefill step that ran its prompt took.
        decode_s: seconds from its first new token until this event.
    """

    text: str
    token_ids: list[int]
    finish_reason: EngineFinish | None
    prompt_tokens: int
    completion_tokens: int
    queued_s: float
    prefill_s: float
    decode_s: float


class EngineRequest:
    """One submitted prompt: its settings, its decoding state and its event stream.

    Built by ``Engine.submit``. The engine thread appends to ``new_ids`` and pushes events;
    the client reads them with ``events()`` or ``aevents()`` (one reader per request).
    """

    def __init__(
        self,
        tokenizer: Any,
        wake: Callable[[], None],
        request_id: int,
        prompt_ids: list[int],
        *,
        max_new_tokens: int,
        sampler: Sampler,
        generator: torch.Generator | None,
        stop_ids: set[int],
        stop_strings: list[str],
        repeat_penalty: float,
        frequency_penalty: float,
        presence_penalty: float,
    ):
        self.id = request_id
        self.prompt_ids = prompt_ids
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.generator = generator
        self.stop_ids = stop_ids
        self.stop_strings = stop_strings
        self.repeat_penalty = repeat_penalty
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty
        self.new_ids: list[int] = []
        self.generated = 0  # steps taken: new_ids plus an end token
        self.finish_reason: EngineFinish | None = None
        self.submitted_at = time.perf_counter()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.prefill_s = 0.0
        self._tokenizer = tokenizer
        self._wake = wake  # tells the engine thread to look at this request again
        self._stop_check = stop_checker(tokenizer, stop_strings)
        self._sent_text = ""
        self._sent_ids = 0
        self._cancelled = threading.Event()
        self._cond = threading.Condition()
        self._pending: collections.deque[EngineEvent | BaseException] = collections.deque()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    # -- the client side ---------------------------------------------------------------------

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop this request: its row leaves the batch at the engine's next step, and its last
        event has ``finish_reason == "cancelled"``. Harmless once it has finished."""
        if self.finish_reason is None and not self._cancelled.is_set():
            self._cancelled.set()
            self._wake()

    def events(self) -> Iterator[EngineEvent]:
        """The request's events as they come, blocking; the last has a ``finish_reason``.

        Leaving the loop before the last event cancels the request (the client went away).
        Raises ``EngineError`` when the model failed on a step this request was in.
        """
        finished = False
        try:
            while not finished:
                with self._cond:
                    while not self._pending:
                        self._cond.wait()
                    item = self._pending.popleft()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.cancel()

    async def aevents(self) -> AsyncIterator[EngineEvent]:
        """``events()`` for asyncio: awaits each event without blocking the event loop.

        Leaving the loop early (or the task being cancelled, as when an HTTP client
        disconnects) cancels the request.
        """
        loop = asyncio.get_running_loop()
        finished = False
        try:
            while not finished:
                with self._cond:
                    item = self._pending.popleft() if self._pending else None
                    if item is None:
                        waiter = asyncio.Event()
                        self._waiters.append((loop, waiter))
                if item is None:
                    await waiter.wait()
                    continue
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self.cancel()

    # -- the engine side ---------------------------------------------------------------------

    def _push(self, item: EngineEvent | BaseException) -> None:
        with self._cond:
            self._pending.append(item)
            self._cond.notify_all()
            waiters, self._waiters = self._waiters, []
        for loop, waiter in waiters:
            try:
                loop.call_soon_threadsafe(waiter.set)
            except RuntimeError:  # that event loop has closed: nobody is listening any more
                pass

    def _event(self, text: str, ids: list[int], finish: EngineFinish | None) -> EngineEvent:
        now = time.perf_counter()
        admitted = self.admitted_at if self.admitted_at is not None else now
        return EngineEvent(
            text=text,
            token_ids=ids,
            finish_reason=finish,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=self.generated,
            queued_s=admitted - self.submitted_at,
            prefill_s=self.prefill_s,
            decode_s=now - self.first_token_at if self.first_token_at is not None else 0.0,
        )

    def _take_token(self, token: int) -> bool:
        """Add the token the engine chose; push the text it completes. True when finished."""
        tokenizer = self._tokenizer
        self.generated += 1
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            self._finish("eos")
            return True
        self.new_ids.append(token)
        if self._stop_check is not None and self._stop_check(0, self.new_ids):
            self._finish("stop")
            return True
        if len(self.new_ids) >= self.max_new_tokens:
            self._finish("length")
            return True
        # As stream() does: hold back half characters and what may start a stop string.
        text = tokenizer.decode(self.new_ids)
        safe = text[: len(text) - held_back(text, self.stop_strings)]
        if len(safe) > len(self._sent_text) and safe.startswith(self._sent_text):
            end = self._ids_holding(safe)
            ids = self.new_ids[self._sent_ids : end]
            self._push(self._event(safe[len(self._sent_text) :], ids, None))
            self._sent_text, self._sent_ids = safe, end
        return False

    def _ids_holding(self, text: str) -> int:
        """How many new ids the fewest are whose text holds ``text``: as ``make_result`` cuts
        the ids at a stop string, so the ids of all events join to ``generate``'s."""
        end = self._sent_ids
        while end < len(self.new_ids) and not self._tokenizer.decode(self.new_ids[:end]).startswith(
            text
        ):
            end += 1
        return end

    def _finish(self, reason: EngineFinish) -> None:
        """Push the last event: the rest of the text (as ``generate`` cuts it) and the totals."""
        self.finish_reason = reason
        if reason == "cancelled":
            text, ids = "", []
        else:
            result = make_result(self._tokenizer, self.new_ids, reason, self.stop_strings, 0)
            rest = result.text[len(self._sent_text) :]
            text = rest if result.text.startswith(self._sent_text) else ""
            ids = result.token_ids[self._sent_ids :]
        self._push(self._event(text, ids, reason))
