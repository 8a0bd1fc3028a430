"""GPT-2's byte-pair encoding through tiktoken, offline by default.

The ranks come from the ``gpt2.tiktoken`` file shipped as package data (the file the
``openai-whisper`` package ships, MIT), so GPT-2 tokenisation needs no network. The same ranks
can be rebuilt from a checkpoint directory's ``vocab.json`` + ``merges.txt``, and written back
out in that form so that ``transformers.AutoTokenizer`` loads our checkpoints as GPT-2.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

from instructune.errors import ModelLoadError, OfflineError
from instructune.utils.io import atomic_write_json, atomic_write_text, sha256_file

ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
# tiktoken's r50k/gpt2 split pattern (tiktoken_ext.openai_public.r50k_pat_str); a fact needed to
# reproduce GPT-2's tokenisation, equivalent to the regex in OpenAI's original encoder.py.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)
# The files tiktoken.get_encoding("gpt2") downloads (tiktoken_ext.openai_public.gpt2).
TIKTOKEN_GPT2_URLS = (
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
)
SHIPPED_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"


def shipped_ranks_path() -> Path:
    """The ``gpt2.tiktoken`` ranks file inside the installed package."""
    return Path(str(resources.files("instructune") / "assets" / "gpt2.tiktoken"))


def read_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file: one ``base64(token) rank`` pair a line."""
    ranks: dict[bytes, int] = {}
    try:
        lines = Path(path).read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read the tiktoken ranks file {path}: {exc}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ModelLoadError(f"{path}, line {number}: expected 'base64-token rank'") from None
    return ranks


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (used in vocab.json/merges.txt).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in order, to U+0100 on.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _to_text(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def _to_bytes(text: str, where: str) -> bytes:
    inverse = _unicode_to_byte()
    try:
        return bytes(inverse[c] for c in text)
    except KeyError:
        raise ModelLoadError(
            f"{where}: token {text!r} is not byte-level BPE text (not a GPT-2 style vocabulary)"
        ) from None


def _bpe_pieces(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """Byte-pair-merge ``token`` using only ranks < ``below`` (recovers GPT-2's merge list)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best, best_rank = -1, below
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    return parts


def ranks_to_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The ordered merge list that, applied as BPE, reproduces ``ranks`` (multi-byte tokens)."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        pieces = _bpe_pieces(token, ranks, rank)
        if len(pieces) != 2:
            raise ModelLoadError(f"token {token!r} (rank {rank}) is not the merge of two tokens")
        merges.append((pieces[0], pieces[1]))
    return merges


def merges_to_ranks(merges: list[tuple[bytes, bytes]]) -> dict[bytes, int]:
    """GPT-2's ranks: the 256 bytes in vocab.json's byte order, then one rank per merge."""
    ranks = {bytes([b]): i for i, b in enumerate(byte_to_unicode())}
    for left, right in merges:
        ranks.setdefault(left + right, len(ranks))
    return ranks


class GPT2Tokenizer:
    """GPT-2 byte-pair encoding (tiktoken); ``<|endoftext|>`` (50256) is end, pad and BOS token.

    Build it with ``GPT2Tokenizer()`` (offline, from the shipped ranks file),
    ``GPT2Tokenizer.from_tiktoken()`` (``tiktoken.get_encoding("gpt2")``, which downloads once)
    or ``GPT2Tokenizer.from_vocab_merges(directory)``.
    """

    add_bos = False
    chat_template = None

    def __init__(
        self,
        ranks: dict[bytes, int] | None = None,
        *,
        special_tokens: dict[str, int] | None = None,
        eos_token: str = ENDOFTEXT,
        name: str = "gpt2 (tiktoken)",
    ):
        import tiktoken

        if ranks is None:
            path = shipped_ranks_path()
            if sha256_file(path) != SHIPPED_RANKS_SHA256:
                raise ModelLoadError(f"{path} is damaged (sha256 mismatch); reinstall instructune")
            ranks = read_tiktoken_ranks(path)
        special_tokens = dict(special_tokens or {ENDOFTEXT: ENDOFTEXT_ID})
        if eos_token not in special_tokens:
            raise ModelLoadError(f"{name}: end token {eos_token!r} is not a special token")
        self._ranks = ranks
        self._merges: list[tuple[bytes, bytes]] | None = None
        self._encoding = tiktoken.Encoding(
            name="gpt2",
            pat_str=GPT2_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=special_tokens,
        )
        self._special_ids = set(special_tokens.values())
        self.special_tokens = special_tokens
        self.name = name
        self.eos_token = eos_token
        self.eos_id = special_tokens[eos_token]
        self.pad_id = self.eos_id
        # GPT-2 declares <|endoftext|> as its BOS too, but never prepends it.
        self.bos_id = self.eos_id
        self.vocab_size = self._encoding.n_vocab

    @staticmethod
    def tiktoken_cached() -> bool:
        """Whether tiktoken's own cache already holds the ``gpt2`` files (no download needed)."""
        import hashlib
        import tempfile

        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR")
        cache = cache or os.path.join(tempfile.gettempdir(), "data-gym-cache")
        return all(
            os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest()))
            for url in TIKTOKEN_GPT2_URLS
        )

    @classmethod
    def from_tiktoken(cls) -> GPT2Tokenizer:
        """``tiktoken.get_encoding("gpt2")`` (downloaded once into tiktoken's cache)."""
        import tiktoken

        try:
            encoding = tiktoken.get_encoding("gpt2")
        except Exception as exc:  # tiktoken raises requests/urllib errors when offline
            raise OfflineError(
                f"tiktoken could not load the 'gpt2' encoding ({type(exc).__name__}: {exc}); "
                "use GPT2Tokenizer() / --tokenizer gpt2, which works offline from the shipped file"
            ) from None
        return cls(
            encoding._mergeable_ranks,
            special_tokens=dict(encoding._special_tokens),
            name="gpt2 (tiktoken get_encoding)",
        )

    @classmethod
    def from_ranks_file(cls, path: str | os.PathLike) -> GPT2Tokenizer:
        """From a ``.tiktoken`` ranks file, with ``<|endoftext|>`` after the last rank."""
        ranks = read_tiktoken_ranks(path)
        return cls(ranks, special_tokens={ENDOFTEXT: len(ranks)}, name=str(path))

    @classmethod
    def from_vocab_merges(cls, directory: str | os.PathLike) -> GPT2Tokenizer:
        """From a checkpoint directory's GPT-2 style ``vocab.json`` + ``merges.txt``.

        The vocabulary must number tokens in merge order, as GPT-2's does (bytes first, then one
        id per merge); tokens outside that order (``<|endoftext|>``) are special tokens.
        """
        directory = Path(directory)
        vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
        for path in (vocab_path, merges_path):
            if not path.is_file():
                raise ModelLoadError(
                    f"{path} is missing; a GPT-2 tokenizer needs vocab.json and merges.txt"
                )
        try:
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{vocab_path} is not valid JSON: {exc}") from None
        merges = []
        for number, line in enumerate(merges_path.read_text(encoding="utf-8").splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise ModelLoadError(f"{merges_path}, line {number}: expected two tokens")
            where = f"{merges_path}, line {number}"
            merges.append((_to_bytes(pair[0], where), _to_bytes(pair[1], where)))
        ranks = merges_to_ranks(merges)
        by_text = {_to_text(token): rank for token, rank in ranks.items()}
        special = {}
        for text, index in vocab.items():
            if text in by_text:
                if by_text[text] != index:
                    raise ModelLoadError(
                        f"{vocab_path}: token {text!r} has id {index} but merge rank "
                        f"{by_text[text]}; this is not GPT-2's vocabulary layout, load the "
                        "directory's tokenizer.json instead"
                    )
            else:
                special[text] = index
        missing = len(by_text) - (len(vocab) - len(special))
        if missing:
            raise ModelLoadError(f"{vocab_path}: {missing} merged tokens are not in the vocabulary")
        eos = _configured_eos(directory) or ENDOFTEXT
        if eos not in special:
            raise ModelLoadError(f"{vocab_path}: the end token {eos!r} is not in the vocabulary")
        return cls(ranks, special_tokens=special, eos_token=eos, name=str(directory))

    # --- the Tokenizer protocol ---------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token text such as ``<|endoftext|>`` becomes its id."""
        return self._encoding.encode(text, allowed_special="all")

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        if skip_special:
            ids = [i for i in ids if i not in self._special_ids]
        return self._encoding.decode(list(ids))

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
        ``special_tokens_map.json``: the files of the Hugging Face GPT-2 checkpoints.
        """
        directory = Path(directory)
        vocab = {_to_text(token): rank for token, rank in self._ranks.items()}
        vocab.update(self.special_tokens)
        vocab = dict(sorted(vocab.items(), key=lambda item: item[1]))
        if self._merges is None:  # recovering 50k merges takes a moment: do it once
            self._merges = ranks_to_merges(self._ranks)
        merges = self._merges
        lines = ["#version: 0.2", *(f"{_to_text(a)} {_to_text(b)}" for a, b in merges)]
        atomic_write_json(directory / "vocab.json", vocab, indent=None)
        atomic_write_text(directory / "merges.txt", "\n".join(lines) + "\n")
        tokens = {
            "bos_token": self.eos_token,
            "eos_token": self.eos_token,
            "unk_token": self.eos_token,
        }
        atomic_write_json(
            directory / "tokenizer_config.json",
            {
                "tokenizer_class": "GPT2Tokenizer",
                **tokens,
                "add_prefix_space": False,
                "add_bos_token": False,
                "model_max_length": 1024,
                "clean_up_tokenization_spaces": False,
            },
        )
        atomic_write_json(directory / "special_tokens_map.json", tokens)
        return ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]

    def __repr__(self) -> str:
        return (
            f"GPT2Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"
        )


def _configured_eos(directory: Path) -> str | None:
    """The eos token named in ``tokenizer_config.json`` / ``special_tokens_map.json``, if any."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8")).get("eos_token")
            except ValueError:
                continue
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                return value
    return None
