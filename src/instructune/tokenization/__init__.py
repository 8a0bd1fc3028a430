"""Tokenizers behind one small interface (see ``base.Tokenizer``)."""

from instructune.tokenization.base import Tokenizer

__all__ = ["Tokenizer"]
