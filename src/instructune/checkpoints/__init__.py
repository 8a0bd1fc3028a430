"""Weights in and out: HF directories and hub ids, GGUF files, the embedded model, our saves.

``load_model(spec)`` and ``save_model(directory, ...)``; see ``resolve`` for what a spec means.
Importing this package is cheap; torch is imported when a function is called.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model", "save_model", "LoadedModel"]


def __getattr__(name: str) -> Any:
    if name in ("load_model", "LoadedModel"):
        from instructune.checkpoints import load

        return getattr(load, name)
    if name == "save_model":
        from instructune.checkpoints.native import save_model

        return save_model
    raise AttributeError(f"module 'instructune.checkpoints' has no attribute {name!r}")
