"""benchmarks/training.py on a tiny GPT-2: the figures issue 14.3 asks for (MFU against the
row's own precision's peak, each step's loss for the bf16-against-fp32 curve) and the per-step
peak probe. The benchmark's child processes run as they do for the real models."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from helpers import FIXTURES

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import training as bench  # noqa: E402  (benchmarks/training.py, found through sys.path)

TINY = {"n_layers": 2, "emb_dim": 32, "n_heads": 2, "hidden_dim": 64, "context_length": 128}
SPEC = {
    "model": "gpt2",
    "model_overrides": TINY,
    "data": str(FIXTURES / "instructions-40.json"),
    "batch_size": 4,
    "threads": 1,
    "max_length": 128,
    "grouped": False,
    "steps": 3,
    "peak_n": 128,  # the tiny model's products are small; so is this probe (bf16 is emulated)
}


def test_curve_gap_is_the_largest_relative_gap_and_its_step():
    worst, at, mean = bench.curve_gap([2.0, 1.0, 0.5], [2.0, 1.01, 0.52])
    assert (worst, at, mean) == pytest.approx((0.04, 2, 0.05 / 3))
    with pytest.raises(ValueError, match="3 and 2 steps"):
        bench.curve_gap([2.0, 1.0, 0.5], [2.0, 1.0])


@pytest.mark.slow
def test_rows_give_each_steps_loss_and_mfu_against_their_own_precisions_peak():
    fp32 = bench._child({**SPEC, "precision": "fp32", "step_peak": True})
    bf16 = bench._child({**SPEC, "precision": "bf16", "step_peak": True})
    for r in (fp32, bf16):
        assert len(r["losses"]) == SPEC["steps"] + 1  # the warm-up step's too
        assert all(math.isfinite(x) and x > 0 for x in r["losses"])
        assert len(r["step_mfus"]) == SPEC["steps"] and min(r["step_mfus"]) > 0
        useful = 6 * r["n_params"] * r["supervised_per_s"]
        assert r["mfu"] == pytest.approx(useful / r["peak_flops"])
        assert r["mfu_fp32_peak"] == pytest.approx(useful / r["fp32_peak_flops"])
    assert fp32["peak_flops"] == fp32["fp32_peak_flops"]
    assert bf16["peak_flops"] != bf16["fp32_peak_flops"]  # a bf16 product was timed
    # Same weights and the same first batch: the first losses agree to bf16's rounding.
    assert bf16["losses"][0] == pytest.approx(fp32["losses"][0], rel=0.02)
    assert bf16["losses"][0] != fp32["losses"][0]


@pytest.mark.slow
def test_loss_curves_compare_bf16_with_fp32_or_say_why_not(capsys):
    bench.loss_curves(["gpt2"], SPEC, 4, skip_reason=bench.NO_FAST_BF16)
    out = capsys.readouterr().out
    assert "skipped: this CPU has no AVX512-BF16 or AMX" in out
    assert "largest gap" not in out

    bench.loss_curves(["gpt2"], SPEC, 4, skip_reason=None)
    out = capsys.readouterr().out
    assert "training loss over the first 4 steps (target: within 2%)" in out
    line = next(x for x in out.splitlines() if "largest gap" in x)
    assert line.strip().startswith("gpt2: largest gap") and line.endswith("-> within 2%")
    assert "fp32 loss at steps 0: " in out and "bf16 loss at steps 0: " in out
