"""The project's one LLM client (torch-free): chat, raw completion, streaming, retries with
back-off and time-outs against Ollama or any OpenAI-compatible server, and a JSONL reply cache.
Used by ``instructune evaluate --judge`` and the ``instructune data`` commands.
"""

from instructune.llm.cache import ReplyCache, cached_call, client_key, request_key
from instructune.llm.client import (
    BACKENDS,
    DEFAULT_URLS,
    LLMClient,
    LLMError,
    LLMSpec,
    LLMUnavailableError,
    ServerInfo,
    make_client,
    parse_llm,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_URLS",
    "LLMClient",
    "LLMError",
    "LLMSpec",
    "LLMUnavailableError",
    "ReplyCache",
    "ServerInfo",
    "cached_call",
    "client_key",
    "make_client",
    "parse_llm",
    "request_key",
]
