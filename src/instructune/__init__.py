"""instructune: fine-tune a pretrained GPT-style model to follow instructions.

The public API is imported lazily so that ``import instructune`` (and the CLI's
``--help``) stays fast and never imports torch until a function that needs it is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access (PEP 562).
_PUBLIC = {
    "load_records": "instructune.data.records",
    "split_records": "instructune.data.records",
    "load_source": "instructune.data.sources",
    "format_prompt": "instructune.data.prompts",
    "format_example": "instructune.data.prompts",
    "extract_response": "instructune.data.prompts",
    "PromptFormat": "instructune.data.prompts",
    "load_tokenizer": "instructune.tokenization",
    "load_model": "instructune.checkpoints",
    "save_model": "instructune.checkpoints",
    "generate": "instructune.generation",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'instructune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
