"""What a run measures: metrics.jsonl, throughput, model FLOPs utilisation, peak memory.

``metrics.jsonl`` holds one JSON object a line, of two kinds:

- ``{"kind": "step", "step", "epoch", "tokens_seen", "supervised_tokens", "loss", "lr",
  "tokens_per_s", "elapsed_s"}`` after every optimizer step (``loss``: that step's mean loss
  per supervised token; ``tokens_per_s``: supervised tokens per second of training so far);
- ``{"kind": "eval", "step", "epoch", "tokens_seen", "train_loss", "val_loss", "lr",
  "tokens_per_s"}`` at every evaluation (the book's ``train_losses`` / ``val_losses``). Each
  measure of the run's objective is logged as ``train_<name>`` and ``val_<name>``: DPO adds
  ``chosen_reward``, ``rejected_reward``, ``margin`` and ``accuracy`` to ``loss`` (the step
  records' ``loss`` is then the mean per-pair DPO loss).

``epoch`` is fractional (1.5 = half-way through the second epoch), as the book's plot.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from instructune.utils.io import atomic_write_text

# Fields that depend on the clock, not on the computation (left out when comparing runs).
TIMING_FIELDS = ("tokens_per_s", "elapsed_s")


class MetricsLog:
    """Appends records to ``metrics.jsonl`` (only on the main process; others pass None)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open

    def write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Force the lines written so far to disk (at checkpoints)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (a torn last line, from a kill, is ignored)."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_metrics(path: str | os.PathLike, step: int) -> int:
    """Keep only records up to and including ``step`` (a resume from that step); return count."""
    path = Path(path)
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept)
    atomic_write_text(path, text)
    return len(kept)


def without_timings(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records minus clock-dependent fields: what two identical runs share exactly."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


# ---------------------------------------------------------------------------- throughput


class Throughput:
    """Counts supervised tokens and positions over training time (evaluation excluded)."""

    def __init__(self, seconds: float = 0.0, supervised: int = 0, positions: int = 0) -> None:
        self.seconds = seconds
        self.supervised = supervised
        self.positions = positions
        self._start: float | None = None

    def start(self) -> None:
        self._start = time.perf_counter()

    def stop(self, *, supervised: int, positions: int) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self._start = None
        self.supervised += supervised
        self.positions += positions

    @property
    def supervised_per_s(self) -> float:
        return self.supervised / self.seconds if self.seconds > 0 else 0.0

    @property
    def positions_per_s(self) -> float:
        return self.positions / self.seconds if self.seconds > 0 else 0.0


def count_matmul_params(model) -> int:
    """Weight-matrix parameters, including the output head once: the N of 6·N·tokens.

    Counts every ``nn.Linear`` weight plus ``model.output_weight`` (the tied token embedding
    for GPT-2), and not the embedding lookups (a gather, not a matmul). ``gpt2``: 123.5M.
    """
    from torch import nn

    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear):
            seen[id(module.weight)] = module.weight.numel()
    head = getattr(model, "output_weight", None)
    if head is not None:
        seen[id(head)] = head.numel()
    return sum(seen.values())


class MatmulProbe:
    """Times one ``torch.mm`` of two n×n matrices, made (and multiplied once, to warm up the
    thread pool and packing buffers) when the probe is made, so that it can be timed again
    and again: after every training step, say, where the machine's speed drifts.

    Uses the current ``torch.get_num_threads()``, so make it in the process you measure.
    """

    def __init__(self, dtype=None, n: int = 4096) -> None:
        import torch

        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=gen).to(dtype or torch.float32)
        self.b = torch.randn(n, n, generator=gen).to(dtype or torch.float32)
        self.n = n
        torch.mm(self.a, self.b)

    def seconds(self) -> float:
        import torch

        start = time.perf_counter()
        torch.mm(self.a, self.b)
        return time.perf_counter() - start

    def flops(self) -> float:
        """FLOP/s of one product, now."""
        return 2 * self.n**3 / self.seconds()


def matmul_peak_flops(dtype=None, *, n: int = 4096, repeats: int = 3) -> float:
    """FLOP/s of one ``torch.mm`` of two n×n matrices: the median of ``repeats`` timed runs
    (see :class:`MatmulProbe`)."""
    probe = MatmulProbe(dtype, n)
    return 2 * n**3 / statistics.median(probe.seconds() for _ in range(repeats))


def supervised_mfu(n_params: int, supervised_tokens_per_s: float, peak_flops: float) -> float:
    """6·N·(supervised tokens/s) ÷ peak: the share of the machine spent on useful training."""
    return 6 * n_params * supervised_tokens_per_s / peak_flops


def peak_rss_bytes() -> int | None:
    """Peak resident memory of this process in bytes, or None where it cannot be read.

    ``resource.getrusage`` (Unix: ``ru_maxrss``, KiB on Linux, bytes on macOS); on Windows,
    which has no ``resource`` module, psutil's ``peak_wset`` when psutil is installed.
    """
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    try:
        import psutil
    except ImportError:
        return None
    peak = getattr(psutil.Process().memory_info(), "peak_wset", None)  # Windows only
    return int(peak) if peak is not None else None


def environment() -> dict[str, Any]:
    """Library versions and the machine, for run.json."""
    from importlib import metadata

    versions = {}
    for name in ("instructune", "torch", "numpy", "tiktoken", "tokenizers", "safetensors"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    import torch

    return {
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
