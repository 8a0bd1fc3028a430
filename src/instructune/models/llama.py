"""The Llama architecture (Llama 3.2, SmolLM2): RMSNorm, RoPE, grouped-query attention, SwiGLU."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from instructune.models.config import ModelConfig
from instructune.models.layers import (
    Block,
    CausalSelfAttention,
    KVCache,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    build_attention_mask,
    linear,
    new_kv_cache,
    packed_positions,
    run_blocks,
)


class LlamaModel(nn.Module):
    """Token embedding, pre-RMSNorm blocks with rotary attention, final RMSNorm, linear head.

    Parameter names: ``tok_emb``, ``blocks.{i}.norm1|attn.qkv|attn.proj|norm2|ff.gate_up|
    ff.down``, ``final_norm``, and ``out_head`` only when the head is untied. ``attn.qkv`` holds
    the q, k and v projections stacked (rows: H*hd, KV*hd, KV*hd) and ``ff.gate_up`` the gate and
    up projections, so each is one matmul; the checkpoint loaders split and join them.
    """

    # forward_hidden takes ``segments``: sequences packed end to end (training unpadded).
    packs_sequences = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.arch != "llama":
            raise ValueError(f"LlamaModel needs arch 'llama', got {cfg.arch!r}")
        self.cfg = cfg
        # True: recompute every block's activations in backward; an int k: the first k blocks.
        self.gradient_checkpointing: bool | int = False
        # _weight skips nn.Embedding's own random init (build_model initialises everything once).
        self.tok_emb = nn.Embedding(
            cfg.vocab_size, cfg.emb_dim, _weight=torch.empty(cfg.vocab_size, cfg.emb_dim)
        )
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.rope = RotaryEmbedding(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, max_positions=cfg.context_length
        )
        self.blocks = nn.ModuleList(
            Block(
                norm1=RMSNorm(cfg.emb_dim, cfg.norm_eps),
                attn=CausalSelfAttention(
                    cfg.emb_dim,
                    cfg.n_heads,
                    cfg.n_kv_heads,
                    cfg.head_dim,
                    qkv_bias=cfg.qkv_bias,
                    drop_rate=cfg.drop_rate,
                ),
                norm2=RMSNorm(cfg.emb_dim, cfg.norm_eps),
                ff=SwiGLU(cfg.emb_dim, cfg.hidden_dim),
                drop_rate=cfg.drop_rate,
            )
            for _ in range(cfg.n_layers)
        )
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.out_head = (
            None if cfg.tie_embeddings else Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        )

    @property
    def output_weight(self) -> torch.Tensor:
        """The (V, D) head weight: the token embedding when tied."""
        return self.tok_emb.weight if self.out_head is None else self.out_head.weight

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty KV cache for ``batch_size`` sequences of up to ``max_len`` positions."""
        return new_kv_cache(
            self.cfg, self.tok_emb.weight, batch_size, max_len, device=device, dtype=dtype
        )

    def forward_hidden(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        segments: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, D). See ``forward`` for the arguments; with
        ``segments``, ``input_ids`` (1, T) holds sequences of these lengths end to end, each
        attending to itself alone from position 0 (training without padding)."""
        past = cache.length if cache is not None else 0
        t = input_ids.shape[1]
        if segments is not None:
            position_ids = packed_positions(input_ids, segments, cache, attention_mask)
        x = self.drop_emb(self.tok_emb(input_ids))
        rope = self.rope(position_ids, past, t, device=x.device, dtype=x.dtype)
        mask = build_attention_mask(attention_mask, past, t, input_ids.device)
        x = run_blocks(
            self.blocks,
            x,
            rope=rope,
            mask=mask,
            cache=cache,
            checkpointing=self.gradient_checkpointing if self.training else False,
            segments=segments,
        )
        return self.final_norm(x)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for ``input_ids`` (B, T).

        Args:
            position_ids: (B, T) positions; default ``arange`` offset by the cache length.
            attention_mask: (B, past + T) bool, True for real tokens (left-padded batches).
            cache: a ``KVCache`` from ``new_cache``; the new keys/values are appended to it.
        """
        hidden = self.forward_hidden(
            input_ids, position_ids=position_ids, attention_mask=attention_mask, cache=cache
        )
        return linear(hidden, self.output_weight)
