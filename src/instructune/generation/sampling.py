"""Sampling: greedy, or temperature then top-k then top-p; one seeded generator per prompt.

Public names: ``Sampler`` (the choice of a token) and ``prompt_generators``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from instructune.generation.base import GenerationError


@dataclass(frozen=True)
class Sampler:
    """How the next token is chosen from the logits: greedy when ``temperature == 0``;
    otherwise temperature, then top-k, then top-p. Bad settings raise ``GenerationError``."""

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
        """Whether the choice is the argmax (no generator is drawn from)."""
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


def prompt_generators(
    seed: int | Sequence[int] | None, count: int, device: torch.device
) -> list[torch.Generator]:
    """One generator per prompt: prompt i is seeded ``seed + i``, or ``seed[i]`` when ``seed``
    gives one seed per prompt. No seed draws one from torch's RNG (so ``torch.manual_seed``
    still makes a run repeatable)."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    if isinstance(seed, int):
        seeds = [seed + i for i in range(count)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise GenerationError(f"seed: got {len(seeds)} seeds for {count} prompts")
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]
