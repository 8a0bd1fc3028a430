"""Judging many prompts: one retry for an unusable reply, the cache, and a bounded thread pool.

Each distinct prompt is sent once (identical records share one judgement), prompts already in the
cache are not sent at all, and each new judgement is appended to the cache by the worker that
got it, the moment it arrives: so a run stopped by Ctrl-C, a crash or a judge that went away
resumes where it stopped, and nothing is counted twice.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

from instructune.evaluation.cache import Judgement, JudgementCache, judgement_key, sha256_text
from instructune.evaluation.prompt import PROMPT_VERSION, parse_score, retry_prompt
from instructune.llm.client import LLMClient, LLMError


def judge_one(client: LLMClient, prompt: str) -> Judgement:
    """Ask once; when the reply holds no score from 0 to 100, ask once more, more firmly."""
    reply = client.chat(prompt)
    score = parse_score(reply)
    if score is not None:
        return Judgement(score=score, replies=[reply])
    second = client.chat(retry_prompt(prompt))
    return Judgement(score=parse_score(second), replies=[reply, second])


@dataclass
class JudgeStats:
    """How a batch of prompts was served: from the cache or by asking the judge."""

    prompts: int = 0  # distinct prompts
    cached: int = 0  # of those, already in the cache
    requested: int = 0  # judged in this run


def prompt_key(client: LLMClient, prompt: str) -> str:
    """The cache key of ``prompt`` for this client (call after ``client.probe()``)."""
    return judgement_key(
        backend=client.spec.backend,
        model=client.spec.model,
        digest=client.info.digest,
        options=client.options,
        prompt_version=PROMPT_VERSION,
        prompt=prompt,
    )


def judge_prompts(
    client: LLMClient,
    prompts: Sequence[str],
    cache: JudgementCache,
    *,
    workers: int = 1,
    quiet: bool = False,
) -> tuple[dict[str, Judgement], JudgeStats]:
    """Judge every prompt (serving the cache first); return ``{prompt: judgement}`` and stats.

    Raises:
        LLMError: when the judge stays unreachable or refuses; every judgement received
            before that is in the cache, so running again resumes.
    """
    if workers < 1:
        raise LLMError(f"--workers must be at least 1 (got {workers})")
    keys: dict[str, str] = {}
    for prompt in prompts:
        if prompt not in keys:
            keys[prompt] = prompt_key(client, prompt)
    stats = JudgeStats(prompts=len(keys))
    results: dict[str, Judgement] = {}
    todo: list[str] = []
    for prompt, key in keys.items():
        hit = cache.get(key)
        if hit is not None:
            results[prompt] = hit
            stats.cached += 1
        else:
            todo.append(prompt)
    if not todo:
        return results, stats

    stop = threading.Event()  # set by the first failure: queued prompts are not sent

    def work(prompt: str) -> Judgement | None:
        if stop.is_set():
            return None
        try:
            judgement = judge_one(client, prompt)
        except BaseException:
            stop.set()
            raise
        # Written by the worker itself, so a judgement that arrives while the main thread is
        # being interrupted still reaches the cache.
        cache.put(
            keys[prompt],
            judgement,
            judge=client.spec.label,
            digest=client.info.digest,
            prompt_version=PROMPT_VERSION,
            prompt_sha256=sha256_text(prompt),
        )
        return judgement

    progress = _progress(len(todo), quiet, client.spec.label)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
    futures = {pool.submit(work, p): p for p in todo}
    pending = set(futures)
    failure: BaseException | None = None
    try:
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                exc = fut.exception()
                if exc is not None:
                    failure = failure or exc
                    continue
                judgement = fut.result()
                if judgement is None:
                    continue  # skipped after a failure elsewhere
                results[futures[fut]] = judgement
                stats.requested += 1
                progress.update(1)
            if failure is not None:
                # Stop sending new prompts; let those in flight finish (they land in the cache).
                for fut in pending:
                    fut.cancel()
                wait(pending)
                for fut in pending:
                    if not fut.cancelled() and fut.exception() is None and fut.result():
                        stats.requested += 1
                break
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
        progress.close()
        raise
    pool.shutdown(wait=True)
    progress.close()
    if failure is not None:
        if isinstance(failure, LLMError):
            raise type(failure)(
                f"{failure} (the {stats.requested} judgements received before that are saved "
                f"in {cache.path}; run the same command again to resume)"
            ) from failure
        raise failure
    return results, stats


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, quiet: bool, label: str):
    if quiet:
        return _NoProgress()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but the judge can run without a progress bar
        return _NoProgress()
    return tqdm(total=total, desc=f"judging with {label}", unit="prompt", file=sys.stderr)
