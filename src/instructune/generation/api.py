"""``generate()`` and ``stream()``: check the options, encode and fit the prompts, decode.

Both run the one decoding loop (``decoding.BatchDecoder``); ``generate`` sorts the prompts
by length and decodes them in batches, ``stream`` yields one prompt's text as it comes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from instructune.generation.base import GenerationError, GenerationResult
from instructune.generation.decoding import (
    BatchDecoder,
    context_length_of,
    eval_mode,
    model_device_dtype,
)
from instructune.generation.sampling import Sampler, prompt_generators
from instructune.generation.text import fit_context, held_back, make_result, stop_checker
from instructune.tokenization.base import encode_prompt


@dataclass
class _Setup:
    sampler: Sampler
    stop_ids: set[int]
    stop_strings: list[str]
    context_length: int | None
    max_new_tokens: int
    context: str
    stop_check: Callable[[int, list[int]], bool] | None


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
    return _Setup(
        Sampler(temperature, top_k, top_p),
        set(stop_ids),
        stops,
        context_length_of(model),
        max_new_tokens,
        context,
        stop_checker(tokenizer, stops),
    )


def _encode_and_fit(
    tokenizer: Any, prompt: str | Sequence[int], index: int, setup: _Setup
) -> list[int]:
    """Encode ``prompt`` (a string gets BOS when the tokenizer adds one) and fit the context."""
    ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
    return fit_context(
        ids,
        index=index,
        context_length=setup.context_length,
        max_new_tokens=setup.max_new_tokens,
        context=setup.context,
        bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
    )


def _decoder(
    model: torch.nn.Module,
    tokenizer: Any,
    setup: _Setup,
    prompts: list[list[int]],
    generators: list[torch.Generator],
    use_cache: bool,
) -> BatchDecoder:
    """The decoding loop for one batch of encoded prompts, configured by ``setup``."""
    return BatchDecoder(
        model,
        prompts,
        max_new_tokens=setup.max_new_tokens,
        sampler=setup.sampler,
        generators=generators,
        stop_ids=setup.stop_ids,
        pad_id=tokenizer.pad_id,
        vocab_limit=tokenizer.vocab_size,
        use_cache=use_cache,
        stop_check=setup.stop_check,
    )


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | Sequence[int] | None = None,
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
        seed: prompt i samples with a generator seeded ``seed + i`` (or ``seed[i]``, given one
            seed per prompt), so the same seed gives the same answers whatever the batch size.
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
    encoded = [_encode_and_fit(tokenizer, p, i, setup) for i, p in enumerate(prompts)]
    device, _ = model_device_dtype(model)
    generators = prompt_generators(seed, len(encoded), device) if not setup.sampler.greedy else []
    # Longest first: similar lengths share a batch, and memory trouble shows up at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    results: list[GenerationResult | None] = [None] * len(encoded)
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            decoder = _decoder(
                model,
                tokenizer,
                setup,
                [encoded[i] for i in batch],
                [generators[i] for i in batch] if generators else [],
                use_cache,
            )
            while not decoder.done:
                decoder.step()
            for j, i in enumerate(batch):
                results[i] = make_result(
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
    ids = _encode_and_fit(tokenizer, prompt, 0, setup)
    device, _ = model_device_dtype(model)
    generators = prompt_generators(seed, 1, device) if not setup.sampler.greedy else []
    decoder = _decoder(model, tokenizer, setup, [ids], generators, use_cache)
    sent = ""
    with eval_mode(model):
        while not decoder.done:
            decoder.step()
            if decoder.done:
                break
            text = tokenizer.decode(decoder.new_ids[0])
            safe = text[: len(text) - held_back(text, setup.stop_strings)]
            if len(safe) > len(sent) and safe.startswith(sent):
                yield safe[len(sent) :]
                sent = safe
        final = make_result(
            tokenizer, decoder.new_ids[0], decoder.finish[0] or "length", setup.stop_strings, 0
        )
    if final.text.startswith(sent) and len(final.text) > len(sent):
        yield final.text[len(sent) :]
