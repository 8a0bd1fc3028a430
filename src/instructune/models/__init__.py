"""Model definitions: GPT-2 and Llama in plain PyTorch, built from a ``ModelConfig``.

``ModelConfig``, ``REGISTRY`` and ``get_config`` come without torch; ``build_model`` and the
model classes import it on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from instructune.models.config import REGISTRY, ModelConfig, get_config

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "ModelConfig",
    "REGISTRY",
    "get_config",
    "build_model",
    "GPT2Model",
    "LlamaModel",
    "KVCache",
]


def build_model(
    cfg: ModelConfig,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> nn.Module:
    """A ``GPT2Model`` or ``LlamaModel`` for ``cfg``, randomly initialised, in eval mode.

    Parameters are created directly on ``device`` in ``dtype`` (no fp32 copy first). On
    ``torch.device("meta")`` nothing is allocated: use it to count parameters or to load
    weights with ``load_state_dict(..., assign=True)``. The random init draws from torch's
    global generator, so ``torch.manual_seed`` makes it reproducible.
    """
    import torch

    from instructune.models.gpt2 import GPT2Model
    from instructune.models.layers import init_weights
    from instructune.models.llama import LlamaModel

    cls = {"gpt2": GPT2Model, "llama": LlamaModel}[cfg.arch]
    device = torch.device(device or "cpu")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        # Shapes first (free on meta), then memory and one random init: PyTorch's per-layer
        # default init would be drawn and then overwritten.
        with torch.device("meta"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(previous)
    if device.type != "meta":
        model.to_empty(device=device)
        with torch.no_grad():
            init_weights(model)
    return model.eval()


def __getattr__(name: str) -> Any:
    # Lazy access to the torch-based classes, so importing this package stays cheap.
    if name == "GPT2Model":
        from instructune.models.gpt2 import GPT2Model

        return GPT2Model
    if name == "LlamaModel":
        from instructune.models.llama import LlamaModel

        return LlamaModel
    if name == "KVCache":
        from instructune.models.layers import KVCache

        return KVCache
    raise AttributeError(f"module 'instructune.models' has no attribute {name!r}")
