"""A model card (``README.md``) for every saved model directory: full, merged or exported.

The card follows the Hugging Face hub's layout: YAML front matter (``base_model``, ``license``,
``library_name``, ``tags``, ``pipeline_tag``, ``datasets``) and a body with the base model, the
data, the prompt format (an example prompt), the settings, the final losses and metrics and the
licence. Whatever is unknown is left out rather than guessed. A README.md that instructune did
not write (it lacks the marker below) is never overwritten.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructune.utils.io import atomic_write_text

CARD_FILE = "README.md"
MARKER = "<!-- written by instructune -->"

# Licences of the registry models' pretrained weights (their hub model cards), and of the named
# data sets (README "Data sources"). Hub license ids.
MODEL_LICENSES = {"gpt2": "mit", "smollm2": "apache-2.0", "llama-3.2": "llama3.2"}
DATA_LICENSES = {"book": "apache-2.0", "demo": "apache-2.0", "alpaca": "cc-by-nc-4.0"}
SETTINGS_SHOWN = (
    "epochs", "max_steps", "batch_size", "grad_accum", "lr", "lr_schedule", "warmup_steps",
    "weight_decay", "max_length", "mask_instructions", "precision", "seed", "lora_rank",
    "lora_alpha", "lora_dropout", "lora_targets",
)  # fmt: skip


@dataclass
class ModelCard:
    """What a card says. Only ``kind`` and ``prompt_format`` are required.

    Attributes:
        kind: ``fine-tuned``, ``merged`` or ``exported`` (a word for the title).
        prompt_format: a ``PromptFormat`` (or None: the card says the format is unknown).
        base_model: the hub id or name of the model it started from.
        model_name: the registry name, used to find the base licence.
        arch: ``gpt2`` / ``llama``.
        data: the training data (a named source or a path).
        settings: training settings (a ``FinetuneConfig.to_dict()``).
        results: final losses and metrics (``train_loss``, ``val_loss``, scores...).
        files: extra lines about the files (e.g. the GGUF and Modelfile of an export).
    """

    kind: str
    prompt_format: Any = None
    base_model: str | None = None
    model_name: str | None = None
    arch: str | None = None
    data: str | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    results: Mapping[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    random_init: bool = False  # trained from random weights: no base model, no base licence


def base_license(card: ModelCard) -> str | None:
    if card.random_init:
        return None
    name = (card.model_name or card.base_model or "").lower().split("/")[-1]
    for prefix, licence in MODEL_LICENSES.items():
        if name.startswith(prefix):
            return licence
    return None


def data_license(data: str | None) -> str | None:
    return DATA_LICENSES.get(data or "")


def _yaml_value(value: Any) -> str:
    # JSON scalars and flow lists are valid YAML, and quote anything that needs it.
    return json.dumps(value, ensure_ascii=False)


def _front_matter(card: ModelCard) -> str:
    licence = base_license(card) or "other"
    tags = ["instructune", "instruction-tuned", card.kind.replace(" ", "-")]
    if card.arch:
        tags.append(card.arch)
    if card.prompt_format is not None:
        tags.append(f"prompt-{card.prompt_format.style}")
    if card.kind == "exported":
        tags += ["gguf", "ollama", "llama.cpp"]
    meta: dict[str, Any] = {}
    if card.base_model:
        meta["base_model"] = card.base_model
    meta["license"] = licence
    meta["library_name"] = "instructune"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = tags
    if card.data and "/" not in card.data and not card.data.endswith((".json", ".jsonl")):
        meta["datasets"] = [card.data]
    lines = ["---"]
    for key, value in meta.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines += [f"  - {_yaml_value(v)}" for v in value]
        else:
            lines.append(f"{key}: {_yaml_value(value)}")
    return "\n".join([*lines, "---"])


def _fmt_number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def card_text(card: ModelCard) -> str:
    """The README.md text of ``card``."""
    from instructune.data.prompts import format_prompt

    title = card.base_model or card.model_name or "a model"
    if card.random_init:
        title = f"A model of {card.model_name or card.arch or 'unknown'}'s shape"
    out = [_front_matter(card), MARKER, "", f"# {title}, {card.kind} with instructune", ""]
    out += [
        "Fine-tuned to follow instructions with [instructune](https://pypi.org/project/"
        "instructune/), the system of chapter 7 of *Build a Large Language Model (From "
        "Scratch)*.",
        "",
        "## Base model",
        "",
        (
            f"- none: random weights in {card.model_name}'s shape"
            if card.random_init
            else f"- {card.base_model or 'unknown'}" + (f" ({card.arch})" if card.arch else "")
        ),
        "",
        "## Data",
        "",
        f"- {card.data or 'not recorded'}"
        + (f" (licence {data_license(card.data)})" if data_license(card.data) else ""),
        "",
        "## Prompt format",
        "",
    ]
    fmt = card.prompt_format
    if fmt is None:
        out.append("Not recorded (no instructune.json).")
    else:
        out.append(
            f"Style `{fmt.style}`; the answer ends with the end token `{fmt.eos_token}` "
            f"(id {fmt.eos_id}); BOS {'added' if fmt.add_bos else 'not added'}; stop strings "
            f"{', '.join(f'`{json.dumps(s)}`' for s in fmt.stop_strings) or 'none'}."
        )
        if fmt.system_prompt is not None:
            out.append(
                f"A prompt without a system turn gets the one it was trained with: "
                f"`{json.dumps(fmt.system_prompt)}`."
            )
        if fmt.style != "chat":
            example = format_prompt(
                {"instruction": "Name the capital of France.", "input": ""}, fmt.style
            )
            out += ["", "```text", example + "<answer>", "```"]
    settings = {k: card.settings[k] for k in SETTINGS_SHOWN if card.settings.get(k) is not None}
    if settings:
        out += ["", "## Training settings", "", "| setting | value |", "|---|---|"]
        out += [f"| {k} | {_fmt_number(v)} |" for k, v in settings.items()]
    results = {k: v for k, v in card.results.items() if isinstance(v, (int, float, str))}
    if results:
        out += ["", "## Results", "", "| metric | value |", "|---|---|"]
        out += [f"| {k} | {_fmt_number(v)} |" for k, v in results.items()]
    if card.files:
        out += ["", "## Files", ""] + [f"- {line}" for line in card.files]
    licence = base_license(card)
    out += [
        "",
        "## Licence",
        "",
        (
            f"The weights derive from {card.base_model or 'the base model'}, licensed "
            f"{licence}; its terms apply."
            if licence
            else "Trained from random weights: no base model licence applies."
            if card.random_init
            else "The base model's licence applies; instructune could not tell which it is."
        ),
    ]
    if data_license(card.data):
        out.append(f"The training data is licensed {data_license(card.data)}.")
    return "\n".join(out) + "\n"


def write_model_card(directory: str | os.PathLike, card: ModelCard) -> Path | None:
    """Write ``directory/README.md`` atomically, unless a README not written by us is there."""
    path = Path(directory) / CARD_FILE
    if path.is_file() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    atomic_write_text(path, card_text(card))
    return path


def card_for_model(
    config: Any, prompt_format: Any, *, kind: str = "fine-tuned", **extra: Any
) -> ModelCard:
    """A card from what every saved model knows: its ``ModelConfig`` and prompt format."""
    return ModelCard(
        kind=kind,
        prompt_format=prompt_format,
        base_model=extra.pop("base_model", None) or config.hub_id or config.name or None,
        model_name=extra.pop("model_name", None) or config.name or None,
        arch=config.arch,
        **extra,
    )


def card_from_run(run_info: Mapping[str, Any], config: Any, prompt_format: Any) -> ModelCard:
    """A card for a fine-tuning run's directory, from its ``run.json`` contents."""
    settings = dict(run_info.get("config") or {})
    if settings.get("lora_rank") is None:  # LoRA settings say nothing about a full run
        settings = {k: v for k, v in settings.items() if not k.startswith("lora_")}
    results = dict(run_info.get("results") or {})
    shown = {
        k: results[k]
        for k in ("steps", "epochs", "train_loss", "val_loss", "best_val_loss")
        if results.get(k) is not None
    }
    evaluation = results.get("evaluation")
    if isinstance(evaluation, Mapping):
        for key, value in evaluation.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                shown[key] = value
    model = settings.get("model")
    if settings.get("init") == "random":  # no pretrained weights: there is no base model
        return ModelCard(
            kind="trained from random weights",
            prompt_format=prompt_format,
            model_name=model,
            arch=config.arch,
            data=settings.get("data"),
            settings=settings,
            results=shown,
            random_init=True,
        )
    return card_for_model(
        config,
        prompt_format,
        base_model=config.hub_id or model,
        model_name=config.name or model,
        data=settings.get("data"),
        settings=settings,
        results=shown,
    )
