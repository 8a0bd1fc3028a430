"""After training: greedy answers for the test split (responses.json) and their evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from instructune.config import FinetuneConfig
from instructune.errors import InstructuneError
from instructune.pipeline.messages import _warn
from instructune.utils.io import atomic_write_json


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Prompt ids as training saw them: BOS once when the tokenizer adds one (a chat template
    may already have rendered it as text)."""
    from instructune.data.dataset import encode_with_bos

    return encode_with_bos(tokenizer, prompt)


def answer_test_split(
    model,
    tokenizer,
    records: list[dict],
    *,
    style: str,
    prompt_format,
    max_new_tokens: int,
    batch_size: int,
    out_path: Path,
    limit: int | None = None,
    quiet: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Greedy answers for the test records (the book's 7.7), saved as responses.json.

    Returns the records with ``model_response`` and a count of finish reasons
    (``eos``: the model emitted its end token before ``max_new_tokens``).
    """
    from instructune.data.prompts import extract_response, format_prompt
    from instructune.generation import generate

    records = records[:limit] if limit is not None else records
    prompts = [
        prompt_ids(tokenizer, format_prompt(r, style, chat_template=tokenizer.chat_template))
        for r in records
    ]
    results = []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(prompts), desc="answering test split", unit="record", disable=quiet)
    for start in range(0, len(prompts), batch_size):
        results += generate(
            model,
            tokenizer,
            prompts[start : start + batch_size],
            max_new_tokens=max_new_tokens,
            stop_ids=[tokenizer.eos_id],
            stop_strings=prompt_format.stop_strings,
            batch_size=batch_size,
        )
        bar.update(min(batch_size, len(prompts) - start))
    bar.close()
    out = []
    finish: dict[str, int] = {}
    for record, result in zip(records, results, strict=True):
        out.append({**record, "model_response": extract_response(result.text, style)})
        finish[result.finish_reason] = finish.get(result.finish_reason, 0) + 1
    atomic_write_json(out_path, out, indent=4)
    return out, finish


def evaluate_outputs(
    cfg: FinetuneConfig, responses: list[dict], out: Path, say: Callable[[str], None]
) -> dict[str, Any] | None:
    """Text metrics (and the judge when configured) via the evaluation module, if present."""
    if not cfg.evaluate or not responses:
        return None
    try:
        from instructune.evaluation import evaluate_responses
    except ImportError:
        say("evaluation skipped: instructune.evaluation.evaluate_responses is not available")
        return None
    try:
        return evaluate_responses(
            responses, out_dir=out, judge=cfg.judge, url=cfg.judge_url, quiet=cfg.quiet
        )
    except InstructuneError as exc:
        if cfg.judge is None:
            raise
        # The judge is optional: keep the text metrics when it cannot be reached.
        _warn(f"warning: the judge failed ({exc}); scoring with text metrics only")
        return evaluate_responses(responses, out_dir=out, judge=None, quiet=cfg.quiet)
