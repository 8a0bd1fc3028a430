"""OpenAI's API (``/v1/...``) over the served models: chat completions, completions, models.

Streaming is Server-Sent Events through ``sse-starlette``: ``data: {chunk}`` events and a last
``data: [DONE]``. Errors are ``{"error": {"message", "type", "param", "code"}}``, ``param``
naming the field. ``/v1/completions`` sends its prompt as it is (no prompt format), as
OpenAI's completions endpoint does; ``/v1/chat/completions`` formats the messages in the
model's prompt format. Defaults are OpenAI's (temperature 1, top_p 1); ``n`` must be 1.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

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

# "developer" is the newer name of the system role.
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def error(
    message: str,
    status: int = 400,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    kind = (
        "invalid_request_error"
        if status < 500
        else "server_error"
        if status != 503
        else "overloaded_error"
    )
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _find(request: Request, body: dict) -> ServedModel:
    name = get_str(body, "model", required=True)
    model = request.app.state.registry.find(name)
    if model is None:
        have = ", ".join(request.app.state.registry.names())
        raise RequestError(
            f"The model {name!r} does not exist (served: {have})",
            field="model",
            status=404,
            code="model_not_found",
        )
    return model


def _text_content(value: Any, name: str) -> str:
    """A message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        texts = []
        for i, part in enumerate(value):
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise RequestError(
                    f"{name}[{i}]: only text parts are supported",
                    field=f"{name}[{i}]",
                    code="invalid_value",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RequestError(
        f"{name}: expected a string or a list of text parts", field=name, code="invalid_value"
    )


def _refuse_unsupported(body: dict) -> None:
    n = get_int(body, "n", low=1)
    if n is not None and n != 1:
        raise RequestError(
            f"n: only n=1 is supported, got {n}", field="n", code="unsupported_value"
        )
    for key in ("logprobs", "echo"):
        if body.get(key):
            raise RequestError(
                f"{key}: not supported by this server", field=key, code="unsupported_value"
            )
    for key in ("tools", "functions", "suffix"):
        if body.get(key):
            raise RequestError(
                f"{key}: not supported by this server", field=key, code="unsupported_value"
            )
    fmt = get_object(body, "response_format")
    if fmt and fmt.get("type") not in (None, "text"):
        raise RequestError(
            "response_format: only type 'text' is supported",
            field="response_format",
            code="unsupported_value",
        )
    best_of = get_int(body, "best_of", low=1)
    if best_of not in (None, 1):
        raise RequestError(
            "best_of: only 1 is supported", field="best_of", code="unsupported_value"
        )


def settings_from(body: dict) -> Settings:
    # max_completion_tokens is the newer name; either is accepted.
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    temperature = get_number(body, "temperature", low=0.0, high=2.0)
    top_p = get_number(body, "top_p", low=0.0, high=1.0)
    if top_p == 0.0:
        raise RequestError("top_p: must be above 0", field="top_p", code="invalid_value")
    return Settings(
        max_new_tokens=get_int(body, key, low=1),
        temperature=1.0 if temperature is None else temperature,
        top_p=None if top_p is None or top_p >= 1.0 else top_p,
        seed=get_int(body, "seed"),
        stop=get_stop(body, "stop", most=4),
        frequency_penalty=get_number(body, "frequency_penalty", low=-2.0, high=2.0) or 0.0,
        presence_penalty=get_number(body, "presence_penalty", low=-2.0, high=2.0) or 0.0,
        max_tokens_field=key,
    )


async def _complete(request: Request, chat: bool) -> Any:
    body = await read_json(request, request.app.state.max_body)
    model = _find(request, body)
    _refuse_unsupported(body)
    settings = settings_from(body)
    stream = get_bool(body, "stream", False)
    include_usage = get_bool(
        get_object(body, "stream_options"),
        "include_usage",
        False,
        name="stream_options.include_usage",
    )
    if chat:
        messages = check_messages(body.get("messages"), roles=_ROLES, content=_text_content)
        ids, prompt_field = model.chat_ids(messages), "messages"
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(
                "prompt: expected a non-empty string (one prompt per request)",
                field="prompt",
                code="invalid_value",
            )
        ids, prompt_field = model.text_ids(prompt, raw=True), "prompt"
    from instructune.generation.engine import EngineError, QueueFullError

    try:
        req = model.submit(ids, settings, prompt_field=prompt_field)
    except QueueFullError as exc:
        retry = max(1, round(getattr(exc, "retry_after", 1) or 1))
        return error(
            f"server busy: {exc}", 503, code="queue_full", headers={"Retry-After": str(retry)}
        )

    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    created = int(time.time())
    head = {
        "id": ident,
        "object": "chat.completion" if chat else "text_completion",
        "created": created,
        "model": model.name,
        "system_fingerprint": f"fp_{model.digest[:12]}",
    }

    def usage(ev: Any) -> dict:
        return {
            "prompt_tokens": ev.prompt_tokens,
            "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens,
        }

    if not stream:
        pieces: list[str] = []
        try:
            async for ev in req.aevents():
                pieces.append(ev.text)
                if ev.finish_reason is not None:
                    text, reason = "".join(pieces), _FINISH.get(ev.finish_reason, "stop")
                    choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
                    if chat:
                        choice["message"] = {"role": "assistant", "content": text}
                    else:
                        choice["text"] = text
                    return {**head, "choices": [choice], "usage": usage(ev)}
        finally:
            req.cancel()  # a no-op once finished; frees the row if this task is cancelled
        return error("the engine stopped before the answer was finished", 500)

    chunk_head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(text: str | None, reason: str | None, first: bool = False) -> dict:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
        out = {**chunk_head, "choices": [choice]}
        if include_usage:
            out["usage"] = None
        return out

    async def events() -> AsyncIterator[dict]:
        try:
            if chat:
                yield {"data": json.dumps(chunk(None, None, first=True))}
            async for ev in req.aevents():
                if ev.text:
                    yield {"data": json.dumps(chunk(ev.text, None), ensure_ascii=False)}
                if ev.finish_reason is not None:
                    yield {"data": json.dumps(chunk(None, _FINISH.get(ev.finish_reason, "stop")))}
                    if include_usage:
                        yield {
                            "data": json.dumps({**chunk_head, "choices": [], "usage": usage(ev)})
                        }
                    yield {"data": "[DONE]"}
                    return
            message = "the engine stopped before the answer was finished"
            body = {
                "error": {"message": message, "type": "server_error", "param": None, "code": None}
            }
            yield {"data": json.dumps(body)}
        except EngineError as exc:
            # The status line is sent already: the error goes as an event, as OpenAI sends one.
            body = {
                "error": {"message": str(exc), "type": "server_error", "param": None, "code": None}
            }
            yield {"data": json.dumps(body)}
        finally:
            req.cancel()  # the client went away (or the answer is done): free its row

    from sse_starlette import EventSourceResponse

    return EventSourceResponse(events())


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Any:
    return await _complete(request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Any:
    return await _complete(request, chat=False)


@router.get("/v1/models")
async def models(request: Request) -> Any:
    return {
        "object": "list",
        "data": [
            {
                "id": m.name,
                "object": "model",
                "created": int(m.modified_at.timestamp()),
                "owned_by": "instructune",
            }
            for m in request.app.state.registry
        ],
    }


@router.get("/v1/models/{name:path}")
async def model(name: str, request: Request) -> Any:
    m = request.app.state.registry.find(name)
    if m is None:
        return error(
            f"The model {name!r} does not exist", 404, param="model", code="model_not_found"
        )
    return {
        "id": m.name,
        "object": "model",
        "created": int(m.modified_at.timestamp()),
        "owned_by": "instructune",
    }
