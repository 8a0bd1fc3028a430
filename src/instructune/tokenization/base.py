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


def encode_prompt(tokenizer: Tokenizer, text: str, *, add_bos: bool | None = None) -> list[int]:
    """The ids a model sees for ``text``: ``tokenizer.encode(text)``, starting with exactly one
    BOS when ``add_bos`` (default: the tokenizer's ``add_bos``) and the tokenizer has a BOS id.

    Training (``data.dataset.tokenize_record``) and every kind of answering (``generation``,
    the pipeline, the CLI) encode prompts with this one function, so a prompt's ids are the same
    in all of them. A chat template may render the BOS token as text, which ``encode`` maps to
    its id; then no second one is put in front.
    """
    ids = list(tokenizer.encode(text))
    add_bos = tokenizer.add_bos if add_bos is None else add_bos
    if add_bos and tokenizer.bos_id is not None and ids[:1] != [tokenizer.bos_id]:
        ids.insert(0, tokenizer.bos_id)
    return ids
