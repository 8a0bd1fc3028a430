"""Train only the upper part of a model: the embeddings and the lowest blocks stay fixed.

A transform of the model, as LoRA is: ``freeze_lower_blocks(model, n)`` turns off the gradients
of the token (and GPT-2's position) embeddings and of blocks ``0 .. n-1``. Nothing below block
``n`` then needs a gradient, so autograd's backward pass stops there: a step costs the forward
of every block but the backward of the upper ones only, and those weights need neither
gradients nor optimizer state. The output head tied to the token embedding (GPT-2, SmolLM2)
is that same tensor and stays fixed with it; an untied head is trained.
"""

from __future__ import annotations

from torch import nn


def freeze_lower_blocks(model: nn.Module, blocks: int) -> int:
    """Fix the embeddings and the first ``blocks`` blocks of ``model``; returns how many
    parameters were frozen. ``blocks`` may be 0 (the embeddings only) up to every block but
    the last (ValueError beyond)."""
    n_blocks = len(model.blocks)
    if not 0 <= blocks < n_blocks:
        raise ValueError(
            f"can freeze 0 to {n_blocks - 1} of this model's {n_blocks} blocks, not {blocks}"
        )
    frozen: list[nn.Parameter] = []
    lower = [model.tok_emb, getattr(model, "pos_emb", None), *model.blocks[:blocks]]
    for module in lower:
        if module is None:
            continue
        for p in module.parameters():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    return sum(p.numel() for p in frozen)
