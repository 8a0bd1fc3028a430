"""``instructune data``: fetch, validate, split, show and inspect instruction data; find near
duplicates (``dedup``); make data with an LLM (``generate``, ``rewrite``, ``prefer``).

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
  instructune data inspect chats.jsonl --style chat --tokenizer MODEL_DIR --tokens 0
  instructune data dedup book --key output --out book-dedup.json
  instructune data generate --llm ollama:llama3 --n 100 --out magpie.jsonl
  instructune data rewrite book --llm ollama:llama3 --prompt passive-voice --into passive \
      --out passive.jsonl
  instructune data prefer book --llm ollama:llama3 --out preference.jsonl

Downloads are cached in ~/.cache/instructune (INSTRUCTUNE_CACHE_DIR overrides it);
INSTRUCTUNE_OFFLINE=1 forbids downloads.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "data",
        help="fetch, validate, split, show, inspect; dedup, generate, rewrite, prefer (LLM)",
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
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        metavar="N",
        help="also show record N's tokens, the supervised ones (each answer) marked TRAIN",
    )
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("dedup", help="find near-duplicate records (the book's TF-IDF method)")
    p.add_argument("src", metavar="SRC", help=SRC_HELP)
    p.add_argument(
        "--key",
        default="instruction",
        choices=["instruction", "input", "output"],
        help="field compared (default instruction)",
    )
    p.add_argument(
        "--threshold", type=float, default=0.75, help="cosine above which records pair (0.75)"
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help="write the data without each pair's second record (JSON; dropped ones listed in "
        "FILE.dropped.json)",
    )
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=cmd_dedup)

    p = commands.add_parser("generate", help="make instruction records with an LLM (Magpie)")
    _llm_args(p)
    p.add_argument("--n", type=_positive, required=True, help="records wanted in --out")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="appended record by record")
    p.add_argument("--pre-query", help="the opening of a user turn (default: from the template)")
    p.add_argument("--seed", type=int, default=0, help="attempt k uses seed+k (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="for instructions (1.0)")
    p.add_argument(
        "--threshold", type=float, default=0.75, help="near-duplicate cosine (as dedup, 0.75)"
    )
    p.add_argument("--max-attempts", type=_positive, help="give up after (default 10*N+10)")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("rewrite", help="one LLM call per record; the reply into a field")
    p.add_argument("src", metavar="SRC", help=SRC_HELP)
    _llm_args(p)
    p.add_argument(
        "--prompt",
        required=True,
        metavar="FILE",
        help="str.format template with record fields, e.g. {instruction}; or a shipped name: "
        "passive-voice",
    )
    p.add_argument("--into", required=True, metavar="FIELD", help="field that gets the reply")
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="written record by record")
    p.set_defaults(func=cmd_rewrite)

    p = commands.add_parser("prefer", help="chosen/rejected pairs for DPO (the book's recipe)")
    p.add_argument("src", metavar="SRC", help=SRC_HELP)
    _llm_args(p)
    p.add_argument("--out", required=True, metavar="FILE.jsonl", help="written record by record")
    p.add_argument("--seed", type=int, default=123, help="polite/impolite choices (123)")
    p.set_defaults(func=cmd_prefer)


def _llm_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--llm", required=True, metavar="BACKEND:MODEL", help="ollama:MODEL or openai:MODEL"
    )
    p.add_argument("--url", help="server base URL (default 127.0.0.1:11434 ollama, :8000 openai)")
    p.add_argument("--workers", type=_positive, default=1, help="requests at a time (1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds of silence (120)")
    p.add_argument("--retries", type=int, default=4, help="retries per request (4)")
    p.add_argument("--backoff", type=float, default=1.0, help="first retry delay, doubling (1 s)")
    p.add_argument("--cache", metavar="FILE", help="reply cache (default OUT.cache.jsonl)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write a cache")
    p.add_argument(
        "--max-tokens", type=_positive, help="longest reply, in tokens (generate: 256 by default)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress line")


def _client(args, options: dict | None = None):
    from instructune.errors import InstructuneError
    from instructune.llm import make_client, parse_llm

    if not args.timeout > 0:
        raise InstructuneError(f"--timeout must be positive (got {args.timeout})")
    if args.retries < 0:
        raise InstructuneError(f"--retries must be at least 0 (got {args.retries})")
    client = make_client(
        parse_llm(args.llm, args.url),
        options=options,
        timeout=args.timeout,
        retries=args.retries,
        backoff=args.backoff,
    )
    client.probe()
    return client


# The book's request options (seed 123, temperature 0, a 2,048-token context), as the judge.
BOOK_REQUEST = {"seed": 123, "temperature": 0, "num_ctx": 2048}


def _book_options(args) -> dict:
    extra = {"num_predict": args.max_tokens} if args.max_tokens else {}
    return {**BOOK_REQUEST, **extra}


def _cache(args):
    from instructune.data.rewrite import default_cache_path
    from instructune.llm import ReplyCache

    if args.no_cache:
        return None
    return ReplyCache(args.cache or default_cache_path(args.out))


def _finish(summary: str, complete: bool, error) -> int:
    print(summary)
    if error is not None:
        print(f"error: {error}; run the same command again to resume", file=sys.stderr)
    return 0 if complete else 1


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
    p.add_argument(
        "--system-prompt",
        default=None,
        metavar="TEXT",
        help="with --style chat: the system turn of records without one, as finetune "
        "--system-prompt ('' an empty one; default: the template's own)",
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
    from instructune.data.prompts import check_system_prompt
    from instructune.tokenization import load_tokenizer

    check_system_prompt(args.style, args.system_prompt)
    tokenizer = load_tokenizer(args.tokenizer)
    if args.style == "chat" and not tokenizer.chat_template:
        from instructune.errors import DataError

        raise DataError(
            f"--style chat needs a tokenizer with a chat template, and {tokenizer.name} has "
            "none; pass --tokenizer MODEL_DIR (or tokenizer.json), or use --style alpaca"
        )
    return tokenizer, tokenizer.chat_template


def _system_turn_notice(records, style: str) -> None:
    """On stderr: how many records lose their system turn, or all but their last answer, to
    ``style`` (nothing if none)."""
    from instructune.data.prompts import multi_turn_notice, system_turn_notice

    for notice in (system_turn_notice(records, style), multi_turn_notice(records, style)):
        if notice is not None:
            print(notice, file=sys.stderr)


def _record_index(records, index: int) -> int:
    from instructune.errors import DataError

    if not -len(records) <= index < len(records):
        raise DataError(
            f"{records.source}: no record {index}; it has {len(records)} (0 to {len(records) - 1})"
        )
    return index % len(records)


def cmd_show(args) -> int:
    from instructune.data.prompts import format_parts
    from instructune.data.sources import load_source

    records = load_source(args.src)
    index = _record_index(records, args.index)
    end_token, template = "", None
    if args.style == "chat" or args.system_prompt is not None:
        tokenizer, template = _tokenizer_and_template(args)
        end_token = tokenizer.eos_token
    record = records[index]
    parts = format_parts(
        record,
        args.style,
        chat_template=template,
        end_token=end_token,
        system_prompt=args.system_prompt,
    )
    _system_turn_notice([record], args.style)
    prompt, response = parts[-1]
    if args.json:
        shown = {"prompt": prompt, "response": response}
        if "messages" in record:
            # The record's turns, and for the chat style every (prompt, answer) it trains on.
            shown["messages"] = record["messages"]
            shown["parts"] = [{"prompt": p, "response": r} for p, r in parts]
        print(json.dumps(shown, ensure_ascii=False, indent=2))
        return 0
    where = records.locations[index]
    print(f"=== {records.source}: {where} of {len(records)}, style {args.style} ===")
    for number, (prompt, response) in enumerate(parts, start=1):
        print("--- prompt ---")
        sys.stdout.write(prompt if prompt.endswith("\n") else prompt + "\n")
        if len(parts) == 1:
            print("--- response ---")
        else:
            # Training puts the end token after every answer; the next prompt starts after it.
            print(f"--- response {number} of {len(parts)} (then the end token {end_token}) ---")
        print(response)
    print("--- end ---")
    return 0


def cmd_inspect(args) -> int:
    from instructune.data.inspection import (
        format_report,
        format_token_view,
        inspect_records,
        token_view,
    )
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
        system_prompt=args.system_prompt,
    )
    view = None
    if args.tokens is not None:
        index = _record_index(records, args.tokens)
        where = f"record {index} ({records.locations[index]})"
        view = token_view(
            records[index],
            tokenizer,
            style=args.style,
            where=where,
            system_prompt=args.system_prompt,
        )
    if args.json:
        shown = report.to_dict()
        if view is not None:
            shown["token_view"] = view
        print(json.dumps(shown, indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
        if view is not None:
            print(format_token_view(view))
    return 0


def cmd_dedup(args) -> int:
    from pathlib import Path

    from instructune.data.dedup import field_texts, near_duplicate_pairs, second_members
    from instructune.data.sources import load_source
    from instructune.utils.io import atomic_write_json

    records = load_source(args.src)
    texts = field_texts(records, args.key, str(records.source))
    pairs = near_duplicate_pairs(texts, args.threshold)
    if not args.quiet:
        for p in pairs:
            print(f"{p.similarity:.4f}\t{p.first}\t{p.second}")
            print(f"  {p.first}: {texts[p.first][:100]!r}")
            print(f"  {p.second}: {texts[p.second][:100]!r}")
    dropped = second_members(pairs)
    line = (
        f"{records.source}: {len(pairs)} near-duplicate pairs on {args.key!r} above "
        f"{args.threshold} among {len(records)} records"
    )
    if args.out:
        out = Path(args.out)
        gone = set(dropped)
        atomic_write_json(out, [r for i, r in enumerate(records) if i not in gone], indent=4)
        side = out.with_name(out.name.removesuffix(".json") + ".dropped.json")
        listed: dict[int, dict] = {}
        for p in pairs:  # each dropped record once, with the first pair that drops it
            if p.second not in listed:
                listed[p.second] = {
                    "index": p.second,
                    "duplicate_of": p.first,
                    "similarity": p.similarity,
                    "record": records[p.second],
                }
        atomic_write_json(side, [listed[i] for i in sorted(listed)], indent=4)
        line += f"; wrote {len(records) - len(dropped)} of {len(records)} to {out}, the "
        line += f"{len(dropped)} dropped listed in {side}"
    print(line)
    return 0


def cmd_generate(args) -> int:
    import json as _json

    from instructune.data.magpie import generate_records
    from instructune.data.sources import demo_path

    client = _client(args)
    demo = _json.loads(demo_path().read_text(encoding="utf-8"))
    stats = generate_records(
        client=client,
        n=args.n,
        out=args.out,
        cache=_cache(args),
        pre_query=args.pre_query,
        seed=args.seed,
        temperature=args.temperature,
        max_tokens=args.max_tokens or 256,
        threshold=args.threshold,
        workers=args.workers,
        max_attempts=args.max_attempts,
        corpus=[r["instruction"] for r in demo],
        quiet=args.quiet,
    )
    summary = (
        f"wrote {stats.written} of {args.n} records to {args.out} ({stats.attempts} attempts; "
        f"skipped {stats.duplicates} duplicates, {stats.near_duplicates} near duplicates, "
        f"{stats.invalid} invalid)"
    )
    error = stats.error
    if error is None and stats.written < args.n:
        error = f"gave up after {stats.attempts} attempts (--max-attempts)"
    return _finish(summary, stats.written >= args.n, error)


def _prompt_template(name: str) -> str:
    from importlib import resources
    from pathlib import Path

    from instructune.errors import InstructuneError

    path = Path(name)
    if not path.exists() and "/" not in name and not name.endswith(".txt"):
        shipped = resources.files("instructune") / "assets" / "prompts" / f"{name}.txt"
        if shipped.is_file():
            return shipped.read_text(encoding="utf-8")
    if not path.is_file():
        raise InstructuneError(f"--prompt {name}: no such file (shipped: passive-voice)")
    return path.read_text(encoding="utf-8")


def cmd_rewrite(args) -> int:
    from instructune.data.rewrite import check_template, rewrite_records
    from instructune.data.sources import load_source

    template = _prompt_template(args.prompt)
    records = load_source(args.src)
    check_template(template, records, str(records.source))
    result = rewrite_records(
        records,
        source=str(records.source),
        template=template,
        into=args.into,
        out=args.out,
        client=_client(args, _book_options(args)),
        cache=_cache(args),
        workers=args.workers,
        quiet=args.quiet,
    )
    return _job_exit(result, args.out)


def cmd_prefer(args) -> int:
    from instructune.data.preference import make_preferences
    from instructune.data.sources import load_source

    records = load_source(args.src)
    result = make_preferences(
        records,
        source=str(records.source),
        out=args.out,
        client=_client(args, _book_options(args)),
        cache=_cache(args),
        seed=args.seed,
        workers=args.workers,
        quiet=args.quiet,
    )
    return _job_exit(result, args.out)


def _job_exit(result, out) -> int:
    from instructune.data.rewrite import skipped_path

    summary = f"wrote {result.written} of {result.total} records to {out}"
    if result.skipped:
        summary += f" ({result.skipped} left out, listed in {skipped_path(out)})"
    return _finish(summary, result.complete, result.error)
