"""``instructune evaluate``: score responses with text metrics and, optionally, an LLM judge.

Nothing heavy is imported here: the evaluation package is imported when the command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

EPILOG = """\
examples:
  instructune evaluate responses.json                      # text metrics only
  instructune evaluate responses.json --judge ollama:llama3
  instructune evaluate eval-example-data.json --response-key "model 1 response" \\
      --response-key "model 2 response" --judge ollama:llama3
  OPENAI_API_KEY=... instructune evaluate responses.json --judge openai:gpt-4o-mini \\
      --url https://api.openai.com
  instructune evaluate --compare run-a/scores.json run-b/scores.json

The judge's URL defaults to http://127.0.0.1:11434 for ollama (Ollama's default) and
http://127.0.0.1:8000 for openai (vLLM's default; llama.cpp's llama-server listens on 8080).
Start Ollama with `ollama serve` and fetch the judge with `ollama pull llama3`.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score responses (text metrics; an LLM judge with --judge; --compare two runs)",
        description=(
            "Score each record's response against its reference output: normalised exact\n"
            "match, token F1, ROUGE-L and length ratio always; the book's 0-100 judge score\n"
            "with --judge. Writes scores.json, report.md and a histogram PNG."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("responses", nargs="?", help="JSON list (or .jsonl) of records with responses")
    p.add_argument(
        "--judge",
        metavar="BACKEND:MODEL",
        help="ollama:MODEL (e.g. ollama:llama3) or openai:MODEL; without it, metrics only",
    )
    p.add_argument("--url", help="the judge server's base URL (default: per backend, see below)")
    p.add_argument(
        "--response-key",
        action="append",
        dest="response_keys",
        metavar="KEY",
        help="field holding the response (repeatable; default: model_response)",
    )
    p.add_argument("--workers", type=int, default=1, help="concurrent judge requests (default 1)")
    p.add_argument(
        "--structured",
        action="store_true",
        help="ask for a JSON {score} through the server's structured output",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds to wait for the judge's next bytes (default 120)",
    )
    p.add_argument("--retries", type=int, default=4, help="retries per request (default 4)")
    p.add_argument(
        "--no-stream", action="store_true", help="ask for whole answers instead of streams"
    )
    p.add_argument("--cache", help="JSONL judgement cache (default: OUT/judge-cache.jsonl)")
    p.add_argument("--out", help="output folder (default: the responses file's folder)")
    p.add_argument(
        "--no-embeddings", action="store_true", help="skip the embedding-similarity attempt"
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="compare two runs' scores.json, paired by record",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructune.errors import InstructuneError

    if args.compare:
        from instructune.evaluation import compare_runs, format_comparison
        from instructune.utils.io import atomic_write_json

        if args.responses:
            raise InstructuneError("give either RESPONSES.json or --compare A.json B.json")
        keys = args.response_keys or []
        if len(keys) > 1:
            raise InstructuneError("--compare takes at most one --response-key")
        cmp = compare_runs(*args.compare, response_key=keys[0] if keys else None)
        if not args.quiet:
            print(format_comparison(cmp))
        if args.out:
            atomic_write_json(Path(args.out) / "compare.json", cmp)
        return 0

    if not args.responses:
        raise InstructuneError("give the responses file (or --compare A.json B.json)")
    from instructune.evaluation import evaluate_responses, load_responses

    path = Path(args.responses)
    records = load_responses(path)
    evaluate_responses(
        records,
        out_dir=Path(args.out) if args.out else path.parent,
        response_keys=args.response_keys or ["model_response"],
        judge=args.judge,
        url=args.url,
        workers=args.workers,
        structured=args.structured,
        cache_path=args.cache,
        timeout=args.timeout,
        retries=args.retries,
        stream=not args.no_stream,
        quiet=args.quiet,
        source=str(path),
        embeddings=not args.no_embeddings,
    )
    return 0
