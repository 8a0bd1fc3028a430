"""LoRA (the book's appendix E) as a transform of a built model: no second set of model classes.

``apply_lora(model, LoraSettings(rank=16))`` swaps the chosen linear layers for ``LoraLinear``
wrappers in place and freezes everything else. A wrapper keeps the original layer (frozen) and
adds ``scaling * B @ A`` to its output, with ``scaling = alpha / rank``; A starts
Kaiming-uniform (as the book and PEFT) and B at zero, so the model's outputs are unchanged
until the first optimizer step.

Fused layers get one low-rank adapter per projection they hold, so each splits exactly into
PEFT's per-projection adapters: Llama's ``attn.qkv`` (q, k, v rows) gets three, ``ff.gate_up``
(gate, up rows) two. GPT-2's ``attn.qkv`` is HF's ``c_attn``, already fused there too, so it gets
one. Shapes (``n`` projections with ``out_i`` rows each, ``r`` the rank)::

    lora_A: (n * r, in)     rows i*r:(i+1)*r are projection i's A
    lora_B: (out, r)        rows of projection i are its B (block diagonal in effect)

The head is special: the registry models tie it to the token embedding, and the loss, decoding
and serving all read it as a weight (``model.output_weight``), not as a layer they call. So the
head adapter (``LoraHead``) takes the place of ``out_head`` and *is* a weight:
``weight = W + scaling * B @ A``, where W stays the shared embedding (its lookup unchanged). It
has no dropout (dropout acts on a layer's input, and there is no call to apply it to).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TARGETS = ("attn", "mlp", "head")


@dataclass(frozen=True, kw_only=True)
class LoraSettings:
    """What to adapt and how.

    Attributes:
        rank: r, the inner width of each adapter.
        alpha: the update is scaled by alpha / rank; None means alpha = rank (the book: 16/16).
        dropout: dropout probability on the adapter's input (training only; not on the head).
        targets: a subset of ``("attn", "mlp", "head")``.
    """

    rank: int
    alpha: float | None = None
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(
                f"LoRA targets must be some of {', '.join(TARGETS)} (or all), got "
                f"{','.join(self.targets) or 'nothing'}"
            )

    @property
    def scaling(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def lora_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


def parse_targets(text: str) -> tuple[str, ...]:
    """``"attn,mlp"`` or ``"all"`` -> the targets in canonical order; ValueError otherwise."""
    parts = {p.strip() for p in text.split(",") if p.strip()}
    if parts == {"all"}:
        return TARGETS
    unknown = sorted(parts - set(TARGETS))
    if unknown or not parts:
        raise ValueError(
            f"LoRA targets must be a comma-separated subset of {','.join(TARGETS)}, or all; "
            f"got {text!r}"
        )
    return tuple(t for t in TARGETS if t in parts)


class LoraLinear(nn.Module):
    """A frozen linear layer plus ``scaling * B @ A`` on each of its row blocks.

    ``splits`` are the output rows of the projections the layer fuses (one entry for a plain
    layer). ``enabled = False`` turns the adapter off (the base layer alone).
    """

    def __init__(
        self, base: nn.Linear, *, rank: int, scaling: float, dropout: float, splits: tuple[int, ...]
    ) -> None:
        super().__init__()
        if sum(splits) != base.out_features:
            raise ValueError(f"splits {splits} do not add up to {base.out_features} rows")
        self.base = base
        self.rank = rank
        self.scaling = scaling
        self.splits = tuple(splits)
        self.enabled = True
        weight = base.weight
        self.lora_A = nn.Parameter(
            torch.empty(
                len(splits) * rank, base.in_features, device=weight.device, dtype=weight.dtype
            )
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, device=weight.device, dtype=weight.dtype)
        )
        # fan_in = in_features for every block, so one call draws what per-block calls would.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        low = F.linear(self.dropout(x), self.lora_A)  # (..., n*r)
        if len(self.splits) == 1:
            return out + self.scaling * F.linear(low, self.lora_B)
        b_blocks = self.lora_B.split(self.splits, dim=0)
        parts = [
            F.linear(chunk, b)
            for chunk, b in zip(low.split(self.rank, dim=-1), b_blocks, strict=True)
        ]
        return out + self.scaling * torch.cat(parts, dim=-1)

    def delta_weight(self) -> torch.Tensor:
        """The (out, in) update the adapter adds: block i is ``scaling * B_i @ A_i``."""
        a_blocks = self.lora_A.split(self.rank, dim=0)
        b_blocks = self.lora_B.split(self.splits, dim=0)
        return self.scaling * torch.cat([b @ a for b, a in zip(b_blocks, a_blocks, strict=True)])


class LoraHead(nn.Module):
    """The output head's adapter, as a weight: ``weight = W + scaling * B @ A`` (V, D).

    W is the token embedding's weight when the head is tied (read through a reference that is
    not a submodule, so it is neither counted nor saved twice), else the untied head's. With
    gradients off (decoding, serving) the sum is computed once and reused until a parameter
    changes.
    """

    def __init__(
        self, *, embedding: nn.Embedding | None, head: nn.Linear | None, rank: int, scaling: float
    ) -> None:
        super().__init__()
        if (embedding is None) == (head is None):
            raise ValueError("LoraHead adapts either a tied embedding or an untied head")
        self._tied = [embedding] if embedding is not None else []  # a list: not a submodule
        self.base = head
        self.rank = rank
        self.scaling = scaling
        self.splits = (self.base_weight.shape[0],)
        self.enabled = True
        w = self.base_weight
        vocab, dim = w.shape
        self.lora_A = nn.Parameter(torch.empty(rank, dim, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(vocab, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self._cache: tuple[tuple, torch.Tensor] | None = None

    @property
    def tied(self) -> bool:
        return bool(self._tied)

    @property
    def base_weight(self) -> torch.Tensor:
        return self._tied[0].weight if self._tied else self.base.weight

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    @property
    def weight(self) -> torch.Tensor:
        w = self.base_weight
        if not self.enabled:
            return w
        if torch.is_grad_enabled():
            self._cache = None
            return w + self.delta_weight()
        # _version moves with every in-place change (an optimizer step, a load).
        key = tuple((t.data_ptr(), t._version) for t in (w, self.lora_A, self.lora_B))
        if self._cache is None or self._cache[0] != key:
            with torch.inference_mode(False):
                self._cache = (key, (w + self.delta_weight()).detach())
        return self._cache[1]


def _splits(model: nn.Module, path: str, layer: nn.Linear) -> tuple[int, ...]:
    """The row blocks of a fused layer (PEFT's per-projection adapters), else one block."""
    cfg = model.cfg
    if cfg.arch == "llama" and path.endswith("attn.qkv"):
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        return (q, kv, kv)
    if cfg.arch == "llama" and path.endswith("ff.gate_up"):
        return (cfg.hidden_dim, cfg.hidden_dim)
    return (layer.out_features,)


def target_layers(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Paths of the linear layers ``targets`` select (``blocks.0.attn.qkv``, ...), in order."""
    paths = []
    for i, block in enumerate(model.blocks):
        for group, module in (("attn", block.attn), ("mlp", block.ff)):
            if group not in targets:
                continue
            for name, child in module.named_children():
                if isinstance(child, (nn.Linear, LoraLinear)):
                    paths.append(f"blocks.{i}.{'attn' if group == 'attn' else 'ff'}.{name}")
    return paths


def apply_lora(model: nn.Module, settings: LoraSettings) -> nn.Module:
    """Wrap ``model``'s target layers with adapters in place, freeze the rest; returns it.

    The adapters are created on the device and in the dtype of the layers they wrap (the meta
    device too, to count parameters without memory). Raises ValueError on a model that has
    adapters already.
    """
    if lora_settings(model) is not None:
        raise ValueError("the model has LoRA adapters already; merge them first (merge_lora)")
    for p in model.parameters():
        p.requires_grad_(False)
    for path in target_layers(model, settings.targets):
        parent_path, name = path.rsplit(".", 1)
        parent = model.get_submodule(parent_path)
        layer = getattr(parent, name)
        wrapped = LoraLinear(
            layer,
            rank=settings.rank,
            scaling=settings.scaling,
            dropout=settings.dropout,
            splits=_splits(model, path, layer),
        )
        wrapped.train(layer.training)  # a new module starts in training mode (its dropout on)
        setattr(parent, name, wrapped)
    if "head" in settings.targets:
        head = model.out_head
        model.out_head = LoraHead(
            embedding=model.tok_emb if head is None else None,
            head=head,
            rank=settings.rank,
            scaling=settings.scaling,
        ).train(model.training)
    model._lora_settings = settings
    return model


def lora_settings(model: nn.Module) -> LoraSettings | None:
    """The settings ``apply_lora`` used on ``model``, or None for a model without adapters."""
    return getattr(model, "_lora_settings", None)


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLinear | LoraHead]]:
    """(path, adapter) for every adapter in ``model``: ``blocks.0.attn.qkv``, ..., ``out_head``."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLinear, LoraHead)):
            yield name, module


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes as its base (e.g. DPO's reference model)."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m, state in zip(modules, previous, strict=True):
            m.enabled = state


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors alone, by our names: ``blocks.0.attn.qkv.lora_A``, ..."""
    out = {}
    for path, module in lora_modules(model):
        out[f"{path}.lora_A"] = module.lora_A
        out[f"{path}.lora_B"] = module.lora_B
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into the weights and unwrap the layers; returns the plain model.

    A head adapter becomes an untied head (``out_head``, a new weight ``W + scaling * B @ A``)
    and ``model.cfg.tie_embeddings`` turns False: the token embedding stays as it was, so the
    inputs are embedded exactly as before. Every parameter is trainable again afterwards.
    """
    from instructune.models.layers import Linear

    with torch.no_grad():
        for path, module in list(lora_modules(model)):
            parent_path, _, name = path.rpartition(".")
            parent = model.get_submodule(parent_path) if parent_path else model
            if isinstance(module, LoraLinear):
                base = module.base
                base.weight.add_(module.delta_weight().to(base.weight.dtype))
                setattr(parent, name, base)
                continue
            w = module.base_weight
            head = Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
            head.weight.copy_(w + module.delta_weight())
            setattr(parent, name, head)
            if module.tied:
                model.cfg = model.cfg.replace(tie_embeddings=False)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "_lora_settings"):
        del model._lora_settings
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tensor shared by two modules is counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():  # parameters() yields each tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
