"""Settings: presets, YAML files, flags, in that order; bad settings named clearly."""

from __future__ import annotations

import json

import pytest

from instructune.cli.main import main
from instructune.config import (
    PRESETS,
    ConfigError,
    DpoConfig,
    FinetuneConfig,
    apply_overrides,
    dump_yaml,
    format_config,
    nearest_setting,
    preset,
    resolve_config,
)


def test_book_preset_is_the_books_settings():
    cfg = preset("book")
    assert (cfg.model, cfg.data, cfg.style) == ("gpt2-medium", "book", "alpaca")
    assert (cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.epochs) == (5e-5, 0.1, 8, 2)
    assert (cfg.max_length, cfg.seed, cfg.eval_every, cfg.eval_batches) == (1024, 123, 5, 5)
    assert cfg.lr_schedule == "constant" and cfg.precision == "auto"


def test_smollm2_book_preset_and_the_cli_lists_every_preset():
    from instructune.cli.main import build_parser
    from instructune.config import PRESETS

    cfg = preset("smollm2-book")
    assert (cfg.model, cfg.data, cfg.style) == ("smollm2-135m-instruct", "book", "chat")
    assert cfg.mask_instructions and cfg.lr_schedule == "cosine" and cfg.precision == "auto"
    assert cfg.freeze_blocks == 0 and cfg.epochs == 1 and cfg.max_steps is None
    assert cfg.system_prompt == ""  # an empty system turn, not SmolLM2's default
    assert cfg.group_by_length is False  # chosen on the validation split (docs/results.md)
    finetune = build_parser()._subparsers._group_actions[0].choices["finetune"]
    (choice,) = [a for a in finetune._actions if a.dest == "preset"]
    assert list(choice.choices) == list(PRESETS)


def test_lora_on_top_of_a_preset_drops_its_frozen_blocks_but_not_the_users(tmp_path):
    # smollm2-book freezes the embedding for full fine-tuning; LoRA keeps every base weight
    # fixed anyway, so `--preset smollm2-book --lora-rank 16` must not fail on a setting the
    # user never gave.
    cfg = resolve_config(preset_name="smollm2-book", flags={"lora_rank": 16})
    assert cfg.lora_rank == 16 and cfg.freeze_blocks is None
    assert resolve_config(preset_name="smollm2-book").freeze_blocks == 0
    given = resolve_config(preset_name="smollm2-book", flags={"lora_rank": 16, "freeze_blocks": 2})
    assert given.freeze_blocks == 2  # the user's own: the run refuses it, naming both
    path = tmp_path / "run.yaml"
    path.write_text("preset: smollm2-book\nfreeze-blocks: 3\n")
    from_file = resolve_config(config_file=path, flags={"lora_rank": 16})
    assert from_file.freeze_blocks == 3


def test_default_preset_is_offline_and_sparse():
    cfg = resolve_config()
    assert cfg.model == "smollm2-135m-instruct" and cfg.data == "demo"
    assert cfg.eval_every > 5
    assert cfg.max_length == 256 and cfg.group_by_length is True


def test_max_length_unset_means_the_models_context_length():
    # None is resolved against the model by the pipeline; the presets keep their lengths.
    assert FinetuneConfig().max_length is None
    assert "context length" in FinetuneConfig.model_fields["max_length"].description
    assert (preset("default").max_length, preset("book").max_length) == (256, 1024)


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
        ("learning_rate: 1\n", "setting 'learning_rate' (the nearest known setting is 'lr')"),
        ("batchsize: 8\n", "setting 'batchsize' (the nearest known setting is 'batch_size')"),
        ("max-lenght: 8\n", "setting 'max-lenght' (the nearest known setting is 'max_length')"),
        (
            "batch_size: eight\n",
            "setting 'batch_size' (records per micro-batch and process): "
            "input should be a valid integer, got 'eight'",
        ),
        ("batch_size: true\n", "setting 'batch_size' (records per micro-batch and process): input"),
        ("epochs: 2.5\n", "setting 'epochs' (passes over the training split): input should be"),
        ("lr_schedule: linear\n", "should be 'constant' or 'cosine', got 'linear'"),
        ("device: tpu\n", "setting 'device' ("),
        ("max_length: 1\n", "setting 'max_length' (truncate"),
        ("preset: fast\n", "unknown preset 'fast'"),
    ],
)
def test_bad_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        resolve_config(config_file=path)
    assert str(caught.value).startswith(f"{path}: ")  # the source first
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "text, message", [("- a\n- b\n", "must be a mapping"), ("lr: [1\n", "not valid YAML")]
)
def test_unreadable_config_files_are_named(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        resolve_config(config_file=path)


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 0\nlr: -1\nwarmup: 3\n")
    with pytest.raises(ConfigError) as caught:
        resolve_config(config_file=path)
    lines = str(caught.value).splitlines()
    assert len(lines) == 3 and all(line.startswith(str(path)) for line in lines)


def test_errors_name_the_command_line_and_presets_as_sources():
    with pytest.raises(ConfigError, match=r"^command line: setting 'epochs' \(passes"):
        resolve_config(flags={"epochs": 0})
    with pytest.raises(ConfigError, match="^preset 'default': unknown setting 'x'"):
        apply_overrides(preset("default"), {"x": 1}, source="preset 'default'")


def test_nearest_setting_prefers_abbreviations_then_spelling():
    assert nearest_setting("learning_rate") == "lr"
    assert nearest_setting("grad-accumulation") == "grad_accum"
    assert nearest_setting("Epoch") == "epochs"


def test_every_setting_is_described_once():
    for name, info in FinetuneConfig.model_fields.items():
        assert info.description and len(info.description) > 10, name
    for values in PRESETS.values():
        assert set(values) <= set(FinetuneConfig.model_fields)


def test_yaml_round_trip_and_printing(tmp_path):
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


def test_run_json_round_trip_keeps_every_value(tmp_path):
    cfg = resolve_config(flags={"out": tmp_path, "max_length": None, "grad_clip": 1})
    assert cfg.out == str(tmp_path) and cfg.grad_clip == 1.0  # a path as text, an int as float
    again = FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())), source="run.json")
    assert again == cfg and again.max_length is None


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


def test_validate_rejects_nonsense():
    with pytest.raises(ConfigError, match="setting 'batch_size'"):
        FinetuneConfig.model_construct(batch_size=0).validate()  # built without validation
    with pytest.raises(ConfigError, match="^run.json: setting 'batch_size'"):
        FinetuneConfig.from_dict({"batch_size": 0}, source="run.json")
    with pytest.raises(ValueError, match="batch_size"):
        FinetuneConfig(batch_size=0)
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("fast")


def test_assignment_is_validated():
    cfg = preset("default")
    cfg.out = "elsewhere"  # load_run_config points a run at its directory this way
    assert cfg.out == "elsewhere"
    with pytest.raises(ConfigError, match="setting 'epochs'"):
        cfg.epochs = 0
    assert cfg.epochs == 1


def test_dpo_refuses_finetune_only_loss_settings_it_would_ignore():
    assert DpoConfig.from_dict({"loss_average": "token"}).loss_average == "token"
    with pytest.raises(ConfigError, match="loss_average.*DPO's loss is a mean over pairs"):
        DpoConfig.from_dict({"loss_average": "record"})
    assert FinetuneConfig.from_dict({"loss_average": "record"}).loss_average == "record"
    with pytest.raises(ConfigError, match="prompt_gradient.*DPO takes the exact gradient"):
        DpoConfig.from_dict({"prompt_gradient": False})
    assert FinetuneConfig.from_dict({"prompt_gradient": False}).prompt_gradient is False
