"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_GPT2 = "n_layers=2,emb_dim=32,n_heads=2,hidden_dim=64,context_length=128"


def tiny_finetune_args(out: Path, *extra: str) -> list[str]:
    """``instructune finetune`` on a tiny random GPT-2 and the 40-record fixture, then ``extra``."""
    return [
        "finetune",
        "--model",
        "gpt2",
        "--init",
        "random",
        "--model-overrides",
        TINY_GPT2,
        "--data",
        str(FIXTURES / "instructions-40.json"),
        "--out",
        str(out),
        "--threads",
        "1",
        "--quiet",
        *extra,
    ]
