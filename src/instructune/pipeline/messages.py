"""How the pipeline talks: progress lines to stdout (unless quiet), warnings to stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable


def _info(quiet: bool) -> Callable[[str], None]:
    def log(message: str) -> None:
        if not quiet:
            print(message, flush=True)

    return log


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
