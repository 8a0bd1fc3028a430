"""Every setting of a fine-tuning run, in one validated pydantic model, with presets and YAML.

The order of precedence, lowest first: the model's defaults, a preset (``default`` or
``book``), a YAML file (``--config FILE.yaml``, which may name its own ``preset``), then the
command-line flags. The CLI resolves all of this once; below it, code takes typed values.

Each setting is declared once, as a field with a ``description``: the same text is the flag's
``--help`` (``instructune.cli.finetune`` builds the flags from the fields) and names the setting
in error messages. Values are checked strictly (``batch_size: "8"`` or ``true`` is not an int)
and unknown keys are errors that name the nearest known setting.

This module imports neither torch nor yaml at module level (pydantic, yes: the CLI imports it
only when the ``finetune`` sub-command is used).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from instructune.errors import InstructuneError


class ConfigError(InstructuneError, ValueError):
    """A setting is unknown or has a bad value; the message names the source and the setting."""


def _path_text(value: Any) -> Any:
    """Paths are accepted where a path is meant, and stored as text (run.json, YAML)."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _float_text(value: Any) -> Any:
    """YAML 1.1 reads ``5e-5`` (no dot) as a string; take it as the number it means."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value  # pydantic then reports it as not a number
    return value


Text = Annotated[str, BeforeValidator(_path_text)]
Real = Annotated[float, BeforeValidator(_float_text)]

DEVICES = ("auto", "cpu", "cuda", "mps")


class FinetuneConfig(BaseModel):
    """The settings of one ``instructune finetune`` run (the book's chapter 7 job).

    ``batch_size`` is the micro-batch of one process; one optimizer step sees
    ``batch_size * grad_accum * world_size`` records and divides the summed token losses by
    the number of supervised tokens in all of them. ``None`` means "not set" where a setting
    allows it (each description says what happens then). Assigning an attribute validates it.
    """

    # strict: no silent conversions (a bool is not an int, "8" is not 8); the few wanted ones
    # (path -> text, "5e-5" -> float) are the validators above. protected_namespaces=(): the
    # fields `model` and `model_overrides` are ours, not pydantic's `model_*` API.
    model_config = ConfigDict(
        extra="forbid", strict=True, validate_assignment=True, protected_namespaces=()
    )

    # What to train, on what.
    model: Text = Field(
        "smollm2-135m-instruct",
        description="registry name (gpt2, gpt2-medium, smollm2-135m-instruct...), hub id, "
        "model directory or .gguf file",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained", description="start from the pretrained weights, or random ones (tests)"
    )
    model_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="model shape changes (ModelConfig fields), with --init random",
    )
    data: Text = Field(
        "demo",
        description="training data: a .json/.jsonl file, a URL, or a named data set (book, "
        "preference, alpaca, demo)",
    )
    val_data: Text | None = Field(
        None, description="separate validation file (then --data is used whole); none: split"
    )
    test_data: Text | None = Field(
        None, description="separate test file (then --data is used whole); none: split"
    )
    out: Text = Field("runs/finetune", description="output directory of the run")
    style: Literal["alpaca", "phi3", "chat"] | None = Field(
        None, description="prompt style; none: the model's saved style, else alpaca"
    )
    system_prompt: str | None = Field(
        None,
        description="system turn of every prompt without one (chat style), saved with the "
        "model; '' gives an empty one (shorter prompts); none: the model's saved one, else "
        "the chat template's default",
    )
    mask_instructions: bool = Field(
        False, description="no loss on the prompt tokens (the book's exercise 7.2)"
    )
    loss_average: Literal["token", "record"] = Field(
        "token",
        description="what a step's loss averages: token (every supervised token alike, the "
        "book's) or record (each record's mean token loss alike: a one-word answer weighs as "
        "much as a paragraph)",
    )
    prompt_gradient: bool = Field(
        True,
        description="with mask_instructions: let the gradient reach the weights through the "
        "prompt positions too (the exact gradient); off, each prompt runs once without "
        "gradients and backward covers the answers alone (cheaper, an approximation)",
    )
    max_length: int | None = Field(
        None,
        ge=2,
        description="truncate sequences to this many tokens (the book's allowed_max_length); "
        "none: the model's context length",
    )
    group_by_length: bool = Field(
        False, description="batch records of similar lengths together (less padding)"
    )
    split_shuffle_seed: int | None = Field(
        None,
        description="shuffle the records with this seed before the 85/10/5 split; "
        "none: no shuffle (the book)",
    )

    # Optimisation.
    epochs: int = Field(2, ge=1, description="passes over the training split")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many optimizer steps (overrides --epochs)"
    )
    batch_size: int = Field(8, ge=1, description="records per micro-batch and process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: Real = Field(5e-5, gt=0, description="learning rate (AdamW)")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="learning-rate schedule: constant (the book) or cosine"
    )
    warmup_steps: int = Field(0, ge=0, description="optimizer steps of linear warm-up")
    min_lr_ratio: Real = Field(
        0.1, ge=0, le=1, description="the cosine schedule decays to lr times this"
    )
    weight_decay: Real = Field(0.1, ge=0, description="AdamW weight decay")
    grad_clip: Real | None = Field(
        None, gt=0, description="clip the global gradient norm to this value; none: no clipping"
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp32 on CPU and MPS, bf16 on CUDA that has it, else fp16"
    )
    activation_checkpointing: bool = Field(
        False, description="recompute activations in backward (less memory, slower)"
    )
    optimizer_in_backward: bool = Field(
        False,
        description="update each weight as its gradient is ready (less memory; no --grad-accum)",
    )
    compile: bool = Field(False, description="torch.compile the model")
    freeze_blocks: int | None = Field(
        None,
        ge=0,
        description="train the upper blocks only: the embeddings (and a head tied to them) "
        "and the first N blocks stay fixed, and backward stops above them (faster); none: "
        "train every weight",
    )
    lora_rank: int | None = Field(
        None,
        ge=1,
        description="train rank-R LoRA adapters on the frozen model (the book's appendix E: "
        "16); none: full fine-tuning",
    )
    lora_alpha: Real | None = Field(
        None, gt=0, description="LoRA: the update is scaled by alpha/rank; none: alpha = rank"
    )
    lora_dropout: Real = Field(
        0.0, ge=0, lt=1, description="LoRA: dropout on the adapters' input (not on the head)"
    )
    lora_targets: str = Field(
        "all",
        description="LoRA: the layers adapted, a comma-separated subset of attn,mlp,head, or all",
    )
    seed: int = Field(123, description="random seed (the book: 123)")

    # Machine.
    device: str = Field("auto", description="auto, cpu, cuda, mps, or one device (cuda:1)")
    threads: int | None = Field(
        None, ge=1, description="CPU threads (torch.set_num_threads); none: torch's default"
    )

    # Watching and saving.
    eval_every: int = Field(5, ge=1, description="optimizer steps between loss evaluations")
    eval_batches: int = Field(5, ge=1, description="batches per train/validation loss estimate")
    checkpoint_every: int | None = Field(
        None,
        ge=1,
        description="optimizer steps between checkpoints; none: only at the end (and on Ctrl-C)",
    )
    keep: int = Field(
        2, ge=1, description="checkpoints kept (optimizer state only in the newest), plus the best"
    )
    sample_every_epoch: bool = Field(
        True, description="print an answer to the first validation prompt after each epoch"
    )
    quiet: bool = Field(False, description="no progress bars; log lines only")
    overwrite: bool = Field(False, description="replace an existing run in --out")

    # After training.
    max_new_tokens: int = Field(
        256, ge=1, description="longest answer to a test prompt, in tokens (the book: 256)"
    )
    gen_batch_size: int = Field(16, ge=1, description="test prompts answered together")
    answer_dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="precision of the weights answering the test split (after they are "
        "saved): auto is bf16 where the GPU has it or the CPU has AVX512-BF16/AMX, else fp32",
    )
    test_limit: int | None = Field(
        None, ge=0, description="answer only the first N test records; none: all"
    )
    evaluate: bool = Field(
        True, description="score the answers (text metrics, and the judge when given)"
    )
    judge: str | None = Field(
        None, description="ollama:MODEL or openai:MODEL to score the answers; none: no judge"
    )
    judge_url: str | None = Field(None, description="the judge server's URL")

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, value: str) -> str:
        # The names of instructune.models.lora.TARGETS, checked here without importing torch.
        parts = {p.strip() for p in value.split(",") if p.strip()}
        if parts == {"all"} or (parts and parts <= {"attn", "mlp", "head"}):
            return value
        raise ValueError("LoRA targets are a comma-separated subset of attn,mlp,head, or all")

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if value in DEVICES or ":" in value:
            return value
        raise ValueError(f"device must be {', '.join(DEVICES)} or TYPE:INDEX")

    # No __init__ override: pydantic would call it inside model_validate and wrap a ConfigError
    # raised there as a ValueError of its own. FinetuneConfig(...) raises pydantic's
    # ValidationError (a ValueError); from_dict, apply_overrides and resolve_config raise
    # ConfigError naming the source.

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as exc:
            raise ConfigError(explain(exc, source="settings")) from None

    def validate(self) -> FinetuneConfig:  # type: ignore[override]
        """Check every value again; raise ConfigError naming the setting. Returns ``self``."""
        # Assignments are validated already; this also catches an object built without
        # validation (model_construct) and keeps the call sites' contract.
        _validated(self.to_dict(), source="settings", config_class=type(self))
        return self

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain JSON/YAML-ready values."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "settings") -> FinetuneConfig:
        """The defaults with ``data`` applied (``source`` names where it came from in errors)."""
        return apply_overrides(cls(), data, source=source)


def nearest_setting(name: str, config_class: type[FinetuneConfig] | None = None) -> str:
    """The known setting closest to an unknown ``name`` (for "did you mean" hints)."""
    names = list((config_class or FinetuneConfig).model_fields)
    key = name.lower().replace("-", "_")
    # An abbreviation by initials (learning_rate -> lr) beats spelling similarity.
    initials = "".join(word[0] for word in key.split("_") if word)
    if len(initials) > 1 and initials in names:
        return initials
    return difflib.get_close_matches(key, names, n=1, cutoff=0.0)[0]


def explain(
    exc: ValidationError, *, source: str, config_class: type[FinetuneConfig] | None = None
) -> str:
    """pydantic's errors as one line per problem, each naming the source and the setting."""
    config_class = config_class or FinetuneConfig
    fields = config_class.model_fields
    lines = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        if error["type"] == "extra_forbidden":
            lines.append(
                f"{source}: unknown setting '{name}' "
                f"(the nearest known setting is '{nearest_setting(name, config_class)}')"
            )
            continue
        if error["type"] == "value_error":  # our validators' own words, without pydantic's tag
            message = str(error["ctx"]["error"])
        else:
            message = error["msg"][:1].lower() + error["msg"][1:]
        if name in fields:
            lines.append(
                f"{source}: setting '{name}' ({fields[name].description}): {message}, "
                f"got {error['input']!r}"
            )
        else:
            lines.append(f"{source}: {message}")
    return "\n".join(lines)


def _validated(
    data: dict[str, Any], *, source: str, config_class: type[FinetuneConfig] | None = None
) -> FinetuneConfig:
    config_class = config_class or FinetuneConfig
    try:
        return config_class.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(explain(exc, source=source, config_class=config_class)) from None


# Presets hold only what differs from the model's defaults' meaning for that job.
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
    # Quality per second for the embedded model on the book's data (issue 14.6), chosen on the
    # validation split: the model's own chat template (it is an instruct model: less to
    # relearn than the Alpaca format) with an empty system turn in place of SmolLM2's default
    # one (28% fewer tokens a record); the (tied) embedding fixed, so the head needs no weight
    # gradient; loss on the answers only (the head then runs on answer tokens alone); a cosine
    # schedule from 2x the book's rate; a checkpoint every half epoch; batches drawn in
    # shuffled order, not grouped by length (a batch of like lengths is mostly one kind of
    # task; the padded positions are not computed, so this costs ~3%). Figures:
    # docs/results.md.
    "smollm2-book": {
        "model": "smollm2-135m-instruct",
        "data": "book",
        "style": "chat",
        "system_prompt": "",
        "mask_instructions": True,
        "freeze_blocks": 0,
        "epochs": 1,
        "batch_size": 8,
        "lr": 1e-4,
        "lr_schedule": "cosine",
        "warmup_steps": 8,
        "min_lr_ratio": 0.1,
        "weight_decay": 0.1,
        "max_length": 256,
        "group_by_length": False,
        "seed": 123,
        "eval_every": 29,
        "eval_batches": 2,
        "checkpoint_every": 58,
        "max_new_tokens": 96,
        "out": "runs/smollm2-book",
    },
}


def apply_overrides(
    cfg: FinetuneConfig, overrides: dict[str, Any], *, source: str = "settings"
) -> FinetuneConfig:
    """A copy of ``cfg`` with ``overrides`` applied (``-`` in a name read as ``_``).

    Raises ConfigError naming ``source`` and the setting for an unknown name (with the
    nearest known one) or a bad value.
    """
    data = cfg.to_dict()
    fields = type(cfg).model_fields
    for name, value in overrides.items():
        key = str(name).replace("-", "_")
        # An unknown name stays as written, so that the error quotes the user's spelling.
        data[key if key in fields else str(name)] = value
    return _validated(data, source=source, config_class=type(cfg))


def presets_of(config_class: type[FinetuneConfig]) -> dict[str, dict[str, Any]]:
    """The presets of a job's settings: ``PRESETS`` for fine-tuning, ``DPO_PRESETS`` for DPO."""
    return DPO_PRESETS if issubclass(config_class, DpoConfig) else PRESETS


def preset(name: str, config_class: type[FinetuneConfig] | None = None) -> FinetuneConfig:
    """The named preset (``default`` or ``book``; ``dpo`` for DpoConfig) applied to the
    defaults of ``config_class`` (FinetuneConfig when None)."""
    config_class = config_class or FinetuneConfig
    known = presets_of(config_class)
    if name not in known:
        raise ConfigError(f"unknown preset '{name}'; choose one of {', '.join(known)}")
    return apply_overrides(config_class(), known[name], source=f"preset '{name}'")


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
    config_class: type[FinetuneConfig] | None = None,
) -> FinetuneConfig:
    """Defaults, then a preset, then a YAML file, then flags (only those given).

    ``config_class`` picks the job (FinetuneConfig when None, DpoConfig for ``dpo``); with
    no preset named, its first preset applies (``default``; ``dpo``)."""
    config_class = config_class or FinetuneConfig
    known = presets_of(config_class)
    file_values: dict[str, Any] = {}
    if config_file is not None:
        file_values = load_yaml(config_file)
        file_preset = file_values.pop("preset", None)
        if preset_name is None and file_preset is not None:
            if str(file_preset) not in known:
                raise ConfigError(
                    f"{config_file}: unknown preset '{file_preset}'; "
                    f"choose one of {', '.join(known)}"
                )
            preset_name = str(file_preset)
    cfg = preset(preset_name or next(iter(known)), config_class)
    if file_values:
        cfg = apply_overrides(cfg, file_values, source=str(config_file))
    if flags:
        cfg = apply_overrides(cfg, flags, source="command line")
    given = {str(name).replace("-", "_") for name in [*file_values, *(flags or {})]}
    if cfg.lora_rank is not None and cfg.freeze_blocks is not None and "freeze_blocks" not in given:
        # A preset's frozen blocks are a choice for full fine-tuning; LoRA asked for on top of
        # it keeps every base weight fixed anyway.
        cfg = apply_overrides(cfg, {"freeze_blocks": None}, source="LoRA")
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
    base = base or type(cfg)()
    names = list(type(cfg).model_fields)
    width = max(len(name) for name in names)
    lines = ["settings:"]
    for name in names:
        value = getattr(cfg, name)
        mark = "*" if value != getattr(base, name) else " "
        lines.append(f" {mark} {name:<{width}} {value!r}")
    return "\n".join(lines)


class DpoConfig(FinetuneConfig):
    """The settings of one ``instructune dpo`` run: every fine-tuning setting (the same loop,
    checkpoints, answering and evaluation), plus DPO's ``beta``.

    ``data`` holds preference records (``chosen`` and ``rejected``); the prompt is always
    masked out of the log-probabilities, so ``mask_instructions`` has no effect here.
    """

    beta: Real = Field(
        0.1,
        gt=0,
        description="DPO: how far the policy may move from the reference (the book: 0.1)",
    )

    @field_validator("loss_average")
    @classmethod
    def _pairs_only(cls, value: str) -> str:
        if value != "token":
            raise ValueError("DPO's loss is a mean over pairs; loss_average is finetune's")
        return value

    @field_validator("prompt_gradient")
    @classmethod
    def _exact_gradient(cls, value: bool) -> bool:
        if not value:
            raise ValueError("DPO takes the exact gradient; prompt_gradient is finetune's")
        return value


# The book's DPO notebook (ch07/04_preference-tuning-with-dpo): AdamW lr 5e-6, weight decay
# 0.01, batch size 8, 1 epoch, beta 0.1, evaluation every 5 steps on 5 batches, seed 123. It
# starts from its own chapter-7 model; here the default start is the embedded instruction-tuned
# SmolLM2, which needs no download.
DPO_PRESETS: dict[str, dict[str, Any]] = {
    "dpo": {
        "model": "smollm2-135m-instruct",
        "data": "preference",
        "epochs": 1,
        "batch_size": 8,
        "lr": 5e-6,
        "weight_decay": 0.01,
        "beta": 0.1,
        "max_length": 1024,
        "seed": 123,
        "eval_every": 5,
        "eval_batches": 5,
        "max_new_tokens": 256,
        "out": "runs/dpo",
    },
}
