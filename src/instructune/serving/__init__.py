"""Serving a loaded model to many clients at once.

- ``engine``: ``Engine``, the continuous-batching decoder one server process shares between
  its clients: ``submit()`` encoded prompts from any thread, read each request's ``events()``
  (or ``aevents()`` under asyncio), ``cancel()`` when a client goes away.
- ``requests``: ``EngineRequest`` and ``EngineEvent`` (one request's state and answer pieces),
  the errors ``EngineError`` and ``QueueFullError``; all re-exported by ``engine``.
- ``batching``: ``ContinuousBatch``, the KV-cached batch the engine decodes, which rows join
  (after their prefill) and leave between steps.
- ``refill``: ``generate_continuous``, ``generate`` for many prompts on the engine (a finished
  row is refilled from the queue at once).

Nothing is imported here, so importing one module (the server's app) loads only what it needs
and ``instructune --help`` stays torch-free.
"""
