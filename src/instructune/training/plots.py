"""The book's loss figure (7.6): train and validation loss against epochs, tokens seen on top.

The same figure serves any measure the evaluations log as ``train_<m>`` / ``val_<m>`` (DPO's
reward margin, as the book's DPO notebook plots it)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_losses(
    records: list[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    name: str = "loss",
    measure: str = "loss",
    label: str = "Loss",
) -> list[Path]:
    """Write ``<name>.png`` and ``<name>.pdf`` from the ``eval`` records of metrics.jsonl:
    ``train_<measure>`` and ``val_<measure>`` (``label`` on the axis and in the legend).

    The bottom axis is epochs seen, the top axis the tokens seen at the same points (the two
    grow together, so one line on the bottom axis carries both scales). Returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    from instructune.utils.io import atomic_write_bytes

    train_key, val_key = f"train_{measure}", f"val_{measure}"
    evals = [r for r in records if r.get("kind") == "eval" and r.get(train_key) is not None]
    epochs = [r["epoch"] for r in evals]
    tokens = [r["tokens_seen"] for r in evals]
    fig, ax = plt.subplots(figsize=(5, 3))
    lower = label[:1].lower() + label[1:]
    ax.plot(epochs, [r[train_key] for r in evals], label=f"Training {lower}")
    ax.plot(epochs, [r.get(val_key) for r in evals], linestyle="-.", label=f"Validation {lower}")
    ax.set_xlabel("Epochs")
    ax.set_ylabel(label)
    ax.legend(loc="upper right")
    if len(evals) >= 2 and epochs[-1] > epochs[0]:
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        # Map epoch ticks to tokens by linear interpolation between the recorded points.
        ticks = [t for t in ax.get_xticks() if epochs[0] <= t <= epochs[-1]]
        top.set_xticks(ticks)
        top.set_xticklabels([_format_tokens(_interp(t, epochs, tokens)) for t in ticks])
        top.set_xlabel("Tokens seen")
    fig.tight_layout()
    out_dir = Path(out_dir)
    paths = []
    for ext in ("png", "pdf"):
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150 if ext == "png" else None)
        paths.append(atomic_write_bytes(out_dir / f"{name}.{ext}", buffer.getvalue()))
    plt.close(fig)
    return paths


def _interp(x: float, xs: list[float], ys: list[float]) -> float:
    for i in range(1, len(xs)):
        if x <= xs[i]:
            span = xs[i] - xs[i - 1]
            frac = (x - xs[i - 1]) / span if span else 0.0
            return ys[i - 1] + frac * (ys[i] - ys[i - 1])
    return ys[-1]


def _format_tokens(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.0f}k"
    return f"{n:.0f}"
