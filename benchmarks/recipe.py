"""Quality per second of fine-tuning recipes on the book's data (prints figures; not a test).

Each recipe is a full ``instructune finetune`` run of the embedded SmolLM2-135M-Instruct on the
book's 1,100 records, one process per seed, one after the other: train, answer the 110 test
records, score them. Printed per run: the command's wall time and its parts (training,
answering), the test split's ROUGE-L and exact match, and with ``--validation`` the same two
on the validation split (answered afterwards, outside the timed command: recipes are chosen on
it). Then each recipe's mean over its seeds and its time against the first recipe's.

- ``baseline``: ``instructune finetune --model smollm2-135m-instruct --data BOOK`` (the default
  preset: 1 epoch, lr 5e-5 constant, loss on the whole prompt).
- ``smollm2-book``: ``--preset smollm2-book`` (issue 14.6).

Timings are only comparable on a quiet machine, within minutes; the CPU's flags and fp32
matmul peak are printed first.

    python benchmarks/recipe.py                                   # baseline seed 123, preset x3
    python benchmarks/recipe.py --recipes smollm2-book --seeds 123 --validation
    python benchmarks/recipe.py --recipes baseline --extra="--lr 1e-4"   # try a variation
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"

RECIPES = {
    "baseline": ["--model", "smollm2-135m-instruct"],
    "smollm2-book": ["--preset", "smollm2-book"],
}


def _instructune(*args: str) -> list[str]:
    return [sys.executable, "-m", "instructune", *args]


def run_recipe(name: str, seed: int, args: argparse.Namespace) -> dict:
    """One timed ``finetune`` run; its figures from run.json and scores.json."""
    out = Path(args.out) / f"{name}-{seed}"
    cmd = _instructune(
        "finetune",
        *RECIPES[name],
        "--data",
        args.data,
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--overwrite",
        "--quiet",
        *shlex.split(args.extra),
    )
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    run = json.loads((out / "run.json").read_text())
    scores = json.loads((out / "scores.json").read_text())["summary"]["model_response"]
    row = {
        "recipe": name,
        "seed": seed,
        "wall_s": wall,
        "train_s": run["timings"]["train_s"],
        "answer_s": run["timings"]["generate_s"],
        "steps": run["results"]["steps"],
        "val_loss": run["results"]["val_loss"],
        "test_rouge_l": scores["metrics"]["rouge_l"],
        "test_exact_match": scores["metrics"]["exact_match"],
    }
    if args.validation:
        row.update(_validation_scores(out, run["config"]))
    if not args.keep_checkpoints:
        # The saved model, its answers and its metrics stay; the checkpoints (weights and
        # optimizer state, 1.3 GB a run of this model) would fill the disk over a sweep.
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    return row


def validation_records(config: dict) -> list[dict]:
    """The validation split a run was trained beside, from its run.json ``config``: its
    ``--val-data`` file, or the 85/10/5 split of its ``--data`` (with its split seed)."""
    from instructune.data.records import split_records
    from instructune.data.sources import load_source

    if config.get("val_data"):
        return list(load_source(config["val_data"]))
    _train, _test, val = split_records(
        load_source(config["data"]), shuffle_seed=config.get("split_shuffle_seed")
    )
    return val


def _validation_scores(out: Path, config: dict) -> dict:
    """Answer the run's validation split with its model (greedy, as the test split) and score."""
    from instructune.evaluation.textmetrics import mean_of, text_metrics

    val_file = out / "validation-records.json"
    val_file.write_text(json.dumps(validation_records(config), ensure_ascii=False))
    answers = out / "validation-responses.json"
    answers.unlink(missing_ok=True)  # a rerun scores the model as it is now
    cmd = _instructune(
        "generate", "--model", str(out), "--data", str(val_file), "--out", str(answers),
        "--max-new-tokens", str(config["max_new_tokens"]), "--quiet",
    )  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    records = json.loads(answers.read_text())
    metrics = [text_metrics(r["model_response"], r["output"]) for r in records]
    return {
        "val_rouge_l": mean_of([m["rouge_l"] for m in metrics]),
        "val_exact_match": mean_of([m["exact_match"] for m in metrics]),
    }


def _print_row(r: dict) -> None:
    val = f"{r['val_rouge_l']:>8.3f} {r['val_exact_match']:>7.3f}" if "val_rouge_l" in r else ""
    print(
        f"{r['recipe']:<14} {r['seed']:>5} {r['steps']:>6} {r['wall_s']:>7.0f} {r['train_s']:>7.0f}"
        f" {r['answer_s']:>7.0f} {r['val_loss']:>8.4f} {r['test_rouge_l']:>8.3f}"
        f" {r['test_exact_match']:>7.3f} {val}",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="the book's instruction-data.json")
    p.add_argument("--recipes", default="baseline,smollm2-book", help=f"of {', '.join(RECIPES)}")
    p.add_argument("--seeds", default="123,124,125", help="seeds of every recipe but baseline")
    p.add_argument("--baseline-seeds", default="123", help="seeds of the baseline")
    p.add_argument("--validation", action="store_true", help="also score the validation split")
    p.add_argument(
        "--extra", default="", help='more finetune flags for every run (--extra="--flag")'
    )
    p.add_argument("--out", default=str(REPO / "runs" / "recipe-bench"))
    p.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="keep each run's checkpoints/ (removed once it is scored: 1.3 GB a run)",
    )
    args = p.parse_args(argv)
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data} not found; pass --data PATH to the book's file")

    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine import machine_lines

    for line in machine_lines():
        print(line)
    print(
        f"{'recipe':<14} {'seed':>5} {'steps':>6} {'wall s':>7} {'train':>7} {'answer':>7}"
        f" {'val loss':>8} {'rouge_l':>8} {'EM':>7} {'val rouge_l':>8} {'val EM':>7}"
    )
    rows = []
    for name in args.recipes.split(","):
        seeds = args.baseline_seeds if name == "baseline" else args.seeds
        for seed in (int(s) for s in seeds.split(",")):
            rows.append(run_recipe(name, seed, args))
            _print_row(rows[-1])
    first = None
    for name in args.recipes.split(","):
        mine = [r for r in rows if r["recipe"] == name]
        mean = {
            k: sum(r[k] for r in mine) / len(mine)
            for k in ("wall_s", "test_rouge_l", "test_exact_match")
        }
        first = first or mean
        val = ""
        if args.validation:  # what a recipe is chosen by
            val_rouge = sum(r["val_rouge_l"] for r in mine) / len(mine)
            val_em = sum(r["val_exact_match"] for r in mine) / len(mine)
            val = f"; validation rouge_l {val_rouge:.3f}, exact_match {val_em:.3f}"
        print(
            f"{name}: mean of {len(mine)} seed(s): {mean['wall_s']:.0f} s end to end "
            f"({mean['wall_s'] / first['wall_s']:.2f}x the first recipe), test rouge_l "
            f"{mean['test_rouge_l']:.3f}, exact_match {mean['test_exact_match']:.3f}{val}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
