"""The models one ``instructune serve`` process answers with, by name, and what a request to
one of them becomes: prompt ids and generation settings, checked against the model's context.

Each served model is loaded once, gets its own engine (continuous batching,
``generation.engine``), and is identified by the sha256 digest of its weight files: Ollama's
``/api/tags`` reports it, and the judge cache keys its judgements on it, so answers from other
weights are never mixed up with these.

Both APIs (``serving.ollama``, ``serving.openai``) prompt through :meth:`ServedModel.chat_ids`
and :meth:`ServedModel.text_ids`, and submit through :meth:`ServedModel.submit`, so a request
means the same thing in either dialect.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from instructune.serving.fields import RequestError

# The weight files of an HF-format directory (ours included), in the order they are hashed.
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclass
class Settings:
    """Generation settings of one request, already checked (see ``generation.engine``).

    ``max_new_tokens`` None means "until the context is full", the default of both APIs.
    """

    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    num_ctx: int | None = None  # Ollama's option: a smaller context window than the model's
    max_tokens_field: str = "max_tokens"  # the field to name when the budget does not fit


def parse_model_specs(specs: Iterable[str]) -> list[tuple[str, str]]:
    """``--model`` values to ``(name, spec)``: ``NAME=SPEC`` names it, a bare spec is named by
    its basename (a directory or ``.gguf`` file) or is its registry name. Names must differ."""
    out: list[tuple[str, str]] = []
    for text in specs:
        name, sep, spec = text.partition("=")
        if not sep:
            spec = text
            path = Path(text).expanduser()
            name = (path.stem if path.suffix.lower() == ".gguf" else path.name) or text
        name, spec = name.strip(), spec.strip()
        if not name or not spec:
            raise ValueError(f"--model {text!r}: expected SPEC or NAME=SPEC")
        if any(name == other for other, _ in out):
            raise ValueError(
                f"--model {text!r}: the name {name!r} is already taken; name it with NAME=SPEC"
            )
        out.append((name, spec))
    return out


def weights_digest(loaded: Any, spec: str, init: str = "pretrained") -> tuple[str, int]:
    """``(sha256 hex, bytes)`` of the weights ``spec`` loaded from: the file's own sha256 for a
    single file (a ``.gguf``, one ``model.safetensors``), a sha256 over each file's name and
    sha256 for a sharded directory, and for random weights a sha256 of the tensors' bytes."""
    from instructune.checkpoints.resolve import resolve
    from instructune.utils.io import sha256_file

    resolved = resolve(spec, init=init)
    if resolved.path is None:
        return _tensor_digest(loaded.model)
    path = resolved.path
    files = (
        [path]
        if path.is_file()
        else sorted({f for pattern in _WEIGHT_PATTERNS for f in path.glob(pattern)})
    )
    if not files:
        return _tensor_digest(loaded.model)
    size = sum(f.stat().st_size for f in files)
    if len(files) == 1:
        return sha256_file(files[0]), size
    combined = hashlib.sha256()
    for f in files:
        combined.update(f"{f.name}:{sha256_file(f)}\n".encode())
    return combined.hexdigest(), size


def _tensor_digest(model: Any) -> tuple[str, int]:
    import torch

    digest, size = hashlib.sha256(), 0
    for name, tensor in model.state_dict().items():
        data = tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()
        digest.update(name.encode())
        digest.update(data.tobytes())
        size += data.nbytes
    return digest.hexdigest(), size


@dataclass(kw_only=True)
class ServedModel:
    """One served model: its ``LoadedModel``, engine, prompt format and identity.

    Attributes:
        name: the name clients ask for (``model`` in both APIs).
        spec: the ``--model`` spec it was loaded from.
        loaded: the ``LoadedModel``.
        engine: its ``generation.engine.Engine``.
        digest: sha256 hex of its weights (see :func:`weights_digest`).
        size: bytes of its weight files (of its tensors for random weights).
        prompt_format: the saved ``PromptFormat``, else the default style's (``alpaca``, as
            ``instructune generate`` prompts such a model).
        load_ns: how long loading took, reported as Ollama's ``load_duration`` of the first
            request (later requests find it loaded: 0, as Ollama reports).
        modified_at: when the weights were written (the file's time; now for random weights).
    """

    name: str
    spec: str
    loaded: Any
    engine: Any
    digest: str
    size: int
    prompt_format: Any
    load_ns: int
    modified_at: datetime
    loaded_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    _load_reported: bool = False

    @property
    def context_length(self) -> int:
        return int(self.loaded.config.context_length)

    @property
    def family(self) -> str:
        return str(self.loaded.config.arch)

    @property
    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.loaded.model.parameters())

    def take_load_ns(self) -> int:
        """The load time for the first request's ``load_duration``, 0 afterwards."""
        if self._load_reported:
            return 0
        self._load_reported = True
        return self.load_ns

    # --- prompts ---------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """A conversation as prompt ids, in the model's prompt format (``format_conversation``:
        the chat template for chat models, the last user turn as the instruction and the turns
        before it as its input for ``alpaca``/``phi3``)."""
        from instructune.data.conversation import format_conversation
        from instructune.errors import DataError

        try:
            text = format_conversation(
                messages, self.prompt_format, self.loaded.tokenizer.chat_template
            )
        except DataError as exc:
            # Its messages start with the field they are about ("messages[2].role: ...").
            head = str(exc).split(":", 1)[0]
            field = head if head.startswith("messages") and " " not in head else "messages"
            raise RequestError(str(exc), field=field, code="invalid_value") from None
        return self._encode(text)

    def text_ids(self, prompt: str, *, system: str | None = None, raw: bool = False) -> list[int]:
        """A prompt as ids: as it is when ``raw``, else as the instruction of one user turn
        (after ``system`` when given), formatted like a chat."""
        if raw:
            return self._encode(prompt, raw=True)
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return self.chat_ids(messages)

    def _encode(self, text: str, *, raw: bool = False) -> list[int]:
        from instructune.tokenization.base import encode_prompt

        ids = encode_prompt(self.loaded.tokenizer, text, add_bos=self.prompt_format.add_bos)
        if not ids:
            raise RequestError("the prompt is empty", field="prompt" if raw else "messages")
        return ids

    # --- generating ------------------------------------------------------------------------

    def submit(self, ids: list[int], settings: Settings, *, prompt_field: str) -> Any:
        """Check ``ids`` and ``settings`` against the context and hand them to the engine.

        The prompt must leave room for at least one new token in the context (the model's, or
        a smaller ``num_ctx``); an explicit token budget that does not fit is refused (naming
        its field), no budget means "up to the end of the context".

        Raises:
            RequestError: the prompt or the budget does not fit.
            QueueFullError: the engine's queue is full (the caller answers 503).
        """
        context = self.context_length
        if settings.num_ctx is not None:
            context = min(context, settings.num_ctx)
        room = context - len(ids)
        if room < 1:
            raise RequestError(
                f"the prompt has {len(ids)} tokens and the context window is {context}: it "
                f"leaves no room for an answer; shorten the prompt",
                field=prompt_field,
                code="context_length_exceeded",
            )
        budget = settings.max_new_tokens
        if budget is not None and budget > room:
            raise RequestError(
                f"{settings.max_tokens_field}={budget} does not fit: the prompt has {len(ids)} "
                f"tokens and the context window is {context}, leaving room for {room}",
                field=settings.max_tokens_field,
                code="context_length_exceeded",
            )
        stops = list(dict.fromkeys([*self.stop_strings, *settings.stop]))
        return self.engine.submit(
            ids,
            max_new_tokens=room if budget is None else budget,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed,
            stop_ids=self.stop_ids,
            stop_strings=stops or None,
            repeat_penalty=settings.repeat_penalty,
            frequency_penalty=settings.frequency_penalty,
            presence_penalty=settings.presence_penalty,
        )

    @property
    def stop_ids(self) -> list[int]:
        from instructune.generation import stop_ids_for

        return stop_ids_for(self.loaded)

    @property
    def stop_strings(self) -> list[str]:
        return list(self.prompt_format.stop_strings)


class ModelRegistry:
    """The served models by name. A name asked for with Ollama's ``:latest`` tag finds the
    model served without a tag, and the other way round."""

    def __init__(self, models: Iterable[ServedModel] = ()) -> None:
        self._models: dict[str, ServedModel] = {}
        for m in models:
            self.add(m)

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    def __iter__(self):
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def names(self) -> list[str]:
        return list(self._models)

    def find(self, name: str) -> ServedModel | None:
        if name in self._models:
            return self._models[name]
        base = name.removesuffix(":latest")
        if base in self._models:
            return self._models[base]
        return self._models.get(f"{name}:latest")

    def start(self) -> None:
        for m in self:
            m.engine.start()

    def close(self) -> None:
        for m in self:
            m.engine.close()


def load_served(
    name: str,
    spec: str,
    *,
    max_batch: int = 8,
    max_queue: int = 64,
    device: Any = "cpu",
    dtype: Any = None,
    init: str = "pretrained",
    log: Any = None,
) -> ServedModel:
    """Load ``spec`` and build its engine (not started: :meth:`ModelRegistry.start` does)."""
    import torch

    from instructune.checkpoints import load_model
    from instructune.data.prompts import prompt_format_for
    from instructune.generation import style_and_stops
    from instructune.generation.engine import Engine

    start = time.perf_counter_ns()
    loaded = load_model(spec, init=init, device=device, dtype=dtype or torch.float32, log=log)
    load_ns = time.perf_counter_ns() - start
    # A model saved without a prompt format is prompted as ``generate`` prompts it.
    fmt = loaded.prompt_format or prompt_format_for(loaded.tokenizer, style_and_stops(loaded)[0])
    digest, size = weights_digest(loaded, spec, init)
    path = Path(os.path.expanduser(spec))
    stamp = path.stat().st_mtime if path.exists() else time.time()
    return ServedModel(
        name=name,
        spec=spec,
        loaded=loaded,
        engine=Engine(loaded, max_batch=max_batch, max_queue=max_queue),
        digest=digest,
        size=size,
        prompt_format=fmt,
        load_ns=load_ns,
        modified_at=datetime.fromtimestamp(stamp, timezone.utc),
    )
