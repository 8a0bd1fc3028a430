"""Export a model to GGUF (llama.cpp, Ollama), with its tokenizer and its trained prompt format.

Tensor names and metadata keys are the ones llama.cpp's ``convert_hf_to_gguf.py`` writes, taken
from the ``gguf`` package's constants (``TENSOR_NAMES``, ``Keys``) through its ``GGUFWriter``:

* Llama: ``token_embd``, ``blk.N.attn_q/k/v/output``, ``ffn_gate/up/down``, ``attn_norm``,
  ``ffn_norm``, ``output_norm`` and ``output`` when the head is not tied. The Q and K rows are
  permuted within each head (``gguf.permute_rows``), because llama.cpp's RoPE rotates
  neighbouring pairs where HF's rotates the two halves of a head.
* GPT-2: ``token_embd``, ``position_embd``, ``blk.N.attn_norm/attn_qkv/attn_output/ffn_norm/
  ffn_up/ffn_down`` (weights as Linear (out, in): the transpose of HF's Conv1D) and
  ``output_norm``; a tied head is not stored (llama.cpp then uses ``token_embd``).

The tokenizer is written as byte-level BPE (tokens, types, merges, pre-tokenizer name), with the
prompt format's end token as ``eos``, its ``add_bos`` as ``add_bos_token``, and a
``tokenizer.chat_template`` that renders exactly the trained prompt. The prompt format itself
rides along as ``instructune.prompt_format`` so the file loads back here with it.

Types: ``f32``, ``f16`` (2-D weights; norms stay F32, as llama.cpp keeps them) and ``q8_0``
(quantised by the ``gguf`` package); ``q4_k_m`` is made from the f16 file by llama.cpp's own
quantiser (``llama_cpp.llama_model_quantize`` or a ``llama-quantize`` binary).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from instructune.checkpoints.gguf import PROMPT_FORMAT_KEY, hf_to_gguf_name, permute_rows
from instructune.checkpoints.hf import key_map
from instructune.data.prompts import PromptFormat
from instructune.errors import InstructuneError, ModelLoadError
from instructune.models.config import ModelConfig

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_k_m")
Q8_BLOCK = 32  # values per Q8_0 block: a row must hold whole blocks
# llama.cpp's file types (enum llama_ftype): what general.file_type says.
_FILE_TYPE = {"f32": 0, "f16": 1, "q8_0": 7, "q4_k_m": 15}


@dataclass
class GGUFExport:
    """What :func:`export_gguf` wrote."""

    gguf: Path
    modelfile: Path | None
    gguf_type: str
    tensor_types: dict[str, int]  # GGML type name -> number of tensors


def model_tensors(model: torch.nn.Module, cfg: ModelConfig):
    """``(gguf_name, float32 array)`` for every weight, in llama.cpp's names and layout."""
    params = dict(model.named_parameters())
    for m in key_map(cfg):
        t = params[m.ours].detach()
        if m.rows is not None:
            t = t[m.rows[0] : m.rows[1]]
        # Our Linear weights are (out, in), which is GGUF's layout for both architectures.
        arr = t.to(device="cpu", dtype=torch.float32).numpy()
        if ".q_proj." in m.hf:
            arr = permute_rows(arr, cfg.n_heads)
        elif ".k_proj." in m.hf:
            arr = permute_rows(arr, cfg.n_kv_heads)
        yield hf_to_gguf_name(m.hf, cfg.arch), np.ascontiguousarray(arr)


def _stored(name: str, arr: np.ndarray, gguf_type: str):
    """``(data, raw_dtype)`` for one tensor in the file's type (None: plain float data)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    # Norms, biases and GPT-2's position table stay F32, as llama.cpp's converter keeps them.
    if gguf_type == "f32" or arr.ndim < 2 or name == "position_embd.weight":
        return arr.astype(np.float32), None
    if gguf_type == "q8_0" and arr.shape[-1] % Q8_BLOCK == 0:
        return quantize(arr, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0
    return arr.astype(np.float16), None


def _add_config(w: Any, cfg: ModelConfig, name: str, gguf_type: str) -> None:
    w.add_name(name)
    w.add_file_type(_FILE_TYPE[gguf_type])
    if gguf_type == "q8_0":
        from gguf import GGML_QUANT_VERSION

        w.add_quantization_version(GGML_QUANT_VERSION)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.emb_dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.arch == "gpt2":
        w.add_layer_norm_eps(cfg.norm_eps)
        return
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.head_dim)
    if cfg.head_dim * cfg.n_heads != cfg.emb_dim:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def _rope_factors(cfg: ModelConfig) -> np.ndarray | None:
    """Llama 3 RoPE scaling as llama.cpp stores it: per-frequency divisors (``rope_freqs``)."""
    if not cfg.rope_scaling:
        return None
    from instructune.models.layers import llama3_inv_freq

    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta**exponents)
    return (inv_freq / llama3_inv_freq(inv_freq, cfg.rope_scaling)).numpy().astype(np.float32)


def _add_tokenizer(w: Any, tokenizer: Any, cfg: ModelConfig, fmt: PromptFormat) -> None:
    from instructune.checkpoints.prompt_templates import jinja_chat_template
    from instructune.tokenization.gguf import gguf_tokenizer_data

    data = gguf_tokenizer_data(tokenizer, cfg.vocab_size)
    w.add_tokenizer_model(data.model)
    w.add_tokenizer_pre(data.pre)
    w.add_token_list(data.tokens)
    w.add_token_types(data.token_types)
    w.add_token_merges(data.merges)
    # The end token the model learned to emit after an answer: what makes engines stop.
    w.add_eos_token_id(fmt.eos_id)
    bos = fmt.bos_id if fmt.bos_id is not None else tokenizer.bos_id
    if bos is not None:
        w.add_bos_token_id(bos)
    w.add_add_bos_token(bool(fmt.add_bos))
    w.add_add_eos_token(False)
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_chat_template(jinja_chat_template(fmt, tokenizer.chat_template))
    w.add_string(PROMPT_FORMAT_KEY, json.dumps(fmt.to_dict()))


def write_gguf(
    path: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: ModelConfig,
    fmt: PromptFormat,
    *,
    gguf_type: str = "f16",
    name: str = "model",
) -> dict[str, int]:
    """Write one GGUF file of type f32, f16 or q8_0 (atomically); return the tensor type counts."""
    from gguf import GGUFWriter

    if gguf_type not in ("f32", "f16", "q8_0"):
        raise InstructuneError(f"write_gguf writes f32, f16 or q8_0, not {gguf_type!r}")
    if cfg.arch not in ("llama", "gpt2"):
        raise ModelLoadError(f"GGUF export supports llama and gpt2 models, not {cfg.arch!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    counts: dict[str, int] = {}
    w = GGUFWriter(None, cfg.arch)
    try:
        _add_config(w, cfg, name, gguf_type)
        _add_tokenizer(w, tokenizer, cfg, fmt)
        factors = _rope_factors(cfg)
        if factors is not None:
            w.add_tensor("rope_freqs.weight", factors)
            counts["F32"] = 1
        for tensor_name, arr in model_tensors(model, cfg):
            data, raw = _stored(tensor_name, arr, gguf_type)
            w.add_tensor(tensor_name, data, raw_dtype=raw)
            kind = raw.name if raw is not None else ("F16" if data.dtype == np.float16 else "F32")
            counts[kind] = counts.get(kind, 0) + 1
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return counts


# --- q4_k_m through llama.cpp's quantiser -----------------------------------------------------


def llama_quantizer() -> str | None:
    """How llama.cpp's quantiser can be reached here: ``"llama_cpp"``, a binary path, or None."""
    try:
        import llama_cpp  # noqa: F401

        return "llama_cpp"
    except ImportError:
        return shutil.which("llama-quantize")


def require_quantizer() -> str:
    """:func:`llama_quantizer`, or a clear error saying how to install one."""
    how = llama_quantizer()
    if how is None:
        raise InstructuneError(
            "--type q4_k_m needs llama.cpp's quantiser: pip install llama-cpp-python, or put "
            "llama.cpp's llama-quantize binary on PATH; f32, f16 and q8_0 need neither"
        )
    return how


def quantize_q4_k_m(source: Path, target: Path) -> None:
    """Quantise an f16/f32 GGUF to Q4_K_M with llama.cpp (atomically)."""
    how = require_quantizer()
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        if how == "llama_cpp":
            import llama_cpp

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = _FILE_TYPE["q4_k_m"]
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        else:
            rc = subprocess.run(
                [how, str(source), str(tmp), "Q4_K_M"], capture_output=True, text=True
            ).returncode
        if rc != 0 or not tmp.is_file():
            raise InstructuneError(f"llama.cpp's quantiser failed on {source} (status {rc})")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# --- the whole export ---------------------------------------------------------------------------


def export_gguf(
    loaded: Any,
    out_dir: str | os.PathLike,
    *,
    gguf_type: str = "f16",
    prompt_format: PromptFormat | None = None,
    name: str | None = None,
    modelfile: bool = True,
) -> GGUFExport:
    """Write ``out_dir/<name>-<type>.gguf``, an Ollama ``Modelfile`` and a model card.

    Args:
        loaded: a ``LoadedModel`` (``load_model``); a LoRA run is merged before it gets here.
        gguf_type: one of ``GGUF_TYPES``.
        prompt_format: the format to export; default: the model's saved one, else alpaca with
            the tokenizer's end token.
        name: the file's base name and ``general.name`` (default: the output folder's name).
    """
    from instructune.checkpoints.model_card import card_for_model, write_model_card
    from instructune.checkpoints.modelfile import write_modelfile
    from instructune.checkpoints.prompt_templates import prompt_pieces
    from instructune.data.prompts import prompt_format_for

    if gguf_type not in GGUF_TYPES:
        raise InstructuneError(f"--type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    out = Path(out_dir)
    name = name or out.resolve().name or "model"
    fmt = prompt_format or loaded.prompt_format or prompt_format_for(loaded.tokenizer, "alpaca")
    template = loaded.tokenizer.chat_template
    pieces = prompt_pieces(fmt, template)  # fails early on a format no template can express
    path = out / f"{name}-{gguf_type}.gguf"
    if gguf_type == "q4_k_m":
        require_quantizer()  # before any work is done
        f16 = out / f".{name}-f16-for-q4_k_m.gguf"
        try:
            write_gguf(f16, loaded.model, loaded.tokenizer, loaded.config, fmt, name=name)
            quantize_q4_k_m(f16, path)
        finally:
            f16.unlink(missing_ok=True)
        counts: dict[str, int] = {}
    else:
        counts = write_gguf(
            path, loaded.model, loaded.tokenizer, loaded.config, fmt, gguf_type=gguf_type, name=name
        )
    mf = None
    if modelfile:
        mf = write_modelfile(
            out, path.name, fmt, pieces, context_length=loaded.config.context_length
        )
    files = [f"`{path.name}`: GGUF ({gguf_type}) for llama.cpp and Ollama"]
    if mf is not None:
        files.append(
            f"`{mf.name}`: run it with `ollama create {name} -f {mf.name}` then `ollama run {name}`"
        )
    card = card_for_model(loaded.config, fmt, kind="exported", files=files)
    write_model_card(out, card)
    return GGUFExport(gguf=path, modelfile=mf, gguf_type=gguf_type, tensor_types=counts)
