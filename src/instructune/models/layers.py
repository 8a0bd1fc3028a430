"""Building blocks shared by the GPT-2 and Llama models, and the KV cache.

Shapes in comments: B batch, T new tokens, S keys attended (past + new), H query heads,
KV key/value heads, hd head width, D model width.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

if TYPE_CHECKING:
    from instructune.models.config import ModelConfig


# Below this many rows (tokens), a CPU matmul against a weight is computed as (W @ x^T)^T.
# Decoding multiplies a handful of rows by every weight matrix; MKL's sgemm for that shape (the
# orientation F.linear asks for) streams the weights at well under the machine's bandwidth, and
# the transposed call is 1.2-2.8x faster for 1-256 rows on the 2-core development machine (the
# 30 SmolLM2 layers plus its 49k-row head at 16 rows: 104 ms against 178 ms), while at 4,096
# rows the two are level (benchmarks/serving.py's docstring has the measurements). The product
# is the same; only the order MKL sums in may differ, as between any two batch sizes.
SMALL_ROWS = 256
# MKL's transposed product is much slower when the row count is not a multiple of its kernel's
# width: a SmolLM2 layer's four weight shapes, 30 times over (so cache-resident), take 115 ms
# at 15 rows and 54 ms at 16; 9-15 rows all take 77-115 ms, 23 rows 127 ms against 71 ms at 24
# (AVX2 development machine; the real model's 15-row decoding step: 225 -> 164 ms). So rows
# up to PAD_ROWS_UP_TO are padded with zeros: 1 to 2 (the vector path is slower still), 3 to 4,
# 5-16 to 16, and above that to a multiple of 8. Padding rows never mix into real ones (each
# output row is its own dot products), so results are what a batch of that size gives.
PAD_ROWS_UP_TO = 64


def padded_rows(rows: int) -> int:
    """The row count ``linear`` computes ``rows`` rows with on the CPU (see PAD_ROWS_UP_TO)."""
    if rows > PAD_ROWS_UP_TO:
        return rows
    if rows <= 4:
        return rows + rows % 2
    if rows <= 16:
        return 16
    return -(-rows // 8) * 8


# Above SMALL_ROWS (training batches, prefill), an fp32 CPU product x @ W^T goes to oneDNN,
# which PyTorch's CPU build bundles, instead of MKL's sgemm. On the AVX2 development machine
# (AMD EPYC) MKL computes that orientation well below its square-matrix rate when W is wide:
# at 512 rows GPT-2's qkv, MLP-up and 50257-row head ran at 65, 71 and 59 GFLOP/s against
# oneDNN's 117, 87 and 73, and over GPT-2's and SmolLM2's weight shapes at 512 and 1,024 rows
# the forward products took 2.7 s against 3.5 s. For the backward products (dY @ W and
# dY^T @ X) MKL was the faster of the two, so only the forward changes (_OneDNNLinear).
_ONEDNN_LINEAR = (
    getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if torch.backends.mkldnn.is_available()
    else None
)


class _OneDNNLinear(torch.autograd.Function):
    """x @ weight.T + bias for 2-d fp32 CPU tensors: oneDNN forward, MKL backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):  # noqa: D102
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        x, weight = ctx.saved_tensors
        want_x, want_weight, want_bias = ctx.needs_input_grad
        grad_x = grad.mm(weight) if want_x else None
        grad_weight = grad.t().mm(x) if want_weight else None
        grad_bias = grad.sum(0) if ctx.has_bias and want_bias else None
        return grad_x, grad_weight, grad_bias


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        _ONEDNN_LINEAR is not None
        and weight.dtype == torch.float32  # linear has checked that x's matches
        and (bias is None or bias.dtype == torch.float32)
        and weight.is_contiguous()
        and not torch.is_autocast_enabled("cpu")
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, by the fastest CPU route for the row count."""
    rows = x.numel() // max(1, x.shape[-1])
    if x.device.type != "cpu" or rows == 0 or x.dtype != weight.dtype:
        return F.linear(x, weight, bias)
    if rows > SMALL_ROWS:
        if not _onednn_applies(x, weight, bias):
            return F.linear(x, weight, bias)
        flat = x.reshape(rows, x.shape[-1]).contiguous()
        out = _OneDNNLinear.apply(flat, weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    flat = x.reshape(rows, x.shape[-1])
    padded = padded_rows(rows)
    if padded != rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    if bias is None:
        out_t = torch.mm(weight, flat.t())
    else:
        out_t = torch.addmm(bias[:, None], weight, flat.t())
    return out_t[:, :rows].t().contiguous().view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and initialisation) whose forward uses
    ``linear``: the models' decoding speed on the CPU depends on it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class LayerNorm(nn.Module):
    """LayerNorm with a scale and a shift (GPT-2's; HF names them ``weight`` and ``bias``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama). Normalises in fp32, as HF does, then scales in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, eps=self.eps)
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return normed * self.weight


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3's RoPE frequency scaling: slow down long wavelengths, keep short ones.

    Wavelengths longer than ``original / low_freq_factor`` are divided by ``factor``, those shorter
    than ``original / high_freq_factor`` are kept, and the band between is interpolated smoothly.
    """
    factor = float(scaling["factor"])
    low = float(scaling["low_freq_factor"])
    high = float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(in_band, blended, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables in HF's rotate-half layout.

    The cos/sin tables are computed once per device (fp32, like HF), grown when a longer
    position is asked for, and kept out of the state dict. They are plain attributes rather than
    buffers so that a model built on the ``meta`` device and then filled with real weights
    computes real tables on first use.
    """

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict[str, Any] | None = None,
        *,
        max_positions: int = 8192,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.max_positions = max_positions
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def inv_freq(self, device: torch.device | None = None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        if self.scaling is not None:
            inv_freq = llama3_inv_freq(inv_freq, self.scaling)
        return inv_freq

    def _table(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._tables.get(device)
        if cached is not None and cached[0].shape[0] >= length:
            return cached
        # Grow geometrically so generation does not rebuild the table for every new token.
        size = max(length, 256, 2 * cached[0].shape[0] if cached is not None else 0)
        # Plain tensors even when first called under inference_mode: training reuses them.
        with torch.inference_mode(False), torch.no_grad():
            positions = torch.arange(size, dtype=torch.float32, device=device)
            freqs = torch.outer(positions, self.inv_freq(device))  # (size, hd/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (size, hd)
            self._tables[device] = (angles.cos(), angles.sin())
        return self._tables[device]

    def forward(
        self, position_ids: torch.Tensor | None, start: int, length: int, *, device, dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the new tokens: (1, 1, T, hd) from ``start``, or (B, 1, T, hd)."""
        if position_ids is None:
            cos, sin = self._table(start + length, device)
            cos, sin = cos[start : start + length], sin[start : start + length]
            return cos.to(dtype)[None, None], sin.to(dtype)[None, None]
        # Explicit positions: cover the whole context once, so no step has to read
        # position_ids back from the device to size the table.
        cos, sin = self._table(self.max_positions, device)
        return cos[position_ids].to(dtype)[:, None], sin[position_ids].to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hd) by the position angles; halves are paired (HF's rotate_half)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Preallocated keys and values for every layer, and how many positions are filled.

    ``k[i]`` and ``v[i]`` are (B, KV, max_len, hd). A forward pass with the cache writes the new
    tokens' keys/values at ``[length:length + T]``, attends over ``[:length + T]`` and then
    advances ``length`` by T. The batch shares one length: left-pad prompts of unequal length
    and pass an ``attention_mask``.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_len = max_len
        self.batch_size = batch_size
        self.length = 0

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new (B, KV, T, hd) keys/values of ``layer``; return all filled ones."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[layer][:, :, self.length : end] = k
        self.v[layer][:, :, self.length : end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reset(self) -> None:
        """Forget the contents (the memory is reused)."""
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Keep only the batch rows in ``index`` (e.g. drop finished sequences).

        Only the filled positions ``[:length]`` are copied; the new buffers still hold
        ``max_len`` positions, and the rest is left uninitialised (``update`` writes a position
        before anything reads it).
        """
        self.k = [self._select_rows(t, index) for t in self.k]
        self.v = [self._select_rows(t, index) for t in self.v]
        self.batch_size = int(index.shape[0])

    def _select_rows(self, buffer: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """A new (len(index), KV, max_len, hd) buffer with the filled part of rows ``index``."""
        out = buffer.new_empty((index.shape[0], *buffer.shape[1:]))
        torch.index_select(buffer[:, :, : self.length], 0, index, out=out[:, :, : self.length])
        return out


def new_kv_cache(
    cfg: ModelConfig,
    ref: torch.Tensor,
    batch_size: int,
    max_len: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> KVCache:
    """An empty ``KVCache`` sized for ``cfg``; device and dtype default to those of ``ref``."""
    return KVCache(
        cfg.n_layers,
        batch_size,
        cfg.n_kv_heads,
        max_len,
        cfg.head_dim,
        device=device or ref.device,
        dtype=dtype or ref.dtype,
    )


def packed_positions(
    input_ids: torch.Tensor, segments: Sequence[int], cache: KVCache | None, mask
) -> torch.Tensor:
    """Position ids (1, T) of sequences packed end to end: each counts from 0."""
    if input_ids.shape[0] != 1 or sum(segments) != input_ids.shape[1]:
        raise ValueError(
            f"packed input must be (1, {sum(segments)}) for segments summing to that, got "
            f"{tuple(input_ids.shape)}"
        )
    if cache is not None or mask is not None:
        raise ValueError("packed sequences take no cache and no attention_mask")
    device = input_ids.device
    return torch.cat([torch.arange(n, device=device) for n in segments])[None]


def build_attention_mask(
    attention_mask: torch.Tensor | None, past: int, new: int, device: torch.device
) -> torch.Tensor | None:
    """The boolean mask SDPA needs (B or 1, 1, T, S), or None when plain causal attention works.

    Combines causality (query t sits at position ``past + t``) with key padding
    (``attention_mask`` False). Each query may always see itself, so a padding query never has
    every key masked (SDPA would return NaN for it, and NaN would leak through later layers).
    """
    total = past + new
    if attention_mask is None and (past == 0 or new == 1):
        return None  # is_causal=True (no cache) or a single query that may see every key
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = key_pos <= query_pos  # (T, S)
    if attention_mask is None:
        return mask[None, None]
    if attention_mask.shape[-1] != total:
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions, expected past + new = {total}"
        )
    keep = attention_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # (B, 1, 1, S)
    return (mask[None, None] & keep) | (key_pos == query_pos)[None, None]


def packed_causal_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: Sequence[int],
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention for (1, H, T, hd) queries over (1, KV, T, hd) keys/values holding sequences of
    ``segments`` lengths end to end: each attends causally to itself alone. (1, H, T, hd)."""
    parts = zip(q.split(segments, 2), k.split(segments, 2), v.split(segments, 2), strict=True)
    gqa = k.shape[1] != q.shape[1]
    return torch.cat(
        [
            F.scaled_dot_product_attention(
                qs, ks, vs, dropout_p=dropout_p, is_causal=True, enable_gqa=gqa
            )
            for qs, ks, vs in parts
        ],
        dim=2,
    )


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention with one fused q/k/v projection.

    ``qkv`` maps D to (H + 2*KV) * hd: the query heads, then the key heads, then the value heads.
    RoPE is applied when the caller passes cos/sin (Llama) and skipped when it passes None (GPT-2).
    """

    def __init__(
        self,
        emb_dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.drop_rate = drop_rate
        self.qkv = Linear(emb_dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.proj = Linear(n_heads * head_dim, emb_dim, bias=qkv_bias)

    def forward(
        self,
        x: torch.Tensor,
        *,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        cache: KVCache | None,
        layer: int,
        segments: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """``segments``: x is (1, T) sequences packed end to end, of these lengths (no cache)."""
        b, t, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(b, t, h + 2 * kv, hd).transpose(1, 2)  # (B, H+2KV, T, hd)
        q, k, v = qkv.split((h, kv, kv), dim=1)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        dropout_p = self.drop_rate if self.training else 0.0
        if cache is not None and hasattr(cache, "attend"):
            # A cache that runs several groups of rows as one flat sequence (the continuous
            # batch's joint step) attends each group over its own keys itself.
            out = cache.attend(layer, q, k, v)
        elif segments is not None:
            out = packed_causal_attention(q, k, v, segments, dropout_p=dropout_p)
        else:
            if cache is not None:
                k, v = cache.update(layer, k, v)  # (B, KV, S, hd)
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout_p,
                # No mask means plain causal attention, unless past keys are cached (T == 1).
                is_causal=mask is None and (cache is None or cache.length == 0),
                enable_gqa=kv != h,
            )  # (B, H, T, hd)
        return self.proj(out.transpose(1, 2).reshape(b, t, h * hd))


class Block(nn.Module):
    """A pre-norm transformer block; the norms and the MLP are given, so both models share it.

    x + drop(attn(norm1(x))), then + drop(ff(norm2(x))): the two residual ("shortcut") paths.
    """

    def __init__(
        self,
        *,
        norm1: nn.Module,
        attn: CausalSelfAttention,
        norm2: nn.Module,
        ff: nn.Module,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm1
        self.attn = attn
        self.norm2 = norm2
        self.ff = ff
        self.drop = nn.Dropout(drop_rate)

    def forward(
        self, x, rope, mask, cache: KVCache | None, layer: int, segments=None
    ) -> torch.Tensor:
        attn = self.attn(
            self.norm1(x), rope=rope, mask=mask, cache=cache, layer=layer, segments=segments
        )
        x = x + self.drop(attn)
        return x + self.drop(self.ff(self.norm2(x)))


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    *,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    checkpointing: bool | int,
    segments: Sequence[int] | None = None,
) -> torch.Tensor:
    """Run every block, with activation checkpointing when asked and gradients are on.

    ``checkpointing``: True recomputes every block's activations in backward; an int k only
    the first k blocks', so memory and recompute time can be traded block by block.
    """
    recomputed = 0
    if torch.is_grad_enabled() and cache is None:
        recomputed = len(blocks) if checkpointing is True else int(checkpointing)
    for i, block in enumerate(blocks):
        if i < recomputed:
            x = torch.utils.checkpoint.checkpoint(
                block, x, rope, mask, None, i, segments, use_reentrant=False
            )
        else:
            x = block(x, rope, mask, cache, i, segments)
    if cache is not None:
        cache.advance(x.shape[1])
    return x


class GeluMLP(nn.Module):
    """GPT-2's feed-forward: Linear, GELU (tanh approximation), Linear."""

    def __init__(self, emb_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc = Linear(emb_dim, hidden_dim)
        self.proj = Linear(hidden_dim, emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class SwiGLU(nn.Module):
    """Llama's feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, emb_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate_up = Linear(emb_dim, 2 * hidden_dim, bias=False)  # rows: gate, then up
        self.down = Linear(hidden_dim, emb_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden_dim, dim=-1)
        return self.down(F.silu(gate) * up)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2-style random init: N(0, std) matrices, zero biases, unit norm scales."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, (LayerNorm, RMSNorm)):
            nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
