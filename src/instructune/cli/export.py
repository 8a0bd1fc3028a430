"""``instructune export``: a saved model as GGUF for llama.cpp and Ollama (with a Modelfile).

Nothing heavy is imported at module level: torch and the model code load when the command runs.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  instructune export runs/book --to gguf --out runs/book/gguf               # f16 + Modelfile
  instructune export runs/book --to gguf --type q8_0 --out exported
  instructune export runs/lora-run --to gguf --type q4_k_m --out exported   # an adapter: merged

then, with Ollama installed:
  cd exported && ollama create my-model -f Modelfile && ollama run my-model

The GGUF carries the tokenizer, the end token as eos, the saved prompt format's BOS setting and
a chat template that renders exactly the trained prompt; the Modelfile's TEMPLATE and stop
lines are generated from the same prompt format (instructune.json). q4_k_m needs llama.cpp's
quantiser (llama-cpp-python, or a llama-quantize binary on PATH).
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a model as GGUF (llama.cpp, Ollama) with an Ollama Modelfile",
        description=(
            "Export a model (a saved directory, an adapter directory, a registry name or a "
            ".gguf) to GGUF, with an Ollama Modelfile and a model card."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="directory, adapter directory, registry name or .gguf")
    p.add_argument("--to", choices=("gguf",), default="gguf", help="the format (gguf)")
    p.add_argument(
        "--type",
        default="f16",
        choices=("f32", "f16", "q8_0", "q4_k_m"),
        help="weight type (default f16); q4_k_m needs llama.cpp's quantiser",
    )
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--name", help="file and model name (default: the output folder's name)")
    p.add_argument(
        "--style",
        choices=("alpaca", "phi3", "chat"),
        help="prompt style to export (default: the model's saved one, else alpaca)",
    )
    p.add_argument("--no-modelfile", action="store_true", help="write the GGUF only")
    p.add_argument(
        "--init", choices=("pretrained", "random"), default="pretrained", help=argparse.SUPPRESS
    )  # random weights: tests
    p.set_defaults(func=run)


def load_for_export(spec: str, init: str = "pretrained"):
    """The model to export, on the CPU in fp32; an adapter directory is merged into its base.

    The merge is the LoRA module's (``models.lora.merge_lora``): a head adapter becomes an
    untied ``output`` tensor, never a change to the shared token embedding.
    """
    import dataclasses

    from instructune.checkpoints import load_model
    from instructune.checkpoints.adapter import is_adapter_dir, load_adapter
    from instructune.models.lora import merge_lora

    if is_adapter_dir(spec):
        loaded = load_adapter(spec, device="cpu")
        model = merge_lora(loaded.model).eval()
        return dataclasses.replace(loaded, model=model, config=getattr(model, "cfg", loaded.config))
    return load_model(spec, init=init, device="cpu")


def run(args: argparse.Namespace) -> int:
    from instructune.checkpoints.gguf_export import export_gguf
    from instructune.data.prompts import prompt_format_for

    loaded = load_for_export(args.model, args.init)
    fmt = None
    if args.style and (loaded.prompt_format is None or loaded.prompt_format.style != args.style):
        fmt = prompt_format_for(loaded.tokenizer, args.style)
    result = export_gguf(
        loaded,
        args.out,
        gguf_type=args.type,
        prompt_format=fmt,
        name=args.name,
        modelfile=not args.no_modelfile,
    )
    print(f"wrote {result.gguf}", file=sys.stderr)
    if result.modelfile is not None:
        name = args.name or result.gguf.name.rsplit("-", 1)[0]
        print(
            f"wrote {result.modelfile}; run it with:\n"
            f"  cd {result.modelfile.parent} && ollama create {name} -f Modelfile "
            f"&& ollama run {name}",
            file=sys.stderr,
        )
    return 0
