"""A model's tokenizer and GGUF metadata, both ways: rebuilt as an ``HFTokenizer`` from a file,
and written out (:func:`gguf_tokenizer_data`) by ``checkpoints.gguf_export``.

A GGUF file carries no ``tokenizer.json``; it stores the vocabulary (``tokenizer.ggml.tokens``),
the BPE merges, each token's type, the special ids, a pre-tokenizer name
(``tokenizer.ggml.pre``) and the chat template. This module turns those into a
``tokenizers.Tokenizer`` that splits text the way the model's own tokenizer does.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``: GPT-2, SmolLM2,
Llama 3) are supported; SentencePiece ones are refused with a clear message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from instructune.errors import ModelLoadError

# Token types in tokenizer.ggml.token_type (llama.cpp's llama_token_type).
CONTROL = 3
USER_DEFINED = 4

# Llama 3's split pattern (from its tokenizer.json / tiktoken definition): letters with an
# optional leading non-letter, digits in groups of up to three, punctuation runs, newlines.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_PRE = {"llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx"}
# llama.cpp names GPT-2's pre-tokenizer "gpt-2" (llama-vocab.cpp); "gpt2" is accepted too.
GPT2_PRE = {"gpt-2", "gpt2", "default", None}
SMOLLM_PRE = {"smollm", "starcoder"}


@dataclass
class GGUFTokenizerData:
    """The tokenizer part of a GGUF file's metadata (``tokenizer.*`` keys)."""

    model: str
    tokens: list[str]
    merges: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    chat_template: str | None = None


def tokenizer_data_from_fields(fields: dict[str, Any], *, source: str) -> GGUFTokenizerData:
    """Collect the tokenizer metadata from a dict of GGUF key -> value."""

    def get(key: str, default: Any = None) -> Any:
        return fields.get(f"tokenizer.{key}", default)

    model = get("ggml.model")
    tokens = get("ggml.tokens")
    if model is None or not tokens:
        raise ModelLoadError(f"{source}: the GGUF file carries no tokenizer (tokenizer.ggml.*)")
    return GGUFTokenizerData(
        model=model,
        tokens=list(tokens),
        merges=list(get("ggml.merges") or []),
        token_types=[int(t) for t in get("ggml.token_type") or []],
        pre=get("ggml.pre"),
        bos_id=get("ggml.bos_token_id"),
        eos_id=get("ggml.eos_token_id"),
        pad_id=get("ggml.padding_token_id"),
        add_bos=get("ggml.add_bos_token"),
        chat_template=get("chat_template"),
    )


def _byte_level_spelling(tokens: list[str]) -> list[str]:
    """Tokens as byte-level BPE spells them; a few files store some tokens as raw text."""
    from instructune.tokenization.gpt2 import byte_to_unicode

    table = byte_to_unicode()
    alphabet = set(table.values())
    return [
        t if set(t) <= alphabet else "".join(table[b] for b in t.encode("utf-8")) for t in tokens
    ]


def build_raw_tokenizer(data: GGUFTokenizerData, *, source: str):
    """A ``tokenizers.Tokenizer`` equivalent to the one the GGUF metadata describes."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if data.model != "gpt2":
        raise ModelLoadError(
            f"{source}: tokenizer model {data.model!r} is not supported; only byte-level BPE "
            "('gpt2': GPT-2, SmolLM2, Llama 3) GGUF vocabularies can be rebuilt"
        )
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if data.pre in GPT2_PRE:
        pre = byte_level
    elif data.pre in SMOLLM_PRE:
        # SmolLM2 (StarCoder lineage) puts every digit in its own piece before GPT-2's split.
        pre = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif data.pre in LLAMA3_PRE:
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        raise ModelLoadError(
            f"{source}: pre-tokenizer {data.pre!r} is not supported "
            f"(known: {', '.join(sorted(p for p in GPT2_PRE | SMOLLM_PRE | LLAMA3_PRE if p))})"
        )
    spelled = _byte_level_spelling(data.tokens)
    vocab = {t: i for i, t in enumerate(spelled)}
    merges = []
    for number, merge in enumerate(data.merges):
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ModelLoadError(
                f"{source}: tokenizer.ggml.merges[{number}] {merge!r} is not 'a b'"
            )
        merges.append((left, right))
    bpe = models.BPE(
        vocab=vocab,
        merges=merges,
        # Llama 3 looks a whole piece up in the vocabulary before merging (its tokenizer.json).
        ignore_merges=data.pre in LLAMA3_PRE,
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    types = data.token_types or [1] * len(data.tokens)
    # Control tokens (<|im_start|>, <|endoftext|>) and user-defined ones are matched whole in
    # text, as llama.cpp does; control tokens are special (skipped by decode(skip_special)).
    special = [
        AddedToken(spelled[i], special=True, normalized=False)
        for i, kind in enumerate(types)
        if kind == CONTROL
    ]
    user = [
        AddedToken(spelled[i], special=False, normalized=False)
        for i, kind in enumerate(types)
        if kind == USER_DEFINED
    ]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def tokenizer_from_gguf(data: GGUFTokenizerData, *, source: str):
    """An ``HFTokenizer`` (end, BOS and pad tokens, add_bos, chat template) from GGUF metadata.

    Raises:
        ModelLoadError: an unsupported vocabulary type or pre-tokenizer, or no end token.
    """
    from instructune.tokenization.hf import HFTokenizer

    raw = build_raw_tokenizer(data, source=source)
    n = len(data.tokens)

    def token(index: int | None, role: str) -> str | None:
        if index is None:
            return None
        if not 0 <= index < n:
            raise ModelLoadError(
                f"{source}: tokenizer.ggml.{role}_token_id {index} is out of range"
            )
        return raw.id_to_token(index)

    eos = token(data.eos_id, "eos")
    if eos is None:
        raise ModelLoadError(f"{source}: the GGUF tokenizer has no eos_token_id")
    bos = token(data.bos_id, "bos")
    pad = token(data.pad_id, "padding")
    return HFTokenizer(
        raw,
        eos_token=eos,
        bos_token=bos,
        pad_token=pad,
        add_bos=bool(data.add_bos) and bos is not None,
        chat_template=data.chat_template,
        name=source,
    )


# --- the other direction: our tokenizers as GGUF metadata (for gguf_export) -------------------

NORMAL = 1
UNUSED = 5


def gguf_tokenizer_data(tokenizer: Any, vocab_size: int) -> GGUFTokenizerData:
    """The GGUF tokenizer metadata of ``tokenizer`` (a ``GPT2Tokenizer`` or a byte-level BPE
    ``HFTokenizer``), its token list padded to the model's ``vocab_size`` rows.

    Tokens are spelled as byte-level BPE spells them (``Ġthe``), as llama.cpp's converter writes
    them; rows the tokenizer never produces become ``[PAD{i}]`` of type UNUSED (the converter's
    convention). ``eos_id``, ``bos_id`` and ``add_bos`` are left for the caller (the prompt
    format decides them).

    Raises:
        ModelLoadError: the tokenizer is not byte-level BPE, or has more ids than the model.
    """
    from instructune.tokenization.gpt2 import GPT2Tokenizer

    if isinstance(tokenizer, GPT2Tokenizer):
        by_id, types, merges, pre = _gpt2_vocab(tokenizer)
    elif hasattr(tokenizer, "raw"):
        by_id, types, merges, pre = _hf_vocab(tokenizer)
    else:
        raise ModelLoadError(f"{tokenizer.name}: no GGUF vocabulary can be written for it")
    n = max(by_id) + 1
    if n > vocab_size:
        raise ModelLoadError(
            f"{tokenizer.name}: {n} token ids, more than the model's {vocab_size} embedding rows"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    kinds = [types.get(i, UNUSED if i not in by_id else NORMAL) for i in range(vocab_size)]
    return GGUFTokenizerData(
        model="gpt2",
        tokens=tokens,
        merges=merges,
        token_types=kinds,
        pre=pre,
        pad_id=tokenizer.pad_id,
        chat_template=tokenizer.chat_template,
    )


def _gpt2_vocab(tokenizer: Any) -> tuple[dict[int, str], dict[int, int], list[str], str]:
    from instructune.tokenization.gpt2 import byte_to_unicode, ranks_to_merges

    table = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(table[b] for b in token)

    ranks = tokenizer._ranks
    by_id = {rank: spell(token) for token, rank in ranks.items()}
    types = {}
    for text, index in tokenizer.special_tokens.items():
        by_id[index] = text
        types[index] = CONTROL
    if tokenizer._merges is None:  # recovering GPT-2's 50k merges takes a second: keep them
        tokenizer._merges = ranks_to_merges(ranks)
    merges = [f"{spell(a)} {spell(b)}" for a, b in tokenizer._merges]
    return by_id, types, merges, "gpt-2"


def _hf_vocab(tokenizer: Any) -> tuple[dict[int, str], dict[int, int], list[str], str]:
    import json

    spec = json.loads(tokenizer.raw.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ModelLoadError(
            f"{tokenizer.name}: only byte-level BPE tokenizers can be written to GGUF "
            f"(this one is {model.get('type')!r})"
        )
    pre = _pre_name(spec.get("pre_tokenizer"), tokenizer.name)
    by_id = {int(i): t for t, i in model["vocab"].items()}
    types = {}
    for added in spec.get("added_tokens") or []:
        by_id[int(added["id"])] = added["content"]
        types[int(added["id"])] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return by_id, types, merges, pre


def _pre_name(pre: Any, source: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` name for a tokenizer.json pre-tokenizer.

    The inverse of :func:`build_raw_tokenizer`'s choice: GPT-2's byte-level split alone
    (``gpt2``), single digits first (``smollm``), or Llama 3's split pattern (``llama-bpe``).
    """
    pre = pre or {}
    parts = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts or []]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if (
        kinds == ["Split", "ByteLevel"]
        and (parts[0].get("pattern") or {}).get("Regex") == LLAMA3_SPLIT
    ):
        return "llama-bpe"
    raise ModelLoadError(
        f"{source}: the pre-tokenizer {json_text(pre)} has no llama.cpp name this exporter knows "
        "(GPT-2's byte-level split, SmolLM2's or Llama 3's)"
    )


def json_text(value: Any) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "..."
