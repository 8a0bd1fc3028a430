"""The machine line every benchmark prints above its figures: date, CPU model and flags, the
versions, torch's threads, and the fp32/bf16 matmul peak measured in the same process (so a
figure can be read as a share of what this machine did at that moment).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
from pathlib import Path


def cpu_line() -> str:
    """The CPU's model, its logical CPUs and the flags that decide matmul speed, and the OS."""
    from instructune.utils.devices import cpu_flags

    cpu, flags = platform.processor() or "unknown", cpu_flags()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)
    return f"machine: {cpu}; {os.cpu_count()} logical CPUs; flags {shown}; {platform.platform()}"


def machine_lines() -> list[str]:
    import torch

    from instructune.training.metrics import matmul_peak_flops

    try:
        import transformers

        versions = f", transformers {transformers.__version__}"
    except ImportError:
        versions = ""
    fp32 = matmul_peak_flops(torch.float32) / 1e9
    # Without AVX512-BF16/AMX, bf16 matmuls are emulated ~50x slower than fp32: a 512x512 probe
    # says so in a second, where 4096x4096 would take minutes (as benchmarks/training.py does).
    bf16 = matmul_peak_flops(torch.bfloat16, n=512, repeats=1) / 1e9
    if bf16 >= 0.5 * fp32:
        bf16 = matmul_peak_flops(torch.bfloat16) / 1e9
        bf16_text = f"bf16 {bf16:.0f} GFLOP/s"
    else:
        bf16_text = f"bf16 {bf16:.1f} GFLOP/s (512x512 probe: no fast bf16 on this CPU)"
    return [
        f"date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC",
        cpu_line(),
        f"python {platform.python_version()}, torch {torch.__version__}{versions}, "
        f"torch threads {torch.get_num_threads()}",
        f"matmul peak (4096x4096, this process): fp32 {fp32:.0f} GFLOP/s, {bf16_text}",
    ]
