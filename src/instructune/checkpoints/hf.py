"""HuggingFace format: declarative key maps both ways, and config.json <-> ModelConfig.

A key map is a list of ``KeyMap`` rows: one HF tensor, the parameter of ours it fills, and how
(transposed for GPT-2's Conv1D layers; a row range for the projections we fuse: Llama's q/k/v
into ``attn.qkv`` and gate/up into ``ff.gate_up``). Loading and saving read the same rows, so
the two directions cannot drift apart.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from instructune.errors import ModelLoadError
from instructune.models.config import ModelConfig


@dataclass(frozen=True)
class KeyMap:
    """One HF tensor and where it lives in our model.

    Attributes:
        hf: the HF state-dict key (``transformer.`` prefix stripped for GPT-2).
        ours: our parameter name.
        transpose: HF stores it transposed (GPT-2 Conv1D weights are (in, out)).
        rows: ``(start, stop)`` rows of ``ours`` that this tensor fills, or None for all of it.
    """

    hf: str
    ours: str
    transpose: bool = False
    rows: tuple[int, int] | None = None


def _gpt2_map(cfg: ModelConfig) -> list[KeyMap]:
    rows = [KeyMap("wte.weight", "tok_emb.weight"), KeyMap("wpe.weight", "pos_emb.weight")]
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"blocks.{i}."
        for hf_mod, our_mod, conv in [
            ("ln_1", "norm1", False),
            ("attn.c_attn", "attn.qkv", True),
            ("attn.c_proj", "attn.proj", True),
            ("ln_2", "norm2", False),
            ("mlp.c_fc", "ff.fc", True),
            ("mlp.c_proj", "ff.proj", True),
        ]:
            rows.append(KeyMap(f"{h}{hf_mod}.weight", f"{b}{our_mod}.weight", transpose=conv))
            rows.append(KeyMap(f"{h}{hf_mod}.bias", f"{b}{our_mod}.bias"))
    rows += [KeyMap("ln_f.weight", "final_norm.weight"), KeyMap("ln_f.bias", "final_norm.bias")]
    if not cfg.tie_embeddings:
        rows.append(KeyMap("lm_head.weight", "out_head.weight"))
    return rows


def _llama_map(cfg: ModelConfig) -> list[KeyMap]:
    q, kv, hidden = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.hidden_dim
    rows = [KeyMap("model.embed_tokens.weight", "tok_emb.weight")]
    for i in range(cfg.n_layers):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        params = ["weight", "bias"] if cfg.qkv_bias else ["weight"]
        for p in params:
            rows += [
                KeyMap(f"{h}self_attn.q_proj.{p}", f"{b}attn.qkv.{p}", rows=(0, q)),
                KeyMap(f"{h}self_attn.k_proj.{p}", f"{b}attn.qkv.{p}", rows=(q, q + kv)),
                KeyMap(f"{h}self_attn.v_proj.{p}", f"{b}attn.qkv.{p}", rows=(q + kv, q + 2 * kv)),
                KeyMap(f"{h}self_attn.o_proj.{p}", f"{b}attn.proj.{p}"),
            ]
        rows += [
            KeyMap(f"{h}mlp.gate_proj.weight", f"{b}ff.gate_up.weight", rows=(0, hidden)),
            KeyMap(f"{h}mlp.up_proj.weight", f"{b}ff.gate_up.weight", rows=(hidden, 2 * hidden)),
            KeyMap(f"{h}mlp.down_proj.weight", f"{b}ff.down.weight"),
            KeyMap(f"{h}input_layernorm.weight", f"{b}norm1.weight"),
            KeyMap(f"{h}post_attention_layernorm.weight", f"{b}norm2.weight"),
        ]
    rows.append(KeyMap("model.norm.weight", "final_norm.weight"))
    if not cfg.tie_embeddings:
        rows.append(KeyMap("lm_head.weight", "out_head.weight"))
    return rows


def key_map(cfg: ModelConfig) -> list[KeyMap]:
    """Every HF tensor of a model with config ``cfg``, in HF's order, and where it goes."""
    return {"gpt2": _gpt2_map, "llama": _llama_map}[cfg.arch](cfg)


# HF keys that carry no weights we need: GPT-2's saved causal-mask buffers, old Llama
# checkpoints' RoPE buffers, and a tied head that some checkpoints store anyway.
_IGNORED = {
    "gpt2": re.compile(r"h\.\d+\.attn\.(masked_)?bias$|lm_head\.weight$"),
    "llama": re.compile(r".*rotary_emb\.inv_freq$|lm_head\.weight$"),
}


def normalize_key(cfg: ModelConfig, key: str) -> str:
    """GPT-2 checkpoints come with and without the ``transformer.`` prefix; drop it."""
    if cfg.arch == "gpt2" and key.startswith("transformer."):
        return key[len("transformer.") :]
    return key


def hf_key(cfg: ModelConfig, key: str) -> str:
    """The key as ``transformers`` saves it (GPT2LMHeadModel keeps the ``transformer.`` prefix)."""
    if cfg.arch == "gpt2" and key != "lm_head.weight":
        return "transformer." + key
    return key


def check_keys(cfg: ModelConfig, available: set[str], source: str) -> None:
    """Fail with both lists when a checkpoint lacks tensors we need or has ones we don't know."""
    needed = {m.hf for m in key_map(cfg)}
    missing = sorted(needed - available)
    unexpected = sorted(k for k in available - needed if not _IGNORED[cfg.arch].match(k))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors: {_abbrev(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors: {_abbrev(unexpected)}")
        raise ModelLoadError(
            f"{source}: the weights do not match a {cfg.arch} model with this config.json ("
            + "; ".join(parts)
            + ")"
        )


def _abbrev(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------- config.json


def _require(data: dict[str, Any], key: str, source: str) -> Any:
    if key not in data or data[key] is None:
        raise ModelLoadError(f"{source}: config.json lacks the field {key!r}")
    return data[key]


def config_from_hf(data: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
    """A ``ModelConfig`` from an HF ``config.json`` (model_type ``gpt2`` or ``llama``).

    Reads both the transformers 4 spelling (``rope_theta`` + ``rope_scaling``) and the 5 one
    (``rope_parameters``). Settings our models do not implement are refused, not ignored.
    """
    model_type = data.get("model_type")
    if model_type == "gpt2":
        act = data.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelLoadError(f"{source}: GPT-2 activation {act!r} is not supported (gelu_new)")
        for flag, ok in [
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("scale_attn_weights", True),
            ("add_cross_attention", False),
        ]:
            if data.get(flag, ok) != ok:
                raise ModelLoadError(f"{source}: GPT-2 with {flag}={data[flag]} is not supported")
        emb = _require(data, "n_embd", source)
        return ModelConfig(
            arch="gpt2",
            vocab_size=_require(data, "vocab_size", source),
            context_length=data.get("n_positions") or _require(data, "n_ctx", source),
            emb_dim=emb,
            n_layers=_require(data, "n_layer", source),
            n_heads=_require(data, "n_head", source),
            hidden_dim=data.get("n_inner") or 4 * emb,
            qkv_bias=True,
            tie_embeddings=data.get("tie_word_embeddings", True),
            norm_eps=data.get("layer_norm_epsilon", 1e-5),
        )
    if model_type == "llama":
        act = data.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{source}: Llama activation {act!r} is not supported (silu)")
        if data.get("mlp_bias"):
            raise ModelLoadError(f"{source}: Llama with mlp_bias=true is not supported")
        if data.get("pretraining_tp", 1) not in (1, None):
            raise ModelLoadError(f"{source}: pretraining_tp > 1 is not supported")
        rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or data.get("rope_theta", 10000.0)
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind == "llama3":
            scaling = {k: v for k, v in rope.items() if k != "type"}
        else:
            raise ModelLoadError(
                f"{source}: rope type {kind!r} is not supported (default or llama3)"
            )
        heads = _require(data, "num_attention_heads", source)
        return ModelConfig(
            arch="llama",
            vocab_size=_require(data, "vocab_size", source),
            context_length=_require(data, "max_position_embeddings", source),
            emb_dim=_require(data, "hidden_size", source),
            n_layers=_require(data, "num_hidden_layers", source),
            n_heads=heads,
            n_kv_heads=data.get("num_key_value_heads") or heads,
            hidden_dim=_require(data, "intermediate_size", source),
            head_dim=data.get("head_dim"),
            qkv_bias=bool(data.get("attention_bias", False)),
            tie_embeddings=data.get("tie_word_embeddings", False),
            norm_eps=data.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
        )
    raise ModelLoadError(
        f"{source}: model_type {model_type!r} is not supported (gpt2 or llama architectures)"
    )


def config_to_hf(
    cfg: ModelConfig,
    *,
    dtype: str = "float32",
    eos_id: int | None = None,
    bos_id: int | None = None,
    pad_id: int | None = None,
) -> dict[str, Any]:
    """The ``config.json`` transformers needs to rebuild ``cfg`` (GPT2Config / LlamaConfig)."""
    common = {
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        # transformers 4 reads torch_dtype, 5 reads dtype.
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if cfg.arch == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "n_embd": cfg.emb_dim,
            "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads,
            "n_positions": cfg.context_length,
            "n_ctx": cfg.context_length,
            "n_inner": cfg.hidden_dim,
            "layer_norm_epsilon": cfg.norm_eps,
            "attn_pdrop": cfg.drop_rate,
            "embd_pdrop": cfg.drop_rate,
            "resid_pdrop": cfg.drop_rate,
            "scale_attn_weights": True,
            **common,
        }
    rope: dict[str, Any] = {"rope_type": "default"} | dict(cfg.rope_scaling or {})
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.emb_dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "attention_bias": cfg.qkv_bias,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        # Both spellings: transformers 4 reads rope_theta/rope_scaling, 5 rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": rope | {"rope_theta": cfg.rope_theta},
        **common,
    }


# ----------------------------------------------------------------------------- weights


def hf_tensors(model: Any, cfg: ModelConfig) -> Iterator[tuple[str, Any]]:
    """Our model's weights as (HF key, tensor) pairs, in HF layout, one tensor at a time.

    Tied heads are not emitted (HF re-ties them on load). Tensors are views where possible;
    the caller makes each contiguous while it writes it.
    """
    params = dict(model.named_parameters())
    for m in key_map(cfg):
        t = params[m.ours].detach()
        if m.rows is not None:
            t = t[m.rows[0] : m.rows[1]]
        if m.transpose:
            t = t.t()
        yield hf_key(cfg, m.hf), t
