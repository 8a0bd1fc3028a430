"""Device and dtype choices, resolved once at the edge and passed down explicitly."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; any other value is passed to ``torch.device``."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_dtype(name: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """The dtype ``name`` means; ``auto`` is bf16 where ``device`` computes it natively
    (:func:`has_fast_bf16`), else fp32."""
    if isinstance(name, torch.dtype):
        return name
    if name.lower() == "auto":
        fast = device is not None and has_fast_bf16(device)
        return torch.bfloat16 if fast else torch.float32
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, fp32, bf16, fp16") from None


def supports_bf16(device: torch.device) -> bool:
    """Whether bf16 runs on ``device`` at all (on any CPU it does, if slowly, in emulation)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


# Either gives bf16 dot products in hardware; without them torch emulates bf16 matmuls,
# ~50x slower than fp32 on an AVX2 EPYC, so bf16 would only save memory.
FAST_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def has_fast_bf16(device: torch.device) -> bool:
    """Whether bf16 is faster than fp32 on ``device``: a CUDA GPU with bf16, or a CPU with
    AVX512-BF16 or AMX. Decoding reads every weight for each token, so half the bytes is
    close to half the time there."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(cpu_flags() & FAST_BF16_CPU_FLAGS)
    return False
