"""``instructune dpo``'s shell: its flags and preset, YAML, resume rules, and bad records."""

from __future__ import annotations

import json

import pytest
import yaml

from instructune.cli.main import main
from instructune.config import ConfigError, DpoConfig, FinetuneConfig, resolve_config


def test_help_lists_beta_with_the_preset_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["dpo", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--beta X" in text and "(default: 0.1)" in text
    assert "learning rate (AdamW) (default: 5e-06)" in text
    assert "AdamW weight decay (default: 0.01)" in text


def test_print_config_is_the_books_notebook_then_yaml_then_flags(tmp_path, capsys):
    settings = tmp_path / "dpo.yaml"
    settings.write_text("beta: 0.5\nepochs: 2\n", encoding="utf-8")
    assert main(["dpo", "--config", str(settings), "--lr", "1e-5", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["beta"] == 0.5 and cfg["epochs"] == 2 and cfg["lr"] == 1e-5
    assert cfg["weight_decay"] == 0.01 and cfg["batch_size"] == 8 and cfg["out"] == "runs/dpo"
    # Fine-tuning keeps its own settings: no beta there, its defaults unchanged.
    assert "beta" not in FinetuneConfig.model_fields
    assert resolve_config().lr == 5e-5 and resolve_config().weight_decay == 0.1


def test_bad_settings_name_the_setting():
    with pytest.raises(ConfigError, match="setting 'beta'.*greater than 0"):
        resolve_config(flags={"beta": 0.0}, config_class=DpoConfig)
    with pytest.raises(ConfigError, match="nearest known setting is 'beta'"):
        resolve_config(flags={"betta": 0.2}, config_class=DpoConfig)
    with pytest.raises(ConfigError, match="unknown preset 'book'; choose one of dpo"):
        resolve_config(preset_name="book", config_class=DpoConfig)


def test_a_bad_preference_record_names_file_record_and_field(tmp_path, capsys):
    data = tmp_path / "pairs.json"
    records = [
        {"instruction": "Say hi.", "chosen": "Hi.", "rejected": "No."},
        {"instruction": "Say bye.", "chosen": "Bye.", "rejected": "  "},
    ]
    data.write_text(json.dumps(records), encoding="utf-8")
    out = tmp_path / "run"
    code = main(
        ["dpo", "--model", "gpt2", "--init", "random", "--data", str(data), "--out", str(out),
         "--quiet", "--model-overrides", "n_layers=1,emb_dim=16,n_heads=2,hidden_dim=16"]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert f"{data}: record 1: field 'rejected': is empty" in err


def test_resume_refuses_changed_training_settings(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"config": DpoConfig().to_dict()}))
    assert main(["dpo", "--resume", str(out), "--beta", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "continues a run with its own settings" in err and "(got --beta)" in err
