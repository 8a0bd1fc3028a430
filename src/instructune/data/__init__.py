"""The data side of chapter 7: load, check, split, format, tokenise and batch instruction records.

Modules: ``records`` (load, validate, split), ``sources`` (files, URLs, named data sets),
``prompts`` (prompt styles), ``dataset`` (tokenise once), ``collate`` (padded tensors),
``sampling`` (batch orders), ``inspection`` (figures for ``instructune data inspect``).
Everything here except ``collate`` is torch-free, and ``collate`` imports torch when called.
"""

from __future__ import annotations

import importlib

_PUBLIC = {
    "Record": "records",
    "LoadResult": "records",
    "load_records": "records",
    "split_records": "records",
    "load_source": "sources",
    "resolve_source": "sources",
    "format_input": "prompts",
    "format_prompt": "prompts",
    "format_example": "prompts",
    "extract_response": "prompts",
    "PromptFormat": "prompts",
    "TokenizedRecord": "dataset",
    "tokenize_records": "dataset",
    "collate": "collate",
    "make_collate": "collate",
    "batch_order": "sampling",
    "padding_share": "sampling",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'instructune.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"instructune.data.{module}"), name)
