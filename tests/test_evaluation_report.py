"""Report files, the paired comparison of two runs, and the book's example file."""

from __future__ import annotations

import json
import random

import pytest
from judge_server import JudgeServer, response_in

from instructune.errors import InstructuneError
from instructune.evaluation import compare_runs, evaluate_responses, format_comparison
from instructune.evaluation.prompt import build_judge_prompt
from instructune.evaluation.report import SCORES_FORMAT, record_id
from instructune.evaluation.textmetrics import pearson, spearman


def _records(n: int, key: str = "model_response") -> list[dict]:
    return [
        {
            "instruction": f"Spell the number {i}.",
            "input": "",
            "output": f"The number is {i}.",
            key: f"The number is {i}." if i % 4 else "No idea.",
        }
        for i in range(n)
    ]


def test_metrics_only_run_writes_every_file(tmp_path):
    records = _records(12)
    summary = evaluate_responses(records, out_dir=tmp_path, quiet=True)
    for name in ("scores.json", "report.md", "scores-histogram.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "scores-histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((tmp_path / "scores.json").read_text())
    assert doc["format"] == SCORES_FORMAT and doc["judge"] is None
    assert doc["embedding"]["available"] is False and "skipped" in doc["embedding"]["reason"]
    assert "normalisation" in doc["metric_notes"]
    metrics = summary["responses"]["model_response"]["metrics"]
    assert metrics["exact_match"] == pytest.approx(9 / 12)  # i = 0, 4, 8 answered "No idea."
    assert summary["responses"]["model_response"]["judge"] is None
    low = doc["lowest"]["model_response"]
    assert len(low) == 10 and [x["index"] for x in low[:3]] == [0, 4, 8]
    assert low[0]["response"] == "No idea." and low[0]["value"] == 0.0
    report = (tmp_path / "report.md").read_text()
    assert "lowest 10 by ROUGE-L" in report and "No idea." in report


def test_judged_report_records_the_judge_and_the_lowest_ten(tmp_path, capsys):
    records = _records(14)

    def scorer(prompt: str) -> str:
        return "5" if "No idea." in response_in(prompt) else "90"

    with JudgeServer(scorer=scorer) as server:
        evaluate_responses(
            records, out_dir=tmp_path, judge="ollama:llama3", url=server.url, backoff=0.05
        )
    out = capsys.readouterr().out
    assert "scored 14 of 14" in out and "lowest 10 by judge score" in out
    assert "#0 (5)" in out and "response: No idea." in out
    doc = json.loads((tmp_path / "scores.json").read_text())
    judge = doc["judge"]
    assert judge["model"] == "llama3" and judge["digest"] == server.digest
    assert judge["prompt_version"] and judge["options"] == {
        "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}
    }
    s = doc["summary"]["model_response"]["judge"]
    assert s["mean"] == pytest.approx((4 * 5 + 10 * 90) / 14, abs=0.01) and s["median"] == 90
    assert s["mean_ci95"][0] < s["mean"] < s["mean_ci95"][1]
    assert [x["value"] for x in doc["lowest"]["model_response"][:4]] == [5, 5, 5, 5]
    report = (tmp_path / "report.md").read_text()
    assert f"judge: ollama:llama3 (server: {server.digest})" in report
    assert "scored 14 of 14" in report


def _judged_run(tmp_path, name: str, records: list[dict], scores: dict[str, int]) -> str:
    def scorer(prompt: str) -> str:
        return str(scores[response_in(prompt)])

    out = tmp_path / name
    with JudgeServer(scorer=scorer) as server:
        evaluate_responses(
            records,
            out_dir=out,
            judge="ollama:llama3",
            url=server.url,
            backoff=0.05,
            quiet=True,
            histogram=False,
        )
    return str(out / "scores.json")


def test_compare_pairs_records_by_hash_not_position(tmp_path):
    base = _records(10)
    a_records = [dict(r, model_response=f"A{i}") for i, r in enumerate(base)]
    b_records = [dict(r, model_response=f"B{i}") for i, r in enumerate(base)]
    a_scores = {f"A{i}": 50 for i in range(10)}
    # B beats A on 6 records by 10, ties on 2, loses on 2 by 20: mean difference +2.
    b_scores = {f"B{i}": 60 if i < 6 else (50 if i < 8 else 30) for i in range(10)}
    random.Random(0).shuffle(b_records)  # a different order must not matter
    b_records.append({"instruction": "extra", "input": "", "output": "x", "model_response": "B99"})
    b_scores["B99"] = 100
    a = _judged_run(tmp_path, "a", a_records, a_scores)
    b = _judged_run(tmp_path, "b", b_records, b_scores)
    cmp = compare_runs(a, b)
    assert cmp["measure"] == "judge" and cmp["notes"] == []
    (pair,) = cmp["pairs"]
    assert pair["paired"] == 10 and pair["only_in_b"] == 1 and pair["only_in_a"] == 0
    assert (pair["wins"], pair["ties"], pair["losses"]) == (6, 2, 2)
    assert pair["mean_diff"] == pytest.approx(2.0)
    lo, hi = pair["mean_diff_ci95"]
    assert lo < 2.0 < hi
    text = format_comparison(cmp)
    assert "B wins 6, ties 2, loses 2" in text and "+2.000" in text


def test_compare_warns_when_judges_differ_and_falls_back_to_rouge(tmp_path):
    records = _records(6)
    a = _judged_run(tmp_path, "a", records, {r["model_response"]: 70 for r in records})
    evaluate_responses(records, out_dir=tmp_path / "m", quiet=True, histogram=False)
    cmp = compare_runs(a, tmp_path / "m" / "scores.json")
    assert cmp["measure"] == "rouge_l"  # one run has no judge
    assert cmp["pairs"][0]["mean_diff"] == 0.0 and cmp["pairs"][0]["ties"] == 6

    doc = json.loads(open(a).read())
    doc["judge"]["digest"] = "other"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(doc))
    assert any("digest" in n for n in compare_runs(a, other)["notes"])


def test_compare_rejects_other_files(tmp_path):
    bogus = tmp_path / "x.json"
    bogus.write_text("[1, 2]")
    with pytest.raises(InstructuneError, match="not an instructune scores.json"):
        compare_runs(bogus, bogus)
    with pytest.raises(InstructuneError, match="no such file"):
        compare_runs(tmp_path / "missing.json", bogus)


def test_record_id_ignores_the_response():
    r = {"instruction": "i", "input": "", "output": "o", "model_response": "x"}
    assert record_id(r) == record_id(dict(r, model_response="y"))
    assert record_id(r) != record_id(dict(r, input="z"))
    assert record_id(r) == record_id({"instruction": "i", "output": "o"})  # no input = empty


BOOK_KEYS = ["model 1 response", "model 2 response"]


@pytest.mark.shared
def test_the_books_example_file_end_to_end(shared_data, tmp_path):
    """Metrics on both models' responses, and a judge that answers with GPT-4's own scores:
    the pipeline must reproduce the book's means (74.09 and 56.57)."""
    records = json.loads((shared_data / "eval-example-data.json").read_text())
    gpt4 = {
        key: json.loads(
            (shared_data / f"eval-example-scores/gpt4-model-{m}-response.json").read_text()
        )
        for m, key in enumerate(BOOK_KEYS, start=1)
    }
    lookup = {}  # by the whole prompt: some responses recur with other instructions
    for key in BOOK_KEYS:
        for rec, score in zip(records, gpt4[key], strict=True):
            lookup[build_judge_prompt(rec, rec[key])] = score

    with JudgeServer(scorer=lambda p: f"Score: {lookup[p]}") as server:
        summary = evaluate_responses(
            records,
            out_dir=tmp_path,
            response_keys=BOOK_KEYS,
            judge="ollama:llama3",
            url=server.url,
            workers=2,
            backoff=0.05,
            quiet=True,
        )
    m1, m2 = (summary["responses"][k] for k in BOOK_KEYS)
    assert m1["judge"]["mean"] == pytest.approx(74.09) and m2["judge"]["mean"] == pytest.approx(
        56.57
    )
    assert m1["judge"]["text"] == "scored 100 of 100"
    # Model 1 is the better one by every text metric too, as by both judges.
    for metric in ("exact_match", "token_f1", "rouge_l"):
        assert m1["metrics"][metric] > m2["metrics"][metric]
    # ROUGE-L tracks GPT-4's judgement closely on this file (Spearman about 0.85 over both).
    doc = json.loads((tmp_path / "scores.json").read_text())
    rouge = [r["responses"][k]["metrics"]["rouge_l"] for k in BOOK_KEYS for r in doc["records"]]
    judged = gpt4[BOOK_KEYS[0]] + gpt4[BOOK_KEYS[1]]
    assert spearman(rouge, judged) > 0.75 and pearson(rouge, judged) > 0.5
