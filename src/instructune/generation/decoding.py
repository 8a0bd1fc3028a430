"""The decoding loop: ``BatchDecoder`` runs one batch of prompts a token at a time.

It prefills the (left-padded) batch, running a prefix all prompts share once, feeds each
chosen token back through the KV cache (or, with ``use_cache=False``, reruns the whole
sequence), stops rows on an end token, a stop string or the token budget, and drops finished
rows from the batch. The model helpers it needs live here too.

Public names: ``BatchDecoder``, and the model helpers ``model_device_dtype``,
``context_length_of`` and ``eval_mode``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from instructune.generation.base import FinishReason
from instructune.generation.sampling import Sampler
from instructune.models.layers import linear

# A prefix all prompts of a batch share is run once when it is at least this long (below
# that, copying its keys/values to every row costs about what it saves).
_MIN_SHARED_PREFIX = 4


# --------------------------------------------------------------------------------------------
# Model helpers


def model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of the model's first floating-point parameter (CPU, fp32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def context_length_of(model: torch.nn.Module) -> int | None:
    """The model's context length from its ``cfg`` or ``config``; None when it names none."""
    for attr in ("cfg", "config"):
        length = getattr(getattr(model, attr, None), "context_length", None)
        if length:
            return int(length)
    return None


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() for generation, then back to whatever mode the caller had (e.g. mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def left_padded(
    rests: list[list[int]], shared: int, pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of prompt parts that follow a ``shared`` prefix already in the cache, left-padded.

    Returns ``ids`` (n, width) on ``device``, the attention ``mask`` (n, shared + width) over the
    prefix and the parts, and the ``positions`` (n, shared + width) of every column: real tokens
    count from 0 as they would alone; padding takes a neighbour's (never attended to).
    """
    n, width = len(rests), max(len(r) for r in rests)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, shared + width), dtype=torch.bool)
    mask[:, :shared] = True
    for i, rest in enumerate(rests):
        ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
        mask[i, shared + width - len(rest) :] = True
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)
    return ids, mask, positions


def _last_logits(model: torch.nn.Module, **kwargs: Any) -> torch.Tensor:
    """Logits of the last position only, (b, V).

    The head runs on one position per row instead of the whole prompt: for a 49k vocabulary
    that is a noticeable share of a long prompt's prefill.
    """
    hidden = model.forward_hidden(**kwargs)[:, -1]
    return linear(hidden, model.output_weight)


def _keep_cache_rows(cache: Any, rows: torch.Tensor) -> bool:
    """Restrict the cache to batch ``rows`` in place; False when the cache cannot do that."""
    reorder = getattr(cache, "reorder", None)
    if not callable(reorder):
        return False
    reorder(rows)
    return True


# --------------------------------------------------------------------------------------------
# The decoding loop


class BatchDecoder:
    """Decodes one batch of prompts, one token per ``step()``, for every row still running.

    Call ``step()`` until ``done``; then ``new_ids[i]`` holds prompt i's new tokens (the end
    token excluded) and ``finish[i]`` why it stopped (None until it has). Per-prompt state is
    kept in plain lists indexed by the prompt's position in the batch; ``rows`` maps the tensor
    rows still in the batch to those positions.

    Args:
        model: a model with ``forward``, ``forward_hidden``, ``output_weight``, ``new_cache``.
        prompts: the encoded prompts (already fitted to the context).
        max_new_tokens: the token budget per prompt.
        sampler: how each token is chosen.
        generators: one per prompt when sampling, else empty.
        stop_ids: end token ids.
        pad_id: the id put in padded positions (never attended to).
        vocab_limit: ids at or above it are never chosen (embedding rows past the tokenizer's).
        use_cache: False reruns the whole sequence for every token.
        stop_check: ``(prompt index, its new ids) -> bool``, True when a stop string appeared.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampler: Sampler,
        generators: list[torch.Generator],
        stop_ids: set[int],
        pad_id: int,
        vocab_limit: int | None,
        use_cache: bool,
        stop_check: Callable[[int, list[int]], bool] | None = None,
    ):
        self.model = model
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.sampler = sampler
        self.generators = generators
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.vocab_limit = vocab_limit
        self.use_cache = use_cache
        self.stop_check = stop_check
        self.new_ids: list[list[int]] = [[] for _ in prompts]
        self.finish: list[FinishReason | None] = [None] * len(prompts)
        self.rows: list[int] = list(range(len(prompts)))
        self.steps = 0
        self.device, self.dtype = model_device_dtype(model)
        if max_new_tokens <= 0:
            self.rows = []
            for i in range(len(prompts)):
                self.finish[i] = "length"

    @property
    def done(self) -> bool:
        """Whether every prompt has finished."""
        return not self.rows

    # -- the model side ----------------------------------------------------------------------

    def _shared_prefix(self) -> int:
        """How many leading tokens every prompt shares (the Alpaca preamble, a system prompt),
        kept below the shortest prompt's length so that every row has a token left to run."""
        if len(self.prompts) < 2:
            return 0
        first, limit = self.prompts[0], min(len(p) for p in self.prompts) - 1
        shared = 0
        while shared < limit and all(p[shared] == first[shared] for p in self.prompts):
            shared += 1
        return shared if shared >= _MIN_SHARED_PREFIX else 0

    def _prefill(self) -> torch.Tensor:
        """Run the prompts as one batch; returns the next-token logits (b, V).

        Layout of a row: [shared prefix][padding][the rest of its prompt]. The prefix every
        prompt shares is run once and its keys/values copied to every row; the rests are
        left-padded. The attention mask hides the padding and positions skip it, so each row
        sees exactly what it would see alone.
        """
        shared = self._prefill_shared() if self.use_cache else 0
        rests = [p[shared:] for p in self.prompts]
        ids, mask, positions = left_padded(rests, shared, self.pad_id, self.device)
        positions = positions[:, shared:]
        padded = not bool(mask.all())
        self.mask = mask
        if not self.use_cache:
            self.ids, self.positions = ids, positions
            return self._full_forward()
        self.next_pos = positions[:, -1] + 1
        return _last_logits(
            self.model,
            input_ids=ids,
            position_ids=positions,
            attention_mask=mask if padded else None,
            cache=self.cache,
        )

    def _prefill_shared(self) -> int:
        """Make the cache; run the prefix all prompts share once and copy it to every row.

        Returns the shared length (0 when nothing is shared or the cache cannot copy rows).
        """
        n = len(self.prompts)
        max_len = max(len(p) for p in self.prompts) + self.max_new_tokens
        shared = self._shared_prefix()
        if shared:
            cache = self.model.new_cache(1, max_len, device=self.device, dtype=self.dtype)
            if callable(getattr(cache, "reorder", None)):
                prefix = self.prompts[0][:shared]
                self.model.forward_hidden(
                    torch.tensor([prefix], dtype=torch.long, device=self.device), cache=cache
                )
                cache.reorder(torch.zeros(n, dtype=torch.long, device=self.device))
                self.cache = cache
                return shared
        self.cache = self.model.new_cache(n, max_len, device=self.device, dtype=self.dtype)
        return 0

    def _full_forward(self) -> torch.Tensor:
        """The book's way: run the whole sequence again and keep the last position's logits."""
        padded = not bool(self.mask.all())
        logits = self.model(
            self.ids,
            position_ids=self.positions,
            attention_mask=self.mask if padded else None,
        )
        return logits[:, -1]

    def _advance(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed the tokens just chosen (b,) and return the logits for the next ones."""
        ones = torch.ones((tokens.shape[0], 1), dtype=torch.bool, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        padded = not bool(self.mask.all())
        if not self.use_cache:
            self.ids = torch.cat([self.ids, tokens[:, None]], dim=1)
            self.positions = torch.cat([self.positions, self.positions[:, -1:] + 1], dim=1)
            return self._full_forward()
        positions = self.next_pos[:, None]
        self.next_pos = self.next_pos + 1
        return _last_logits(
            self.model,
            input_ids=tokens[:, None],
            position_ids=positions,
            attention_mask=self.mask if padded else None,
            cache=self.cache,
        )

    def _drop_finished(self, keep: list[int]) -> bool:
        """Remove finished rows from the batch tensors; False if the cache cannot do it."""
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        if self.use_cache:
            if not _keep_cache_rows(self.cache, index):
                return False
            self.next_pos = self.next_pos[index]
        else:
            self.ids, self.positions = self.ids[index], self.positions[index]
        self.mask = self.mask[index]
        self.rows = [self.rows[j] for j in keep]
        return True

    # -- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Run the model once and append one token to every running row."""
        if self.done:
            return
        if self.steps == 0:
            logits = self._prefill()
        else:
            logits = self._advance(self._last_tokens)
        logits = logits.float()
        if self.vocab_limit is not None and logits.shape[-1] > self.vocab_limit:
            # Embedding rows beyond the tokenizer's vocabulary are padding; never pick them.
            logits[:, self.vocab_limit :] = -math.inf
        running = [j for j, i in enumerate(self.rows) if self.finish[i] is None]
        tokens = torch.full((len(self.rows),), self.pad_id, dtype=torch.long, device=self.device)
        if running:
            index = torch.tensor(running, dtype=torch.long, device=self.device)
            gens = [self.generators[self.rows[j]] for j in running] if self.generators else []
            tokens[index] = self.sampler.choose(logits[index], gens)
        self.steps += 1
        for j, token in zip(running, tokens[running].tolist(), strict=True):
            i = self.rows[j]
            if token in self.stop_ids:
                self.finish[i] = "eos"
                continue
            self.new_ids[i].append(token)
            if self.stop_check is not None and self.stop_check(i, self.new_ids[i]):
                self.finish[i] = "stop"
            elif len(self.new_ids[i]) >= self.max_new_tokens:
                self.finish[i] = "length"
        self._last_tokens = tokens
        keep = [j for j, i in enumerate(self.rows) if self.finish[i] is None]
        if not keep:
            self.rows = []
        elif len(keep) < len(self.rows):
            # Dropping rows copies the cache, so wait until a quarter of the batch is idle.
            # Without that support, finished rows stay and are fed padding (ignored).
            idle = len(self.rows) - len(keep)
            if (not self.use_cache or 4 * idle >= len(self.rows)) and self._drop_finished(keep):
                self._last_tokens = tokens[torch.tensor(keep, device=self.device)]
