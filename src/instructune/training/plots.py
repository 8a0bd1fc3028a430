"""The book's loss figure (7.6): train and validation loss against epochs, tokens seen on top."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_losses(
    records: list[dict[str, Any]], out_dir: str | os.PathLike, *, name: str = "loss"
) -> list[Path]:
    """Write ``loss.png`` and ``loss.pdf`` from the ``eval`` records of metrics.jsonl.

    The bottom axis is epochs seen, the top axis the tokens seen at the same points (the two
    grow together, so one line on the bottom axis carries both scales). Returns the paths.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    from instructune.utils.io import atomic_write_bytes

    evals = [r for r in records if r.get("kind") == "eval" and r.get("train_loss") is not None]
    epochs = [r["epoch"] for r in evals]
    tokens = [r["tokens_seen"] for r in evals]
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(epochs, [r["train_loss"] for r in evals], label="Training loss")
    ax.plot(epochs, [r["val_loss"] for r in evals], linestyle="-.", label="Validation loss")
    ax.set_xlabel("Epochs")
    ax.set_ylabel("Loss")
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
