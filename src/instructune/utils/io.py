"""Small file helpers: every file instructune writes is written atomically."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from instructune.errors import StorageError


@contextmanager
def atomic_writer(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open a binary file whose contents replace ``path`` atomically when the block exits.

    Writes go to a temporary file in the same directory. On a clean exit it is flushed,
    fsynced, given the mode a plain ``open()`` would have, and renamed over ``path`` (atomic on
    POSIX and Windows), so readers see the old file or the new one, never half. If the block
    raises, the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates files readable by their owner only; give the file the mode a plain
        # open() would have, so saved models and data stay readable by the user's group.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if is_disk_full(exc):
            raise StorageError(
                f"could not write {path}: no space left on its disk "
                f"({format_bytes(free_bytes(path.parent))} free); the file was not changed"
            ) from exc
        raise


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is the operating system's "no space left" error.

    Python's own writes raise OSError with ENOSPC (or EDQUOT for a quota); safetensors' writer
    wraps the same error in its own exception type, with the OS's text ("os error 28").
    """
    seen: BaseException | None = exc
    for _ in range(4):  # the exception, its cause, and theirs
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if f"os error {errno.ENOSPC}" in text or os.strerror(errno.ENOSPC) in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def free_bytes(path: str | os.PathLike) -> int:
    """Bytes free to this user on the file system that holds ``path`` (or its nearest parent)."""
    here = Path(path).absolute()
    while not here.exists() and here != here.parent:
        here = here.parent
    return shutil.disk_usage(here).free


def format_bytes(n: float) -> str:
    """``n`` bytes as people read it: 512 B, 3.4 MB, 1.62 GB (powers of 1000, as df -H)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half."""
    with atomic_writer(path) as f:
        f.write(data)
    return Path(path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    return atomic_write_text(path, text + "\n")


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The download cache: ``$INSTRUCTUNE_CACHE_DIR`` or ``~/.cache/instructune``."""
    env = os.environ.get("INSTRUCTUNE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "instructune"
