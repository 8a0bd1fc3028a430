"""Reading a request's JSON body field by field, each refusal naming the field.

Both APIs (``serving.ollama``, ``serving.openai``) read their bodies with these checks rather
than through pydantic models, so that every refusal is in the API's own error format (each
API's module turns a ``RequestError`` into it) and names the field, dotted as the client wrote
it (``options.temperature``, ``messages[2].content``).
"""

from __future__ import annotations

from typing import Any


class RequestError(ValueError):
    """A request the server refuses (HTTP 4xx): ``field`` names the offending field (dotted,
    e.g. ``options.temperature``), ``status`` is the HTTP status, ``code`` a short tag for
    OpenAI's ``error.code``."""

    def __init__(
        self, message: str, *, field: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.code = code


_MISSING = object()


async def read_json(request: Any, limit: int) -> dict:
    """The request's JSON object, refusing a body over ``limit`` bytes (413) before reading it
    all, and anything that is not a JSON object (400)."""
    import json

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the request body is over the limit of {limit} bytes", status=413)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise RequestError(f"the request body is over the limit of {limit} bytes", status=413)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _bad(name: str, what: str) -> RequestError:
    return RequestError(f"{name}: {what}", field=name, code="invalid_value")


def get_str(
    body: dict,
    key: str,
    *,
    name: str | None = None,
    required: bool = False,
    default: str | None = None,
) -> str | None:
    name = name or key
    value = body.get(key)
    if value is None:
        if required:
            raise RequestError(f"{name}: this field is required", field=name, code="missing")
        return default
    if not isinstance(value, str):
        raise _bad(name, f"expected a string, got {type(value).__name__}")
    return value


def get_bool(body: dict, key: str, default: bool, *, name: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name or key, f"expected true or false, got {value!r}")
    return value


def get_number(
    body: dict,
    key: str,
    *,
    name: str | None = None,
    low: float | None = None,
    high: float | None = None,
    above: float | None = None,
) -> float | None:
    """A number within ``[low, high]`` (and ``> above``), or None when absent."""
    name = name or key
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(name, f"expected a number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise _bad(name, f"{value} is outside [{low}, {high}]")
    if above is not None and value <= above:
        raise _bad(name, f"{value} must be above {above}")
    return float(value)


def get_int(
    body: dict,
    key: str,
    *,
    name: str | None = None,
    low: int | None = None,
    high: int | None = None,
) -> int | None:
    """An integer (a float with no fraction is accepted) at least ``low``, or None."""
    name = name or key
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, f"expected an integer, got {value!r}")
    if low is not None and value < low:
        raise _bad(name, f"{value} is below the minimum of {low}")
    if high is not None and value > high:
        raise _bad(name, f"{value} is above the maximum of {high}")
    return value


def get_stop(
    body: dict, key: str, *, name: str | None = None, most: int | None = None
) -> list[str]:
    """Stop strings: one string or a list of non-empty strings (at most ``most``)."""
    name = name or key
    value = body.get(key)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad(name, "expected a non-empty string or a list of them")
    if most is not None and len(items) > most:
        raise _bad(name, f"at most {most} stop sequences, got {len(items)}")
    return list(items)


def get_object(body: dict, key: str, *, name: str | None = None) -> dict:
    value = body.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(name or key, f"expected an object, got {type(value).__name__}")
    return value


def check_messages(value: Any, *, roles: dict[str, str], content: Any = None) -> list[dict]:
    """``messages`` as ``[{"role", "content"}]``: a non-empty list, each role one of ``roles``
    (mapped to the name ``format_conversation`` knows), each content a string (or what
    ``content(value, name)`` turns into one). Which turn may come where is
    ``format_conversation``'s rule, checked there."""
    if value is None:
        raise RequestError("messages: this field is required", field="messages", code="missing")
    if not isinstance(value, list) or not value:
        raise _bad("messages", "expected a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad(where, "expected an object with role and content")
        role = message.get("role")
        if role not in roles:
            raise _bad(f"{where}.role", f"{role!r} is not one of {', '.join(roles)}")
        text = message.get("content", "")
        if content is not None:
            text = content(text, f"{where}.content")
        elif text is None:
            text = ""
        if not isinstance(text, str):
            raise _bad(f"{where}.content", f"expected a string, got {type(text).__name__}")
        out.append({"role": roles[role], "content": text})
    return out
