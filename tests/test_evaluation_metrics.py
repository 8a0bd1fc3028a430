"""Judge-free metrics, statistics, the judge prompt and score parsing (no server needed)."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from instructune.evaluation.prompt import (
    JUDGE_TEMPLATE,
    RETRY_SUFFIX,
    build_judge_prompt,
    estimate_tokens,
    parse_score,
    retry_prompt,
)
from instructune.evaluation.textmetrics import (
    bootstrap_ci,
    exact_match,
    lcs_length,
    length_ratio,
    normalize_text,
    pearson,
    rouge_l,
    spearman,
    text_metrics,
    token_f1,
)


def test_normalisation_drops_case_punctuation_articles_and_extra_space():
    assert normalize_text("  The  Cat, sat on A mat! ") == "cat sat on mat"
    assert normalize_text("An “apple” — and THE end.") == "apple and end"
    # Articles only as whole words: "there" and "another" keep their letters.
    assert normalize_text("There is another") == "there is another"


def test_exact_match_after_normalisation():
    assert exact_match("The hypotenuse is 10 cm.", "the hypotenuse is 10 cm") == 1.0
    assert exact_match("The hypotenuse is 12 cm.", "The hypotenuse is 10 cm.") == 0.0


def test_token_f1_by_hand():
    # pred tokens: [cat, sat, down]; ref: [cat, sat, on, mat] -> common 2, P 2/3, R 2/4
    expected = 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)
    assert token_f1("The cat sat down", "the cat sat on the mat") == pytest.approx(expected)
    assert token_f1("", "") == 1.0
    assert token_f1("something", "") == 0.0
    assert token_f1("dog", "cat") == 0.0
    # repeated tokens count as a multiset: "a a a" style repetition is not rewarded
    assert token_f1("yes yes yes", "yes") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))


def test_rouge_l_by_hand():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    # pred [police, killed, gunman], ref [police, kill, gunman]: LCS 2 -> P = R = 2/3
    assert rouge_l("police killed the gunman", "the police kill the gunman") == pytest.approx(2 / 3)
    # order matters for ROUGE-L but not for F1
    assert token_f1("y x", "x y") == 1.0
    assert rouge_l("y x", "x y") == pytest.approx(0.5)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def test_length_ratio_and_bundle():
    assert length_ratio("one two three four", "one two") == 2.0
    assert length_ratio("anything", "   ") is None
    m = text_metrics("The hypotenuse is 10 cm.", "The hypotenuse of the triangle is 10 cm.")
    assert set(m) == {"exact_match", "token_f1", "rouge_l", "length_ratio"}
    assert m["exact_match"] == 0.0 and 0 < m["rouge_l"] < 1 and m["length_ratio"] == 5 / 8


def test_pearson_and_spearman_known_values():
    x = [1, 2, 3, 4, 5]
    assert pearson(x, [2, 4, 6, 8, 10]) == pytest.approx(1.0)
    assert spearman(x, [1, 4, 9, 16, 25]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson(x, [1, 4, 9, 16, 25]) < 1.0
    assert spearman(x, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties get their average rank: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4].
    a, b = [1, 2, 2, 3], [1, 3, 2, 4]
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError):
        pearson([1, 2], [1, 2, 3])


def test_bootstrap_is_seeded_and_brackets_the_statistic():
    rng = np.random.default_rng(0)
    values = rng.normal(50, 10, size=200)
    lo, hi = bootstrap_ci(values, "mean")
    assert lo < values.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * values.std() / math.sqrt(200), rel=0.2)
    assert bootstrap_ci(values, "mean") == (lo, hi)  # same seed, same interval
    assert bootstrap_ci(values, "mean", seed=1) != (lo, hi)
    mlo, mhi = bootstrap_ci(values, "median")
    assert mlo < float(np.median(values)) < mhi
    assert bootstrap_ci([], "mean") is None
    assert bootstrap_ci([7, 7, 7], "mean") == (7.0, 7.0)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("85", 85),
        ("Score: 85", 85),
        ("85/100", 85),
        ("**85**", 85),
        ("  90\n", 90),
        ("I would give it 70 out of 100.", 70),
        ("0", 0),
        ("100", 100),
        ("85.6", 86),
        ('{"score": 42}', 42),
        ('{"score": "77"}', 77),
        ("150", None),
        ("-5", None),
        ("The answer is good.", None),
        ("", None),
        ('{"score": true}', None),
        ('{"score": 101}', None),
    ],
)
def test_parse_score(reply, score):
    assert parse_score(reply) == score


def test_judge_prompt_is_the_books_text():
    record = {
        "instruction": "Rewrite the sentence using a simile.",
        "input": "The car is very fast.",
        "output": "The car is as fast as lightning.",
    }
    prompt = build_judge_prompt(record, "The car is as fast as a cheetah.")
    alpaca = (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile."
        "\n\n### Input:\nThe car is very fast."
    )
    assert prompt == (
        f"Given the input `{alpaca}` and correct output `The car is as fast as lightning.`, "
        "score the model response `The car is as fast as a cheetah.` on a scale from 0 to 100, "
        "where 100 is the best score. Respond with the integer number only."
    )
    assert JUDGE_TEMPLATE.endswith("Respond with the integer number only.")
    # Without input, no input section (the book's format_input).
    no_input = build_judge_prompt({"instruction": "Say hi.", "input": "", "output": "Hi."}, "Hi")
    assert "### Input" not in no_input and "### Response" not in no_input
    assert retry_prompt(prompt) == prompt + RETRY_SUFFIX


def test_estimate_tokens_errs_high():
    assert estimate_tokens("word " * 300) == 400  # 300 words / 0.75
    assert estimate_tokens("x" * 4000) == 1000  # one "word", 4000 bytes / 4
    assert estimate_tokens("") == 0


def test_evaluation_imports_no_torch(tmp_path):
    import subprocess

    code = (
        "import sys, instructune.evaluation as ev, instructune.cli.evaluate\n"
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)\n"
        "rec = {'instruction': 'Say hi.', 'input': '', 'output': 'Hi.', 'model_response': 'Hi!'}\n"
        f"ev.evaluate_responses([rec], out_dir={str(tmp_path)!r}, quiet=True)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]
    assert (tmp_path / "scores.json").exists()
