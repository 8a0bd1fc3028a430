"""Ollama's REST API (``/api/...``) over the served models.

Streamed answers are NDJSON, one object per line, the last with ``"done": true`` and Ollama's
timing fields in nanoseconds; ``"stream": false`` returns that last object with the whole
answer. Errors are ``{"error": "..."}`` with a 4xx/5xx status, as Ollama sends them.

Defaults follow Ollama's documented ones (temperature 0.8, top_k 40, top_p 0.9,
repeat_penalty 1.1, generate until the end token or the context's end); pass
``options: {"temperature": 0}`` for greedy answers, as the book's judge set-up does.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

import instructune
from instructune.checkpoints.prompt_templates import jinja_chat_template
from instructune.serving.fields import (
    RequestError,
    check_messages,
    get_bool,
    get_int,
    get_number,
    get_object,
    get_stop,
    get_str,
    read_json,
)
from instructune.serving.models import ServedModel, Settings

router = APIRouter()

# Ollama's documented defaults (its Modelfile parameter table).
DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repeat_penalty": 1.1}
_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
_DONE_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


def error(message: str, status: int = 400, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def tagged(name: str) -> str:
    """Ollama names carry a tag; a model served without one is ``NAME:latest``."""
    return name if ":" in name else f"{name}:latest"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def _find(request: Request, body: dict, key: str = "model") -> ServedModel:
    name = get_str(body, key) or get_str(body, "name")  # /api/show's older "name"
    if not name:
        raise RequestError(f"{key}: this field is required", field=key)
    model = request.app.state.registry.find(name)
    if model is None:
        have = ", ".join(tagged(n) for n in request.app.state.registry.names())
        raise RequestError(f"model {name!r} not found (served: {have})", field=key, status=404)
    return model


def _refuse_unsupported(body: dict) -> None:
    """Fields this server cannot honour are refused, not silently ignored."""
    if body.get("format") not in (None, ""):
        raise RequestError(
            "format: structured (JSON) output is not supported by this server", field="format"
        )
    for key in ("images", "tools", "context"):
        if body.get(key):
            raise RequestError(f"{key}: not supported by this server (text only)", field=key)
    for key in ("suffix", "template"):
        if body.get(key):
            raise RequestError(
                f"{key}: not supported; prompts use the model's saved prompt format", field=key
            )
    if body.get("think"):
        raise RequestError("think: this model does not think aloud", field="think")


def settings_from(body: dict) -> Settings:
    """``options`` (Ollama's names) to :class:`Settings`, each value checked."""
    opts = get_object(body, "options")

    def num(key: str, **limits) -> float | None:
        return get_number(opts, key, name=f"options.{key}", **limits)

    temperature = num("temperature", low=0.0)
    top_k = get_int(opts, "top_k", name="options.top_k", low=0)
    top_p = num("top_p", above=0.0, high=1.0)
    num_predict = get_int(opts, "num_predict", name="options.num_predict", low=-2)
    if num_predict == 0:
        raise RequestError(
            "options.num_predict: 0 asks for no answer; use -1 for no limit",
            field="options.num_predict",
        )
    repeat = num("repeat_penalty", above=0.0)
    return Settings(
        # -1 (no limit) and -2 (fill the context) both mean: until the context's end.
        max_new_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        temperature=DEFAULTS["temperature"] if temperature is None else temperature,
        # llama.cpp's convention, which Ollama follows: top_k 0 turns it off.
        top_k=DEFAULTS["top_k"] if top_k is None else (top_k or None),
        top_p=DEFAULTS["top_p"] if top_p is None else top_p,
        seed=get_int(opts, "seed", name="options.seed"),
        stop=get_stop(opts, "stop", name="options.stop"),
        repeat_penalty=DEFAULTS["repeat_penalty"] if repeat is None else repeat,
        frequency_penalty=num("frequency_penalty", low=-2.0, high=2.0) or 0.0,
        presence_penalty=num("presence_penalty", low=-2.0, high=2.0) or 0.0,
        num_ctx=get_int(opts, "num_ctx", name="options.num_ctx", low=1),
        max_tokens_field="options.num_predict",
    )


async def _answer(request: Request, kind: str) -> Any:
    """``/api/chat`` (``kind == "chat"``) and ``/api/generate``: one code path, two shapes."""
    started = time.perf_counter_ns()
    body = await read_json(request, request.app.state.max_body)
    model = _find(request, body)
    _refuse_unsupported(body)
    stream = get_bool(body, "stream", True)
    settings = settings_from(body)
    if kind == "chat":
        ids = model.chat_ids(check_messages(body.get("messages"), roles=_ROLES))
    else:
        prompt = get_str(body, "prompt", default="")
        if not prompt:
            # Ollama's way to load a model: an empty prompt answers "done" at once.
            return {
                "model": tagged(model.name),
                "created_at": _now(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
        ids = model.text_ids(
            prompt, system=get_str(body, "system"), raw=get_bool(body, "raw", False)
        )
    from instructune.generation.engine import EngineError, QueueFullError

    try:
        req = model.submit(ids, settings, prompt_field="messages" if kind == "chat" else "prompt")
    except QueueFullError as exc:
        retry = max(1, round(getattr(exc, "retry_after", 1) or 1))
        return error(f"server busy: {exc}", 503, {"Retry-After": str(retry)})
    load_ns = model.take_load_ns()

    def piece(text: str) -> dict:
        out: dict[str, Any] = {"model": tagged(model.name), "created_at": _now()}
        if kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        return out

    def final(ev: Any, text: str) -> dict:
        return {
            **piece(text),
            "done": True,
            "done_reason": _DONE_REASONS.get(ev.finish_reason, ev.finish_reason),
            "total_duration": time.perf_counter_ns() - started,
            "load_duration": load_ns,
            "prompt_eval_count": ev.prompt_tokens,
            "prompt_eval_duration": int(ev.prefill_s * 1e9),
            "eval_count": ev.completion_tokens,
            "eval_duration": int(ev.decode_s * 1e9),
        }

    if not stream:
        pieces: list[str] = []
        try:
            async for ev in req.aevents():
                pieces.append(ev.text)
                if ev.finish_reason is not None:
                    return final(ev, "".join(pieces))
        finally:
            req.cancel()  # a no-op once finished; frees the row if this task is cancelled
        return error("the engine stopped before the answer was finished", 500)

    async def lines() -> AsyncIterator[bytes]:
        try:
            async for ev in req.aevents():
                if ev.finish_reason is not None:
                    if ev.text:
                        yield _line({**piece(ev.text), "done": False})
                    yield _line(final(ev, ""))
                    return
                if ev.text:
                    yield _line({**piece(ev.text), "done": False})
            yield _line({"error": "the engine stopped before the answer was finished"})
        except EngineError as exc:
            # The status line is sent already: Ollama reports a failure mid-stream this way.
            yield _line({"error": str(exc)})
        finally:
            req.cancel()  # the client went away (or the answer is done): free its row

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _line(obj: dict) -> bytes:
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode()


@router.post("/api/chat")
async def chat(request: Request) -> Any:
    return await _answer(request, "chat")


@router.post("/api/generate")
async def generate(request: Request) -> Any:
    return await _answer(request, "generate")


def _details(model: ServedModel) -> dict:
    fmt = "gguf" if model.loaded.weights.lower().find("gguf") >= 0 else "safetensors"
    n = model.parameter_count
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n}"
    return {
        "parent_model": "",
        "format": fmt,
        "family": model.family,
        "families": [model.family],
        "parameter_size": size,
        # What the weights are once loaded (the engine computes in this dtype).
        "quantization_level": str(next(model.loaded.model.parameters()).dtype).split(".")[-1],
    }


def _listing(model: ServedModel) -> dict:
    return {
        "name": tagged(model.name),
        "model": tagged(model.name),
        "modified_at": model.modified_at.isoformat(),
        "size": model.size,
        "digest": model.digest,
        "details": _details(model),
    }


@router.get("/api/tags")
async def tags(request: Request) -> Any:
    return {"models": [_listing(m) for m in request.app.state.registry]}


@router.get("/api/ps")
async def ps(request: Request) -> Any:
    # Served models stay loaded for the life of the process: no expiry.
    return {
        "models": [
            {
                **_listing(m),
                "expires_at": "9999-12-31T23:59:59Z",
                "size_vram": 0,
                "context_length": m.context_length,
            }
            for m in request.app.state.registry
        ]
    }


@router.post("/api/show")
async def show(request: Request) -> Any:
    body = await read_json(request, request.app.state.max_body)
    model = _find(request, body)
    fmt = model.prompt_format
    chat_template = model.loaded.tokenizer.chat_template
    # The template the model is prompted with: its own, opened by its trained system prompt.
    template = (
        jinja_chat_template(fmt, chat_template) if fmt.style == "chat" and chat_template else None
    )
    stops = [*fmt.stop_strings, fmt.eos_token]
    return {
        "modelfile": f"# served by instructune\nFROM {model.spec}\n",
        "parameters": "\n".join(f"stop {json.dumps(s)}" for s in stops),
        "template": template or f"(instructune prompt style {fmt.style!r})",
        "details": _details(model),
        "model_info": {
            "general.architecture": model.family,
            "general.parameter_count": model.parameter_count,
            f"{model.family}.context_length": model.context_length,
            "instructune.prompt_style": fmt.style,
            "instructune.weights": model.loaded.weights,
            "instructune.weights_sha256": model.digest,
        },
        "capabilities": ["completion"],
        "modified_at": model.modified_at.isoformat(),
        "digest": model.digest,
    }


@router.get("/api/version")
async def version() -> Any:
    return {"version": instructune.__version__}
