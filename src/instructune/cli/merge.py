"""``instructune merge ADAPTER --out DIR``: fold a LoRA adapter into its base, save a plain model.

Nothing heavy is imported at module level: torch loads when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """\
examples:
  instructune merge runs/lora --out runs/lora-merged
  instructune generate --model runs/lora-merged --prompt "Rewrite: the cake was baked."

ADAPTER is a directory with adapter_config.json and adapter_model.safetensors (a LoRA run's
--out, or an adapter PEFT saved); its base is loaded from base_model_name_or_path. The merged
directory is a normal saved model (config.json, model.safetensors, tokenizer, instructune.json),
so generate, serve and export take it. An adapter on the output head is merged into a separate,
untied lm_head: the token embedding stays as it was.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "merge",
        help="fold a LoRA adapter into its base model and save the result",
        description="Merge a LoRA adapter into the weights of its base model (fp32).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", metavar="ADAPTER", help="the adapter directory")
    p.add_argument("--out", required=True, metavar="DIR", help="where to save the merged model")
    p.add_argument(
        "--overwrite", action="store_true", help="write into --out even if it holds a model"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from instructune.checkpoints.adapter import merge_adapter
    from instructune.errors import InstructuneError

    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        raise InstructuneError(f"{out} holds a model already; pass --overwrite to replace it")
    if Path(args.adapter).resolve() == out.resolve():
        raise InstructuneError("--out must be another directory than the adapter's")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    merge_adapter(args.adapter, out, log=say)
    print(f"merged {args.adapter} into {out}")
    return 0
