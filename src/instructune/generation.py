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
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from instructune.errors import DataError, InstructuneError

FinishReason = Literal["eos", "stop", "length"]
_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete multi-byte character
# A prefix all prompts of a batch share is run once when it is at least this long (below
# that, copying its keys/values to every row costs about what it saves).
_MIN_SHARED_PREFIX = 4


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


# --------------------------------------------------------------------------------------------
# Sampling


@dataclass(frozen=True)
class _Sampler:
    """Greedy when ``temperature == 0``; otherwise temperature, then top-k, then top-p."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise GenerationError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1 (or None), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (or None), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def choose(self, logits: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """One token per row of ``logits`` (b, V); row i draws from ``generators[i]``."""
        if self.greedy:
            return logits.argmax(dim=-1)
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if self.top_p is not None and self.top_p < 1:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # Drop a token when the tokens ranked above it already hold top_p of the mass; the
            # most likely token is always kept, so a tiny top_p is greedy.
            mass_before = probs.cumsum(dim=-1) - probs
            drop_sorted = mass_before >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, -math.inf)
        probs = logits.softmax(dim=-1)
        # One generator per prompt: a prompt's sample does not depend on its batch neighbours.
        return torch.cat(
            [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
        )


def _generators(seed: int | None, count: int, device: torch.device) -> list[torch.Generator]:
    """Prompt i samples from a generator seeded ``seed + i``; no seed draws one from torch's RNG
    (so ``torch.manual_seed`` still makes a run repeatable)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return [torch.Generator(device=device).manual_seed(seed + i) for i in range(count)]


# --------------------------------------------------------------------------------------------
# Model helpers


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def _context_length(model: torch.nn.Module) -> int | None:
    for attr in ("cfg", "config"):
        length = getattr(getattr(model, attr, None), "context_length", None)
        if length:
            return int(length)
    return None


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """eval() for generation, then back to whatever mode the caller had (e.g. mid-training)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _last_logits(model: torch.nn.Module, **kwargs: Any) -> torch.Tensor:
    """Logits of the last position only, (b, V).

    The head runs on one position per row instead of the whole prompt: for a 49k vocabulary
    that is a noticeable share of a long prompt's prefill.
    """
    hidden = model.forward_hidden(**kwargs)[:, -1]
    return torch.nn.functional.linear(hidden, model.output_weight)


def _keep_cache_rows(cache: Any, rows: torch.Tensor) -> bool:
    """Restrict the cache to batch ``rows`` in place; False when the cache cannot do that."""
    reorder = getattr(cache, "reorder", None)
    if not callable(reorder):
        return False
    reorder(rows)
    return True


# --------------------------------------------------------------------------------------------
# The decoding loop


class _BatchDecoder:
    """Decodes one batch of prompts, one token per ``step()``, for every row still running.

    Per-prompt state (``new_ids``, ``finish``) is kept in plain lists indexed by the prompt's
    position in the batch; ``rows`` maps the tensor rows still in the batch to those positions.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        prompts: list[list[int]],
        *,
        max_new_tokens: int,
        sampler: _Sampler,
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
        self.device, self.dtype = _model_device_dtype(model)
        if max_new_tokens <= 0:
            self.rows = []
            for i in range(len(prompts)):
                self.finish[i] = "length"

    @property
    def done(self) -> bool:
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
        n = len(self.prompts)
        shared = self._prefill_shared() if self.use_cache else 0
        rests = [p[shared:] for p in self.prompts]
        width = max(len(r) for r in rests)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, shared + width), dtype=torch.bool)
        mask[:, :shared] = True
        for i, rest in enumerate(rests):
            ids[i, width - len(rest) :] = torch.tensor(rest, dtype=torch.long)
            mask[i, shared + width - len(rest) :] = True
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Real tokens count from 0 as they would alone; padding takes a neighbour's (unseen).
        positions = (mask.long().cumsum(dim=-1) - 1).clamp(min=0)[:, shared:]
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


# --------------------------------------------------------------------------------------------
# Prompts in, text out


def encode_prompt(tokenizer: Any, prompt: str, *, add_bos: bool | None = None) -> list[int]:
    """The ids the model sees for ``prompt``: BOS first when ``add_bos`` (default: the
    tokenizer's ``add_bos``) and the tokenizer has one."""
    ids = list(tokenizer.encode(prompt))
    add_bos = tokenizer.add_bos if add_bos is None else add_bos
    if add_bos and tokenizer.bos_id is not None:
        ids.insert(0, tokenizer.bos_id)
    return ids


def _fit_context(
    ids: list[int],
    *,
    index: int,
    context_length: int | None,
    max_new_tokens: int,
    context: str,
    bos_id: int | None,
) -> list[int]:
    """Crop the prompt from the left (keeping a leading BOS) or refuse, as ``context`` says."""
    if not ids:
        raise GenerationError(f"prompt {index} is empty: the model needs at least one token")
    if context_length is None:
        return ids
    room = context_length - max_new_tokens
    if room < 1:
        raise ContextLengthError(
            f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context "
            f"of {context_length} tokens; lower max_new_tokens"
        )
    if len(ids) <= room:
        return ids
    if context == "error":
        raise ContextLengthError(
            f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's context length of {context_length}. Shorten the prompt, lower "
            f"max_new_tokens, or crop the prompt (context='crop')"
        )
    keep_bos = bos_id is not None and ids[0] == bos_id and room > 1
    kept = ([bos_id] if keep_bos else []) + ids[len(ids) - room + keep_bos :]
    dropped = len(ids) - len(kept)
    warnings.warn(
        f"prompt {index}: dropped its first {dropped} of {len(ids)} tokens so that it plus "
        f"max_new_tokens={max_new_tokens} fits the model's context length of {context_length}",
        stacklevel=4,
    )
    return kept


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the earliest stop string, and whether one was found."""
    cut = min((pos for s in stop_strings if (pos := text.find(s)) >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def _finish_row(
    tokenizer: Any,
    new_ids: list[int],
    finish: FinishReason,
    stop_strings: Sequence[str],
    prompt_tokens: int,
) -> GenerationResult:
    text = tokenizer.decode(new_ids)
    ids = list(new_ids)
    if finish == "stop":
        text, _ = _cut_at_stop(text, stop_strings)
        # Keep the shortest run of tokens whose text still holds the answer before the stop.
        while ids and tokenizer.decode(ids[:-1]).startswith(text):
            ids.pop()
    return GenerationResult(text, ids, finish, prompt_tokens)


def _held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many characters at the end of ``text`` a stream must not yield yet: an incomplete
    multi-byte character (U+FFFD) or the start of what may become a stop string."""
    end = len(text)
    while end and text[end - 1] == _REPLACEMENT:
        end -= 1
    longest = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, end), longest, -1):
            if text.endswith(s[:k], 0, end):
                longest = k
                break
    return len(text) - end + longest


@dataclass
class _Setup:
    sampler: _Sampler
    stop_ids: set[int]
    stop_strings: list[str]
    context_length: int | None


def _setup(
    model: torch.nn.Module,
    tokenizer: Any,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    stop_ids: Sequence[int] | int | None,
    stop_strings: Sequence[str] | str | None,
    context: str,
) -> _Setup:
    if context not in ("crop", "error"):
        raise GenerationError(f"context must be 'crop' or 'error', got {context!r}")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if stop_ids is None:
        stop_ids = [tokenizer.eos_id]
    elif isinstance(stop_ids, int):
        stop_ids = [stop_ids]
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    stops = [s for s in (stop_strings or []) if s]
    return _Setup(_Sampler(temperature, top_k, top_p), set(stop_ids), stops, _context_length(model))


def _stop_checker(
    tokenizer: Any, stop_strings: list[str]
) -> Callable[[int, list[int]], bool] | None:
    if not stop_strings:
        return None
    longest = max(len(s) for s in stop_strings)

    def check(_: int, ids: list[int]) -> bool:
        # A new stop string must end within the last token's text, so look only at the tail
        # (decoding a few tokens is cheap; decoding the whole answer every step is not).
        tail = tokenizer.decode(ids[-(longest + 8) :])
        return any(s in tail for s in stop_strings)

    return check


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] | int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    batch_size: int = 16,
    context: Literal["crop", "error"] = "crop",
    use_cache: bool = True,
) -> list[GenerationResult]:
    """Generate an answer for every prompt, in batches, in the prompts' order.

    Args:
        model: a model with the instructune model API (``forward``, ``forward_hidden``,
            ``output_weight``, ``new_cache``); put in eval mode for the call and restored after.
        tokenizer: an ``instructune.tokenization.Tokenizer``.
        prompts: strings (encoded here, with BOS first when ``tokenizer.add_bos``) or lists of
            token ids (used as they are).
        max_new_tokens: the most tokens generated per prompt (an end token that stops the
            answer counts as one, as in transformers, though it is not in the result).
        temperature: 0 is greedy; above 0, sample from softmax(logits / temperature).
        top_k: sample among the k most likely tokens only.
        top_p: sample among the most likely tokens that together hold probability ``top_p``.
        seed: prompt i samples with a generator seeded ``seed + i``, so the same seed gives the
            same answers whatever the batch size.
        stop_ids: end token ids (default: ``tokenizer.eos_id``); the token is not in the result.
        stop_strings: strings that end generation, checked on the new text; cut from the text.
        batch_size: prompts decoded together (sorted by length to waste little on padding).
        context: when a prompt plus ``max_new_tokens`` exceeds the model's context length,
            ``"crop"`` drops the prompt's first tokens (with a warning), ``"error"`` raises
            ``ContextLengthError``.
        use_cache: False recomputes the whole sequence for every token (the book's way; slow).

    Returns:
        One ``GenerationResult`` per prompt.
    """
    if isinstance(prompts, str):
        raise GenerationError("prompts must be a list of prompts; wrap the one string in [...]")
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")
    setup = _setup(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        context=context,
    )
    encoded = [
        _fit_context(
            encode_prompt(tokenizer, p) if isinstance(p, str) else [int(t) for t in p],
            index=i,
            context_length=setup.context_length,
            max_new_tokens=max_new_tokens,
            context=context,
            bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
        )
        for i, p in enumerate(prompts)
    ]
    device, _ = _model_device_dtype(model)
    generators = _generators(seed, len(encoded), device) if not setup.sampler.greedy else []
    # Longest first: similar lengths share a batch, and memory trouble shows up at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[GenerationResult | None] = [None] * len(encoded)
    check = _stop_checker(tokenizer, setup.stop_strings)
    with _eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            decoder = _BatchDecoder(
                model,
                [encoded[i] for i in batch],
                max_new_tokens=max_new_tokens,
                sampler=setup.sampler,
                generators=[generators[i] for i in batch] if generators else [],
                stop_ids=setup.stop_ids,
                pad_id=tokenizer.pad_id,
                vocab_limit=tokenizer.vocab_size,
                use_cache=use_cache,
                stop_check=check,
            )
            while not decoder.done:
                decoder.step()
            for j, i in enumerate(batch):
                results[i] = _finish_row(
                    tokenizer,
                    decoder.new_ids[j],
                    decoder.finish[j] or "length",
                    setup.stop_strings,
                    len(encoded[i]),
                )
    return results  # type: ignore[return-value]


def stream(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] | int | None = None,
    stop_strings: Sequence[str] | str | None = None,
    context: Literal["crop", "error"] = "crop",
    use_cache: bool = True,
) -> Iterator[str]:
    """Yield one prompt's answer as text pieces, as the tokens come.

    The pieces join to exactly ``generate(model, tokenizer, [prompt], ...)[0].text`` with the
    same options. A piece never ends in half a multi-byte character (text ending in U+FFFD is
    held back until the character is complete) nor in what may be the start of a stop string.
    """
    setup = _setup(
        model,
        tokenizer,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=stop_ids,
        stop_strings=stop_strings,
        context=context,
    )
    ids = _fit_context(
        encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else [int(t) for t in prompt],
        index=0,
        context_length=setup.context_length,
        max_new_tokens=max_new_tokens,
        context=context,
        bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
    )
    device, _ = _model_device_dtype(model)
    decoder = _BatchDecoder(
        model,
        [ids],
        max_new_tokens=max_new_tokens,
        sampler=setup.sampler,
        generators=_generators(seed, 1, device) if not setup.sampler.greedy else [],
        stop_ids=setup.stop_ids,
        pad_id=tokenizer.pad_id,
        vocab_limit=tokenizer.vocab_size,
        use_cache=use_cache,
        stop_check=_stop_checker(tokenizer, setup.stop_strings),
    )
    sent = ""
    with _eval_mode(model):
        while not decoder.done:
            decoder.step()
            if decoder.done:
                break
            text = tokenizer.decode(decoder.new_ids[0])
            safe = text[: len(text) - _held_back(text, setup.stop_strings)]
            if len(safe) > len(sent) and safe.startswith(sent):
                yield safe[len(sent) :]
                sent = safe
        final = _finish_row(
            tokenizer, decoder.new_ids[0], decoder.finish[0] or "length", setup.stop_strings, 0
        )
    if final.text.startswith(sent) and len(final.text) > len(sent):
        yield final.text[len(sent) :]


# --------------------------------------------------------------------------------------------
# Answering a data set (the book's section 7.7)


def stop_ids_for(loaded: Any) -> list[int]:
    """End tokens for a loaded model: its saved prompt format's and its tokenizer's."""
    ids = [loaded.tokenizer.eos_id]
    fmt = getattr(loaded, "prompt_format", None)
    if fmt is not None and fmt.eos_id is not None and fmt.eos_id not in ids:
        ids.append(fmt.eos_id)
    return ids


def _without(record: dict, key: str) -> dict:
    return {k: v for k, v in record.items() if k != key}


def _previous_answers(out_path: Path, records: list[dict], key: str) -> dict[int, Any]:
    """Answers already in ``out_path`` (index -> answer), after checking it fits ``records``."""
    try:
        previous = json.loads(out_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(
            f"{out_path}: cannot resume from it ({exc}); delete it or pick another out path"
        ) from None
    if not isinstance(previous, list) or len(previous) != len(records):
        raise DataError(
            f"{out_path}: holds {len(previous) if isinstance(previous, list) else 'no list of'} "
            f"records, the input {len(records)}; it was written for other data. Delete it or "
            f"pick another out path"
        )
    answers = {}
    for i, (old, new) in enumerate(zip(previous, records, strict=True)):
        if not isinstance(old, dict) or key not in old:
            continue
        if _without(old, key) != _without(new, key):
            field = next((f for f in {**old, **new} if f != key and old.get(f) != new.get(f)), "?")
            raise DataError(
                f"{out_path}: record {i} field {field!r} differs from the input's record {i}; "
                f"the file was written for other data. Delete it or pick another out path"
            )
        answers[i] = old[key]
    return answers


def answer_records(
    loaded: Any,
    records: Sequence[dict],
    *,
    style: str | None = None,
    out_path: str | Path | None = None,
    response_key: str = "model_response",
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    batch_size: int = 16,
    stop_strings: Sequence[str] | None = None,
    add_bos: bool | None = None,
    progress: bool = True,
) -> list[dict]:
    """Answer every record, as the book's section 7.7 does, in batches.

    Each record is prompted with ``format_prompt(record, style)``; the answer is
    ``extract_response`` of the new text, stored under ``response_key`` in a copy of the record.

    Args:
        loaded: a ``LoadedModel`` (``model``, ``tokenizer``, ``prompt_format``).
        records: instruction records (``instruction``, ``input``, ``output``...).
        style: prompt style; default the model's saved ``prompt_format.style``, else ``alpaca``.
        out_path: if given, the JSON list of answered records is written there atomically after
            every batch, and answers already in it (for the same records) are kept, not redone.
        stop_strings: default: the saved prompt format's when ``style`` is the saved style,
            else the style's own (``stop_strings_for(style)``).
        add_bos: default: the saved prompt format's, else the tokenizer's.
        progress: show a tqdm progress bar.
        The other options are ``generate``'s; the end tokens are ``stop_ids_for(loaded)``.

    Returns:
        The records in their order, each with ``response_key``.
    """
    from tqdm.auto import tqdm

    from instructune.data.prompts import extract_response, format_prompt, stop_strings_for
    from instructune.utils.io import atomic_write_json

    tokenizer, fmt = loaded.tokenizer, loaded.prompt_format
    style = style or (fmt.style if fmt is not None else "alpaca")
    if stop_strings is None:
        saved = fmt is not None and fmt.style == style
        stop_strings = list(fmt.stop_strings) if saved else stop_strings_for(style)
    if add_bos is None and fmt is not None:
        add_bos = fmt.add_bos
    out = [_without(dict(r), response_key) for r in records]
    out_path = Path(out_path) if out_path is not None else None
    if out_path is not None and out_path.exists():
        for i, answer in _previous_answers(out_path, out, response_key).items():
            out[i][response_key] = answer
    pending = [i for i, r in enumerate(out) if response_key not in r]
    prompts = {
        i: encode_prompt(
            tokenizer,
            format_prompt(out[i], style, chat_template=tokenizer.chat_template),
            add_bos=add_bos,
        )
        for i in pending
    }
    # Longest first, batch by batch, so each batch holds similar lengths and is saved once done.
    pending.sort(key=lambda i: -len(prompts[i]))
    bar = tqdm(total=len(out), initial=len(out) - len(pending), unit="record", disable=not progress)
    try:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            results = generate(
                loaded.model,
                tokenizer,
                [prompts[i] for i in batch],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=None if seed is None else seed + start,
                stop_ids=stop_ids_for(loaded),
                stop_strings=stop_strings,
                batch_size=batch_size,
            )
            for i, result in zip(batch, results, strict=True):
                out[i][response_key] = extract_response(result.text, style)
            if out_path is not None:
                atomic_write_json(out_path, out)
            bar.update(len(batch))
    finally:
        bar.close()
    if out_path is not None and not pending:
        atomic_write_json(out_path, out)
    return out
