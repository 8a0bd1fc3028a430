"""After training: greedy answers for the test split (responses.json) and their evaluation.

Both the test split and the per-epoch sample are answered by ``generation.answer_records``,
the one answering loop, so a run killed while answering resumes its answers.

``responses.json`` keeps the book's format (each test record plus ``model_response``). What a
resume needs beyond it lives in a side file beside it, ``responses.state.json``:

- ``model`` and ``records``: digests of the weights that wrote the answers and of the records
  answered. Answers written by other weights (a run extended with more epochs, say) or for
  other records (another ``--test-limit``) are not kept: every record is answered again.
- ``finish_reasons``: ``{record index: [finish reason, model_response]}``, so the count of
  finish reasons covers kept answers too. The side file is written before each batch's answers
  reach responses.json, so it is never behind them; an entry counts only while its response
  matches the one in responses.json (else the answer counts as ``unknown``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructune.config import FinetuneConfig
from instructune.errors import InstructuneError
from instructune.pipeline.messages import _warn
from instructune.utils.io import atomic_write_json

if TYPE_CHECKING:
    import torch

    from instructune.checkpoints.load import LoadedModel
    from instructune.generation import GenerationResult

RESPONSE_KEY = "model_response"


def answering_state_path(out_path: Path) -> Path:
    """The side file beside ``out_path`` that lets an interrupted answering run resume."""
    return out_path.with_name(f"{out_path.stem}.state.json")


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short digest of the model's weights: each tensor's shape and float64 sum.

    Cheap (one pass over the weights, no copy to the CPU) and, for weights that any training
    step changed, different. A false mismatch only costs answering again.
    """
    import torch

    digest = hashlib.sha256()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                # MPS has no float64; there a float32 sum still changes when training does.
                wide = torch.float32 if tensor.device.type == "mps" else torch.float64
                total = float(tensor.detach().sum(dtype=wide))
                digest.update(f"{tuple(tensor.shape)}:{total!r};".encode())
    return digest.hexdigest()[:16]


def records_digest(records: list[dict]) -> str:
    """A short digest of the records to answer (any answers they carry left out)."""
    bare = [{k: v for k, v in r.items() if k != RESPONSE_KEY} for r in records]
    text = json.dumps(bare, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_state(path: Path, identity: dict[str, str]) -> dict[str, list[str]] | None:
    """The saved finish reasons when ``path`` was written for ``identity`` (the weights and
    records), else None."""
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in identity.items()):
        return None
    reasons = state.get("finish_reasons")
    return reasons if isinstance(reasons, dict) else None


def answer_test_split(
    loaded: LoadedModel,
    records: list[dict],
    *,
    style: str,
    max_new_tokens: int,
    batch_size: int,
    out_path: Path,
    limit: int | None = None,
    quiet: bool = False,
) -> tuple[list[dict], dict[str, int]]:
    """Greedy answers for the test records (the book's 7.7), saved as ``out_path``.

    Resumable: answers already in ``out_path`` from the same weights, for the same records, are
    kept and only the rest generated (see the module docstring for the side file).
    When ``loaded.prompt_format`` is None (a base model being fine-tuned), the stop strings are
    ``style``'s and the end token the tokenizer's.

    Returns:
        The records with ``model_response``, and a count of finish reasons (``eos``: the model
        emitted its end token; ``stop``: a stop string; ``length``: ``max_new_tokens`` ran out).
    """
    from instructune.generation import answer_records

    records = records[:limit] if limit is not None else records
    out_path = Path(out_path)
    state_path = answering_state_path(out_path)
    identity = {"model": model_fingerprint(loaded.model), "records": records_digest(records)}
    reasons = _read_state(state_path, identity)
    if reasons is None:
        # No state for these weights and records: answers in out_path (if any) were written by
        # other weights (a run trained further) or for other records (another --test-limit).
        reasons = {}
        if out_path.exists():
            out_path.unlink()
            if not quiet:
                _warn(
                    f"{out_path} was written by other weights or for other records; "
                    f"answering every record again"
                )

    def save_reasons(batch: dict[int, GenerationResult]) -> None:
        from instructune.data.prompts import extract_response

        for i, result in batch.items():
            reasons[str(i)] = [result.finish_reason, extract_response(result.text, style)]
        atomic_write_json(state_path, {**identity, "finish_reasons": reasons})

    answered = answer_records(
        loaded,
        records,
        style=style,
        out_path=out_path,
        response_key=RESPONSE_KEY,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=not quiet,
        desc="answering test split",
        on_answered=save_reasons,
    )
    finish: dict[str, int] = {}
    for i, record in enumerate(answered):
        saved = reasons.get(str(i))
        ok = isinstance(saved, list) and len(saved) == 2 and saved[1] == record[RESPONSE_KEY]
        reason = saved[0] if ok else "unknown"
        finish[reason] = finish.get(reason, 0) + 1
    return answered, finish


def sample_answer(loaded: LoadedModel, record: dict, *, style: str, max_new_tokens: int) -> str:
    """The model's greedy answer to one record (the per-epoch sample), by ``answer_records``."""
    from instructune.generation import answer_records

    (answered,) = answer_records(
        loaded,
        [record],
        style=style,
        response_key=RESPONSE_KEY,
        max_new_tokens=max_new_tokens,
        batch_size=1,
        progress=False,
    )
    return answered[RESPONSE_KEY]


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
