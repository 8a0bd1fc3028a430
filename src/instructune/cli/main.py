"""The ``instructune`` command: a thin shell that dispatches to one module per sub-command.

Each ``instructune.cli.<name>`` module exposes ``register(subparsers)``, which adds its parser
and sets ``func`` to a function taking the parsed arguments and returning an exit code. Those
modules import nothing heavy at module level, so ``--help`` starts without torch.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from importlib import metadata

import instructune
from instructune.errors import InstructuneError

# Sub-command modules, in the order --help lists them.
COMMANDS = ["data", "finetune", "dpo", "generate", "chat", "serve", "evaluate", "merge", "export"]


def _version_text() -> str:
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = "not installed"
    return (
        f"instructune {instructune.__version__} (torch {torch_version}, "
        f"Python {platform.python_version()}, {platform.platform()})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instructune",
        description="Fine-tune a pretrained GPT-style model to follow instructions.",
    )
    parser.add_argument(
        "--version", action="store_true", help="print the version with torch's and the platform's"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"instructune.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"instructune.cli.{name}":
                continue  # not written yet
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        print(_version_text())
        return 0
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except InstructuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
