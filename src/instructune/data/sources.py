"""Where instruction data comes from: local files, URLs (downloaded once) and four names.

* ``book``: the 1,100 records of the book's chapter 7 (sha256 pinned and verified).
* ``preference``: the same records with ``chosen`` and ``rejected`` responses, for ``dpo``
  (the book's chapter-7 bonus material; sha256 pinned).
* ``alpaca``: Stanford Alpaca's 52k records.
* ``demo``: 300+ records written for instructune, shipped inside the package (no download).

Downloads go to ``cache_dir() / "data"`` with an atomic write, and the file's sha256 is recorded
beside it (``<file>.sha256``); later calls use the cached file without touching the network.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from instructune.data.records import LoadResult, load_records
from instructune.errors import DataError, OfflineError
from instructune.utils.io import atomic_write_bytes, atomic_write_text, cache_dir, sha256_file

# A download larger than this is refused (Alpaca's file is ~22 MB).
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class NamedSource:
    """A data set known by name.

    Attributes:
        name: the name to pass (``book``).
        url: where it is downloaded from (None for data shipped in the package).
        filename: the cached file's name.
        sha256: the pinned checksum, verified after download and on every use (None: not pinned).
        description: one line for ``--help`` and the README.
    """

    name: str
    url: str | None
    filename: str
    sha256: str | None
    description: str


SOURCES: dict[str, NamedSource] = {
    "book": NamedSource(
        "book",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
        "01_main-chapter-code/instruction-data.json",
        "book-instruction-data.json",
        "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944",
        "the 1,100 records of the book's chapter 7 (Apache-2.0)",
    ),
    "preference": NamedSource(
        "preference",
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/"
        "04_preference-tuning-with-dpo/instruction-data-with-preference.json",
        "instruction-data-with-preference.json",
        "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e",
        "the book's 1,100 records with chosen and rejected responses, for dpo (Apache-2.0)",
    ),
    "alpaca": NamedSource(
        "alpaca",
        "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json",
        "alpaca_data.json",
        None,
        "Stanford Alpaca's 52,002 records (CC BY-NC 4.0)",
    ),
    "demo": NamedSource(
        "demo",
        None,
        "demo.json",
        None,
        "300+ short records written for instructune, shipped with it (Apache-2.0)",
    ),
}


def demo_path() -> Path:
    """The ``demo`` data set inside the installed package."""
    return Path(str(resources.files("instructune") / "assets" / "demo.json"))


def _is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def cached_path(url: str, filename: str | None = None) -> Path:
    """Where ``url`` is cached: ``cache_dir()/data/<filename>`` for a named data set, else
    ``cache_dir()/data/<sha256(url)[:12]>-<last part of the URL>``.
    """
    if filename:
        return cache_dir() / "data" / filename
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:12]
    name = url.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "data"
    return cache_dir() / "data" / f"{key}-{name}"


def _offline() -> bool:
    return os.environ.get("INSTRUCTUNE_OFFLINE", "") not in ("", "0")


def download(url: str, dest: Path, *, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically and record its sha256 in ``dest.sha256``.

    Nothing is written unless the whole file arrived and (when given) its checksum matches,
    so a failed or wrong download never leaves a partial or bad file behind.

    Raises:
        OfflineError: the server could not be reached.
        DataError: the server answered with an error, or the checksum does not match.
    """
    if _offline():
        raise OfflineError(f"INSTRUCTUNE_OFFLINE is set, so {url} is not downloaded")
    request = urllib.request.Request(url, headers={"User-Agent": "instructune"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            declared = response.headers.get("Content-Length")
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
        # read(n) returns what arrived when the server closes early; compare with the header.
        if declared is not None and declared.isdigit() and len(data) < int(declared):
            raise http.client.IncompleteRead(data, int(declared) - len(data))
    except urllib.error.HTTPError as exc:
        raise DataError(f"{url}: the server answered {exc.code} {exc.reason}") from None
    except http.client.IncompleteRead as exc:
        raise DataError(
            f"{url}: the connection broke off after {len(exc.partial)} bytes; nothing was kept, "
            "try again"
        ) from None
    except (urllib.error.URLError, OSError) as exc:  # DNS, refused, reset, timeout, short read
        reason = getattr(exc, "reason", exc)
        raise OfflineError(f"could not download {url} ({reason})") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise DataError(f"{url}: larger than {MAX_DOWNLOAD_BYTES >> 20} MiB; download it yourself")
    digest = hashlib.sha256(data).hexdigest()
    if sha256 is not None and digest != sha256:
        raise DataError(
            f"{url}: the download's sha256 is {digest}, expected {sha256}; the file changed "
            "upstream or was damaged on the way, so it was not kept"
        )
    atomic_write_bytes(dest, data)
    atomic_write_text(_checksum_path(dest), f"{digest}  {dest.name}\n")
    return dest


def _checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _verified_cache(path: Path, pinned: str | None) -> bool:
    """Whether ``path`` is cached and matches its recorded (and pinned) checksum."""
    if not path.is_file():
        return False
    record = _checksum_path(path)
    recorded = record.read_text().split()[0] if record.is_file() else None
    actual = sha256_file(path)
    expected = pinned or recorded
    if expected is not None and actual != expected:
        raise DataError(
            f"{path}: the cached file's sha256 is {actual}, expected {expected}; delete it and "
            "run `instructune data fetch` again"
        )
    return True


def fetch_url(url: str, *, filename: str | None = None, sha256: str | None = None) -> Path:
    """The cached copy of ``url``, downloading it the first time."""
    path = cached_path(url, filename)
    if _verified_cache(path, sha256):
        return path
    try:
        return download(url, path, sha256=sha256)
    except OfflineError as exc:
        raise OfflineError(
            f"{exc}, and nothing is cached at {path}. Download the file on a machine with a "
            "network and pass it as a local path (any .json or .jsonl file works as SRC), or "
            f"copy it to {path}"
        ) from None


def resolve_source(name_or_path: str | os.PathLike) -> Path:
    """A local file for a data source: a known name, an http(s) URL or a path.

    Raises:
        DataError: no such file or name.
        OfflineError: a download is needed but the network is unreachable.
    """
    text = str(name_or_path)
    named = SOURCES.get(text)
    if named is not None:
        if named.url is None:
            return demo_path()
        return fetch_url(named.url, filename=named.filename, sha256=named.sha256)
    if _is_url(text):
        return fetch_url(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    known = ", ".join(SOURCES)
    raise DataError(f"{text}: no such file, and not a known data set ({known}) or an http(s) URL")


def load_source(name_or_path: str | os.PathLike, *, skip_invalid: bool = False) -> LoadResult:
    """Resolve ``name_or_path`` (see :func:`resolve_source`) and load its records."""
    return load_records(resolve_source(name_or_path), skip_invalid=skip_invalid)
