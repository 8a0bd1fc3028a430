"""``instructune serve``: Ollama's and OpenAI's APIs over one or more models, on uvicorn.

Nothing heavy is imported at module level: torch, FastAPI and uvicorn load when the command
runs.
"""

from __future__ import annotations

import argparse
import errno
import socket
import sys

from instructune.cli.options import add_load_options, device_and_dtype

DEFAULT_PORT = 11435  # not Ollama's 11434, so both can run on one machine

EPILOG = """\
examples:
  instructune serve --model runs/book/final
  instructune serve --model book=runs/book/final --model smollm2-135m-instruct --port 8000
  curl http://127.0.0.1:11435/api/chat -d '{"model": "book", "messages": [{"role": "user",
      "content": "What is an antonym of complicated?"}], "options": {"temperature": 0}}'
  curl http://127.0.0.1:11435/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "book", "messages": [{"role": "user", "content": "Hi"}]}'

--model is SPEC or NAME=SPEC (repeatable); SPEC is anything `generate --model` takes, and a
bare SPEC is named by its directory or file name (or is its registry name). Clients ask for the
model by that name; /api/tags reports the sha256 of its weights as its digest.
Endpoints: Ollama's /api/chat, /api/generate, /api/tags, /api/show, /api/ps, /api/version;
OpenAI's /v1/chat/completions, /v1/completions, /v1/models; /health.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve models over Ollama's and OpenAI's HTTP APIs",
        description=(
            "Serve one or more models by name over Ollama's and OpenAI's HTTP APIs, with "
            "continuous batching: concurrent requests share one decoding batch."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[NAME=]SPEC",
        help="a model to serve (repeatable): registry name, hub id, directory or .gguf",
    )
    add_load_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}; 0 picks a free one"
    )
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (8)")
    p.add_argument(
        "--max-queue", type=int, default=64, help="requests waiting before 503s (default 64)"
    )
    p.add_argument(
        "--max-body", type=int, default=4 << 20, help="largest request body in bytes (4 MiB)"
    )
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (warning)")
    p.set_defaults(func=run)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, bound before any model loads, so that a port in use
    is said at once (and no other process can take it while the models load)."""
    from instructune.errors import InstructuneError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InstructuneError(f"--host {host}: cannot resolve it ({exc})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise InstructuneError(
                f"port {port} on {host} is in use (another server, or an earlier "
                f"`instructune serve`?); stop it or pass another --port"
            ) from None
        raise InstructuneError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def run(args: argparse.Namespace) -> int:
    from instructune.errors import InstructuneError

    try:
        import fastapi  # noqa: F401
        import sse_starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise InstructuneError(
            f"serve needs the serve extras ({exc.name} is missing): "
            "pip install 'instructune[serve]'"
        ) from None
    from instructune.serving.models import parse_model_specs

    if args.max_batch < 1 or args.max_queue < 0 or args.max_body < 1:
        raise InstructuneError("--max-batch and --max-body must be >= 1, --max-queue >= 0")
    try:
        specs = parse_model_specs(args.model)
    except ValueError as exc:
        raise InstructuneError(str(exc)) from None
    sock = bind(args.host, args.port)
    try:
        app = _load(args, specs)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        print(
            f"serving {', '.join(n for n, _ in specs)} on http://{shown}:{port}",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            # uvicorn shuts down gracefully on Ctrl-C, then raises it again: for a server,
            # being stopped that way is the normal end, not a failure.
            print("stopped", file=sys.stderr)
    finally:
        sock.close()
    return 0


def _load(args: argparse.Namespace, specs: list[tuple[str, str]]):
    from instructune.serving.app import create_app
    from instructune.serving.models import ModelRegistry, load_served

    device, dtype = device_and_dtype(args)
    registry = ModelRegistry()
    for name, spec in specs:
        served = load_served(
            name,
            spec,
            max_batch=args.max_batch,
            max_queue=args.max_queue,
            device=device,
            dtype=dtype,
            init=args.init,
            log=lambda line, name=name: print(f"{name}: {line}", file=sys.stderr, flush=True),
        )
        registry.add(served)
    return create_app(registry, max_body=args.max_body)
