"""Which records go into which batch: the book's shuffled batches or length-grouped ones.

Pure functions of (lengths, seed, epoch), so a resumed run replays exactly the same batches.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

# Length grouping sorts within windows of this many batches, so batches are of similar length
# but which records meet in a window still changes from epoch to epoch.
GROUP_WINDOW_BATCHES = 50


def _rng(seed: int, epoch: int) -> random.Random:
    # String seeds are hashed with SHA-512 by `random`, stable across Python versions.
    return random.Random(f"instructune-batches:{seed}:{epoch}")


def batch_order(
    lengths: Sequence[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int = 0,
    shuffle: bool = True,
    group_by_length: bool = False,
    drop_last: bool = True,
) -> list[list[int]]:
    """Record indices for each batch of one epoch.

    Without grouping this is what ``DataLoader(shuffle=shuffle, drop_last=drop_last)`` does.
    With ``group_by_length`` the shuffled order is cut into windows of ~50 batches, each window
    sorted by length and cut into batches, and the batches are shuffled, so each batch holds
    records of similar length (little padding) and the batch order is still random.

    ``drop_last`` drops the one incomplete batch, if any.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(order)
    if group_by_length:
        window = batch_size * GROUP_WINDOW_BATCHES
        grouped: list[int] = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            grouped.extend(sorted(chunk, key=lambda i: lengths[i]))
        order = grouped
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if group_by_length and shuffle:
        rng.shuffle(batches)
    return batches


def padding_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the positions in the padded batches that are padding (0.0 to 1.0).

    Each batch is padded to its longest member, as :func:`instructune.data.collate.collate`
    does; ``lengths`` are the sequence lengths (``len(TokenizedRecord.ids)``).
    """
    total = real = 0
    for batch in batches:
        if not batch:
            continue
        sizes = [lengths[i] for i in batch]
        total += max(sizes) * len(sizes)
        real += sum(sizes)
    return 0.0 if total == 0 else 1.0 - real / total
