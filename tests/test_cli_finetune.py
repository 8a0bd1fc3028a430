"""``instructune finetune``'s flags: built from the settings, switchable, and --resume's limits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from instructune.cli.main import main
from instructune.config import FinetuneConfig, preset


def finetune_help(capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["finetune", "--help"])
    assert exited.value.code == 0
    # argparse wraps lines; join them so that each option's help reads as one line.
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def option_help(capsys) -> dict[str, str]:
    """--help's entries: each option's flags and help on one line, by its first flag."""
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    entries: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  -"):
            entries.append(line.strip())
        elif line.startswith("      ") and entries:  # a wrapped continuation
            entries[-1] += " " + line.strip()
    return {entry.split()[0].rstrip(","): entry for entry in entries}


def printed_config(capsys, *flags: str) -> dict:
    assert main(["finetune", *flags, "--print-config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


def test_every_setting_has_a_flag_and_its_help(capsys):
    text = finetune_help(capsys)
    for name, info in FinetuneConfig.model_fields.items():
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert info.description in text, name  # the field's description is the help


def test_help_shows_the_default_presets_values(capsys):
    entries = option_help(capsys)
    not_settings = ("-h", "--config", "--print-config", "--resume")
    settings = {k: v for k, v in entries.items() if k not in not_settings}
    assert all("(default: None)" not in text for text in settings.values())
    assert all(text.endswith(")") and "(default: " in text for text in settings.values())
    shown = preset("default")
    assert (shown.max_length, shown.eval_every, shown.checkpoint_every) == (256, 10, 25)
    assert entries["--max-length"].endswith("none: the model's context length (default: 256)")
    assert entries["--eval-every"].endswith("(default: 10)")
    assert entries["--checkpoint-every"].endswith("(default: 25)")
    assert entries["--group-by-length"].endswith("(default: on)")
    assert entries["--sample-every-epoch"].endswith("(default: on)")
    assert entries["--lr"].endswith("(default: 5e-05)")


def test_every_boolean_has_an_off_switch(capsys):
    booleans = [n for n, f in FinetuneConfig.model_fields.items() if f.annotation is bool]
    assert {"group_by_length", "sample_every_epoch", "evaluate"} <= set(booleans)
    text = finetune_help(capsys)
    for name in booleans:
        flag = name.replace("_", "-")
        assert f"--{flag}, --no-{flag}" in text, name
    on = printed_config(capsys, *[f"--{n.replace('_', '-')}" for n in booleans])
    off = printed_config(capsys, *[f"--no-{n.replace('_', '-')}" for n in booleans])
    assert all(on[n] is True for n in booleans) and all(off[n] is False for n in booleans)


def test_the_default_presets_group_by_length_can_be_turned_off(capsys):
    assert printed_config(capsys)["group_by_length"] is True
    assert printed_config(capsys, "--no-group-by-length")["group_by_length"] is False
    assert printed_config(capsys, "--no-sample-every-epoch")["sample_every_epoch"] is False


def test_none_unsets_a_setting_that_allows_it(capsys):
    cfg = printed_config(capsys, "--max-length", "none", "--style", "none", "--threads", "2")
    assert cfg["max_length"] is None and cfg["style"] is None and cfg["threads"] == 2


def test_flag_values_are_checked(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--batch-size", "eight", "--print-config"])
    assert "--batch-size: expected an integer, got 'eight'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["finetune", "--epochs", "none", "--print-config"])  # epochs cannot be unset
    assert "--epochs: expected an integer, got 'none'" in capsys.readouterr().err
    assert main(["finetune", "--max-length", "1", "--print-config"]) == 1
    assert "command line: setting 'max_length'" in capsys.readouterr().err
    assert main(["finetune", "--style", "plain", "--print-config"]) == 1
    assert "should be 'alpaca', 'phi3' or 'chat', got 'plain'" in capsys.readouterr().err


def test_old_spelling_split_seed_still_works(capsys):
    assert printed_config(capsys, "--split-seed", "7")["split_shuffle_seed"] == 7


def test_finetune_help_does_not_import_torch():
    code = (
        "import sys; from instructune.cli.main import main\n"
        "try:\n    main(['finetune', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--grad-accum" in result.stdout and "--resume" in result.stdout


def test_top_level_help_does_not_import_pydantic_or_yaml():
    code = (
        "import sys; from instructune.cli.main import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('pydantic', 'yaml', 'torch') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "finetune" in result.stdout


# ---------------------------------------------------------------------------- --resume


def fake_run(run_dir: Path, *, step: int, epoch: int, batches_done: int = 0, **settings) -> Path:
    """A run directory as a run leaves it: run.json and its newest checkpoint's state.json."""
    cfg = preset("default").to_dict() | {"epochs": 2, **settings}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"status": "finished", "config": cfg}))
    ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
    ckpt.mkdir(parents=True)
    progress = {"step": step, "epoch": epoch, "batches_done": batches_done}
    (ckpt / "state.json").write_text(json.dumps({"progress": progress}))
    return run_dir


def test_resume_rejects_changing_the_runs_settings(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", step=10, epoch=2)
    assert main(["finetune", "--resume", str(run_dir), "--lr", "1"]) == 1
    err = capsys.readouterr().err
    assert "--lr" in err and "--epochs" in err and "--max-steps" in err  # what may change


def test_resume_may_extend_a_finished_run(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", step=10, epoch=2)
    cfg = printed_config(capsys, "--resume", str(run_dir), "--epochs", "3")
    assert cfg["epochs"] == 3 and cfg["out"] == str(run_dir)
    cfg = printed_config(capsys, "--resume", str(run_dir), "--epochs", "2")  # the same end
    assert cfg["epochs"] == 2
    cfg = printed_config(capsys, "--resume", str(run_dir), "--max-steps", "25")
    assert cfg["max_steps"] == 25 and cfg["epochs"] == 2


def test_resume_refuses_an_end_before_what_was_done(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", step=10, epoch=2)
    assert main(["finetune", "--resume", str(run_dir), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert "--epochs 1 is fewer than" in err and "(2 epochs, 10 steps)" in err
    assert main(["finetune", "--resume", str(run_dir), "--max-steps", "9"]) == 1
    assert "--max-steps 9 is fewer than the 10 steps" in capsys.readouterr().err


def test_resume_counts_a_started_epoch_as_done(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", step=7, epoch=1, batches_done=2, epochs=3)
    assert main(["finetune", "--resume", str(run_dir), "--epochs", "1"]) == 1
    assert "(1 epochs and 2 steps of epoch 2, 7 steps)" in capsys.readouterr().err
    assert printed_config(capsys, "--resume", str(run_dir), "--epochs", "2")["epochs"] == 2


def test_resume_with_epochs_drops_the_runs_step_limit(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run", step=10, epoch=1, batches_done=3, max_steps=10)
    assert main(["finetune", "--resume", str(run_dir), "--epochs", "3", "--print-config"]) == 0
    captured = capsys.readouterr()
    cfg = yaml.safe_load(captured.out)
    assert cfg["epochs"] == 3 and cfg["max_steps"] is None
    assert "--epochs 3 replaces the run's --max-steps 10" in captured.err
