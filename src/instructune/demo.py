"""``python -m instructune.demo`` (what ``make demo`` runs): the default fine-tuning, end to end.

Fine-tunes the embedded SmolLM2-135M-Instruct on the shipped demo data with the ``default``
preset (offline, sized for a 2-core CPU), into ``./runs/demo`` (or ``runs/demo-2``, ... when
that exists), then prints where the files are, the loss curve's start and end, a few test
responses, how many answers ended with the end token, and the total time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from instructune.training.metrics import read_metrics

_START = time.perf_counter()


def fresh_dir(base: Path) -> Path:
    """``base`` if it does not exist yet, else the first free ``base-2``, ``base-3``, ..."""
    if not base.exists():
        return base
    n = 2
    while (candidate := base.with_name(f"{base.name}-{n}")).exists():
        n += 1
    return candidate


def summarize(out: Path, summary: dict, *, examples: int = 3) -> str:
    """The closing report: files, the weights, loss curve ends, sample answers, end-token share,
    time."""
    lines = [f"\nfiles in {out}/:"]
    for name, what in [
        (
            "model.safetensors",
            "the fine-tuned weights (+ config.json, tokenizer, instructune.json)",
        ),
        ("responses.json", "the test split with model_response"),
        ("metrics.jsonl", "losses, learning rate and tokens/s"),
        ("loss.png", "the loss curve (also loss.pdf)"),
        ("run.json", "every setting, versions, timings, peak memory"),
        ("scores.json", "text metrics of the responses"),
    ]:
        if (out / name).exists():
            lines.append(f"  {name:<18} {what}")
    model = _run_json(out).get("model")
    if model:  # the default is 4-bit weights dequantised: say what was fine-tuned
        lines.append(f"\nmodel: {model['source']} ({model['weights']})")
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("kind") == "eval"]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(
            f"\nloss curve: train {first['train_loss']:.3f} -> {last['train_loss']:.3f}, "
            f"validation {first['val_loss']:.3f} -> {last['val_loss']:.3f} "
            f"(step {first['step']} -> {last['step']})"
        )
    responses = json.loads((out / "responses.json").read_text(encoding="utf-8"))
    for record in responses[:examples]:
        prompt = record["instruction"] + (f" [{record['input']}]" if record.get("input") else "")
        lines += [
            f"\n> {prompt}",
            f"  expected: {record['output']}",
            f"  model:    {record['model_response']}",
        ]
    share = summary.get("ended_with_eos_share")
    if share is not None:
        reasons = summary.get("finish_reasons", {})
        lines.append(
            f"\n{share:.0%} of {len(responses)} test answers ended with the end token before "
            f"max_new_tokens ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))})"
        )
    lines.append(f"total time {time.perf_counter() - _START:.0f} s (this process)")
    return "\n".join(lines)


def _run_json(out: Path) -> dict:
    try:
        return json.loads((out / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instructune.demo", description=__doc__)
    parser.add_argument("--out", default="runs/demo", help="output directory (a fresh one)")
    parser.add_argument("--max-steps", type=int, help="shorter run (for a quick look)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    from instructune.config import resolve_config
    from instructune.errors import InstructuneError
    from instructune.pipeline import run_finetune

    out = fresh_dir(Path(args.out))
    flags: dict = {"out": str(out)}
    if args.max_steps:
        flags["max_steps"] = args.max_steps
    if args.quiet:
        flags["quiet"] = True
    cfg = resolve_config(preset_name="default", flags=flags)
    try:
        summary = run_finetune(cfg)
    except InstructuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summarize(out, summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
