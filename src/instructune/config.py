"""Every setting of a fine-tuning run, in one typed dataclass, with presets and YAML files.

The order of precedence, lowest first: the dataclass defaults, a preset (``default`` or
``book``), a YAML file (``--config FILE.yaml``, which may name its own ``preset``), then the
command-line flags. The CLI resolves all of this once; below it, code takes typed values.
This module imports neither torch nor yaml at module level.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from instructune.errors import InstructuneError


class ConfigError(InstructuneError, ValueError):
    """A setting is unknown or has a value of the wrong type; the message names the source."""


@dataclass
class FinetuneConfig:
    """The settings of one ``instructune finetune`` run (the book's chapter 7 job).

    ``batch_size`` is the micro-batch of one process; one optimizer step sees
    ``batch_size * grad_accum * world_size`` records and divides the summed token losses by
    the number of supervised tokens in all of them.
    """

    # What to train, on what.
    model: str = "smollm2-135m-instruct"  # registry name, hub id, directory or .gguf
    init: str = "pretrained"  # "pretrained" or "random" (random: registry names, tests)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields (random)
    data: str = "demo"  # data source: a file, a URL or a known name (book, alpaca, demo)
    val_data: str | None = None  # separate validation file: then `data` is used whole
    test_data: str | None = None  # separate test file
    out: str = "runs/finetune"
    style: str | None = None  # alpaca, phi3, chat; None: the model's saved style, else alpaca
    mask_instructions: bool = False  # the book's exercise 7.2: no loss on the prompt
    max_length: int | None = 1024  # the book's allowed_max_length
    group_by_length: bool = False  # batches of similar lengths (less padding)
    split_shuffle_seed: int | None = None  # shuffle before the 85/10/5 split (the book: none)

    # Optimisation.
    epochs: int = 2
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 5e-5
    lr_schedule: str = "constant"  # constant (the book) or cosine
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    grad_clip: float | None = None  # max global gradient norm; None: no clipping
    precision: str = "auto"  # auto, fp32, bf16, fp16 (auto: fp32 on CPU, bf16 on CUDA)
    activation_checkpointing: bool = False
    optimizer_in_backward: bool = False  # AdamW per parameter during backward: no full grads
    compile: bool = False
    seed: int = 123

    # Machine.
    device: str = "auto"  # auto, cpu, cuda, mps
    threads: int | None = None  # torch.set_num_threads; None: torch's default

    # Watching and saving.
    eval_every: int = 5  # optimizer steps between evaluations (the book: 5)
    eval_batches: int = 5  # batches per train/val loss estimate (the book: 5)
    checkpoint_every: int | None = None  # optimizer steps between checkpoints (and at the end)
    keep: int = 2  # checkpoints kept (optimizer state only in the latest), plus the best
    sample_every_epoch: bool = True  # print a generation for the first validation prompt
    quiet: bool = False
    overwrite: bool = False

    # After training.
    max_new_tokens: int = 256  # test-split answers (the book's 7.7: 256)
    gen_batch_size: int = 16
    test_limit: int | None = None  # answer only the first N test records (None: all)
    evaluate: bool = True  # text metrics on the responses (and the judge when given)
    judge: str | None = None  # "ollama:MODEL" or "openai:MODEL"
    judge_url: str | None = None

    def validate(self) -> FinetuneConfig:
        """Check values that a type alone cannot; raise ConfigError naming the setting."""
        checks = [
            (self.init in ("pretrained", "random"), "init must be 'pretrained' or 'random'"),
            (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be constant|cosine"),
            (
                self.precision in ("auto", "fp32", "bf16", "fp16"),
                "precision must be auto|fp32|bf16|fp16",
            ),
            (self.device in ("auto", "cpu", "cuda", "mps") or ":" in self.device, "bad device"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.grad_accum >= 1, "grad_accum must be >= 1"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.eval_every >= 1, "eval_every must be >= 1"),
            (self.eval_batches >= 1, "eval_batches must be >= 1"),
            (self.keep >= 1, "keep must be >= 1"),
            (self.checkpoint_every is None or self.checkpoint_every >= 1, "checkpoint_every >= 1"),
            (self.max_length is None or self.max_length >= 2, "max_length must be >= 2"),
            (self.threads is None or self.threads >= 1, "threads must be >= 1"),
            (self.style in (None, "alpaca", "phi3", "chat"), "style must be alpaca|phi3|chat"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"invalid setting: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "settings") -> FinetuneConfig:
        return apply_overrides(cls(), data, source=source)


# Presets hold only what differs from the dataclass defaults' meaning for that job.
# `default` is sized so that `make demo` (set-up included) finishes on a 2-core CPU in 15 min:
# the embedded 135M model, the shipped demo data, short sequences and sparse evaluation.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "model": "smollm2-135m-instruct",
        "data": "demo",
        "epochs": 1,
        "batch_size": 8,
        "lr": 5e-5,
        "weight_decay": 0.1,
        "max_length": 256,
        "group_by_length": True,
        "eval_every": 10,
        "eval_batches": 2,
        "max_new_tokens": 96,
        "checkpoint_every": 25,
        "out": "runs/finetune",
    },
    # The book's section 7.6: gpt2-medium, AdamW lr 5e-5, weight decay 0.1, batch 8, 2 epochs,
    # allowed_max_length 1024, torch.manual_seed(123), evaluation every 5 steps on 5 batches.
    "book": {
        "model": "gpt2-medium",
        "data": "book",
        "style": "alpaca",
        "epochs": 2,
        "batch_size": 8,
        "grad_accum": 1,
        "lr": 5e-5,
        "weight_decay": 0.1,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "max_length": 1024,
        "seed": 123,
        "eval_every": 5,
        "eval_batches": 5,
        "group_by_length": False,
        "max_new_tokens": 256,
        "out": "runs/book",
    },
}


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(FinetuneConfig)}


def _coerce(name: str, value: Any, type_text: str, source: str) -> Any:
    """Check (and gently convert, e.g. int -> float) one value against its annotated type."""
    optional = "None" in type_text
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: setting '{name}' may not be empty")
    base = type_text.replace("| None", "").strip()
    if base == "bool":
        if isinstance(value, bool):
            return value
    elif base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "5e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif base == "str":
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
    elif base.startswith("dict"):
        if isinstance(value, dict):
            return dict(value)
    else:  # pragma: no cover - every field has one of the types above
        return value
    raise ConfigError(
        f"{source}: setting '{name}' must be {base}, got {type(value).__name__} {value!r}"
    )


def apply_overrides(
    cfg: FinetuneConfig, overrides: dict[str, Any], *, source: str = "settings"
) -> FinetuneConfig:
    """Return a copy of ``cfg`` with ``overrides`` applied; unknown names raise ConfigError."""
    types = _field_types()
    changes = {}
    for name, value in overrides.items():
        key = name.replace("-", "_")
        if key not in types:
            close = [k for k in types if k.startswith(key[:4])]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ConfigError(f"{source}: unknown setting '{name}'{hint}")
        changes[key] = _coerce(key, value, types[key], source)
    return dataclasses.replace(cfg, **changes)


def preset(name: str) -> FinetuneConfig:
    """The named preset (``default`` or ``book``) applied to the dataclass defaults."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(PRESETS)}")
    return apply_overrides(FinetuneConfig(), PRESETS[name], source=f"preset '{name}'")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML settings file into a dict (keys are FinetuneConfig fields, plus ``preset``)."""
    import yaml  # optional at import time: only config files need it

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of setting: value")
    return data


def resolve_config(
    *,
    preset_name: str | None = None,
    config_file: str | os.PathLike | None = None,
    flags: dict[str, Any] | None = None,
) -> FinetuneConfig:
    """Defaults, then a preset, then a YAML file, then flags (only those given, not None)."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = load_yaml(config_file)
        file_preset = file_values.pop("preset", None)
        if preset_name is None and file_preset is not None:
            preset_name = str(file_preset)
    cfg = preset(preset_name or "default")
    if file_values:
        cfg = apply_overrides(cfg, file_values, source=str(config_file))
    if flags:
        cfg = apply_overrides(cfg, flags, source="command line")
    return cfg.validate()


def dump_yaml(cfg: FinetuneConfig, path: str | os.PathLike | None = None) -> str:
    """The settings as YAML text (written atomically to ``path`` when given)."""
    import yaml

    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if path is not None:
        from instructune.utils.io import atomic_write_text

        atomic_write_text(path, text)
    return text


def format_config(cfg: FinetuneConfig, *, base: FinetuneConfig | None = None) -> str:
    """The effective settings, one per line; a ``*`` marks values that differ from ``base``."""
    base = base or FinetuneConfig()
    width = max(len(f.name) for f in fields(cfg))
    lines = ["settings:"]
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        mark = "*" if value != getattr(base, f.name) else " "
        lines.append(f" {mark} {f.name:<{width}} {value!r}")
    return "\n".join(lines)
