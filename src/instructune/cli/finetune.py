"""``instructune finetune``: a thin shell over ``instructune.pipeline.run_finetune``.

Settings resolve once, here: preset, then ``--config FILE.yaml``, then the flags given. Every
setting of :class:`instructune.config.FinetuneConfig` is a flag built from its field: the
field's description is the help, the help shows the value the ``default`` preset uses, a
boolean gets ``--x/--no-x`` and a setting that may be unset takes ``none``. Nothing heavy is
imported at module level (``instructune --help`` stays torch- and pydantic-free).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

# Flags that may change when resuming a run; everything else comes from its run.json.
# epochs and max_steps may only move the end further: that extends a run (even a finished one).
RESUME_FLAGS = {
    "quiet",
    "threads",
    "device",
    "judge",
    "judge_url",
    "evaluate",
    "epochs",
    "max_steps",
}

# --help headings, each with the first setting under it; settings keep their declared order.
GROUPS = {
    "model": "model and data",
    "epochs": "training",
    "device": "machine",
    "eval_every": "watching and saving",
    "max_new_tokens": "after training",
}
ALIASES = {"split_shuffle_seed": ["--split-seed"]}  # older spellings that keep working
# Value names in --help; other settings show N (integer), X (number) or their own name.
METAVARS = {
    "model": "NAME",
    "model_overrides": "K=V,...",
    "data": "SOURCE",
    "val_data": "FILE",
    "system_prompt": "TEXT",
    "test_data": "FILE",
    "out": "DIR",
    "device": "DEVICE",
    "judge": "PROVIDER:MODEL",
    "judge_url": "URL",
    "lora_targets": "LIST",
}


class _FinetuneParser(argparse.ArgumentParser):
    """The ``finetune`` parser, which adds the settings' flags the first time it is used.

    argparse builds every sub-command's parser for ``instructune --help`` and ``instructune
    data ...``; the flags come from the pydantic model, and importing pydantic there would
    slow every command down for nothing.
    """

    _settings_added = False
    # Which job's settings: "finetune" or "dpo" (a name: the class would import pydantic).
    job = "finetune"

    def _add_settings_once(self) -> None:
        if not self._settings_added:
            self._settings_added = True
            add_setting_flags(self, settings_class(self.job))

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        self._add_settings_once()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._add_settings_once()
        return super().format_usage()

    def format_help(self) -> str:
        self._add_settings_once()
        return super().format_help()


def register(subparsers) -> None:
    """Add the ``finetune`` sub-command to ``instructune``'s parser."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on instruction data (the book's chapter 7, end to end)",
        description=(
            "Fine-tune a pretrained model to follow instructions: split the data, train, "
            "answer the test split, save the model and score the answers. With no flags: the "
            "embedded SmolLM2-135M-Instruct on the shipped demo data, offline. Precedence: "
            "--preset < --config FILE.yaml < flags. The defaults shown are the default "
            "preset's; --print-config shows every value a run would use."
        ),
    )
    # add_parser takes no parser class of its own; this one only defers adding arguments.
    p.__class__ = _FinetuneParser
    add_run_options(
        p,
        presets=["default", "book", "smollm2-book"],  # config.PRESETS (tested), without pydantic
        preset_help="named settings: default (the embedded SmolLM2 on the demo data), book "
        "(the book's gpt2-medium run) or smollm2-book (the embedded model on the book's data, "
        "tuned for quality per second) (default: default)",
        resume_help="continue the run in DIR from its last checkpoint; a larger --epochs or "
        "--max-steps extends it, even when it has finished",
    )
    p.set_defaults(func=run)


def add_run_options(
    p: argparse.ArgumentParser, *, presets: list[str], preset_help: str, resume_help: str
) -> None:
    """The "run" group of a training job: --preset, --config, --print-config, --resume."""
    g = p.add_argument_group("run")
    g.add_argument("--preset", choices=presets, help=preset_help)
    g.add_argument(
        "--config", metavar="FILE.yaml", help="settings file (keys as the flags, with _)"
    )
    g.add_argument(
        "--print-config", action="store_true", help="print the settings as YAML and exit"
    )
    g.add_argument("--resume", metavar="DIR", help=resume_help)


def _value_kind(annotation: Any) -> tuple[type, list[str], bool]:
    """(int|float|str|bool|dict, the Literal's choices, whether None is allowed)."""
    optional = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        (annotation,) = members  # the config's unions are all "X | None"
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Literal:
        return str, [str(c) for c in typing.get_args(annotation)], optional
    return typing.get_origin(annotation) or annotation, [], optional


def _parse_value(kind: type, optional: bool):
    """An argparse ``type`` that reads one value; ``none`` unsets a setting that allows it."""

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        try:
            return kind(text)
        except ValueError:
            expected = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
            if optional:
                expected += " or 'none'"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


def _shown(value: Any) -> str:
    """A default as the user would type it."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None or value == {}:
        return "none"
    return str(value)


def settings_class(job: str) -> type:
    """The settings model of a job: FinetuneConfig, or DpoConfig for ``dpo``."""
    from instructune.config import DpoConfig, FinetuneConfig

    return DpoConfig if job == "dpo" else FinetuneConfig


def add_setting_flags(parser: argparse.ArgumentParser, config_class: type | None = None) -> None:
    """One flag per setting of ``config_class`` (FinetuneConfig when None), grouped as in the
    model, help from its field; the defaults shown are the job's first preset's."""
    from instructune.config import FinetuneConfig, preset, presets_of

    config_class = config_class or FinetuneConfig
    shown = preset(next(iter(presets_of(config_class))), config_class)
    group: Any = parser
    for name, info in config_class.model_fields.items():
        if name in GROUPS:
            group = parser.add_argument_group(GROUPS[name])
        kind, choices, optional = _value_kind(info.annotation)
        flags = ["--" + name.replace("_", "-"), *ALIASES.get(name, [])]
        text = f"{info.description} (default: {_shown(getattr(shown, name))})"
        # SUPPRESS: a flag not given leaves no attribute, so the preset/config value stays.
        common = dict(dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if kind is bool:
            group.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
            continue
        if choices:
            metavar = "{" + ",".join(choices + ["none"] * optional) + "}"
        else:
            metavar = METAVARS.get(name, {int: "N", float: "X"}.get(kind, name.upper()))
        value_type = str if kind is dict else _parse_value(kind, optional)
        group.add_argument(*flags, type=value_type, metavar=metavar, **common)


def _flags(args: argparse.Namespace, config_class: type | None = None) -> dict[str, Any]:
    """The settings given on the command line (and only those)."""
    from instructune.config import FinetuneConfig

    fields = (config_class or FinetuneConfig).model_fields
    flags = {k: v for k, v in vars(args).items() if k in fields}
    if "model_overrides" in flags:
        from instructune.pipeline import parse_overrides

        flags["model_overrides"] = parse_overrides(flags["model_overrides"])
    return flags


def _progress_so_far(run_dir: Path) -> tuple[int, int, int] | None:
    """(steps, full epochs, batches into the next epoch) of the run's newest checkpoint."""
    import json

    from instructune.training.state import STATE_FILE, list_checkpoints

    for path in reversed(list_checkpoints(run_dir)):
        try:
            done = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["progress"]
            return int(done["step"]), int(done["epoch"]), int(done.get("batches_done", 0))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged checkpoint: resume skips it too
    return None


def _check_longer_end(cfg, changes: dict[str, Any], run_dir: Path) -> None:
    """Refuse an --epochs/--max-steps that ends before what the run has already trained."""
    from instructune.config import ConfigError

    done = _progress_so_far(run_dir)
    if done is None:
        return  # nothing trained yet (or no checkpoint): any end is ahead
    step, epoch, batches = done
    max_steps = changes.get("max_steps", cfg.max_steps)
    epochs = changes.get("epochs", cfg.epochs)
    if max_steps is not None:
        if max_steps < step:
            raise ConfigError(
                f"--max-steps {max_steps} is fewer than the {step} steps the run in {run_dir} "
                f"has already done; --resume can only extend a run"
            )
    elif epochs < epoch or (epochs == epoch and batches > 0):
        part = f" and {batches} steps of epoch {epoch + 1}" if batches else ""
        raise ConfigError(
            f"--epochs {epochs} is fewer than the run in {run_dir} has already trained "
            f"({epoch} epochs{part}, {step} steps); --resume can only extend a run"
        )


def _resume_config(
    args: argparse.Namespace, flags: dict[str, Any], config_class: type | None = None
):
    """The run's own settings, with the few flags that may change on --resume applied."""
    from instructune.config import ConfigError, apply_overrides
    from instructune.pipeline import load_run_config

    fixed = sorted(set(flags) - RESUME_FLAGS - {"out"})
    if fixed or args.preset or args.config:
        allowed = ", ".join("--" + f.replace("_", "-") for f in sorted(RESUME_FLAGS))
        got = ", ".join("--" + f.replace("_", "-") for f in fixed) or "--preset/--config"
        raise ConfigError(
            f"--resume continues a run with its own settings; only {allowed} may change (got {got})"
        )
    cfg = load_run_config(args.resume, *([config_class] if config_class else []))
    changes = {k: v for k, v in flags.items() if k != "out"}
    if "epochs" in changes and "max_steps" not in changes and cfg.max_steps is not None:
        # The run stopped at its --max-steps, which overrides --epochs: asking for epochs now
        # means training by epochs, so the step limit goes (said, not done silently).
        print(
            f"note: --epochs {changes['epochs']} replaces the run's --max-steps {cfg.max_steps}",
            file=sys.stderr,
        )
        changes["max_steps"] = None
    if "epochs" in changes or "max_steps" in changes:
        _check_longer_end(cfg, changes, Path(args.resume))
    return apply_overrides(cfg, changes, source="command line")


def run(args: argparse.Namespace) -> int:
    """Resolve the settings, then run (or print) the fine-tuning job; returns the exit code."""
    from instructune.config import FinetuneConfig
    from instructune.pipeline import run_finetune

    summary = run_job(args, "finetune", FinetuneConfig, run_finetune)
    if summary is None:
        return 130
    if summary.get("val_loss") is not None and not summary["quiet"]:
        print(f"final validation loss {summary['val_loss']:.4f}")
    return 0


def run_job(args: argparse.Namespace, job: str, config_class: type, runner) -> dict | None:
    """A training job's settings (resumed, or preset < YAML < flags), then the job: its
    summary (with ``quiet``), {"quiet": True} after --print-config, None when interrupted."""
    from instructune.config import dump_yaml, resolve_config
    from instructune.training.loop import TrainingInterrupted

    flags = _flags(args, config_class)
    if args.resume is not None:
        cfg = _resume_config(args, flags, config_class)
    else:
        cfg = resolve_config(
            preset_name=args.preset, config_file=args.config, flags=flags, config_class=config_class
        )
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return {"quiet": True}
    try:
        summary = runner(cfg, resume=args.resume is not None)
    except TrainingInterrupted:
        print(f"stopped; continue with: instructune {job} --resume {cfg.out}", file=sys.stderr)
        return None
    return {**summary, "quiet": cfg.quiet}
    from instructune.pipeline import run_finetune
    from instructune.training.loop import TrainingInterrupted

    try:
        summary = run_finetune(cfg, resume=args.resume is not None)
    except TrainingInterrupted:
        print(f"stopped; continue with: instructune finetune --resume {cfg.out}", file=sys.stderr)
        return 130
    if summary.get("val_loss") is not None and not cfg.quiet:
        print(f"final validation loss {summary['val_loss']:.4f}")
    return 0
