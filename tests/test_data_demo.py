"""The shipped ``demo`` data set: valid, varied, reproducible, and its computed answers right."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from instructune.data.sources import demo_path, load_source

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo():
    return load_source("demo")


def test_demo_is_valid_varied_and_short(demo):
    assert len(demo) >= 300
    assert demo.warnings == [] and demo.skipped == []
    assert sum(1 for r in demo if r["input"]) >= 100
    assert all(set(r) == {"instruction", "input", "output"} for r in demo)
    assert all(len(r["output"]) <= 100 and r["output"].strip() for r in demo)
    kinds = Counter(r["instruction"].split()[0] for r in demo)
    assert len(kinds) >= 15  # many kinds of task, not one template


def test_demo_is_reproducible_from_its_script():
    script = REPO / "scripts" / "make_demo_data.py"
    if not script.exists():
        pytest.skip("scripts/ is not part of an installed package")
    proc = subprocess.run(
        [sys.executable, str(script), "--check", "--out", str(demo_path())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


OPS = {
    "plus": lambda a, b: a + b,
    "minus": lambda a, b: a - b,
    "times": lambda a, b: a * b,
    "divided by": lambda a, b: a // b,
}


def test_computed_answers_are_right(demo):
    checked = 0
    for r in demo:
        q, out = r["instruction"], r["output"]
        if m := re.fullmatch(r"What is (\d+) (plus|minus|times|divided by) (\d+)\?", q):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert out == f"{a} {op} {b} is {OPS[op](a, b)}."
            if op == "divided by":
                assert a % b == 0
        elif m := re.fullmatch(r"What is (\d+) squared\?", q):
            assert out == f"{m[1]} squared is {int(m[1]) ** 2}."
        elif m := re.fullmatch(r"What is (\d+) percent of (\d+)\?", q):
            assert out == f"{m[1]} percent of {m[2]} is {int(m[1]) * int(m[2]) / 100:g}."
        elif m := re.fullmatch(r"Convert (-?\d+) degrees Celsius to Fahrenheit\.", q):
            assert out.endswith(f"is {int(m[1]) * 9 / 5 + 32:g} degrees Fahrenheit.")
        elif q == "Calculate the sum of the numbers.":
            total = sum(int(n) for n in re.findall(r"\d+", r["input"]))
            assert out == f"The sum is {total}."
        elif q.startswith("Sort the following words"):
            assert out == ", ".join(sorted(r["input"].split(", ")))
        elif q.startswith("Sort the numbers"):
            assert out == ", ".join(map(str, sorted(map(int, r["input"].split(", ")))))
        elif q == "How many words are in the following sentence?":
            assert out == f"The sentence has {len(r['input'].split())} words."
        elif m := re.fullmatch(r"Is (\d+) a prime number\?", q):
            n = int(m[1])
            prime = all(n % d for d in range(2, n))
            assert out == f"{n} is {'a' if prime else 'not a'} prime number."
        else:
            continue
        checked += 1
    assert checked >= 80
