"""Answering a data set (the book's section 7.7): ``answer_records``, and the end tokens and
stop strings it answers with (``stop_ids_for``, ``style_and_stops``).

``answer_records`` is the one answering loop: ``instructune generate --data``, the pipeline's
test split and its per-epoch sample all run it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructune.errors import DataError
from instructune.generation.base import GenerationResult
from instructune.generation.decoding import model_device_dtype
from instructune.generation.refill import decode_as_completed
from instructune.tokenization.base import encode_prompt
from instructune.utils.heap import freed_memory_kept_on

if TYPE_CHECKING:
    from instructune.checkpoints.load import LoadedModel

# Answer files are written as the book writes its responses (json.dump(..., indent=4)).
_JSON_INDENT = 4


def stop_ids_for(loaded: LoadedModel) -> list[int]:
    """End tokens for a loaded model: its saved prompt format's and its tokenizer's."""
    ids = [loaded.tokenizer.eos_id]
    fmt = getattr(loaded, "prompt_format", None)
    if fmt is not None and fmt.eos_id is not None and fmt.eos_id not in ids:
        ids.append(fmt.eos_id)
    return ids


def style_and_stops(loaded: LoadedModel, style: str | None = None) -> tuple[str, list[str]]:
    """The prompt style to answer with (default: the model's saved one, else ``alpaca``) and its
    stop strings: the saved prompt format's when ``style`` is the saved style, else the style's
    own (``stop_strings_for(style)``)."""
    from instructune.data.prompts import stop_strings_for

    fmt = loaded.prompt_format
    style = style or (fmt.style if fmt is not None else "alpaca")
    saved = fmt is not None and fmt.style == style
    return style, list(fmt.stop_strings) if saved else stop_strings_for(style)


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
    loaded: LoadedModel,
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
    desc: str | None = None,
    on_answered: Callable[[dict[int, GenerationResult]], None] | None = None,
) -> list[dict]:
    """Answer every record, as the book's section 7.7 does, ``batch_size`` at a time with
    continuous refill (``generation.refill``): a finished answer's row takes the next record at
    once, so no batch waits for its longest answer.

    Each record is prompted with ``format_prompt(record, style)`` (with the system prompt the
    model was trained with, if any); the answer is
    ``extract_response`` of the new text, stored under ``response_key`` in a copy of the record.

    Args:
        loaded: a ``LoadedModel`` (``model``, ``tokenizer``, ``prompt_format``).
        records: instruction records (``instruction``, ``input``, ``output``...).
        style: prompt style; default the model's saved ``prompt_format.style``, else ``alpaca``.
        out_path: if given, the JSON list of answered records is written there atomically after
            every ``batch_size`` finished answers (indented 4, as the book writes it), and
            answers already in it (for the same records) are kept, not redone.
        stop_strings: default: ``style_and_stops(loaded, style)``'s.
        add_bos: default: the saved prompt format's, else the tokenizer's.
        seed: record i samples with a generator seeded ``seed + i``, so a sampled answer does
            not depend on its neighbours in the batch, and a resumed run gives what one run
            would.
        progress: show a tqdm progress bar (labelled ``desc``).
        on_answered: called with ``{record index: GenerationResult}`` for the answers finished
            since its last call, before they are written to ``out_path`` (so whatever it saves is never
            behind the answers file).
        The other options are ``generate``'s; the end tokens are ``stop_ids_for(loaded)``.

    Returns:
        The records in their order, each with ``response_key``.
    """
    from tqdm.auto import tqdm

    from instructune.data.prompts import extract_response, format_prompt, trained_system_prompt
    from instructune.utils.io import atomic_write_json

    tokenizer, fmt = loaded.tokenizer, loaded.prompt_format
    style, default_stops = style_and_stops(loaded, style)
    if stop_strings is None:
        stop_strings = default_stops
    if add_bos is None and fmt is not None:
        add_bos = fmt.add_bos
    out = [_without(dict(r), response_key) for r in records]
    out_path = Path(out_path) if out_path is not None else None
    if out_path is not None and out_path.exists():
        for i, answer in _previous_answers(out_path, out, response_key).items():
            out[i][response_key] = answer
    pending = [i for i, r in enumerate(out) if response_key not in r]
    system_prompt = trained_system_prompt(fmt, style)
    prompts = {
        i: encode_prompt(
            tokenizer,
            format_prompt(
                out[i], style, chat_template=tokenizer.chat_template, system_prompt=system_prompt
            ),
            add_bos=add_bos,
        )
        for i in pending
    }
    # Continuous refill: up to batch_size records decode together and a finished one's row is
    # refilled at once. Answers are saved every batch_size finished records (and at the end),
    # so an interrupted run loses at most that many.
    bar = tqdm(
        total=len(out),
        initial=len(out) - len(pending),
        desc=desc,
        unit="record",
        disable=not progress,
    )
    finished: dict[int, GenerationResult] = {}

    def save() -> None:
        if on_answered is not None:
            on_answered(dict(finished))
        if out_path is not None:
            atomic_write_json(out_path, out, indent=_JSON_INDENT)
        bar.update(len(finished))
        finished.clear()

    # Decoding frees and asks again for the same buffers every step, as training does: 24 test
    # prompts of the embedded model answered 1.1x faster with freed memory kept (utils/heap.py).
    device, _ = model_device_dtype(loaded.model)
    try:
        with freed_memory_kept_on(device):
            answers = (
                ()
                if not pending
                else decode_as_completed(
                    loaded,
                    [prompts[i] for i in pending],
                    max_batch=batch_size,
                    max_new_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=None if seed is None else [seed + i for i in pending],
                    stop_ids=stop_ids_for(loaded),
                    stop_strings=stop_strings,
                )
            )
            for j, result in answers:
                i = pending[j]
                out[i][response_key] = extract_response(result.text, style)
                finished[i] = result
                if len(finished) >= batch_size:
                    save()
            if finished:
                save()
    finally:
        bar.close()
    if out_path is not None and not pending:
        atomic_write_json(out_path, out, indent=_JSON_INDENT)
    return out
