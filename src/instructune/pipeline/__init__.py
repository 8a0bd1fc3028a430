"""The book's chapter 7 as one job: data -> model -> train -> answer the test split -> evaluate.

``run_finetune(cfg)`` writes into ``cfg.out``:

- the model (``save_model``: config.json, model.safetensors, tokenizer files,
  generation_config.json, instructune.json with the prompt format),
- ``metrics.jsonl`` (see ``instructune.training.metrics``), ``loss.png`` and ``loss.pdf``,
- ``responses.json``: the test records, each with ``model_response`` (the book's format),
- ``run.json``: every setting, the model's source and weights, the prompt date, library
  versions, timings, peak memory and the results,
- ``checkpoints/``: training checkpoints (``--resume`` continues from the newest valid one),
- ``scores.json`` and the evaluation report (when the evaluation module is installed).

Modules, one job each:

- ``run_dir``: the run directory (output file names, ``prepare_run_dir``, ``load_run_config``,
  what a resume must keep: ``check_same_batches``, ``prompt_date_of``).
- ``data``: the records' splits and the loop's tokenised data (``load_splits``,
  ``build_loop_data``).
- ``model``: the model to train (``parse_overrides``, ``load_for_training``,
  ``resolve_max_length``, ``resolve_precision``).
- ``outputs``: answering the test split and evaluating the answers (``answer_test_split``,
  ``evaluate_outputs``).
- ``finetune``: ``run_finetune`` itself, as its stages: ``start`` -> ``set_up`` -> ``train`` ->
  ``save`` -> ``answer`` -> ``evaluate``, each a function of the ``Run`` state.
- ``dpo``: ``run_dpo``, preference tuning on the same stages, with preference pairs, the
  reference's cached log-probabilities and the DPO objective handed to them.

Importing this package does not import torch; each job imports it when it runs.
"""

from __future__ import annotations

from instructune.pipeline.data import build_loop_data, load_splits
from instructune.pipeline.dpo import run_dpo
from instructune.pipeline.finetune import loop_settings, run_finetune
from instructune.pipeline.model import (
    load_for_training,
    parse_overrides,
    resolve_max_length,
    resolve_precision,
)
from instructune.pipeline.outputs import answer_test_split, evaluate_outputs
from instructune.pipeline.run_dir import (
    METRICS_FILE,
    RESPONSES_FILE,
    RUN_FILE,
    RunDirError,
    check_same_batches,
    load_run_config,
    prepare_run_dir,
    prompt_date_of,
)

__all__ = [
    "METRICS_FILE",
    "RESPONSES_FILE",
    "RUN_FILE",
    "RunDirError",
    "answer_test_split",
    "build_loop_data",
    "check_same_batches",
    "evaluate_outputs",
    "load_for_training",
    "load_run_config",
    "load_splits",
    "loop_settings",
    "parse_overrides",
    "prepare_run_dir",
    "prompt_date_of",
    "resolve_max_length",
    "resolve_precision",
    "run_dpo",
    "run_finetune",
]
