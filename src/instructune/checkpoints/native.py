"""Save a model as a HuggingFace-format directory that transformers and instructune both load.

Files: ``config.json`` (GPT2Config / LlamaConfig fields), ``model.safetensors`` in HF key
names and layout (tied weights once, as HF stores them), the tokenizer's files,
``generation_config.json`` with the end token (so ``transformers.generate`` stops where we do)
and ``instructune.json`` (the prompt format) when given. Each file is written atomically;
other files in the directory (a run's logs, say) are left alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from instructune.checkpoints.hf import config_to_hf, hf_tensors
from instructune.checkpoints.model_card import card_for_model, write_model_card
from instructune.checkpoints.tensor_files import write_safetensors
from instructune.models.config import ModelConfig
from instructune.utils.io import atomic_write_json

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def save_model(
    directory: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any,
    config: ModelConfig,
    prompt_format: Any = None,
    card: Any = None,
) -> Path:
    """Write ``model`` (with ``tokenizer`` and ``prompt_format``) into ``directory``.

    Args:
        directory: created if missing.
        model: a ``GPT2Model`` / ``LlamaModel`` built from ``config``.
        tokenizer: any ``Tokenizer``; its ``save`` writes files ``AutoTokenizer`` loads.
        config: the model's ``ModelConfig``.
        prompt_format: a ``PromptFormat`` (saved as ``instructune.json``), or None.
        card: the ``model_card.ModelCard`` for README.md (default: one from ``config`` and
            ``prompt_format``; a README.md not written by instructune is kept).

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(model.parameters()).dtype
    dtype_name = _DTYPE_NAMES.get(dtype, "float32")
    bos_id = tokenizer.bos_id if getattr(tokenizer, "bos_id", None) is not None else None
    hf_config = config_to_hf(
        config, dtype=dtype_name, eos_id=tokenizer.eos_id, bos_id=bos_id, pad_id=tokenizer.pad_id
    )
    write_safetensors(directory / "model.safetensors", hf_tensors(model, config))
    tokenizer.save(directory)
    generation = {"eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if bos_id is not None:
        generation["bos_token_id"] = bos_id
    atomic_write_json(directory / "generation_config.json", generation)
    if prompt_format is not None:
        atomic_write_json(directory / "instructune.json", prompt_format.to_dict())
    write_model_card(directory, card or card_for_model(config, prompt_format))
    # config.json last: a directory with a config.json is a complete checkpoint.
    atomic_write_json(directory / "config.json", hf_config)
    return directory
