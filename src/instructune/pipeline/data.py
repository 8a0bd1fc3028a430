"""The job's data: the records' train/val/test splits, and the loop's tokenised batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from instructune.config import FinetuneConfig
from instructune.pipeline.messages import _warn

if TYPE_CHECKING:
    from instructune.tokenization.base import Tokenizer
    from instructune.training.loop import LoopData


def load_splits(cfg: FinetuneConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test) records: the book's 85/10/5 split, or separate val/test files."""
    from instructune.data.records import split_records
    from instructune.data.sources import load_source

    def load(source: str) -> list[dict]:
        records = load_source(source)
        for issue in getattr(records, "warnings", []):
            _warn(f"warning: {issue}")
        return list(records)

    if cfg.val_data is None and cfg.test_data is None:
        train, test, val = split_records(load(cfg.data), shuffle_seed=cfg.split_shuffle_seed)
    else:
        train = load(cfg.data)
        val = load(cfg.val_data) if cfg.val_data else []
        test = load(cfg.test_data) if cfg.test_data else []
    return list(train), list(val), list(test)


def global_batch(cfg: FinetuneConfig, world_size: int) -> int:
    """Records per optimizer step: ``batch_size x grad_accum x world_size``."""
    return cfg.batch_size * cfg.grad_accum * world_size


def build_loop_data(
    cfg: FinetuneConfig,
    tokenizer: Tokenizer,
    style: str,
    train_records: list[dict],
    val_records: list[dict],
    world_size: int = 1,
    *,
    max_length: int | None = None,
    system_prompt: str | None = None,
) -> LoopData:
    """Tokenise once and describe the batches: the loop's ``LoopData``.

    One optimizer step takes a global batch of ``batch_size x grad_accum x world_size``
    records from the pure ``batch_order`` (shuffled, or length-grouped; the last incomplete
    batch dropped, as the book's ``drop_last=True``); validation batches are in file order.
    Sequences are cut at ``max_length`` (the run's resolved length; None: ``cfg.max_length``).
    ``system_prompt`` is the run's resolved one (``PromptFormat.system_prompt``).
    """
    from instructune.data.collate import make_collate
    from instructune.data.dataset import tokenize_records

    train_items = tokenize_records(train_records, tokenizer, style, system_prompt=system_prompt)
    val_items = tokenize_records(val_records, tokenizer, style, system_prompt=system_prompt)
    collate = make_collate(
        pad_id=tokenizer.pad_id,
        max_length=cfg.max_length if max_length is None else max_length,
        mask_prompt=cfg.mask_instructions,
    )
    return batched_loop_data(cfg, train_items, val_items, collate, world_size)


def batched_loop_data(
    cfg: FinetuneConfig,
    train_items: list,
    val_items: list,
    collate: Callable,
    world_size: int = 1,
) -> LoopData:
    """``LoopData`` over tokenised items (records, or DPO's pairs): each epoch's global batches
    from the pure ``batch_order`` (shuffled or length-grouped, the last incomplete one
    dropped), the validation batches in file order."""
    from instructune.data.sampling import batch_order
    from instructune.training.loop import LoopData

    lengths = [len(item) for item in train_items]
    records_per_step = global_batch(cfg, world_size)

    def order(epoch: int) -> list[list[int]]:
        return batch_order(
            lengths,
            records_per_step,
            seed=cfg.seed,
            epoch=epoch,
            shuffle=True,
            group_by_length=cfg.group_by_length,
            drop_last=True,
        )

    val_lengths = [len(i) for i in val_items]
    val_batches = batch_order(
        val_lengths, cfg.batch_size, seed=cfg.seed, shuffle=False, drop_last=False
    )
    return LoopData(train_items, val_items, collate, order, val_batches)
