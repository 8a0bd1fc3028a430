"""Any Hugging Face ``tokenizer.json`` behind instructune's ``Tokenizer`` interface.

Built on the ``tokenizers`` library (no transformers needed). The special tokens and the chat
template come from ``tokenizer_config.json`` (and ``chat_template.jinja``) beside it; the GGUF
loader builds an :class:`HFTokenizer` from GGUF metadata with the same constructor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instructune.errors import ModelLoadError
from instructune.utils.io import atomic_write_json, atomic_write_text


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with its end, BOS and pad tokens and its chat template.

    Args:
        tokenizer: the loaded ``tokenizers.Tokenizer``.
        eos_token: text of the token that ends a response (SmolLM2-Instruct: ``<|im_end|>``).
        bos_token: text of the beginning-of-sequence token, if the model has one.
        pad_token: text of the padding token; defaults to ``eos_token``.
        add_bos: whether sequences start with ``bos_token`` (the data pipeline prepends its id;
            :meth:`encode` never does).
        chat_template: the model's Jinja chat template, if any.
        name: a short description for messages.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        add_bos: bool = False,
        chat_template: str | None = None,
        name: str = "",
    ):
        self._tok = tokenizer
        self.name = name or "tokenizer.json"
        self.eos_token = eos_token
        self.eos_id = self._id_of(eos_token, "end")
        self.bos_token = bos_token
        self.bos_id = self._id_of(bos_token, "BOS") if bos_token is not None else None
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.pad_id = self._id_of(self.pad_token, "pad")
        if add_bos and self.bos_id is None:
            raise ModelLoadError(f"{self.name}: add_bos is set but the tokenizer has no BOS token")
        self.add_bos = bool(add_bos)
        self.chat_template = chat_template or None
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str, role: str) -> int:
        index = self._tok.token_to_id(token)
        if index is None:
            raise ModelLoadError(
                f"{self.name}: the {role} token {token!r} is not in the vocabulary"
            )
        return index

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> HFTokenizer:
        """From a directory with ``tokenizer.json`` and (usually) ``tokenizer_config.json``."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path} has no tokenizer.json")
        return cls.from_file(path / "tokenizer.json")

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike) -> HFTokenizer:
        """From a ``tokenizer.json``; the settings files beside it are read when present."""
        from tokenizers import Tokenizer as RawTokenizer

        tokenizer_json = Path(tokenizer_json)
        directory = tokenizer_json.parent
        try:
            raw = RawTokenizer.from_file(str(tokenizer_json))
        except Exception as exc:  # tokenizers raises a bare Exception on bad files
            raise ModelLoadError(f"cannot load {tokenizer_json}: {exc}") from None
        config = _read_json(directory / "tokenizer_config.json")
        special = _read_json(directory / "special_tokens_map.json")

        def token(key: str) -> str | None:
            value = config.get(key, special.get(key))
            if isinstance(value, dict):  # AddedToken serialised as a dict
                value = value.get("content")
            return value if isinstance(value, str) else None

        eos = token("eos_token") or _eos_from_model_config(directory, raw)
        if eos is None:
            raise ModelLoadError(
                f"{directory}: no eos_token in tokenizer_config.json or special_tokens_map.json "
                "and no eos_token_id in config.json; say which token ends a response there"
            )
        bos = token("bos_token")
        if bos is not None and raw.token_to_id(bos) is None:
            bos = None
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = _post_processor_adds(raw, bos)
        return cls(
            raw,
            eos_token=eos,
            bos_token=bos,
            pad_token=token("pad_token"),
            add_bos=add_bos and bos is not None,
            chat_template=_chat_template(directory, config),
            name=str(directory if tokenizer_json.name == "tokenizer.json" else tokenizer_json),
        )

    # --- the Tokenizer protocol ---------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text to ids; special-token text (``<|im_end|>``) becomes its id; never adds BOS."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def save(self, directory: str | os.PathLike) -> list[str]:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.

        transformers' ``AutoTokenizer`` loads them as a ``PreTrainedTokenizerFast`` with the
        same special tokens and chat template.
        """
        directory = Path(directory)
        atomic_write_text(directory / "tokenizer.json", self._tok.to_str())
        tokens = {"eos_token": self.eos_token, "pad_token": self.pad_token}
        if self.bos_token is not None:
            tokens["bos_token"] = self.bos_token
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **tokens,
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
        }
        if self.chat_template:
            config["chat_template"] = self.chat_template
        atomic_write_json(directory / "tokenizer_config.json", config)
        atomic_write_json(directory / "special_tokens_map.json", tokens)
        return ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]

    @property
    def raw(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def __repr__(self) -> str:
        return (
            f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token!r}/{self.eos_id}, add_bos={self.add_bos})"
        )


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _chat_template(directory: Path, config: dict) -> str | None:
    """``chat_template.jinja`` wins (newer transformers); else the config's template.

    A config may hold a list of named templates; the one named ``default`` is used.
    """
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _eos_from_model_config(directory: Path, raw: Any) -> str | None:
    for name in ("generation_config.json", "config.json"):
        value = _read_json(directory / name).get("eos_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return raw.id_to_token(value)
    return None


def _post_processor_adds(raw: Any, bos: str | None) -> bool:
    """Whether the tokenizer's post-processor puts BOS in front (Llama 3 style configs)."""
    if bos is None:
        return False
    bos_id = raw.token_to_id(bos)
    with_special = raw.encode("a", add_special_tokens=True).ids
    return bool(with_special) and with_special[0] == bos_id
