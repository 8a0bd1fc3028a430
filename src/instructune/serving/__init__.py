"""Serving a loaded model to many clients at once, over HTTP.

- ``app``: the FastAPI application (``create_app``) with Ollama's and OpenAI's routes, the chat
  page and ``/health``.
- ``models``: the served models by name, each with its ``generation.engine.Engine`` (the
  continuous-batching decoder the server shares between its clients), and what a request to
  one becomes (prompt ids, checked generation ``Settings``).
- ``fields``: reading a JSON body field by field (``RequestError`` names the field).
- ``ollama``, ``openai``: one API's routes each, in that API's own request, answer and error
  formats.

The decoding itself (the engine, its batch, its requests) is generation machinery and lives in
``instructune.generation``; nothing here decodes.

Nothing is imported here, so importing one module (the server's app) loads only what it needs
and ``instructune --help`` stays torch-free.
"""
