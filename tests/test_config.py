"""Settings: presets, YAML files, flags, in that order; bad settings named clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest

from instructune.cli.main import main
from instructune.config import (
    ConfigError,
    FinetuneConfig,
    format_config,
    preset,
    resolve_config,
)


def test_book_preset_is_the_books_settings():
    cfg = preset("book")
    assert (cfg.model, cfg.data, cfg.style) == ("gpt2-medium", "book", "alpaca")
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (5e-5, 0.1, 8, 2)
    assert (cfg.max_length, cfg.seed, cfg.eval_every, cfg.eval_batches) == (1024, 123, 5, 5)
    assert cfg.lr_schedule == "constant" and cfg.precision == "auto"


def test_default_preset_is_offline_and_sparse():
    cfg = resolve_config()
    assert cfg.model == "smollm2-135m-instruct" and cfg.data == "demo"
    assert cfg.eval_every > 5


def test_precedence_preset_then_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: book\nlr: 1e-4\nbatch_size: 4\nepochs: 3\n")
    cfg = resolve_config(config_file=path, flags={"epochs": 1})
    assert cfg.model == "gpt2-medium"  # from the preset named in the file
    assert cfg.lr == 1e-4 and cfg.batch_size == 4  # the file over the preset ("1e-4" read as str)
    assert cfg.epochs == 1  # the flag over the file
    assert resolve_config(preset_name="default", config_file=path).model == "smollm2-135m-instruct"


@pytest.mark.parametrize(
    "text, message",
    [
        ("learning_rate: 0.1\n", "unknown setting 'learning_rate'"),
        ("batch_size: eight\n", "'batch_size' must be int"),
        ("- a\n- b\n", "must be a mapping"),
        ("lr: [1\n", "not valid YAML"),
        ("lr_schedule: linear\n", "lr_schedule must be constant|cosine"),
    ],
)
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("[", r"\[")):
        resolve_config(config_file=path)


def test_yaml_round_trip_and_printing(tmp_path):
    from instructune.config import dump_yaml

    cfg = resolve_config(
        preset_name="book", flags={"grad_accum": 2, "model_overrides": {"n_layers": 2}}
    )
    path = tmp_path / "saved.yaml"
    dump_yaml(cfg, path)
    again = resolve_config(config_file=path)
    assert again == cfg
    text = format_config(cfg)
    marked = [line.split()[1] for line in text.splitlines() if line.startswith(" *")]
    assert "grad_accum" in marked and "model" in marked and "keep" not in marked
    assert "gpt2-medium" in text and "grad_accum" in text


def test_cli_print_config_applies_flags(capsys, tmp_path):
    assert (
        main(
            [
                "finetune",
                "--preset",
                "book",
                "--lr",
                "2e-5",
                "--grad-accum",
                "4",
                "--model-overrides",
                "n_layers=2,qkv_bias=false",
                "--print-config",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "model: gpt2-medium" in out and "lr: 2.0e-05" in out and "grad_accum: 4" in out
    assert "n_layers: 2" in out and "qkv_bias: false" in out


def test_cli_rejects_changing_settings_on_resume(tmp_path, capsys):
    (tmp_path / "run.json").write_text('{"config": {"model": "gpt2"}}')
    assert main(["finetune", "--resume", str(tmp_path), "--lr", "1"]) == 1
    assert "--lr" in capsys.readouterr().err


def test_finetune_help_does_not_import_torch():
    code = (
        "import sys; from instructune.cli.main import main\n"
        "try:\n    main(['finetune', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "--grad-accum" in result.stdout and "--resume" in result.stdout


def test_validate_rejects_nonsense():
    with pytest.raises(ConfigError, match="batch_size"):
        FinetuneConfig(batch_size=0).validate()
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("fast")
