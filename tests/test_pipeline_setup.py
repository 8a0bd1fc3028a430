"""``run_finetune``'s set-up stage: the model it loads, what it says about it, the max length."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from helpers import FIXTURES, TINY_GPT2, tiny_config

from instructune.config import ConfigError
from instructune.pipeline import parse_overrides, run_finetune


def tiny_cfg(out: Path, **settings):
    """A 1-step run of a tiny random GPT-2 on the 40-record fixture (no scoring)."""
    return tiny_config(out, **settings)


def test_load_for_training_gives_a_loaded_model_that_names_its_weights():
    import torch

    from instructune.checkpoints.load import LoadedModel
    from instructune.pipeline import load_for_training

    loaded = load_for_training(tiny_cfg(Path("unused")), torch.device("cpu"))
    assert type(loaded) is LoadedModel  # not a stand-in with the same attribute names
    assert loaded.weights == "random init" and loaded.source == "gpt2"
    assert loaded.config.n_layers == 2 and loaded.tokenizer.eos_id == 50256


@pytest.fixture(scope="module")
def system_turn_run(tmp_path_factory):
    """A run on records of which 5 carry a system turn, with its log lines and stderr."""
    tmp = tmp_path_factory.mktemp("system")
    records = json.loads((FIXTURES / "instructions-40.json").read_text())
    for record in records[:5]:
        record["system"] = "You are a terse assistant."
    data = tmp / "with-system.json"
    data.write_text(json.dumps(records))
    out, lines, err = tmp / "run", [], io.StringIO()
    with contextlib.redirect_stderr(err):
        run_finetune(tiny_cfg(out, data=str(data)), log=lines.append)
    return out, lines, err.getvalue()


def test_run_json_and_the_log_name_the_weights(system_turn_run):
    out, lines, _ = system_turn_run
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == {"source": "gpt2", "weights": "random init"}
    assert any("weights: random init" in line for line in lines), lines


def test_a_style_without_system_turns_says_once_how_many_it_leaves_out(system_turn_run):
    _, _, err = system_turn_run
    notes = [line for line in err.splitlines() if "system turn" in line]
    # The 85% training split holds all 5 (they are the file's first records).
    assert len(notes) == 1 and "5 of 34 records" in notes[0], err


@pytest.mark.filterwarnings("ignore:prompt .* dropped its first")  # context 32: prompts cut
def test_max_length_unset_is_the_models_context_length(tmp_path):
    # Context 32: most records are longer, which the model cannot take uncut.
    overrides = parse_overrides(TINY_GPT2.replace("context_length=128", "context_length=32"))
    out = tmp_path / "run"
    cfg = tiny_cfg(out, model_overrides=overrides, max_length=None)
    lines: list[str] = []
    summary = run_finetune(cfg, log=lines.append)
    assert summary["steps"] == 1
    run = json.loads((out / "run.json").read_text())
    assert run["max_length"] == 32 and run["config"]["max_length"] is None
    assert any("max length 32" in line for line in lines)


def test_max_length_longer_than_the_context_is_refused_before_training(tmp_path):
    overrides = parse_overrides(TINY_GPT2.replace("context_length=128", "context_length=32"))
    out = tmp_path / "run"
    cfg = tiny_cfg(out, model_overrides=overrides, max_length=64)
    with pytest.raises(ConfigError, match=r"max_length 64 .* context length .*\(32 tokens\)"):
        run_finetune(cfg)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()


@pytest.mark.parametrize("average", ["token", "record"])
def test_loss_average_sets_what_the_first_step_minimises(tmp_path, average):
    """Step 1's logged loss is the first batch's loss under the starting weights: its token
    mean, or with ``--loss-average record`` the mean of its records' token means."""
    import torch

    from instructune.pipeline import finetune as stages
    from instructune.training.loop import SupervisedObjective
    from instructune.training.metrics import read_metrics

    cfg = tiny_cfg(tmp_path / "run", mask_instructions=True, loss_average=average)
    run = stages.start(cfg)
    stages.set_up(run)
    batch = run.data.collate([run.data.items[i] for i in run.data.order(0)[0]])
    means = {}
    for name in ("token", "record"):
        objective = SupervisedObjective(per_record=name == "record")
        with torch.no_grad():
            loss_sum = objective.loss_module(run.loaded.model)(*batch).item()
        means[name] = loss_sum / objective.sizes(batch)[0]
    # This batch tells the two apart.
    assert means["token"] != pytest.approx(means["record"], rel=1e-4)
    stages.train(run)
    (step,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "step"]
    assert step["loss"] == pytest.approx(means[average], rel=1e-5)
