"""Model shapes: one typed dataclass and one registry of named configs.

Importing this module does not import torch, so the CLI can list and validate model names
cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from instructune.errors import ModelLoadError

ARCHS = ("gpt2", "llama")

# Keys a Llama 3 ``rope_scaling`` dict must carry (HF's config.json spelling).
LLAMA3_ROPE_KEYS = (
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


@dataclass(kw_only=True)
class ModelConfig:
    """Everything needed to build a model; keyword arguments only.

    Attributes:
        arch: ``"gpt2"`` (learned positions, LayerNorm, GELU MLP) or ``"llama"`` (RoPE, RMSNorm,
            SwiGLU, grouped-query attention).
        vocab_size: rows of the token embedding (and of the output head).
        context_length: the longest sequence the model was trained for.
        emb_dim: width of the residual stream.
        n_layers: number of transformer blocks.
        n_heads: query heads per attention layer.
        n_kv_heads: key/value heads (grouped-query attention); defaults to ``n_heads``.
        hidden_dim: width of the MLP's inner layer; defaults to ``4 * emb_dim``.
        head_dim: width of one head; defaults to ``emb_dim // n_heads``.
        qkv_bias: whether the query/key/value projections have a bias (GPT-2: yes).
        tie_embeddings: whether the output head shares the token embedding matrix.
        norm_eps: epsilon of LayerNorm / RMSNorm.
        rope_theta: RoPE base frequency (llama only).
        rope_scaling: Llama 3 RoPE scaling, HF's dict (``rope_type: "llama3"``, ``factor``,
            ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``), or None.
        drop_rate: dropout on embeddings, attention weights and residual branches (the book's).
        name: the registry name this config came from, or ``""``.
        hub_id: the HuggingFace hub repository of its pretrained weights, or None.
    """

    arch: str
    vocab_size: int
    context_length: int
    emb_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    head_dim: int | None = None
    qkv_bias: bool = False
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    drop_rate: float = 0.0
    name: str = ""
    hub_id: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch must be one of {ARCHS}, not {self.arch!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = 4 * self.emb_dim
        if self.head_dim is None:
            if self.emb_dim % self.n_heads:
                raise ValueError(
                    f"ModelConfig: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}"
                )
            self.head_dim = self.emb_dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}"
            )
        if self.arch == "llama" and self.head_dim % 2:
            raise ValueError(f"ModelConfig: RoPE needs an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind != "llama3":
                raise ValueError(
                    f"ModelConfig: only Llama 3 rope_scaling (rope_type 'llama3') is supported, "
                    f"got {self.rope_scaling!r}"
                )
            missing = [k for k in LLAMA3_ROPE_KEYS if k not in self.rope_scaling]
            if missing:
                raise ValueError(f"ModelConfig: rope_scaling lacks {missing}")
            self.rope_scaling["rope_type"] = "llama3"

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with some fields changed (derived fields are recomputed unless given)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        # Derived defaults follow the new shape unless the caller pins them.
        if "n_heads" in overrides or "emb_dim" in overrides:
            values["head_dim"] = None
        if "emb_dim" in overrides and self.hidden_dim == 4 * self.emb_dim:
            values["hidden_dim"] = None
        if "n_heads" in overrides and self.n_kv_heads == self.n_heads:
            values["n_kv_heads"] = None
        values.update(overrides)
        return ModelConfig(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown fields {unknown}")
        return cls(**data)


def _gpt2(name: str, hub: str, emb_dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(
        arch="gpt2",
        vocab_size=50257,
        context_length=1024,
        emb_dim=emb_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        qkv_bias=True,
        tie_embeddings=True,
        norm_eps=1e-5,
        name=name,
        hub_id=hub,
    )


def _llama(name: str, hub: str, **shape: Any) -> ModelConfig:
    return ModelConfig(arch="llama", qkv_bias=False, norm_eps=1e-5, name=name, hub_id=hub, **shape)


_SMOLLM2_135M = dict(
    vocab_size=49152, context_length=8192, emb_dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
    hidden_dim=1536, rope_theta=100000.0, tie_embeddings=True,
)  # fmt: skip
_SMOLLM2_360M = dict(
    vocab_size=49152, context_length=8192, emb_dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
    hidden_dim=2560, rope_theta=100000.0, tie_embeddings=True,
)  # fmt: skip
_SMOLLM2_1_7B = dict(
    vocab_size=49152, context_length=8192, emb_dim=2048, n_layers=24, n_heads=32, n_kv_heads=32,
    hidden_dim=8192, rope_theta=130000.0, tie_embeddings=True,
)  # fmt: skip

# Shapes from each model's config.json on the hub.
REGISTRY: dict[str, ModelConfig] = {
    c.name: c
    for c in [
        _gpt2("gpt2", "openai-community/gpt2", 768, 12, 12),
        _gpt2("gpt2-medium", "openai-community/gpt2-medium", 1024, 24, 16),
        _gpt2("gpt2-large", "openai-community/gpt2-large", 1280, 36, 20),
        _gpt2("gpt2-xl", "openai-community/gpt2-xl", 1600, 48, 25),
        _llama("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", **_SMOLLM2_135M),
        _llama("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", **_SMOLLM2_135M),
        _llama("smollm2-360m", "HuggingFaceTB/SmolLM2-360M", **_SMOLLM2_360M),
        _llama("smollm2-360m-instruct", "HuggingFaceTB/SmolLM2-360M-Instruct", **_SMOLLM2_360M),
        _llama("smollm2-1.7b", "HuggingFaceTB/SmolLM2-1.7B", **_SMOLLM2_1_7B),
        _llama("smollm2-1.7b-instruct", "HuggingFaceTB/SmolLM2-1.7B-Instruct", **_SMOLLM2_1_7B),
        _llama(
            "llama-3.2-1b",
            "meta-llama/Llama-3.2-1B",
            vocab_size=128256,
            context_length=131072,
            emb_dim=2048,
            n_layers=16,
            n_heads=32,
            n_kv_heads=8,
            hidden_dim=8192,
            rope_theta=500000.0,
            tie_embeddings=True,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ]
}


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The registry config called ``name``, with ``overrides`` applied (e.g. ``drop_rate=0.1``).

    Raises:
        ModelLoadError: ``name`` is not in the registry (the message lists the names).
    """
    try:
        base = REGISTRY[name.lower()]
    except KeyError:
        raise ModelLoadError(
            f"unknown model name {name!r}; known names: {', '.join(REGISTRY)}"
        ) from None
    return base.replace(**overrides) if overrides else base.replace()
