"""``instructune finetune``: a thin shell over ``instructune.pipeline.run_finetune``.

Settings resolve once, here: preset, then ``--config FILE.yaml``, then the flags given.
Nothing heavy is imported at module level (``instructune --help`` stays torch-free).
"""

from __future__ import annotations

import argparse
from typing import Any

# Flags that may change when resuming a run; everything else comes from its run.json.
RESUME_FLAGS = {"quiet", "threads", "device", "judge", "judge_url", "evaluate"}


def _add(group, *names: str, **kwargs: Any) -> None:
    kwargs.setdefault("default", None)  # None = not given: the preset/config value stays
    group.add_argument(*names, **kwargs)


def register(subparsers) -> None:
    """Add the ``finetune`` sub-command to ``instructune``'s parser."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on instruction data (the book's chapter 7, end to end)",
        description=(
            "Fine-tune a pretrained model to follow instructions: split the data, train, "
            "answer the test split, save the model and score the answers. With no flags: the "
            "embedded SmolLM2-135M-Instruct on the shipped demo data, offline. Precedence: "
            "--preset < --config FILE.yaml < flags."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("settings")
    _add(g, "--preset", choices=["default", "book"], help="named settings (book: gpt2-medium)")
    _add(g, "--config", metavar="FILE.yaml", help="settings file (keys as the flags, with _)")
    _add(g, "--print-config", action="store_true", help="print the settings as YAML and exit")

    g = p.add_argument_group("model and data")
    _add(g, "--model", help="registry name, hub id, directory, .gguf or smollm2-135m-instruct")
    _add(g, "--init", choices=["pretrained", "random"], help="random: untrained weights")
    _add(g, "--model-overrides", metavar="K=V,...", help="model shape changes (with --init random)")
    _add(g, "--data", help="training data: file, URL, or book / alpaca / demo")
    _add(g, "--val-data", help="separate validation file (then --data is used whole)")
    _add(g, "--test-data", help="separate test file (then --data is used whole)")
    _add(g, "--split-seed", type=int, help="shuffle the records with this seed before the split")
    _add(g, "--out", metavar="DIR", help="output directory")
    _add(g, "--style", choices=["alpaca", "phi3", "chat"], help="prompt style")
    _add(g, "--mask-instructions", action="store_true", help="no loss on the prompt tokens")
    _add(g, "--max-length", type=int, help="truncate sequences to this many tokens")
    _add(g, "--group-by-length", action="store_true", help="batches of similar lengths")

    g = p.add_argument_group("training")
    _add(g, "--epochs", type=int)
    _add(g, "--max-steps", type=int, help="stop after this many optimizer steps")
    _add(g, "--batch-size", type=int, help="records per micro-batch and process")
    _add(g, "--grad-accum", type=int, help="micro-batches per optimizer step")
    _add(g, "--lr", type=float, help="learning rate (AdamW)")
    _add(g, "--lr-schedule", choices=["constant", "cosine"])
    _add(g, "--warmup-steps", type=int)
    _add(g, "--weight-decay", type=float)
    _add(g, "--grad-clip", type=float, help="clip the gradient norm to this value")
    _add(g, "--precision", choices=["auto", "fp32", "bf16", "fp16"])
    _add(g, "--activation-checkpointing", action="store_true", help="recompute activations")
    _add(
        g,
        "--optimizer-in-backward",
        action="store_true",
        help="update each weight as its gradient is ready (less memory; no --grad-accum)",
    )
    _add(g, "--compile", action="store_true", help="torch.compile the model")
    _add(g, "--seed", type=int)
    _add(g, "--device", help="auto, cpu, cuda, mps")
    _add(g, "--threads", type=int, help="CPU threads (torch.set_num_threads)")

    g = p.add_argument_group("watching, saving, resuming")
    _add(g, "--eval-every", type=int, help="optimizer steps between loss evaluations")
    _add(g, "--eval-batches", type=int, help="batches per loss evaluation")
    _add(g, "--checkpoint-every", type=int, help="optimizer steps between checkpoints")
    _add(g, "--keep", type=int, help="checkpoints to keep (plus the best)")
    _add(g, "--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    _add(g, "--overwrite", action="store_true", help="replace an existing run in --out")
    _add(g, "--quiet", action="store_true", help="no progress bars; log lines only")

    g = p.add_argument_group("after training")
    _add(g, "--max-new-tokens", type=int, help="longest answer for the test split")
    _add(g, "--gen-batch-size", type=int, help="prompts answered together")
    _add(g, "--test-limit", type=int, help="answer only the first N test records")
    _add(g, "--no-evaluate", dest="evaluate", action="store_false", help="skip scoring")
    _add(g, "--judge", help="ollama:MODEL or openai:MODEL to score the answers")
    _add(g, "--judge-url", help="the judge server's URL")
    p.set_defaults(func=run)


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    skip = {"command", "func", "preset", "config", "print_config", "resume", "version"}
    flags = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    if "split_seed" in flags:
        flags["split_shuffle_seed"] = flags.pop("split_seed")
    if "model_overrides" in flags:
        from instructune.pipeline import parse_overrides

        flags["model_overrides"] = parse_overrides(flags["model_overrides"])
    return flags


def run(args: argparse.Namespace) -> int:
    from instructune.config import ConfigError, apply_overrides, dump_yaml, resolve_config

    flags = _flags(args)
    if args.resume is not None:
        from instructune.pipeline import load_run_config

        fixed = sorted(set(flags) - RESUME_FLAGS - {"out"})
        if fixed or args.preset or args.config:
            allowed = ", ".join("--" + f.replace("_", "-") for f in sorted(RESUME_FLAGS))
            got = ", ".join("--" + f.replace("_", "-") for f in fixed) or "--preset/--config"
            raise ConfigError(
                f"--resume continues a run with its own settings; only {allowed} may change "
                f"(got {got})"
            )
        cfg = load_run_config(args.resume)
        cfg = apply_overrides(cfg, {k: v for k, v in flags.items() if k != "out"})
    else:
        cfg = resolve_config(preset_name=args.preset, config_file=args.config, flags=flags)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    from instructune.pipeline import run_finetune
    from instructune.training.loop import TrainingInterrupted

    try:
        summary = run_finetune(cfg, resume=args.resume is not None)
    except TrainingInterrupted:
        import sys

        print(f"stopped; continue with: instructune finetune --resume {cfg.out}", file=sys.stderr)
        return 130
    if summary.get("val_loss") is not None and not cfg.quiet:
        print(f"final validation loss {summary['val_loss']:.4f}")
    return 0
