"""Tokenizers behind one small interface (see ``base.Tokenizer``).

``load_tokenizer("gpt2")`` gives GPT-2's encoding offline; a directory or a ``tokenizer.json``
gives the tokenizer it holds. The implementations import tiktoken / tokenizers when used.
"""

from __future__ import annotations

import os
from pathlib import Path

from instructune.errors import ModelLoadError
from instructune.tokenization.base import Tokenizer

__all__ = ["Tokenizer", "GPT2Tokenizer", "HFTokenizer", "load_tokenizer"]


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from ``spec``.

    * ``"gpt2"``: GPT-2's BPE from the ranks file shipped with instructune (no network).
    * a directory: its ``tokenizer.json`` (with ``tokenizer_config.json``) if present, else a
      GPT-2 style ``vocab.json`` + ``merges.txt``.
    * a ``tokenizer.json`` file, or a ``.tiktoken`` ranks file (GPT-2 layout).
    """
    from instructune.tokenization.gpt2 import GPT2Tokenizer
    from instructune.tokenization.hf import HFTokenizer

    if str(spec) == "gpt2":
        return GPT2Tokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HFTokenizer.from_directory(path)
        if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return GPT2Tokenizer.from_vocab_merges(path)
        raise ModelLoadError(
            f"{path} holds no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"
        )
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer.from_file(path)
        if path.suffix == ".tiktoken":
            return GPT2Tokenizer.from_ranks_file(path)
        raise ModelLoadError(f"{path} is not a tokenizer.json or .tiktoken file")
    raise ModelLoadError(
        f"no tokenizer {str(spec)!r}: give 'gpt2', a model directory or a tokenizer.json path"
    )


def __getattr__(name: str):
    # The classes import tiktoken / tokenizers; load them only when asked for.
    if name == "GPT2Tokenizer":
        from instructune.tokenization.gpt2 import GPT2Tokenizer

        return GPT2Tokenizer
    if name == "HFTokenizer":
        from instructune.tokenization.hf import HFTokenizer

        return HFTokenizer
    raise AttributeError(f"module 'instructune.tokenization' has no attribute {name!r}")
