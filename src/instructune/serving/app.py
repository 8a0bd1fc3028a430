"""The ASGI application of ``instructune serve``: Ollama's API, OpenAI's API and ``/health``
over the served models (``create_app(registry)``), on FastAPI.

Each API answers its errors in its own format (Ollama: ``{"error": "..."}``; OpenAI:
``{"error": {"message", "type", "param", "code"}}``), chosen by the path: ``/v1/...`` is
OpenAI's, everything else Ollama's. Nothing a client sends makes the server crash: bad input is
a 4xx naming the field, and an unexpected failure is a 500 in the same format.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from instructune.serving import ollama, openai
from instructune.serving.fields import RequestError
from instructune.serving.models import ModelRegistry

# Larger than any prompt a served context holds, small enough that a client cannot make the
# server buffer a large body.
DEFAULT_MAX_BODY = 4 << 20
# The chat page: plain files shipped in the package (package-data), no build step.
STATIC = Path(__file__).resolve().with_name("static")

log = logging.getLogger("instructune.serve")


def _error(
    request: Request,
    message: str,
    status: int,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
):
    if request.url.path.startswith("/v1/"):
        return openai.error(message, status, param=param, code=code, headers=headers)
    return ollama.error(message, status, headers=headers)


def create_app(
    registry: ModelRegistry, *, max_body: int = DEFAULT_MAX_BODY, manage_engines: bool = True
) -> FastAPI:
    """The application serving ``registry``'s models.

    Args:
        registry: the models, each with its engine.
        max_body: the largest request body accepted, in bytes (larger: 413).
        manage_engines: start the engines when the server starts and close them when it stops
            (False when the caller runs them itself).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engines:
            registry.start()
        try:
            yield
        finally:
            if manage_engines:
                registry.close()

    app = FastAPI(
        title="instructune", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.registry = registry
    app.state.max_body = max_body

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError):
        return _error(request, exc.message, exc.status, param=exc.field, code=exc.code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # Unknown paths and wrong methods, in the API's format rather than FastAPI's.
        return _error(
            request,
            f"{request.method} {request.url.path}: {exc.detail}",
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        from instructune.errors import InstructuneError
        from instructune.generation.base import GenerationError
        from instructune.generation.engine import EngineError

        if isinstance(exc, EngineError):
            # The engine is closed, or the model failed on a step this request was in.
            return _error(request, str(exc), 500, code="engine_error")
        if isinstance(exc, GenerationError | InstructuneError):
            # Settings the generator refuses (they passed this server's own checks).
            return _error(request, str(exc), 400, code="invalid_value")
        log.exception("unexpected error answering %s", request.url.path)
        return _error(request, f"internal error: {type(exc).__name__}: {exc}", 500)

    @app.get("/health")
    async def health() -> Any:
        # The engines' counters (running, queued, near_ties...) say how busy the server is.
        return {
            "status": "ok",
            "models": registry.names(),
            "engines": {m.name: m.engine.stats() for m in registry},
        }

    @app.get("/")
    async def chat_page() -> Any:
        # The page talks to this server's own Ollama API (/api/tags, /api/chat).
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.include_router(ollama.router)
    app.include_router(openai.router)
    return app
