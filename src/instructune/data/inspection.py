"""Figures about a data set before training on it: sizes, token lengths, padding, flags.

Torch-free, so ``instructune data inspect`` starts fast.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from instructune.data.dataset import TokenizedRecord, tokenize_record, tokenize_records
from instructune.data.prompts import record_conversation
from instructune.data.records import split_records
from instructune.data.sampling import batch_order, padding_share
from instructune.tokenization.base import Tokenizer


@dataclass
class LengthStats:
    """Token lengths of the training sequences (prompt + response + end token)."""

    min: int
    median: float
    p95: int
    max: int
    mean: float

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        ordered = sorted(lengths)
        # Nearest-rank percentile: the smallest length that 95% of the records do not exceed.
        p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
        return cls(
            min=ordered[0],
            median=float(statistics.median(ordered)),
            p95=p95,
            max=ordered[-1],
            mean=round(statistics.fmean(ordered), 2),
        )


@dataclass
class InspectReport:
    """What ``instructune data inspect`` prints.

    Attributes:
        source: the data source.
        records: number of valid records.
        split: sizes of the book's split (train, test, val).
        tokenizer, style: what the lengths were measured with.
        lengths: token-length statistics over all records.
        prompt_lengths: the same for the prompts alone.
        padding_split: the split the padding figures are for.
        batch_size: the batch size they are for.
        padding_shuffled: share of padding positions with the book's shuffled batches.
        padding_grouped: the same with length-grouped batches.
        max_length: the length limit records are checked against.
        too_long: indices of records longer than ``max_length``.
        empty_outputs: indices of records whose output is empty.
        duplicates, conflicts: the duplicate warnings (as text).
        skipped: records dropped as invalid (as text).
        conversations: records that are conversations of several exchanges.
        answers: the responses the style trains on, over all records (one per record, except
            for multi-turn records in the ``chat`` style: one per assistant turn).
    """

    source: str
    records: int
    split: dict[str, int]
    tokenizer: str
    style: str
    lengths: LengthStats
    prompt_lengths: LengthStats
    padding_split: str
    batch_size: int
    padding_shuffled: float
    padding_grouped: float
    max_length: int
    too_long: list[int] = field(default_factory=list)
    empty_outputs: list[int] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    conversations: int = 0
    answers: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inspect_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    style: str = "alpaca",
    batch_size: int = 8,
    max_length: int = 1024,
    split: str = "train",
    seed: int = 123,
    source: str = "<records>",
    system_prompt: str | None = None,
) -> InspectReport:
    """Measure ``records`` as the training job will see them.

    Padding shares are for one epoch of ``split`` (``train``, ``test``, ``val`` or ``all``)
    in batches of ``batch_size`` (the book's loader: shuffled, last partial batch dropped),
    without and with length grouping. ``system_prompt``: as ``finetune --system-prompt``.
    """
    items = tokenize_records(records, tokenizer, style, system_prompt=system_prompt)
    lengths = [len(item.ids) for item in items]
    n_train, n_test, n_val = (len(part) for part in split_records(range(len(items))))
    parts = {
        "train": range(0, n_train),
        "test": range(n_train, n_train + n_test),
        "val": range(n_train + n_test, len(items)),
        "all": range(len(items)),
    }
    if split not in parts:
        raise ValueError(f"split must be one of {', '.join(parts)}, not {split!r}")
    chosen = [lengths[i] for i in parts[split]]
    shuffled = batch_order(chosen, batch_size, seed=seed)
    grouped = batch_order(chosen, batch_size, seed=seed, group_by_length=True)
    warnings = getattr(records, "warnings", [])
    return InspectReport(
        source=source,
        records=len(items),
        split={"train": n_train, "test": n_test, "val": n_val},
        tokenizer=tokenizer.name,
        style=style,
        lengths=LengthStats.of(lengths),
        prompt_lengths=LengthStats.of([item.prompt_len for item in items]),
        padding_split=split,
        batch_size=batch_size,
        padding_shuffled=round(padding_share(chosen, shuffled), 4),
        padding_grouped=round(padding_share(chosen, grouped), 4),
        max_length=max_length,
        too_long=[i for i, n in enumerate(lengths) if n > max_length],
        empty_outputs=[i for i, r in enumerate(records) if not str(r.get("output", "")).strip()],
        duplicates=[str(w) for w in warnings if w.code == "duplicate"],
        conflicts=[str(w) for w in warnings if w.code == "conflict"],
        skipped=[str(s) for s in getattr(records, "skipped", [])],
        conversations=sum(record_conversation(r) is not None for r in records),
        answers=sum(len(item.response_spans()) for item in items),
    )


def format_report(report: InspectReport, *, limit: int = 10) -> str:
    """The report as the lines ``instructune data inspect`` prints."""

    def stats(s: LengthStats) -> str:
        return f"min {s.min}, median {s.median:g}, p95 {s.p95}, max {s.max} (mean {s.mean:g})"

    def listed(items: list, label: str) -> list[str]:
        lines = [f"  {label}: {len(items)}"]
        lines += [f"    {item}" for item in items[:limit]]
        if len(items) > limit:
            lines.append(f"    ... and {len(items) - limit} more")
        return lines

    sizes = report.split
    lines = [
        f"source: {report.source}",
        f"records: {report.records}",
        f"conversations of several exchanges: {report.conversations} "
        f"(answers trained: {report.answers})",
        f"split (train/test/val): {sizes['train']} / {sizes['test']} / {sizes['val']}",
        f"tokens ({report.tokenizer}, style {report.style}):",
        f"  sequence: {stats(report.lengths)}",
        f"  prompt:   {stats(report.prompt_lengths)}",
        f"padding share ({report.padding_split} split, batch size {report.batch_size}):",
        f"  shuffled batches (the book): {report.padding_shuffled:.1%}",
        f"  length-grouped batches:      {report.padding_grouped:.1%}",
        "flags:",
        *listed(report.duplicates, "duplicates"),
        *listed(report.conflicts, "same instruction and input, different output"),
        *listed([f"record {i}" for i in report.empty_outputs], "empty outputs"),
        *listed(
            [f"record {i}" for i in report.too_long], f"longer than {report.max_length} tokens"
        ),
    ]
    if report.skipped:
        lines += listed(report.skipped, "skipped as invalid")
    return "\n".join(lines)


@dataclass
class TokenSegment:
    """A run of consecutive ids of one training sequence that are all prompt or all response.

    Attributes:
        start, end: the ids' range in the sequence.
        supervised: whether they are response ids (targets when the prompt is masked).
        text: the ids decoded.
    """

    start: int
    end: int
    supervised: bool
    text: str


def token_segments(item: TokenizedRecord, tokenizer: Tokenizer) -> list[TokenSegment]:
    """``item``'s ids cut where supervision starts or stops, each run decoded."""
    flags = item.supervised()
    segments = []
    start = 0
    for i in range(1, len(flags) + 1):
        if i == len(flags) or flags[i] != flags[start]:
            text = tokenizer.decode(item.ids[start:i])
            segments.append(TokenSegment(start, i, flags[start], text))
            start = i
    return segments


def token_view(
    record: Mapping[str, Any],
    tokenizer: Tokenizer,
    *,
    style: str = "alpaca",
    where: str = "",
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """What training makes of one record: its ids in runs of prompt and response.

    Returns ``{"where", "tokens", "supervised", "answers", "segments": [TokenSegment as dict]}``.
    """
    item = tokenize_record(record, tokenizer, style, system_prompt=system_prompt)
    segments = token_segments(item, tokenizer)
    return {
        "where": where,
        "style": style,
        "tokens": len(item.ids),
        "supervised": sum(s.end - s.start for s in segments if s.supervised),
        "answers": len(item.response_spans()),
        "segments": [asdict(s) for s in segments],
    }


def format_token_view(view: Mapping[str, Any]) -> str:
    """The token view as lines: one per run, ``TRAIN`` marking the supervised ones."""
    import json

    lines = [
        f"tokens of {view['where'] or 'the record'}, style {view['style']}: {view['tokens']} "
        f"ids, {view['supervised']} supervised in {view['answers']} answer(s)",
        "  (TRAIN: response ids and their end token, the only targets of a conversation; "
        "of one exchange with --mask-instructions, and without it every id after the first)"
        if view["answers"] > 1
        else "  (TRAIN: response ids and their end token, the targets with --mask-instructions; "
        "without it every id after the first is a target)",
    ]
    for s in view["segments"]:
        mark = "TRAIN " if s["supervised"] else "prompt"
        text = json.dumps(s["text"], ensure_ascii=False)
        lines.append(f"  {s['start']:>5}-{s['end'] - 1:<5} {mark} {text}")
    return "\n".join(lines)
