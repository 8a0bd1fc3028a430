"""Summaries and the files of a run (``scores.json``, ``report.md``, the histogram), and the
paired comparison of two runs.

``scores.json`` is self-describing: it names the judge (backend, model, the digest or name the
server reported), the prompt version and the options, so two runs can be compared honestly.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from instructune.errors import InstructuneError
from instructune.evaluation.textmetrics import TEXT_METRICS, bootstrap_ci, mean_of
from instructune.utils.io import atomic_write_json, atomic_write_text

SCORES_FORMAT = "instructune-scores/1"
HISTOGRAM_NAME = "scores-histogram.png"
LOWEST_N = 10


def record_id(record: dict) -> str:
    """A short hash of a record's instruction, input and output: how runs are paired."""
    ident = [str(record.get(k) or "") for k in ("instruction", "input", "output")]
    return hashlib.sha256(json.dumps(ident, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits)


def summarize_key(rows: list[dict], key: str, judged: bool) -> dict:
    """Means of the text metrics and, when judged, the judge's statistics for one response key."""
    entries = [r["responses"][key] for r in rows]
    metrics = {m: _round(mean_of([e["metrics"][m] for e in entries])) for m in TEXT_METRICS}
    emb = [e.get("embedding_similarity") for e in entries]
    if any(v is not None for v in emb):
        metrics["embedding_similarity"] = _round(mean_of(emb))
    summary: dict = {"n": len(entries), "metrics": metrics, "judge": None}
    if judged:
        scores = [e["judge"]["score"] for e in entries if e["judge"]["score"] is not None]
        summary["judge"] = judge_stats(scores, total=len(entries))
        summary["judge"]["empty"] = sum(e["judge"]["status"] == "empty" for e in entries)
    return summary


def judge_stats(scores: Sequence[int], *, total: int) -> dict:
    """Mean and median with seeded bootstrap 95% intervals, and "scored N of M"."""
    stats = {
        "scored": len(scores),
        "of": total,
        "unscored": total - len(scores),
        "text": f"scored {len(scores)} of {total}",
        "mean": None,
        "mean_ci95": None,
        "median": None,
        "median_ci95": None,
    }
    if scores:
        stats["mean"] = _round(float(np.mean(scores)), 2)
        stats["median"] = _round(float(statistics.median(scores)), 2)
        stats["mean_ci95"] = [_round(v, 2) for v in bootstrap_ci(scores, "mean")]
        stats["median_ci95"] = [_round(v, 2) for v in bootstrap_ci(scores, "median")]
    return stats


def lowest(rows: list[dict], key: str, judged: bool, n: int = LOWEST_N) -> list[dict]:
    """The ``n`` lowest-scored records for ``key`` (by judge score, else by ROUGE-L).

    Unscored records are not ranked here (they are listed as unscored in the report).
    """

    def value(row: dict) -> float | None:
        entry = row["responses"][key]
        return entry["judge"]["score"] if judged else entry["metrics"]["rouge_l"]

    ranked = sorted((r for r in rows if value(r) is not None), key=lambda r: (value(r), r["index"]))
    return [
        {
            "index": r["index"],
            "id": r["id"],
            "value": value(r),
            "instruction": r["instruction"],
            "input": r["input"],
            "output": r["output"],
            "response": r["responses"][key]["response"],
        }
        for r in ranked[:n]
    ]


def plot_histogram(doc: dict, path: str | Path) -> Path | None:
    """One histogram per response key (judge scores, or ROUGE-L x 100 without a judge)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = doc["response_keys"]
    judged = doc["judge"] is not None
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.6 * len(keys)), squeeze=False)
    bins = np.arange(0, 105, 5)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        if judged:
            values = [r["responses"][key]["judge"]["score"] for r in doc["records"]]
        else:
            values = [100 * r["responses"][key]["metrics"]["rouge_l"] for r in doc["records"]]
        values = [v for v in values if v is not None]
        ax.hist(values, bins=bins, color="tab:blue", edgecolor="white")
        label = "judge score" if judged else "ROUGE-L x 100"
        ax.set_title(f"{key}: {label} (n={len(values)})")
        ax.set_xlim(0, 100)
        ax.set_ylabel("records")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("judge score (0-100)" if judged else "ROUGE-L x 100")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)  # atomic, like every other file we write
    return path


def _clip(text: str, limit: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_summary(doc: dict, *, clip: int | None = 160) -> str:
    """The summary and the lowest-scored records as plain text (printed, and in report.md)."""
    lines: list[str] = []
    judge = doc["judge"]
    if judge:
        ident = judge.get("digest") or judge.get("reported_model") or "not reported"
        lines.append(
            f"judge: {judge['backend']}:{judge['model']} (server: {ident}), prompt "
            f"{judge['prompt_version']}, options {json.dumps(judge['options'], sort_keys=True)}"
        )
    else:
        lines.append("judge: none (text metrics only)")
    emb = doc.get("embedding") or {}
    if not emb.get("available") and emb.get("reason"):
        lines.append(f"embedding similarity: {emb['reason']}")
    for key in doc["response_keys"]:
        s = doc["summary"][key]
        lines.append("")
        lines.append(f"[{key}] {s['n']} records")
        lines.append(
            "  "
            + ", ".join(
                f"{m} {v:.3f}" if v is not None else f"{m} n/a" for m, v in s["metrics"].items()
            )
        )
        j = s["judge"]
        if j:
            if j["mean"] is not None:
                lines.append(
                    f"  judge: {j['text']}; mean {j['mean']:.2f} "
                    f"[95% CI {j['mean_ci95'][0]:.2f}, {j['mean_ci95'][1]:.2f}], median "
                    f"{j['median']:.1f} [{j['median_ci95'][0]:.1f}, {j['median_ci95'][1]:.1f}]"
                )
            else:
                lines.append(f"  judge: {j['text']}")
            if j["empty"]:
                lines.append(f"  ({j['empty']} empty responses scored 0 without asking)")
        what = "judge score" if j else "ROUGE-L"
        lines.append(f"  lowest {len(doc['lowest'][key])} by {what}:")
        for item in doc["lowest"][key]:
            value = item["value"]
            shown = f"{value}" if j else f"{value:.3f}"
            instruction = item["instruction"] if clip is None else _clip(item["instruction"], clip)
            response = item["response"] if clip is None else _clip(item["response"], clip)
            output = item["output"] if clip is None else _clip(item["output"], clip)
            lines.append(f"  #{item['index']} ({shown}) {instruction}")
            lines.append(f"      expected: {output}")
            lines.append(f"      response: {response}")
    return "\n".join(lines)


def write_outputs(doc: dict, out_dir: str | Path, *, histogram: bool = True) -> dict[str, str]:
    """Write ``scores.json``, ``report.md`` and the histogram PNG into ``out_dir``."""
    out = Path(out_dir)
    paths = {"scores": str(atomic_write_json(out / "scores.json", doc))}
    report = "# Evaluation report\n\n```\n" + format_summary(doc, clip=None) + "\n```\n"
    paths["report"] = str(atomic_write_text(out / "report.md", report))
    if histogram and doc["records"]:
        paths["histogram"] = str(plot_histogram(doc, out / HISTOGRAM_NAME))
    return paths


# ---------------------------------------------------------------- comparing two runs


def load_scores(path: str | Path) -> dict:
    """Read a ``scores.json`` written by :func:`write_outputs`, with a clear error otherwise."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InstructuneError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InstructuneError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != SCORES_FORMAT:
        raise InstructuneError(
            f'{path}: not an instructune scores.json (expected "format": "{SCORES_FORMAT}"); '
            "pass the scores.json files that `instructune evaluate` writes"
        )
    return doc


def _values(doc: dict, key: str, measure: str) -> dict[tuple[str, int], float | None]:
    """``{(record id, occurrence): value}``; the occurrence keeps duplicate records apart."""
    seen: dict[str, int] = {}
    out: dict[tuple[str, int], float | None] = {}
    for rec in doc["records"]:
        n = seen.get(rec["id"], 0)
        seen[rec["id"]] = n + 1
        entry = rec["responses"][key]
        out[(rec["id"], n)] = (
            entry["judge"]["score"] if measure == "judge" else entry["metrics"][measure]
        )
    return out


def _comparable(a: dict, b: dict) -> list[str]:
    ja, jb = a.get("judge"), b.get("judge")
    if not ja or not jb:
        return []
    notes = []
    for field in ("backend", "model", "digest", "prompt_version", "options"):
        if ja.get(field) != jb.get(field):
            notes.append(
                f"the runs differ in the judge's {field}: {ja.get(field)!r} vs {jb.get(field)!r}"
            )
    return notes


def compare_runs(
    a_path: str | Path, b_path: str | Path, *, response_key: str | None = None
) -> dict:
    """Pair two runs' records by :func:`record_id` and compare B with A.

    The measure is the judge's score when both runs were judged, ROUGE-L otherwise. For each
    paired response key: the mean of B - A with a seeded bootstrap 95% interval, and how often
    B wins, ties or loses. Keys are paired by name, or, when each run has a single key, with
    each other; ``response_key`` picks one key present in both.
    """
    a, b = load_scores(a_path), load_scores(b_path)
    ka, kb = a["response_keys"], b["response_keys"]
    if response_key is not None:
        for path, keys in ((a_path, ka), (b_path, kb)):
            if response_key not in keys:
                raise InstructuneError(f"{path}: no response key {response_key!r} (it has {keys})")
        pairs = [(response_key, response_key)]
    else:
        pairs = [(k, k) for k in ka if k in kb]
        if not pairs and len(ka) == 1 and len(kb) == 1:
            pairs = [(ka[0], kb[0])]
        if not pairs:
            raise InstructuneError(
                f"{a_path} has response keys {ka} and {b_path} has {kb}: none in common; "
                "pick one with --response-key"
            )
    measure = "judge" if a.get("judge") and b.get("judge") else "rouge_l"
    result = {
        "a": str(a_path),
        "b": str(b_path),
        "measure": measure,
        "notes": _comparable(a, b),
        "pairs": [],
    }
    for key_a, key_b in pairs:
        va, vb = _values(a, key_a, measure), _values(b, key_b, measure)
        both = [k for k in va if k in vb]
        usable = [k for k in both if va[k] is not None and vb[k] is not None]
        diffs = [vb[k] - va[k] for k in usable]
        ci = bootstrap_ci(diffs, "mean")
        result["pairs"].append(
            {
                "key_a": key_a,
                "key_b": key_b,
                "paired": len(usable),
                "unscored_in_either": len(both) - len(usable),
                "only_in_a": len(va) - len(both),
                "only_in_b": len(vb) - len(both),
                "mean_a": _round(mean_of([va[k] for k in usable])),
                "mean_b": _round(mean_of([vb[k] for k in usable])),
                "mean_diff": _round(mean_of(diffs)),
                "mean_diff_ci95": [_round(v) for v in ci] if ci else None,
                "wins": sum(d > 0 for d in diffs),
                "ties": sum(d == 0 for d in diffs),
                "losses": sum(d < 0 for d in diffs),
            }
        )
    return result


def format_comparison(cmp: dict) -> str:
    """A comparison from :func:`compare_runs` as plain text."""
    what = "judge score" if cmp["measure"] == "judge" else "ROUGE-L"
    lines = [f"A = {cmp['a']}", f"B = {cmp['b']}", f"measure: {what} (B - A)"]
    lines += [f"warning: {note}" for note in cmp["notes"]]
    for p in cmp["pairs"]:
        name = p["key_a"] if p["key_a"] == p["key_b"] else f"{p['key_a']} vs {p['key_b']}"
        lines.append(f"[{name}] {p['paired']} paired records")
        if p["paired"]:
            lo, hi = p["mean_diff_ci95"]
            lines.append(
                f"  mean A {p['mean_a']:.3f}, mean B {p['mean_b']:.3f}, difference "
                f"{p['mean_diff']:+.3f} [95% CI {lo:+.3f}, {hi:+.3f}]"
            )
            lines.append(f"  B wins {p['wins']}, ties {p['ties']}, loses {p['losses']}")
        extra = []
        if p["unscored_in_either"]:
            extra.append(f"{p['unscored_in_either']} unscored in either run")
        if p["only_in_a"] or p["only_in_b"]:
            extra.append(f"{p['only_in_a']} only in A, {p['only_in_b']} only in B")
        if extra:
            lines.append("  left out: " + "; ".join(extra))
    return "\n".join(lines)
