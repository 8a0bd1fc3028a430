"""``instructune generate``: answer one prompt (streamed) or every record of a file.

Nothing heavy is imported at module level: torch and the model code load when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from instructune.cli.options import add_load_options, add_sampling_options, load_from_args

EPILOG = """\
examples:
  instructune generate --model smollm2-135m-instruct --prompt "What is an antonym of 'complicated'?"
  instructune generate --model runs/gpt2-medium/final --prompt "Rewrite: the cake was baked."
  instructune generate --model gpt2 --init random --raw --prompt "Once upon a time" --max-new-tokens 20
  instructune generate --model runs/gpt2-medium/final --data test.json --out test.responses.json

--model is a registry name (its pretrained weights), a hub id, a local directory, a .gguf file,
or smollm2-135m-instruct (the embedded model). A saved model's prompt format (instructune.json:
style, stop strings, end token, BOS) is used unless --style or --stop say otherwise.
--data answers each record with the book's 7.7 extraction and writes `model_response` beside it;
the output is rewritten after every batch, and a rerun skips the records already answered.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate",
        help="answer a prompt (streamed) or every record of a file with a model",
        description=(
            "Generate with a model: --prompt answers one instruction and streams the answer to "
            "stdout; --data answers every record of a JSON/JSONL file into --out. Greedy unless "
            "--temperature is above 0."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registry name, hub id, directory or .gguf")
    add_load_options(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="an instruction to answer (wrapped in the prompt style)")
    what.add_argument("--data", metavar="FILE", help="answer every record of this JSON/JSONL file")
    p.add_argument(
        "--out",
        metavar="OUT.json",
        help="where --data writes the answered records (default: NAME.responses.json beside it)",
    )
    p.add_argument(
        "--style",
        help="prompt style: alpaca, phi3 or chat (default: the model's saved style, else alpaca)",
    )
    p.add_argument("--raw", action="store_true", help="send --prompt as it is, unwrapped")
    add_sampling_options(p)
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (--data)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def default_out_path(data: Path) -> Path:
    """``NAME.responses.json`` beside ``data`` (``test.json`` -> ``test.responses.json``)."""
    return data.with_name(f"{data.stem}.responses.json")


def run(args: argparse.Namespace) -> int:
    from instructune.errors import InstructuneError

    if args.raw and args.data:
        raise InstructuneError("--raw applies to --prompt only; --data records are always wrapped")
    data = Path(args.data) if args.data else None
    out = None
    if data is not None:
        out = Path(args.out) if args.out else default_out_path(data)
        if out.resolve() == data.resolve():
            raise InstructuneError(f"--out {out} is the input file; choose another output path")
        if not data.exists():
            raise InstructuneError(f"--data {data}: no such file")

    loaded = load_from_args(args)
    options = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )
    if data is None:
        return _answer_prompt(loaded, args, options)
    return _answer_file(loaded, args, data, out, options)


def _style_and_stops(loaded, args) -> tuple[str, list[str]]:
    from instructune.generation import style_and_stops

    style, stops = style_and_stops(loaded, args.style)
    return style, stops + list(args.stop)


def _answer_prompt(loaded, args, options: dict) -> int:
    from instructune.data.prompts import format_prompt, trained_system_prompt
    from instructune.generation import encode_prompt, stop_ids_for, stream

    tokenizer, fmt = loaded.tokenizer, loaded.prompt_format
    if args.raw:
        text, stops = args.prompt, list(args.stop)
    else:
        style, stops = _style_and_stops(loaded, args)
        record = {"instruction": args.prompt, "input": ""}
        text = format_prompt(
            record,
            style,
            chat_template=tokenizer.chat_template,
            system_prompt=trained_system_prompt(fmt, style),
        )
    ids = encode_prompt(tokenizer, text, add_bos=fmt.add_bos if fmt is not None else None)
    pieces = stream(
        loaded.model,
        tokenizer,
        ids,
        stop_ids=stop_ids_for(loaded),
        stop_strings=stops,
        **options,
    )
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _answer_file(loaded, args, data: Path, out: Path, options: dict) -> int:
    from instructune.data.records import load_records
    from instructune.generation import answer_records

    style, stops = _style_and_stops(loaded, args)
    records = load_records(data)
    answered = answer_records(
        loaded,
        records,
        style=style,
        out_path=out,
        batch_size=args.batch_size,
        stop_strings=stops,
        progress=not args.quiet,
        **options,
    )
    if not args.quiet:
        print(f"wrote {len(answered)} answered records to {out}", file=sys.stderr)
    return 0
