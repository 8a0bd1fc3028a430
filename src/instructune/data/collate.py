"""Batches of tokenised records as padded input and target tensors (chapter 7.3-7.4).

The target shift happens here, as in the book: inputs are ``padded[:-1]``, targets ``padded[1:]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from instructune.data.dataset import TokenizedRecord

if TYPE_CHECKING:
    import torch


def collate(
    items: Sequence[TokenizedRecord | Sequence[int]],
    *,
    pad_id: int,
    ignore_index: int = -100,
    max_length: int | None = None,
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch and shift it into ``(inputs, targets)`` CPU LongTensors of shape (B, T).

    Items are either :class:`TokenizedRecord` s, whose ids already end with the end token, or
    plain id lists as in the book, to which ``pad_id`` is appended as the end token (the book's
    ``item + [pad_token_id]``). Each sequence is then padded with ``pad_id`` to the longest one;
    inputs are ``[:-1]`` and targets ``[1:]``. Every target after the one that predicts the end
    token becomes ``ignore_index``; the end token itself stays a target. Masking is by position,
    not by id, so it is right when ``pad_id`` equals the end id (GPT-2) and when it does not.

    The book's worked example (chapter 7.3), with plain lists and ``pad_id=50256``::

        collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], pad_id=50256)
        inputs  = [[0, 1, 2, 3, 4], [5, 6, 50256, 50256, 50256], [7, 8, 9, 50256, 50256]]
        targets = [[1, 2, 3, 4, 50256], [6, 50256, -100, -100, -100], [8, 9, 50256, -100, -100]]

    Args:
        max_length: keep at most this many positions (the book's ``allowed_max_length``),
            applied to inputs and targets after masking.
        mask_prompt: set to ``ignore_index`` every target that predicts a prompt token, so the
            first supervised target is the response's first token (exercise 7.2). Needs
            :class:`TokenizedRecord` items, which know where the prompt ends.

    An item with several responses (a multi-turn conversation) is always masked that way,
    whatever ``mask_prompt``: only its responses, each with its end token, are predicted, and
    every target predicting a system or user turn or the template's text between turns is
    ignored. Training on a conversation means learning the assistant's side of it; without
    the mask the model would also learn to write the user's turns.
    """
    import torch

    sequences: list[list[int]] = []
    prompt_lens: list[int] = []
    # Response ranges of the items that have several (multi-turn); () for every other item.
    spans: list[tuple[tuple[int, int], ...]] = []
    for item in items:
        if isinstance(item, TokenizedRecord):
            sequences.append(list(item.ids))
            prompt_lens.append(item.prompt_len)
            spans.append(item.responses)
        else:
            if mask_prompt:
                raise ValueError(
                    "mask_prompt needs TokenizedRecord items (they know the prompt length)"
                )
            sequences.append([*item, pad_id])
            prompt_lens.append(0)
            spans.append(())
    if not sequences:
        raise ValueError("cannot collate an empty batch")

    width = max(len(seq) for seq in sequences)
    # Filled row by row from 1-D tensors: much faster than torch.tensor() on nested lists.
    padded = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    target_tensor = torch.full((len(sequences), width - 1), ignore_index, dtype=torch.long)
    rows = zip(sequences, prompt_lens, spans, strict=True)
    for row, (seq, prompt_len, responses) in enumerate(rows):
        ids = torch.tensor(seq, dtype=torch.long)
        padded[row, : len(seq)] = ids
        if responses:
            # Several answers: only the targets predicting a response id (ids[start:end], so
            # targets start - 1 .. end - 2) are kept; the rest of the row stays ignored.
            for start, end in responses:
                target_tensor[row, start - 1 : end - 1] = ids[start:end]
            continue
        # Target j predicts padded[j + 1]. The end token sits at len(seq) - 1, so targets up to
        # j = len(seq) - 2 are real and every later one (predicting padding) stays ignored.
        target_tensor[row, : len(seq) - 1] = ids[1:]
        if mask_prompt and prompt_len > 1:
            # Targets j < prompt_len - 1 predict prompt tokens 1 .. prompt_len - 1.
            target_tensor[row, : prompt_len - 1] = ignore_index
    input_tensor = padded[:, :-1]
    if max_length is not None:
        input_tensor = input_tensor[:, :max_length]
        target_tensor = target_tensor[:, :max_length]
    # Column slices are views with gaps; hand the loop compact tensors.
    input_tensor, target_tensor = input_tensor.contiguous(), target_tensor.contiguous()
    return input_tensor, target_tensor


def collate_pairs(
    pairs: Sequence[tuple[TokenizedRecord, TokenizedRecord]],
    *,
    pad_id: int,
    ignore_index: int = -100,
    max_length: int | None = None,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Preference pairs as ``((chosen inputs, targets), (rejected inputs, targets))``.

    Both sides are padded to the longest sequence of either (as the book's DPO collate does),
    so one forward pass can run them stacked, and the prompt and padding are ``ignore_index``
    in the targets: only response tokens count in the log-probabilities.
    """
    items = [chosen for chosen, _ in pairs] + [rejected for _, rejected in pairs]
    inputs, targets = collate(
        items, pad_id=pad_id, ignore_index=ignore_index, max_length=max_length, mask_prompt=True
    )
    n = len(pairs)
    return (inputs[:n], targets[:n]), (inputs[n:], targets[n:])


def make_collate(**kwargs: Any) -> partial:
    """``collate`` with its keyword arguments fixed, for ``DataLoader(collate_fn=...)``."""
    return partial(collate, **kwargs)
