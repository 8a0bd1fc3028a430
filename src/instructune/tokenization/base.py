"""The one small tokenizer interface every part of instructune uses."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, training, generation and checkpoints need from a tokenizer.

    Attributes:
        name: a short description (``"gpt2 (tiktoken)"``, a path...), for messages.
        vocab_size: number of ids the tokenizer can produce (may be < the model's embedding rows).
        eos_id: the end token a fine-tuned model learns to emit after each response
            (GPT-2: ``<|endoftext|>`` 50256; SmolLM2: ``<|im_end|>`` 2).
        eos_token: the text of that token.
        pad_id: the id used to pad batches (GPT-2 and SmolLM2: the same as ``eos_id``).
        bos_id: the beginning-of-sequence id, or None.
        add_bos: whether ``bos_id`` is put in front of every sequence the model sees.
        chat_template: the model's Jinja chat template, or None.
    """

    name: str
    vocab_size: int
    eos_id: int
    eos_token: str
    pad_id: int
    bos_id: int | None
    add_bos: bool
    chat_template: str | None

    def encode(self, text: str) -> list[int]:
        """Text to ids. Special-token text (``<|endoftext|>``) maps to its id. Never adds BOS."""
        ...

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Ids to text."""
        ...

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write files that ``transformers.AutoTokenizer.from_pretrained`` loads; return their names."""
        ...
