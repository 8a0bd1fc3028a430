"""Read GGUF files (llama.cpp's format) of the llama and gpt2 architectures.

Config, weights and tokenizer. Every tensor type the ``gguf`` package can dequantise is
accepted. llama.cpp's converter permutes the rows of Llama's Q and K projections within each
head (its RoPE pairs neighbouring values; HF's pairs the two halves of a head);
``unpermute_rows`` undoes that, so the weights come out exactly as HF stores them and the HF
key map takes over. GPT-2's GGUF tensors are the Linear (out, in) layout, the transpose of
HF's Conv1D weights. The tensor names are the ones llama.cpp's ``convert_hf_to_gguf.py``
writes (the ``gguf`` package's ``TENSOR_NAMES``); ``gguf_export`` writes the same.
"""

from __future__ import annotations

import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instructune.checkpoints.hf import check_keys, key_map
from instructune.errors import ModelLoadError
from instructune.models.config import ModelConfig

# GGUF tensor names -> HF names, per architecture (HF GPT-2 names without ``transformer.``).
_GLOBAL = {
    "llama": {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    "gpt2": {
        "token_embd.weight": "wte.weight",
        "position_embd.weight": "wpe.weight",
        "output_norm.weight": "ln_f.weight",
        "output_norm.bias": "ln_f.bias",
        "output.weight": "lm_head.weight",
    },
}
_BLOCK = {
    "llama": {
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    },
    "gpt2": {
        "attn_norm": "ln_1",
        "attn_qkv": "attn.c_attn",
        "attn_output": "attn.c_proj",
        "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
    },
}
_BLOCK_PREFIX = {"llama": "model.layers.", "gpt2": "h."}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")
ARCHITECTURES = tuple(_GLOBAL)


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """The HF key of a GGUF tensor name, or None when it has no HF counterpart."""
    if name in _GLOBAL[arch]:
        return _GLOBAL[arch][name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK[arch]:
        return f"{_BLOCK_PREFIX[arch]}{m.group(1)}.{_BLOCK[arch][m.group(2)]}.{m.group(3)}"
    return None


def hf_to_gguf_name(hf_name: str, arch: str = "llama") -> str:
    """The GGUF tensor name of an HF key (the inverse of :func:`gguf_to_hf_name`)."""
    for gguf_name, hf in _GLOBAL[arch].items():
        if hf == hf_name:
            return gguf_name
    prefix = re.escape(_BLOCK_PREFIX[arch])
    m = re.match(prefix + r"(\d+)\.(.+)\.(weight|bias)$", hf_name)
    if m:
        for block, hf in _BLOCK[arch].items():
            if hf == m.group(2):
                return f"blk.{m.group(1)}.{block}.{m.group(3)}"
    raise KeyError(f"no GGUF name for the {arch} tensor {hf_name!r}")


def permute_rows(w: np.ndarray | torch.Tensor, n_heads: int):
    """llama.cpp's Q/K row order: within each head, interleave the two halves (for tests/export)."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def unpermute_rows(w: np.ndarray | torch.Tensor, n_heads: int):
    """Undo ``permute_rows``: back to HF's half-split rotary layout."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


_SCALARS = {  # GGUF value type -> (struct format, size)
    0: ("<B", 1),
    1: ("<b", 1),
    2: ("<H", 2),
    3: ("<h", 2),
    4: ("<I", 4),
    5: ("<i", 4),
    6: ("<f", 4),
    7: ("<?", 1),
    10: ("<Q", 8),
    11: ("<q", 8),
    12: ("<d", 8),
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor lies in the file: GGUF dims (fastest first), type and byte offset."""

    name: str
    dims: tuple[int, ...]
    qtype: int
    offset: int


class GGUFFile:
    """A GGUF file opened for reading: metadata parsed, tensors memory-mapped.

    The header is parsed here rather than with ``gguf.GGUFReader``, which builds a numpy view per
    vocabulary string and takes seconds on a 49k-token vocabulary; ``gguf`` still does the
    dequantisation. Tensors are dequantised one at a time, on request.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{self.path}: cannot open: {exc}") from None
        try:
            self._parse()
        except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"{self.path}: not a readable GGUF file: {exc}") from None

    def _parse(self) -> None:
        buf = memoryview(self._mm)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError("bad magic (not GGUF)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old (2 or 3 needed)")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", buf, pos)
            text = bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="replace")
            pos += 8 + n
            return text

        def value(kind: int) -> Any:
            nonlocal pos
            if kind == _STRING:
                return string()
            if kind == _ARRAY:
                item_kind, count = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if item_kind in _NUMPY:
                    arr = np.frombuffer(buf, dtype=_NUMPY[item_kind], count=count, offset=pos)
                    pos += arr.nbytes
                    return arr.astype(bool).tolist() if item_kind == 7 else arr.tolist()
                return [value(item_kind) for _ in range(count)]
            fmt, size = _SCALARS[kind]
            (v,) = struct.unpack_from(fmt, buf, pos)
            pos += size
            return v

        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (kind,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            self.fields[key] = value(kind)
        self.tensors: dict[str, GGUFTensorInfo] = {}
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            qtype, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            self.tensors[name] = GGUFTensorInfo(name, tuple(int(d) for d in dims), qtype, offset)
        align = int(self.fields.get("general.alignment", 32))
        self._data_start = pos + (-pos % align)

    def field(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def array(self, name: str) -> np.ndarray:
        """A tensor dequantised to float32, in PyTorch's (row-major, reversed GGUF) shape."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
        from gguf.quants import dequantize

        info = self.tensors[name]
        shape = tuple(reversed(info.dims))
        try:
            qtype = GGMLQuantizationType(info.qtype)
        except ValueError:
            raise ModelLoadError(
                f"{self.path}: tensor {name} has GGML type {info.qtype}, unknown to the installed "
                "gguf package (try upgrading gguf)"
            ) from None
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        n_bytes = math.prod(shape) // block * block_bytes
        start = self._data_start + info.offset
        # A plain ndarray view (not np.memmap): gguf's per-row slicing is much faster on it.
        raw = np.asarray(self._mm[start : start + n_bytes]).view(np.ndarray)
        if qtype == GGMLQuantizationType.F32:
            return raw.view("<f4").astype(np.float32).reshape(shape)  # a copy, off the map
        if qtype == GGMLQuantizationType.F16:
            return raw.view("<f2").astype(np.float32).reshape(shape)
        rows = raw.reshape(*shape[:-1], shape[-1] // block * block_bytes)
        try:
            arr = dequantize(rows, qtype)
        except NotImplementedError:
            raise ModelLoadError(
                f"{self.path}: tensor {name} has type {qtype.name}, which the installed gguf "
                "package cannot dequantise (try upgrading gguf)"
            ) from None
        return arr.astype(np.float32, copy=False).reshape(shape)


# GGML types that store plain floats; every other type is a quantisation.
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def gguf_type_name(qtype: int) -> str:
    """GGML's name for a tensor type (``Q4_1``, ``F16``), or ``type N`` when gguf lacks it."""
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(qtype).name
    except ValueError:
        return f"type {qtype}"


def weight_types(g: GGUFFile) -> list[str]:
    """The types of the file's weight matrices, the one holding most values first.

    Only tensors of two or more dimensions count: llama.cpp keeps the 1-D norm vectors in F32
    whatever the file's type, so they say nothing about the precision of the weights.
    """
    values: dict[str, int] = {}
    for info in g.tensors.values():
        if len(info.dims) >= 2 and info.name != "rope_freqs.weight":
            name = gguf_type_name(info.qtype)
            values[name] = values.get(name, 0) + math.prod(info.dims)
    return sorted(values, key=lambda name: (-values[name], name))


def describe_gguf_weights(g: GGUFFile, dtype_label: str) -> str:
    """``"Q4_1 GGUF (some tensors Q8_0), dequantised to fp32"``: what the loaded weights are.

    The type holding most of the weights is named first; any other matrix type follows, so a
    mixed file is described honestly. ``dtype_label`` is what the weights become (``fp32``).
    """
    types = weight_types(g) or ["F32"]
    text = f"{types[0]} GGUF"
    if len(types) > 1:
        text += f" (some tensors {'/'.join(types[1:])})"
    quantised = any(t not in FLOAT_TYPES for t in types)
    return f"{text}, {'dequantised to' if quantised else 'loaded as'} {dtype_label}"


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    """A ``ModelConfig`` from a GGUF's metadata (``llama.*`` or ``gpt2.*`` keys)."""
    source = str(g.path)
    arch = g.field("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{source}: GGUF architecture {arch!r} is not supported "
            f"({' or '.join(ARCHITECTURES)} only)"
        )

    def req(key: str) -> Any:
        value = g.field(f"{arch}.{key}")
        if value is None:
            raise ModelLoadError(f"{source}: GGUF metadata lacks {arch}.{key}")
        return value

    if arch == "gpt2":
        return _gpt2_config(g, req)
    heads = int(req("attention.head_count"))
    emb = int(req("embedding_length"))
    kv_heads = g.field("llama.attention.head_count_kv")
    head_dim = g.field("llama.attention.key_length") or g.field("llama.rope.dimension_count")
    vocab = _vocab_size(g, arch)
    kind = g.field("llama.rope.scaling.type", "none")
    if kind not in ("none", None):
        raise ModelLoadError(f"{source}: RoPE scaling type {kind!r} is not supported")
    head_dim = int(head_dim) if head_dim else emb // heads
    theta = float(g.field("llama.rope.freq_base", 10000.0))
    # Stored as float32; print-friendly value (9.9999997e-06 -> 1e-05).
    eps = float(f"{float(g.field('llama.attention.layer_norm_rms_epsilon', 1e-5)):.7g}")
    scaling = None
    if "rope_freqs.weight" in g.tensors:
        scaling = _llama3_scaling_from_factors(
            g.array("rope_freqs.weight").reshape(-1), head_dim, theta, source
        )
    return ModelConfig(
        arch="llama",
        vocab_size=int(vocab),
        context_length=int(req("context_length")),
        emb_dim=emb,
        n_layers=int(req("block_count")),
        n_heads=heads,
        n_kv_heads=int(kv_heads) if kv_heads else heads,
        hidden_dim=int(req("feed_forward_length")),
        head_dim=head_dim,
        qkv_bias="blk.0.attn_q.bias" in g.tensors,
        tie_embeddings="output.weight" not in g.tensors,
        norm_eps=eps,
        rope_theta=theta,
        rope_scaling=scaling,
    )


def _vocab_size(g: GGUFFile, arch: str) -> int:
    vocab = g.field(f"{arch}.vocab_size")
    if vocab is None and "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].dims[-1]
    if vocab is None:
        raise ModelLoadError(f"{g.path}: no {arch}.vocab_size and no token_embd.weight")
    return int(vocab)


def _gpt2_config(g: GGUFFile, req) -> ModelConfig:
    """GPT-2's shape from ``gpt2.*`` keys; the head is tied unless ``output.weight`` is stored."""
    eps = float(f"{float(g.field('gpt2.attention.layer_norm_epsilon', 1e-5)):.7g}")
    return ModelConfig(
        arch="gpt2",
        vocab_size=_vocab_size(g, "gpt2"),
        context_length=int(req("context_length")),
        emb_dim=int(req("embedding_length")),
        n_layers=int(req("block_count")),
        n_heads=int(req("attention.head_count")),
        hidden_dim=int(req("feed_forward_length")),
        qkv_bias=True,
        tie_embeddings="output.weight" not in g.tensors,
        norm_eps=eps,
    )


def _llama3_scaling_from_factors(
    factors: np.ndarray, head_dim: int, theta: float, source: str
) -> dict[str, Any] | None:
    """Recover Llama 3's rope_scaling from the per-frequency divisors llama.cpp stores.

    llama.cpp writes ``rope_freqs.weight`` = base inv_freq / scaled inv_freq instead of the
    four parameters. Known parameter sets are tried; the one that reproduces the factors wins.
    """
    from instructune.models.layers import llama3_inv_freq

    if np.allclose(factors, 1.0):
        return None
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    factor = float(factors.max())
    for original in (8192, 4096, 2048, 16384, 32768):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)):
            params = {
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
            predicted = (inv_freq / llama3_inv_freq(inv_freq, params)).numpy()
            if predicted.shape == factors.shape and np.allclose(predicted, factors, rtol=1e-3):
                return params
    raise ModelLoadError(
        f"{source}: rope_freqs.weight does not match a Llama 3 rope_scaling this loader knows "
        f"(max factor {factor:g})"
    )


def load_gguf_weights(
    g: GGUFFile, model: torch.nn.Module, cfg: ModelConfig, *, device, dtype: torch.dtype
) -> None:
    """Fill ``model`` (built on meta from ``cfg``) with the file's dequantised tensors."""
    from instructune.checkpoints.fill import fill_from

    source = str(g.path)
    available: set[str] = set()
    unknown: list[str] = []
    for name in g.tensors:
        hf = gguf_to_hf_name(name, cfg.arch)
        if hf is not None:
            available.add(hf)
        elif name != "rope_freqs.weight":
            unknown.append(name)
    if unknown:
        raise ModelLoadError(
            f"{source}: unexpected GGUF tensors: {', '.join(sorted(unknown)[:12])}"
        )
    check_keys(cfg, available, source)
    # GPT-2's GGUF weights are (out, in); the key map expects HF's transposed Conv1D layout.
    transposed = {m.hf for m in key_map(cfg) if m.transpose}

    def get(hf_name: str) -> torch.Tensor:
        arr = g.array(hf_to_gguf_name(hf_name, cfg.arch))
        if hf_name in transposed:
            arr = arr.T
        elif ".q_proj." in hf_name:
            arr = unpermute_rows(arr, cfg.n_heads)
        elif ".k_proj." in hf_name:
            arr = unpermute_rows(arr, cfg.n_kv_heads)
        return torch.from_numpy(np.ascontiguousarray(arr))

    fill_from(model, key_map(cfg), get, device=device, dtype=dtype, source=source)


# The key under which gguf_export stores the prompt format (instructune.json) as JSON text.
PROMPT_FORMAT_KEY = "instructune.prompt_format"


def prompt_format_from_gguf(g: GGUFFile):
    """The ``PromptFormat`` an instructune export stored in the file, or None."""
    import json

    from instructune.data.prompts import PromptFormat

    text = g.field(PROMPT_FORMAT_KEY)
    if text is None:
        return None
    try:
        return PromptFormat.from_dict(json.loads(text))
    except (ValueError, TypeError) as exc:
        raise ModelLoadError(
            f"{g.path}: {PROMPT_FORMAT_KEY} is not a prompt format: {exc}"
        ) from None


def load_gguf_tokenizer(g: GGUFFile):
    """The file's tokenizer as an ``HFTokenizer``."""
    from instructune.tokenization.gguf import tokenizer_data_from_fields, tokenizer_from_gguf

    data = tokenizer_data_from_fields(g.fields, source=str(g.path))
    return tokenizer_from_gguf(data, source=g.path.name)
