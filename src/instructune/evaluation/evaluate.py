"""``evaluate_responses``: text metrics for every response, the judge when asked, the files."""

from __future__ import annotations

import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from instructune.errors import DataError, InstructuneError
from instructune.evaluation.cache import JudgementCache
from instructune.evaluation.embedding import embedding_similarity
from instructune.evaluation.judge import judge_prompts
from instructune.evaluation.prompt import (
    BOOK_OPTIONS,
    PROMPT_VERSION,
    SCORE_SCHEMA,
    build_judge_prompt,
    estimate_tokens,
)
from instructune.evaluation.report import (
    SCORES_FORMAT,
    format_summary,
    lowest,
    record_id,
    summarize_key,
    write_outputs,
)
from instructune.evaluation.textmetrics import NORMALISATION, text_metrics
from instructune.llm.client import LLMError, make_client, parse_llm

CACHE_NAME = "judge-cache.jsonl"


def load_responses(path: str | Path) -> list[dict]:
    """Records with responses from a JSON list (or JSON Lines) file, with clear errors."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InstructuneError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InstructuneError(f"{path}: cannot read it ({exc})") from None
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}: line {number}: not JSON ({exc.msg})") from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _check_records(records: Sequence, keys: Sequence[str], where: str) -> None:
    if not keys:
        raise InstructuneError("no response keys to score (give at least one --response-key)")
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: record {i}: expected an object, got {type(rec).__name__}")
        for name in ("instruction", "output", *keys):
            if name not in rec:
                hint = ""
                if name in keys:
                    found = [k for k in rec if "response" in k.lower()]
                    hint = f" (response-like fields here: {found}; pick one with --response-key)"
                raise DataError(f"{where}: record {i}: field {name!r} is missing{hint}")
            if not isinstance(rec[name], str):
                raise DataError(
                    f"{where}: record {i}: field {name!r} must be text, "
                    f"got {type(rec[name]).__name__}"
                )
        if rec.get("input") is not None and not isinstance(rec["input"], str):
            raise DataError(f"{where}: record {i}: field 'input' must be text")


def _warn(message: str, warnings_out: list[str], quiet: bool) -> None:
    warnings_out.append(message)
    if not quiet:
        print(f"warning: {message}", file=sys.stderr)


def evaluate_responses(
    records: list[dict],
    *,
    out_dir: str | Path,
    response_keys: Sequence[str] = ("model_response",),
    judge: str | None = None,
    url: str | None = None,
    workers: int = 1,
    structured: bool = False,
    cache_path: str | Path | None = None,
    timeout: float = 120.0,
    quiet: bool = False,
    source: str | None = None,
    stream: bool = True,
    retries: int = 4,
    backoff: float = 1.0,
    embeddings: bool = True,
    histogram: bool = True,
    judge_optional: bool = False,
) -> dict:
    """Score each record's responses and write ``scores.json``, ``report.md`` and the histogram.

    The judge-free metrics (exact match, token F1, ROUGE-L, length ratio, and embedding
    similarity when a local model is installed) are always computed. With ``judge``
    (``"ollama:MODEL"`` or ``"openai:MODEL"``) each non-empty response is also scored 0-100 with
    the book's prompt (empty responses score 0 without asking, as in the book); judgements are
    cached in ``cache_path`` (default ``out_dir/judge-cache.jsonl``), so a re-run resumes.

    Args:
        records: dicts with ``instruction``, ``input`` (optional), ``output`` and each key.
        out_dir: where the files go.
        response_keys: the fields holding responses; each is scored separately.
        source: the file the records came from, named in errors and the report.
        stream: read the judge's answers streamed (the book's way) or in one piece.
        retries, backoff: retry policy for connection errors, time-outs and HTTP 5xx.
        embeddings: try embedding similarity (skipped, with the reason, when unavailable).
        judge_optional: when the judge cannot be reached or fails, warn and write the metrics
            alone instead of raising (what the fine-tuning job wants at its end).

    Returns:
        ``{"scores_json", "files", "judge", "responses": {key: summary}, "warnings"}`` where a
        summary is ``{"n", "metrics": {name: mean}, "judge": None | {"scored", "of", "text"
        ("scored N of M"), "mean", "mean_ci95", "median", "median_ci95", "unscored", "empty"}}``.
    """
    where = source or "records"
    keys = list(dict.fromkeys(response_keys))
    _check_records(records, keys, where)
    warnings_out: list[str] = []
    rows = []
    for i, rec in enumerate(records):
        row = {
            "index": i,
            "id": record_id(rec),
            "instruction": rec["instruction"],
            "input": rec.get("input", "") or "",
            "output": rec["output"],
            "responses": {},
        }
        for key in keys:
            row["responses"][key] = {
                "response": rec[key],
                "metrics": text_metrics(rec[key], rec["output"]),
            }
        rows.append(row)

    emb_info = {"available": False, "model": None, "reason": "skipped: not requested"}
    if embeddings and rows:
        pairs = [(r["responses"][k]["response"], r["output"]) for k in keys for r in rows]
        emb = embedding_similarity([p[0] for p in pairs], [p[1] for p in pairs])
        emb_info = emb.to_dict()
        if emb.similarities is not None:
            it = iter(emb.similarities)
            for key in keys:
                for r in rows:
                    r["responses"][key]["embedding_similarity"] = round(next(it), 4)

    judge_meta = None
    if judge:
        try:
            judge_meta = _run_judge(
                rows,
                keys,
                records,
                judge=judge,
                url=url,
                workers=workers,
                structured=structured,
                cache_path=Path(cache_path) if cache_path else Path(out_dir) / CACHE_NAME,
                timeout=timeout,
                stream=stream,
                retries=retries,
                backoff=backoff,
                quiet=quiet,
                warnings_out=warnings_out,
            )
        except LLMError as exc:
            if not judge_optional:
                raise
            _warn(f"judge skipped, text metrics only: {exc}", warnings_out, quiet)

    from instructune import __version__

    doc = {
        "format": SCORES_FORMAT,
        "source": source,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "instructune_version": __version__,
        "response_keys": keys,
        "judge": judge_meta,
        "metric_notes": {
            "normalisation": NORMALISATION,
            "length_ratio": "response words / reference words (whitespace split)",
        },
        "embedding": emb_info,
        "summary": {k: summarize_key(rows, k, judge_meta is not None) for k in keys},
        "lowest": {k: lowest(rows, k, judge_meta is not None) for k in keys},
        "warnings": warnings_out,
        "records": rows,
    }
    files = write_outputs(doc, out_dir, histogram=histogram)
    if not quiet:
        print(format_summary(doc))
        print("\nwrote " + ", ".join(files.values()))
    return {
        "scores_json": files["scores"],
        "files": files,
        "judge": judge_meta,
        "responses": doc["summary"],
        "warnings": warnings_out,
    }


def _run_judge(
    rows: list[dict],
    keys: list[str],
    records: list[dict],
    *,
    judge: str,
    url: str | None,
    workers: int,
    structured: bool,
    cache_path: Path,
    timeout: float,
    stream: bool,
    retries: int,
    backoff: float,
    quiet: bool,
    warnings_out: list[str],
) -> dict:
    """Judge every non-empty response in place (``row["responses"][key]["judge"]``)."""
    if workers < 1:
        raise InstructuneError(f"--workers must be at least 1 (got {workers})")
    if not timeout > 0:
        raise InstructuneError(f"--timeout must be positive (got {timeout})")
    spec = parse_llm(judge, url, flag="--judge")
    client = make_client(
        spec,
        timeout=timeout,
        retries=retries,
        backoff=backoff,
        stream=stream,
        options=BOOK_OPTIONS,
        schema=SCORE_SCHEMA if structured else None,
        schema_name="judge_score",
    )
    client.probe()
    cache = JudgementCache(cache_path)

    prompts: dict[tuple[int, str], str] = {}
    for row, rec in zip(rows, records, strict=True):
        for key in keys:
            response = rec[key]
            if response.strip():
                prompts[(row["index"], key)] = build_judge_prompt(rec, response)

    if spec.backend == "ollama":
        limit = BOOK_OPTIONS["num_ctx"]
        sizes = [estimate_tokens(p) for p in prompts.values()]
        over = [s for s in sizes if s > limit]
        if over:
            _warn(
                f"{len(over)} of {len(sizes)} judge prompts may be longer than num_ctx={limit} "
                f"tokens (largest about {max(over)}; estimated as the larger of UTF-8 bytes / 4 "
                "and words / 0.75); Ollama cuts such prompts, so their scores are less reliable",
                warnings_out,
                quiet,
            )

    results, stats = judge_prompts(
        client, list(prompts.values()), cache, workers=workers, quiet=quiet
    )
    for row in rows:
        for key in keys:
            entry = row["responses"][key]
            prompt = prompts.get((row["index"], key))
            if prompt is None:
                entry["judge"] = {"score": 0, "status": "empty", "replies": []}
                continue
            j = results[prompt]
            status = "scored" if j.score is not None else "unscored"
            entry["judge"] = {"score": j.score, "status": status, "replies": j.replies}
    return {
        "backend": spec.backend,
        "model": spec.model,
        "url": client.spec.url,
        **client.info.to_dict(),
        "prompt_version": PROMPT_VERSION,
        "options": client.options,
        "structured": structured,
        "stream": stream,
        "workers": workers,
        "cache": str(cache_path),
        "prompts": stats.prompts,
        "from_cache": stats.cached,
        "requested": stats.requested,
    }
