"""``instructune data``: fetch, validate, split, show and inspect instruction data.

A thin shell over ``instructune.data``; nothing here imports torch or transformers, so every
sub-command starts fast. Library modules are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys

SRC_HELP = "a .json/.jsonl file, an http(s) URL, or a name: book, alpaca, demo"
EPILOG = """\
examples:
  instructune data fetch book                   # download the book's 1,100 records once
  instructune data validate my-data.jsonl --skip-invalid
  instructune data split book --out data/ --seed 1
  instructune data show book 50                 # the book's worked example, exact text
  instructune data show demo 3 --style phi3
  instructune data inspect book --batch-size 8 --max-length 1024

Downloads are cached in ~/.cache/instructune (INSTRUCTUNE_CACHE_DIR overrides it);
INSTRUCTUNE_OFFLINE=1 forbids downloads.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="fetch, validate, split, show and inspect instruction data",
        description="Load, check, split, format and measure instruction data (chapter 7.2-7.4).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=lambda args: _help(parser))
    commands = parser.add_subparsers(dest="data_command", metavar="COMMAND")

    p = commands.add_parser("fetch", help="download a named data set or URL into the cache")
    p.add_argument("name", metavar="NAME", help="book, alpaca, demo, or an http(s) URL")
    p.set_defaults(func=cmd_fetch)

    p = commands.add_parser("validate", help="check every record; list errors and warnings")
    p.add_argument("src", metavar="SRC", help=SRC_HELP)
    p.add_argument("--skip-invalid", action="store_true", help="drop bad records and list them")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=cmd_validate)

    p = commands.add_parser("split", help="write the book's train/test/val split as JSON files")
    p.add_argument("src", metavar="SRC", help=SRC_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="directory for train/test/val.json")
    p.add_argument("--seed", type=int, default=None, help="shuffle with this seed first")
    p.add_argument("--train", type=float, default=0.85, help="train share (default 0.85)")
    p.add_argument("--test", type=float, default=0.10, help="test share (default 0.10)")
    p.add_argument("--skip-invalid", action="store_true", help="drop bad records and list them")
    p.set_defaults(func=cmd_split)

    p = commands.add_parser("show", help="print the exact prompt and response of record N")
    p.add_argument("src", metavar="SRC", help=SRC_HELP)
    p.add_argument("index", metavar="N", type=int, help="record index, from 0 (the book's data[N])")
    _style_args(p)
    p.add_argument("--json", action="store_true", help='print {"prompt", "response"} as JSON')
    p.set_defaults(func=cmd_show)

    p = commands.add_parser("inspect", help="sizes, token lengths, padding share and flags")
    p.add_argument("src", metavar="SRC", help=SRC_HELP)
    _style_args(p)
    p.add_argument(
        "--batch-size", type=_positive, default=8, help="batch size (default 8, the book's)"
    )
    p.add_argument(
        "--max-length", type=_positive, default=1024, help="flag records longer (default 1024)"
    )
    p.add_argument(
        "--split",
        choices=["train", "test", "val", "all"],
        default="train",
        help="split the padding share is measured on (default train)",
    )
    p.add_argument("--seed", type=int, default=123, help="batch shuffle seed (default 123)")
    p.add_argument("--skip-invalid", action="store_true", help="drop bad records and list them")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _style_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--style",
        default="alpaca",
        choices=["alpaca", "phi3", "chat"],
        help="prompt style (default alpaca; chat uses the tokenizer's chat template)",
    )
    p.add_argument(
        "--tokenizer",
        default="gpt2",
        metavar="T",
        help="gpt2 (default), a model directory or a tokenizer.json",
    )


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _print_issues(result, *, quiet: bool = False) -> None:
    if quiet:
        return
    for issue in result.warnings:
        print(f"warning: {issue}", file=sys.stderr)
    for issue in result.skipped:
        print(f"skipped: {issue}", file=sys.stderr)


def _skipped_summary(result) -> str:
    where = result.skipped_locations
    if not where:
        return ""
    shown = ", ".join(where[:20]) + (f", ... ({len(where) - 20} more)" if len(where) > 20 else "")
    return f"; skipped {len(where)} invalid: {shown}"


def cmd_fetch(args) -> int:
    from instructune.data.sources import SOURCES, resolve_source
    from instructune.utils.io import sha256_file

    path = resolve_source(args.name)
    known = SOURCES.get(args.name)
    if known is not None and known.url is None:
        print(f"{args.name} is shipped with instructune: {path}")
    else:
        print(path)
    print(f"sha256 {sha256_file(path)}")
    return 0


def cmd_validate(args) -> int:
    from instructune.data.sources import load_source

    result = load_source(args.src, skip_invalid=args.skip_invalid)
    _print_issues(result, quiet=args.quiet)
    counts = {"duplicates": len(result.duplicates), "conflicts": len(result.conflicts)}
    print(
        f"{result.source}: {len(result)} valid records, {len(result.warnings)} warnings "
        f"({counts['duplicates']} duplicates, {counts['conflicts']} conflicting outputs)"
        f"{_skipped_summary(result)}"
    )
    return 0


def cmd_split(args) -> int:
    from pathlib import Path

    from instructune.data.records import split_records
    from instructune.data.sources import load_source
    from instructune.errors import DataError
    from instructune.utils.io import atomic_write_json

    result = load_source(args.src, skip_invalid=args.skip_invalid)
    _print_issues(result)
    try:
        parts = split_records(result, train=args.train, test=args.test, shuffle_seed=args.seed)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    out = Path(args.out)
    for name, part in zip(("train", "test", "val"), parts, strict=True):
        atomic_write_json(out / f"{name}.json", part, indent=4)
    sizes = " / ".join(str(len(p)) for p in parts)
    print(f"wrote {out}/train.json, test.json, val.json: {sizes} records{_skipped_summary(result)}")
    return 0


def _tokenizer_and_template(args):
    from instructune.tokenization import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if args.style == "chat" and not tokenizer.chat_template:
        from instructune.errors import DataError

        raise DataError(
            f"--style chat needs a tokenizer with a chat template, and {tokenizer.name} has "
            "none; pass --tokenizer MODEL_DIR (or tokenizer.json), or use --style alpaca"
        )
    return tokenizer, tokenizer.chat_template


def _system_turn_notice(records, style: str) -> None:
    """On stderr: how many records lose their system turn to ``style`` (nothing if none)."""
    from instructune.data.prompts import system_turn_notice

    notice = system_turn_notice(records, style)
    if notice is not None:
        print(notice, file=sys.stderr)


def cmd_show(args) -> int:
    from instructune.data.prompts import format_example
    from instructune.data.sources import load_source
    from instructune.errors import DataError

    records = load_source(args.src)
    if not -len(records) <= args.index < len(records):
        raise DataError(
            f"{records.source}: no record {args.index}; it has {len(records)} (0 to {len(records) - 1})"
        )
    template = _tokenizer_and_template(args)[1] if args.style == "chat" else None
    prompt, response = format_example(records[args.index], args.style, chat_template=template)
    _system_turn_notice([records[args.index]], args.style)
    if args.json:
        print(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False, indent=2))
        return 0
    where = records.locations[args.index]
    print(f"=== {records.source}: {where} of {len(records)}, style {args.style} ===")
    print("--- prompt ---")
    sys.stdout.write(prompt if prompt.endswith("\n") else prompt + "\n")
    print("--- response ---")
    print(response)
    print("--- end ---")
    return 0


def cmd_inspect(args) -> int:
    from instructune.data.inspection import format_report, inspect_records
    from instructune.data.sources import load_source

    records = load_source(args.src, skip_invalid=args.skip_invalid)
    tokenizer, _ = _tokenizer_and_template(args)
    _system_turn_notice(records, args.style)
    report = inspect_records(
        records,
        tokenizer,
        style=args.style,
        batch_size=args.batch_size,
        max_length=args.max_length,
        split=args.split,
        seed=args.seed,
        source=str(records.source),
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    return 0
