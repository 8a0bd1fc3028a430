"""LoRA adapters on disk in PEFT's format, and loading one onto its base model.

A directory holds ``adapter_config.json`` (PEFT's ``LoraConfig`` fields),
``adapter_model.safetensors`` and, from a run here, ``instructune.json`` (the prompt format).
``peft.PeftModel.from_pretrained(transformers_model, DIR)`` loads it.

The key names are PEFT's (``peft.utils.save_and_load``, which drops the adapter name
``default`` on save)::

    base_model.model.<HF module path>.lora_A.weight   (r, in)
    base_model.model.<HF module path>.lora_B.weight   (out, r)

The HF module paths come from the same key maps that load and save full models
(``checkpoints.hf.key_map``): a fused layer of ours whose weight fills several HF tensors (Llama's
q/k/v, gate/up) holds one adapter per HF projection, in the key map's row order, so it splits
into PEFT's per-projection adapters exactly. GPT-2's ``c_attn`` is one Conv1D in HF too, with one
adapter; ``fan_in_fan_out`` tells PEFT that its base weight is stored (in, out), while
lora_A/lora_B keep the shapes above. The head is HF's ``lm_head``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from instructune.errors import ModelLoadError
from instructune.models.config import ModelConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

    from instructune.checkpoints.load import LoadedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PROMPT_FILE = "instructune.json"
_PREFIX = "base_model.model."

# PEFT target_modules per target group. PEFT matches a name against the end of a module's
# dotted path, so GPT-2's attention projection is "attn.c_proj" (mlp.c_proj is another layer).
_PEFT_TARGETS = {
    "gpt2": {
        "attn": ["attn.c_attn", "attn.c_proj"],
        "mlp": ["mlp.c_fc", "mlp.c_proj"],
        "head": ["lm_head"],
    },
    "llama": {
        "attn": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "mlp": ["gate_proj", "up_proj", "down_proj"],
        "head": ["lm_head"],
    },
}


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding an adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def peft_modules(cfg: ModelConfig, paths: list[str]) -> dict[str, list[str]]:
    """Our adapted layer path -> its HF module paths, one per row block (key-map order).

    ``out_head`` (the head, tied or not) is HF's ``lm_head``.
    """
    from instructune.checkpoints.hf import hf_key, key_map

    by_ours: dict[str, list[tuple[int, str]]] = {}
    for m in key_map(cfg):
        if m.ours.endswith(".weight"):
            start = m.rows[0] if m.rows is not None else 0
            by_ours.setdefault(m.ours, []).append((start, hf_key(cfg, m.hf)))
    out = {}
    for path in paths:
        if path == "out_head":
            out[path] = ["lm_head"]
            continue
        rows = sorted(by_ours[f"{path}.weight"])
        out[path] = [key.removesuffix(".weight") for _, key in rows]
    return out


def peft_target_modules(cfg: ModelConfig, targets: tuple[str, ...]) -> list[str]:
    """PEFT's ``target_modules`` for our target groups."""
    return [name for group in targets for name in _PEFT_TARGETS[cfg.arch][group]]


def targets_from_peft(cfg: ModelConfig, names: list[str], source: str) -> tuple[str, ...]:
    """Our target groups that PEFT's ``target_modules`` touch (q_proj and v_proj alone, PEFT's
    usual choice for Llama, give ``attn``: the other projections then get zero adapters).

    Raises ModelLoadError for a name outside every group.
    """
    from instructune.models.lora import TARGETS

    groups = _PEFT_TARGETS[cfg.arch]
    unknown = sorted(set(names) - {n for t in TARGETS for n in groups[t]})
    if unknown:
        known = "; ".join(f"{t}: {', '.join(groups[t])}" for t in TARGETS)
        raise ModelLoadError(
            f"{source}: field 'target_modules' names {unknown}, which are not among the "
            f"layers instructune adapts for {cfg.arch} ({known})"
        )
    return tuple(t for t in TARGETS if set(groups[t]) & set(names))


def _targeted(hf_module: str, names: list[str]) -> bool:
    """PEFT's rule for a list of ``target_modules``: the name, or a dotted suffix of it."""
    return any(hf_module == n or hf_module.endswith("." + n) for n in names)


def save_adapter(
    directory: str | os.PathLike,
    model: nn.Module,
    config: ModelConfig,
    *,
    base: str,
    prompt_format: Any = None,
) -> Path:
    """Write ``model``'s adapters (see ``models.lora``) into ``directory`` in PEFT's format.

    Args:
        directory: created if missing; other files in it are left alone.
        model: a model after ``apply_lora``.
        config: the base model's config.
        base: ``base_model_name_or_path``: what ``load_model`` loads the base from (a registry
            name, hub id, ``.gguf`` file or model directory).
        prompt_format: the ``PromptFormat`` the adapter was trained with (``instructune.json``).
    """
    from instructune.checkpoints.tensor_files import write_safetensors
    from instructune.models.lora import lora_modules, lora_settings
    from instructune.utils.io import atomic_write_json

    settings = lora_settings(model)
    if settings is None:
        raise ValueError("the model has no LoRA adapters to save")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    adapters = dict(lora_modules(model))
    names = peft_modules(config, list(adapters))
    tensors: list[tuple[str, torch.Tensor]] = []
    for path, module in adapters.items():
        a_blocks = module.lora_A.detach().split(module.rank, dim=0)
        b_blocks = module.lora_B.detach().split(module.splits, dim=0)
        for hf_module, a, b in zip(names[path], a_blocks, b_blocks, strict=True):
            tensors.append((f"{_PREFIX}{hf_module}.lora_A.weight", a))
            tensors.append((f"{_PREFIX}{hf_module}.lora_B.weight", b))
    write_safetensors(directory / ADAPTER_WEIGHTS, tensors)
    if prompt_format is not None:
        atomic_write_json(directory / PROMPT_FILE, prompt_format.to_dict())
    alpha = settings.lora_alpha
    atomic_write_json(
        directory / ADAPTER_CONFIG,
        {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base,
            "revision": None,
            "r": settings.rank,
            "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
            "lora_dropout": settings.dropout,
            "target_modules": peft_target_modules(config, settings.targets),
            "fan_in_fan_out": config.arch == "gpt2",  # HF GPT-2's Conv1D stores (in, out)
            "bias": "none",
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "layers_to_transform": None,
            "layers_pattern": None,
            "rank_pattern": {},
            "alpha_pattern": {},
            "inference_mode": True,
        },
    )
    return directory


def read_adapter_config(directory: str | os.PathLike) -> tuple[dict[str, Any], str]:
    """``adapter_config.json`` checked for what instructune can load, and its base.

    Raises ModelLoadError naming the file and the field for anything else (another PEFT
    method, rsLoRA, DoRA, per-layer ranks, trained biases).
    """
    path = Path(directory) / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: cannot read the adapter config: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")

    def bad(field: str, why: str) -> ModelLoadError:
        return ModelLoadError(f"{path}: field {field!r} {why}, got {data.get(field)!r}")

    if data.get("peft_type") != "LORA":
        raise bad("peft_type", "must be 'LORA' (only LoRA adapters load here)")
    rank = data.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise bad("r", "must be a positive integer")
    for field in ("lora_alpha", "lora_dropout"):
        value = data.get(field, 8 if field == "lora_alpha" else 0.0)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad(field, "must be a number")
    if not isinstance(data.get("target_modules"), list) or not data["target_modules"]:
        raise bad("target_modules", "must be a non-empty list of module names")
    for field, allowed in (
        ("use_rslora", (False, None)),
        ("use_dora", (False, None)),
        ("bias", ("none", None)),
        ("layers_to_transform", (None,)),
        ("modules_to_save", (None, [])),
    ):
        if data.get(field) not in allowed:
            raise bad(field, f"must be {allowed[0]!r} (not supported here)")
    for field in ("rank_pattern", "alpha_pattern"):
        if data.get(field):
            raise bad(field, "must be empty (one rank and alpha for every layer)")
    base = data.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise bad("base_model_name_or_path", "must name the base model")
    return data, base


def load_adapter(
    directory: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: Any = None,
    log: Callable[[str], None] | None = None,
) -> LoadedModel:
    """The base model of an adapter directory with the adapter applied (not merged).

    The base is loaded with ``load_model(base_model_name_or_path)``; the prompt format is the
    adapter's ``instructune.json``, else the base's. The returned model has trainable adapters
    and a frozen base, like a model after ``apply_lora``.
    """
    import dataclasses

    import torch
    from safetensors import safe_open

    from instructune.checkpoints.load import load_model
    from instructune.data.prompts import PromptFormat
    from instructune.models.lora import LoraSettings, apply_lora, lora_modules

    directory = Path(directory)
    data, base = read_adapter_config(directory)
    if is_adapter_dir(base):
        raise ModelLoadError(
            f"{directory / ADAPTER_CONFIG}: the base {base} is itself an adapter; merge it "
            "first (instructune merge) and name the merged directory as the base"
        )
    loaded = load_model(base, device=device, dtype=dtype or torch.float32, log=None)
    cfg = loaded.config
    settings = LoraSettings(
        rank=data["r"],
        alpha=float(data.get("lora_alpha", 8)),
        dropout=float(data.get("lora_dropout", 0.0)),
        targets=targets_from_peft(cfg, data["target_modules"], str(directory / ADAPTER_CONFIG)),
    )
    model = apply_lora(loaded.model, settings)
    adapters = dict(lora_modules(model))
    names = peft_modules(cfg, list(adapters))
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise ModelLoadError(f"{directory}: no {ADAPTER_WEIGHTS}")
    try:
        with safe_open(weights_path, framework="pt") as f:
            stored = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise ModelLoadError(f"{weights_path}: cannot read: {exc}") from None
    every = {hf for hfs in names.values() for hf in hfs}
    wanted = {
        f"{_PREFIX}{hf}.lora_{ab}.weight"
        for hf in every
        if _targeted(hf, data["target_modules"])
        for ab in "AB"
    }
    possible = {f"{_PREFIX}{hf}.lora_{ab}.weight" for hf in every for ab in "AB"}
    missing, unexpected = sorted(wanted - set(stored)), sorted(set(stored) - possible)
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights_path}: the tensors do not match the adapter config (missing "
            f"{missing[:4]}{' ...' if len(missing) > 4 else ''}, unexpected "
            f"{unexpected[:4]}{' ...' if len(unexpected) > 4 else ''})"
        )

    def block(hf: str, which: str, like: torch.Tensor) -> torch.Tensor:
        # A projection the adapter leaves out gets A = B = 0: no update, and zero gradients
        # for both, so it stays inert if trained further.
        return stored.get(
            f"{_PREFIX}{hf}.lora_{which}.weight", torch.zeros(like.shape, dtype=like.dtype)
        )

    with torch.no_grad():
        for path, module in adapters.items():
            a_like = module.lora_A[: module.rank]
            b_blocks = module.lora_B.split(module.splits, dim=0)
            a = torch.cat([block(hf, "A", a_like) for hf in names[path]])
            b = torch.cat(
                [block(hf, "B", bb) for hf, bb in zip(names[path], b_blocks, strict=True)]
            )
            for field, tensor, param in (
                ("lora_A", a, module.lora_A),
                ("lora_B", b, module.lora_B),
            ):
                if tensor.shape != param.shape:
                    raise ModelLoadError(
                        f"{weights_path}: {path}.{field} has shape {tuple(tensor.shape)}, the "
                        f"base {base} needs {tuple(param.shape)} (r={settings.rank})"
                    )
                param.copy_(tensor)
    prompt_format = loaded.prompt_format
    prompt_file = directory / PROMPT_FILE
    if prompt_file.is_file():
        try:
            prompt_format = PromptFormat.from_dict(
                json.loads(prompt_file.read_text(encoding="utf-8"))
            )
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{prompt_file}: not a valid prompt format: {exc}") from None
    result = dataclasses.replace(
        loaded,
        model=model,
        prompt_format=prompt_format,
        source=f"{directory} (LoRA r={settings.rank} on {loaded.source})",
        weights=f"LoRA adapter r={settings.rank} on {loaded.weights}",
    )
    if log is not None:
        log(result.describe())
    return result


def merge_adapter(
    directory: str | os.PathLike,
    out: str | os.PathLike,
    *,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Load an adapter on its base, fold it into the weights and save a plain model in ``out``.

    The result is a normal model directory (``save_model``: loadable here, by transformers and
    by ``instructune export``), with the adapter's prompt format. A head adapter becomes an
    untied ``lm_head``; the token embedding is saved unchanged.
    """
    import torch

    from instructune.checkpoints.model_card import card_for_model
    from instructune.checkpoints.native import save_model
    from instructune.models.lora import merge_lora

    if not is_adapter_dir(directory):
        raise ModelLoadError(f"{directory} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    loaded = load_adapter(directory, device="cpu", dtype=torch.float32, log=log)
    model = merge_lora(loaded.model)
    # The card names the adapter's base, the model the merged weights started from.
    base = read_adapter_config(directory)[1]
    card = card_for_model(model.cfg, loaded.prompt_format, kind="merged", base_model=base)
    return save_model(out, model, loaded.tokenizer, model.cfg, loaded.prompt_format, card=card)
