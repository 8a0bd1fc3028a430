"""Flags that several sub-commands share: where the model runs, and how answers are sampled.

Each is declared once here so that ``generate``, ``chat`` and ``serve`` spell, default and
explain them alike. Nothing heavy is imported at module level.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_load_options(p: argparse.ArgumentParser) -> None:
    """``--init``, ``--device``, ``--dtype``: how the model named by ``--model`` is loaded."""
    p.add_argument(
        "--init",
        choices=("pretrained", "random"),
        default="pretrained",
        help="random: random weights for a registry name (tests, benchmarks)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument(
        "--dtype",
        default="fp32",
        help="fp32 (default), bf16, fp16, or auto: bf16 where the GPU has it or the CPU has "
        "AVX512-BF16/AMX (half the bytes read per token), else fp32",
    )


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """``--max-new-tokens``, ``--temperature``, ``--top-k``, ``--top-p``, ``--seed``, ``--stop``."""
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer; default 256")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among tokens holding this much probability")
    p.add_argument("--seed", type=int, help="seed for sampling (the same seed, the same answers)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="also stop an answer at this text (repeatable)",
    )


def device_and_dtype(args: argparse.Namespace) -> tuple[Any, Any]:
    """The torch device and dtype ``--device`` and ``--dtype`` name (a bad dtype: one line)."""
    from instructune.errors import InstructuneError
    from instructune.utils.devices import pick_device, resolve_dtype

    device = pick_device(args.device)
    try:
        dtype = resolve_dtype(args.dtype, device)
    except ValueError as exc:
        raise InstructuneError(f"--dtype: {exc}") from None
    return device, dtype


def load_from_args(args: argparse.Namespace):
    """``load_model(args.model)`` with the load options above: a ``LoadedModel``."""
    from instructune.checkpoints import load_model

    device, dtype = device_and_dtype(args)
    return load_model(args.model, init=args.init, device=device, dtype=dtype)
