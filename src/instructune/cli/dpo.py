"""``instructune dpo``: a thin shell over ``instructune.pipeline.dpo.run_dpo``.

The settings work as ``finetune``'s (the same flags, built from the fields of
:class:`instructune.config.DpoConfig`, plus ``--beta``): the ``dpo`` preset (the book's DPO
notebook), then ``--config FILE.yaml``, then the flags given; ``--resume DIR`` continues a run
with its own settings. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse

from instructune.cli.finetune import _FinetuneParser, add_run_options


def register(subparsers) -> None:
    """Add the ``dpo`` sub-command to ``instructune``'s parser."""
    p = subparsers.add_parser(
        "dpo",
        help="align an instruction-tuned model with preference data (DPO, the book's ch. 7 bonus)",
        description=(
            "Direct Preference Optimization: train a model so that it prefers each record's "
            "`chosen` response to its `rejected` one, against the starting model as the "
            "reference (its log-probabilities computed once and cached in the run directory). "
            "Then answer the test split with the DPO model and the starting model, score both "
            "and compare them. Precedence: --preset < --config FILE.yaml < flags; the defaults "
            "shown are the dpo preset's (the book's notebook: lr 5e-6, weight decay 0.01, "
            "batch 8, 1 epoch, beta 0.1)."
        ),
    )
    p.__class__ = _FinetuneParser  # defers adding the settings' flags (see cli.finetune)
    p.job = "dpo"
    add_run_options(
        p,
        presets=["dpo"],
        preset_help="named settings: dpo (the book's notebook) (default)",
        resume_help="continue the run in DIR from its last checkpoint (the reference "
        "log-probabilities are read back); a larger --epochs or --max-steps extends it",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Resolve the settings, then run (or print) the DPO job; returns the exit code."""
    from instructune.cli.finetune import run_job
    from instructune.config import DpoConfig
    from instructune.pipeline.dpo import run_dpo

    summary = run_job(args, "dpo", DpoConfig, run_dpo)
    if summary is None:
        return 130
    if not summary["quiet"]:
        if summary.get("val_loss") is not None:
            print(f"final validation loss {summary['val_loss']:.4f}")
        if summary.get("val_margin") is not None:
            start = summary.get("val_margin_start")
            first = "" if start is None else f" (from {start:.3f})"
            print(f"final validation reward margin {summary['val_margin']:.3f}{first}")
    return 0
