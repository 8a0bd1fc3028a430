"""Learning-rate schedules as pure functions of the step, so a resumed run needs no state."""

from __future__ import annotations

import math


def lr_at(
    step: int,
    *,
    base_lr: float,
    schedule: str = "constant",
    warmup_steps: int = 0,
    total_steps: int | None = None,
    min_lr_ratio: float = 0.1,
) -> float:
    """The learning rate for optimizer step ``step`` (0-based).

    ``constant`` (the book) keeps ``base_lr`` after an optional linear warm-up; ``cosine``
    warms up linearly, then follows half a cosine from ``base_lr`` down to
    ``base_lr * min_lr_ratio`` at ``total_steps``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if warmup_steps > 0 and step < warmup_steps:
        # (step + 1): the first step already moves, and step warmup_steps-1 reaches base_lr.
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}; choose constant or cosine")
    if total_steps is None or total_steps <= 0:
        raise ValueError("the cosine schedule needs total_steps")
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    min_lr = base_lr * min_lr_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
