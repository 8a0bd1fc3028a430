"""LLM jobs over a data set, one request per record, safe to run for hours: ``data rewrite``
(a prompt template per record, the reply stored in a field) and the machinery ``data prefer``
shares (:func:`run_record_job`).

Safety comes from three files. The output JSONL is written in source order, one record a line,
appended, flushed and synced as each record is finished; the side file ``OUT.skipped.jsonl``
lists each record left out (index and reason), so nothing is dropped silently; the reply cache
(``instructune.llm.cache``) keeps every answer the moment it arrives, including answers to later
records that finished first. Killed at any moment, a run started again skips what the output
and side file already hold, gets what the cache holds without asking, and asks for the rest.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from instructune.errors import DataError, InstructuneError
from instructune.llm.cache import ReplyCache, cached_call, client_key
from instructune.llm.client import LLMClient, LLMError

REWRITE_VERSION = "rewrite/1"  # part of the cache key: bump when the request's making changes


class JsonlLog:
    """A JSONL file written one object at a time (appended, flushed, synced).

    Opening it reads the objects already there; a last line cut short by a crash is cut off
    (it was never a whole record); any other unreadable line is an error naming the line.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.items: list[dict] = []
        self._lock = threading.Lock()
        if not self.path.exists():
            # Made at once, empty: a job that writes nothing still leaves its output to look at.
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            return
        data = self.path.read_bytes()
        *whole, partial = data.split(b"\n")
        for number, raw in enumerate(whole, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(f"{self.path}: line {number}: not JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{self.path}: line {number}: expected a JSON object")
            self.items.append(obj)
        if partial:
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(partial))

    def __len__(self) -> int:
        return len(self.items)

    def append(self, obj: dict) -> None:
        line = json.dumps(obj, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            self.items.append(obj)


def skipped_path(out: str | os.PathLike) -> Path:
    """The side file listing the records a job left out: ``OUT.skipped.jsonl``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".skipped.jsonl")


def default_cache_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".cache.jsonl")


@dataclass
class Progress:
    """What a job has done; ``line()`` is its progress line, ``summary()`` its last line."""

    total: int
    done: int = 0  # records written (this run and before)
    skipped: int = 0  # records left out (listed in the side file)
    cached: int = 0  # replies served from the cache
    client: LLMClient | None = None
    quiet: bool = False

    def line(self) -> str:
        stats = self.client.stats if self.client else None
        requests = stats.requests if stats else 0
        retries = stats.retries if stats else 0
        return (
            f"{self.done}/{self.total} records, {requests} requests, {retries} retries, "
            f"{self.cached} cached, {self.skipped} skipped"
        )

    def show(self) -> None:
        if not self.quiet:
            print("\r" + self.line(), end="", file=sys.stderr, flush=True)

    def summary(self, out: str | os.PathLike) -> str:
        return f"wrote {self.done} of {self.total} records to {out}"


@dataclass
class JobResult:
    written: int
    total: int
    skipped: int
    error: BaseException | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.written + self.skipped == self.total


@dataclass(frozen=True)
class Step:
    """One record's request: the prompt (chat), per-request options, what to cache it under."""

    prompt: str
    options: dict = field(default_factory=dict)


def render_template(template: str, record: dict, where: str) -> str:
    """``template.format(**record)``; a field the record lacks is an error naming it."""
    try:
        return template.format(**record)
    except KeyError as exc:
        raise DataError(f"{where}: the prompt template needs field {exc.args[0]!r}") from None
    except (IndexError, ValueError) as exc:
        raise InstructuneError(
            f"the prompt template is not a valid str.format text: {exc}"
        ) from None


def check_template(template: str, records: Sequence[dict], source: str) -> None:
    """Render ``template`` for every record now, so a missing field stops the job before the
    first request rather than hours into it."""
    for i, rec in enumerate(records):
        render_template(template, rec, f"{source}: record {i}")


def _resume_point(records: Sequence[dict], out: JsonlLog, skipped: JsonlLog, out_path) -> int:
    """The first source index not yet finished, after checking the output belongs to SRC."""
    left_out = {s.get("index") for s in skipped.items}
    p = 0
    for i, rec in enumerate(records):
        if i in left_out:
            continue
        if p == len(out.items):
            return i
        if out.items[p].get("instruction") != rec.get("instruction"):
            raise DataError(
                f"{out_path}: line {p + 1} is not the output of source record {i}: it was made "
                "from other data; choose another --out"
            )
        p += 1
    if p != len(out.items):
        raise DataError(f"{out_path}: has more records than the source; choose another --out")
    return len(records)


def run_record_job(
    records: Sequence[dict],
    *,
    source: str,
    out: str | os.PathLike,
    client: LLMClient,
    plan: Callable[[int, dict], Step],
    finish: Callable[[int, dict, str], dict | str],
    version: str,
    cache: ReplyCache | None,
    workers: int = 1,
    quiet: bool = False,
) -> JobResult:
    """Ask once per record (``plan`` makes the request, ``finish`` turns the reply into the
    output record, or into a reason string to leave the record out) and write the results in
    source order. Stops at the first request that fails for good; what was finished stays.
    """
    if workers < 1:
        raise InstructuneError(f"--workers must be at least 1 (got {workers})")
    out_log = JsonlLog(out)
    side = JsonlLog(skipped_path(out))
    start = _resume_point(records, out_log, side, out)
    progress = Progress(total=len(records), client=client, quiet=quiet)
    progress.done, progress.skipped = len(out_log), len(side)
    todo = list(range(start, len(records)))
    # Finished results wait here until every earlier record is written (source order).
    results: dict[int, dict | str] = {}
    next_index = start
    stop = threading.Event()
    cached_lock = threading.Lock()

    def work(i: int) -> dict | str | None:
        if stop.is_set():
            return None
        step = plan(i, records[i])
        key = client_key(client, step.prompt, version=version, options=step.options)
        if cache is not None and key in cache:
            with cached_lock:
                progress.cached += 1
        reply = cached_call(
            cache, key, lambda: client.chat(step.prompt, step.options), record=i, source=source
        )
        return finish(i, records[i], reply)

    def write_ready() -> None:
        nonlocal next_index
        while next_index in results:
            result = results.pop(next_index)
            if isinstance(result, str):
                side.append({"index": next_index, "reason": result})
                progress.skipped += 1
            else:
                out_log.append(result)
                progress.done += 1
            next_index += 1
        progress.show()

    failure: BaseException | None = None
    progress.show()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm-job")
    try:
        # A bounded window of requests in flight, so a failure stops the job quickly.
        pending: dict = {}
        queue = iter(todo)
        for i in queue:
            pending[pool.submit(work, i)] = i
            if len(pending) >= 2 * workers:
                break
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                exc = fut.exception()
                if exc is not None:
                    failure = failure or exc
                    stop.set()
                    continue
                result = fut.result()
                if result is not None:
                    results[i] = result
            write_ready()
            if failure is None:
                for i in queue:
                    pending[pool.submit(work, i)] = i
                    if len(pending) >= 2 * workers:
                        break
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    if not quiet:
        print(file=sys.stderr)
    if failure is not None and not isinstance(failure, (LLMError, DataError)):
        raise failure
    return JobResult(progress.done, len(records), progress.skipped, failure)


def rewrite_records(
    records: Sequence[dict],
    *,
    source: str,
    template: str,
    into: str,
    out: str | os.PathLike,
    client: LLMClient,
    cache: ReplyCache | None,
    workers: int = 1,
    quiet: bool = False,
) -> JobResult:
    """One chat request per record, ``template.format(**record)``; the reply goes in ``into``.

    An empty reply leaves the record out (listed in the side file with the reason).
    """
    if not into or not into.strip():
        raise InstructuneError("--into needs a field name")
    check_template(template, records, source)

    def plan(i: int, rec: dict) -> Step:
        return Step(render_template(template, rec, f"{source}: record {i}"))

    def finish(i: int, rec: dict, reply: str) -> dict | str:
        text = reply.strip()
        if not text:
            return "the model's reply was empty"
        return {**rec, into: text}

    return run_record_job(
        records,
        source=source,
        out=out,
        client=client,
        plan=plan,
        finish=finish,
        version=REWRITE_VERSION,
        cache=cache,
        workers=workers,
        quiet=quiet,
    )
