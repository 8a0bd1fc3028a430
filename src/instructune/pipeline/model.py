"""The model to train: ``load_model``, or a smaller random one, and the precision to train in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from instructune.config import ConfigError, FinetuneConfig
from instructune.errors import InstructuneError

if TYPE_CHECKING:
    import torch

    from instructune.checkpoints.load import LoadedModel


def parse_overrides(text: str) -> dict[str, Any]:
    """``"n_layers=2,emb_dim=64,qkv_bias=false"`` -> a dict of typed values."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise InstructuneError(f"model override {part!r} is not NAME=VALUE")
        key, value = (s.strip() for s in part.split("=", 1))
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
        elif lowered in ("none", "null"):
            out[key] = None
        else:
            for cast in (int, float):
                try:
                    out[key] = cast(value)
                    break
                except ValueError:
                    continue
            else:
                out[key] = value
    return out


def load_for_training(cfg: FinetuneConfig, device: torch.device) -> LoadedModel:
    """``load_model`` for the run; with ``model_overrides`` a smaller random model of that name."""
    import torch

    from instructune.checkpoints import load_model

    # log=None: the run's own log line names the weights (see finetune.set_up).
    if not cfg.model_overrides:
        return load_model(cfg.model, init=cfg.init, device=device, dtype=torch.float32, log=None)
    if cfg.init != "random":
        raise InstructuneError(
            "model_overrides change the model's shape, so they need --init random "
            f"(got --init {cfg.init} for {cfg.model})"
        )
    return random_resized(cfg.model, cfg.model_overrides, device)


def random_resized(name: str, overrides: dict[str, Any], device: Any = "cpu") -> LoadedModel:
    """Random fp32 weights of the registry model ``name`` with ``overrides`` applied to its
    shape (``n_layers=2,...``: tests, benchmarks), and that model family's tokenizer."""
    import torch

    from instructune.checkpoints import load_model
    from instructune.checkpoints.load import RANDOM_INIT, LoadedModel
    from instructune.models import build_model, get_config

    model_cfg = get_config(name, **overrides)
    if model_cfg.arch == "gpt2":
        from instructune.tokenization import load_tokenizer

        tokenizer = load_tokenizer("gpt2")
    else:  # the tokenizer of the full-size model of that name
        tokenizer = load_model(name, init="random", device="meta", log=None).tokenizer
    model = build_model(model_cfg, device=device, dtype=torch.float32)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        config=model_cfg,
        prompt_format=None,
        source=name,
        weights=RANDOM_INIT,
    )


def resolve_max_length(max_length: int | None, loaded: LoadedModel) -> int:
    """The sequence length to cut at: ``max_length``, or the model's context length when None.

    Raises ConfigError when ``max_length`` is longer than the model can take (the model would
    otherwise fail on the first long batch, deep inside training).
    """
    context = loaded.config.context_length
    if max_length is None:
        return context
    if max_length > context:
        raise ConfigError(
            f"max_length {max_length} is longer than the context length of {loaded.source} "
            f"({context} tokens): set --max-length {context} or less, or --max-length none "
            "for the model's context length"
        )
    return max_length


def resolve_precision(precision: str, device: torch.device) -> str:
    """auto -> fp32 on CPU/MPS (the book's numbers), bf16 on CUDA that has it, else fp16."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"
