"""``run_dpo(cfg)``: preference tuning with DPO, on the fine-tuning job's stages.

    start -> set_up (preference data, reference log-probs) -> train -> save -> answer
    -> answer as the reference -> evaluate both -> compare

The stages are ``pipeline.finetune``'s (the same run directory, loop, checkpoints, resume,
metrics and torchrun); what differs is handed to them: the records (preference pairs), the
loop's data (``PairItem`` batches with the reference's log-probabilities) and the objective
(``training.dpo.DpoObjective``).

The reference is the starting model. Its log-probabilities of every training and validation
pair are computed once, before the first step (eval mode, the run's precision), and cached in
``reference-logprobs.safetensors`` under a key of the starting weights, the records, the
prompt style and the max length: no second model is kept, and a resumed run reads them back.
With ``--lora-rank`` the starting model is the same weights with the new adapter switched
off (``lora_disabled``), so the reference needs no copy either.

After training, the test split is answered by the DPO model (``responses.json``) and by the
starting model (``responses-reference.json``); each is scored into ``eval/`` and
``eval-reference/``, and ``compare.json`` / ``compare.txt`` compare them (A = reference,
B = DPO), as ``instructune evaluate --compare`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructune.config import DpoConfig
from instructune.pipeline.data import batched_loop_data
from instructune.pipeline.finetune import (
    Run,
    answer,
    answer_in_dtype,
    answer_test_split_as,
    finish,
    save,
    set_up,
    start,
    train,
)
from instructune.pipeline.messages import _warn
from instructune.pipeline.outputs import (
    evaluate_outputs,
    model_fingerprint,
    records_digest,
)
from instructune.pipeline.run_dir import METRICS_FILE
from instructune.utils.io import atomic_write_json, atomic_write_text

if TYPE_CHECKING:
    from instructune.training.loop import LoopData

REFERENCE_FILE = "reference-logprobs.safetensors"
REFERENCE_RESPONSES_FILE = "responses-reference.json"
EVAL_DIR = "eval"
EVAL_REFERENCE_DIR = "eval-reference"
COMPARE_JSON = "compare.json"
COMPARE_TEXT = "compare.txt"


def run_dpo(
    cfg: DpoConfig, *, resume: bool = False, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the DPO job into ``cfg.out`` and return its summary (also in run.json).

    ``resume=True`` continues the run in ``cfg.out`` from its newest valid checkpoint (the
    reference log-probabilities read back from their cache). Raises as ``run_finetune``.
    """
    from instructune.data.prompts import use_prompt_date
    from instructune.training.dpo import DpoObjective

    if not isinstance(cfg, DpoConfig):
        cfg = DpoConfig.from_dict(cfg.to_dict())
    run = start(cfg, resume=resume, log=log)
    run.objective = DpoObjective(cfg.beta)
    with use_prompt_date(run.prompt_date):
        set_up(run, load_data=load_preference_splits, make_data=build_dpo_data)
        summary = train(run)
        if not run.info.is_main:
            return summary
        save(run)
        summary.update(_margins(run))
        responses = answer(run, summary)
        reference = answer_as_reference(run)
        evaluate_both(run, summary, responses, reference)
        finish(run, summary)
    return summary


# ------------------------------------------------------------------------------ data


def load_preference_source(source: str) -> list[dict]:
    """Validated preference records of a file, URL or ``preference`` (the book's data, a
    named source); errors name the file, the record and the field."""
    from instructune.data.records import load_preference_records
    from instructune.data.sources import resolve_source

    records = load_preference_records(resolve_source(source))
    for issue in getattr(records, "warnings", []):
        _warn(f"warning: {issue}")
    return list(records)


def load_preference_splits(cfg: DpoConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, val, test) preference records: the book's 85/10/5 split, or separate files.

    A test record without ``output`` is scored against its ``chosen`` response.
    """
    from instructune.data.records import split_records

    if cfg.val_data is None and cfg.test_data is None:
        records = load_preference_source(cfg.data)
        train_records, test, val = split_records(records, shuffle_seed=cfg.split_shuffle_seed)
    else:
        train_records = load_preference_source(cfg.data)
        val = load_preference_source(cfg.val_data) if cfg.val_data else []
        test = load_preference_source(cfg.test_data) if cfg.test_data else []
    test = [{**r, "output": r.get("output") or r["chosen"]} for r in test]
    return list(train_records), list(val), test


def reference_key(run: Run, max_length: int) -> str:
    """What the cached reference log-probabilities depend on: the starting weights, the
    records, and how they are tokenised and computed."""
    parts = [
        model_fingerprint(run.loaded.model),
        records_digest(run.train_records),
        records_digest(run.val_records),
        run.style,
        str(max_length),
        run.precision,
    ]
    system_prompt = run.loaded.prompt_format.system_prompt
    if system_prompt is not None:  # (absent otherwise: earlier caches keep their keys)
        parts.append("system_prompt:" + system_prompt)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _fresh_adapter(run: Run) -> bool:
    """True when the run put a new LoRA adapter on its model (the reference is then the model
    with it switched off); a model loaded as an adapter is its own reference, adapter on."""
    from instructune.checkpoints.adapter import is_adapter_dir

    return run.lora_base is not None and not is_adapter_dir(run.cfg.model)


def _as_reference(run: Run):
    """The context in which ``run.loaded.model`` is the starting model."""
    if _fresh_adapter(run):
        from instructune.models.lora import lora_disabled

        return lora_disabled(run.loaded.model)
    return contextlib.nullcontext()


def build_dpo_data(run: Run, max_length: int) -> LoopData:
    """Tokenise the pairs once, get the reference's log-probabilities (from the cache, or
    computed on the main process and cached), and describe the batches for the loop."""
    from functools import partial

    from instructune.data.collate import collate_pairs
    from instructune.data.dataset import tokenize_pair
    from instructune.training import distributed as dist
    from instructune.training.dpo import (
        PairItem,
        collate_dpo,
        load_reference_logprobs,
        reference_logprobs,
        save_reference_logprobs,
    )
    from instructune.training.loop import autocast_context

    cfg, info, tokenizer = run.cfg, run.info, run.loaded.tokenizer
    system_prompt = run.loaded.prompt_format.system_prompt
    train_pairs, val_pairs = (
        [tokenize_pair(r, tokenizer, run.style, system_prompt=system_prompt) for r in records]
        for records in (run.train_records, run.val_records)
    )
    pairs = train_pairs + val_pairs
    key = reference_key(run, max_length)
    path = run.out / REFERENCE_FILE
    t0 = time.perf_counter()
    cached = load_reference_logprobs(path, key=key) if info.is_main else None
    reused = cached is not None
    if info.is_main and cached is None:
        sides = partial(collate_pairs, pad_id=tokenizer.pad_id, max_length=max_length)
        # Each split in its own batches of batch_size, in file order: the validation ones are
        # then the evaluation's own batches, so its step-0 margins are exactly 0.
        size = cfg.batch_size
        chunks = [part[i : i + size] for part in (train_pairs, val_pairs)
                  for i in range(0, len(part), size)]  # fmt: skip
        with _as_reference(run), autocast_context(run.device, run.precision):
            cached = reference_logprobs(run.loaded.model, (sides(c) for c in chunks))
        save_reference_logprobs(path, *cached, key=key)
    dist.barrier(info)
    if cached is None:  # another process: the main one has written them
        cached = load_reference_logprobs(path, key=key)
        if cached is None:
            raise RuntimeError(f"{path}: the main process wrote no reference log-probabilities")
    seconds = time.perf_counter() - t0
    run.say(
        f"reference log-probabilities of {len(pairs)} pairs "
        + ("read from " if reused else "computed and saved in ")
        + f"{path.name} ({seconds:.1f} s)"
    )
    run.job_info["reference"] = {"file": REFERENCE_FILE, "key": key, "reused": reused}
    run.timings["reference_s"] = seconds
    chosen, rejected = (t.tolist() for t in cached)
    items = [PairItem(c, r, chosen[i], rejected[i]) for i, (c, r) in enumerate(pairs)]
    train_items, val_items = items[: len(train_pairs)], items[len(train_pairs) :]
    collate = partial(collate_dpo, pad_id=tokenizer.pad_id, max_length=max_length)
    return batched_loop_data(cfg, train_items, val_items, collate, info.world_size)


# ------------------------------------------------------------------------------ after training


def _margins(run: Run) -> dict[str, Any]:
    """The margin plot, and the first and last evaluations' margins and accuracies."""
    from instructune.training.metrics import read_metrics
    from instructune.training.plots import plot_losses

    records = read_metrics(run.out / METRICS_FILE)
    plot_losses(records, run.out, name="margin", measure="margin", label="Reward margin")
    evals = [r for r in records if r.get("kind") == "eval" and "val_margin" in r]
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    out = {}
    for name in ("margin", "accuracy", "chosen_reward", "rejected_reward"):
        out[f"train_{name}"] = last.get(f"train_{name}")
        out[f"val_{name}"] = last.get(f"val_{name}")
    out["val_margin_start"] = first.get("val_margin")
    out["val_margin_start_step"] = first.get("step")
    return out


def answer_as_reference(run: Run) -> list[dict]:
    """The starting model's answers to the test split (``responses-reference.json``).

    With a new adapter: the trained model with it switched off. Otherwise the starting model
    is loaded again, as ``set_up`` loaded it; a changed digest is reported.
    """
    from instructune.pipeline.model import load_for_training
    from instructune.training.state import seed_everything

    limit = run.cfg.test_limit
    if not run.test_records[:limit]:  # nothing to answer: no second load of the model
        return []
    t0 = time.perf_counter()
    if _fresh_adapter(run):
        loaded, context = run.loaded, _as_reference(run)
    else:
        seed_everything(run.cfg.seed)
        start_model = load_for_training(run.cfg, run.device)
        loaded = dataclasses.replace(start_model, prompt_format=run.loaded.prompt_format)
        context = contextlib.nullcontext()
    answer_in_dtype(run, loaded.model)  # as the DPO model's answers
    with context:
        responses, _ = answer_test_split_as(run, loaded, REFERENCE_RESPONSES_FILE)
    run.timings["generate_reference_s"] = time.perf_counter() - t0
    return responses


def evaluate_both(
    run: Run, summary: dict[str, Any], responses: list[dict], reference: list[dict]
) -> None:
    """Score both sets of answers into their folders and compare them (A = reference)."""
    from instructune.evaluation import compare_runs, format_comparison

    t0 = time.perf_counter()
    ev = evaluate_outputs(run.cfg, responses, run.out / EVAL_DIR, run.say)
    ev_ref = evaluate_outputs(run.cfg, reference, run.out / EVAL_REFERENCE_DIR, run.say)
    summary["evaluation"], summary["evaluation_reference"] = ev, ev_ref
    if ev and ev_ref:
        cmp = compare_runs(Path(ev_ref["scores_json"]), Path(ev["scores_json"]))
        atomic_write_json(run.out / COMPARE_JSON, cmp)
        text = format_comparison(cmp)
        atomic_write_text(run.out / COMPARE_TEXT, text + "\n")
        summary["compare"] = {
            "measure": cmp["measure"],
            "pairs": [
                {k: p[k] for k in ("mean_a", "mean_b", "mean_diff", "wins", "ties", "losses")}
                for p in cmp["pairs"]
            ],
        }
        run.say("the DPO model (B) against the starting model (A):\n" + text)
    run.timings["evaluate_s"] = time.perf_counter() - t0
