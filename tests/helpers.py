"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_GPT2 = "n_layers=2,emb_dim=32,n_heads=2,hidden_dim=64,context_length=128"


def tiny_finetune_args(out: Path, *extra: str) -> list[str]:
    """``instructune finetune`` on a tiny random GPT-2 and the 40-record fixture, then ``extra``."""
    return [
        "finetune",
        "--model",
        "gpt2",
        "--init",
        "random",
        "--model-overrides",
        TINY_GPT2,
        "--data",
        str(FIXTURES / "instructions-40.json"),
        "--out",
        str(out),
        "--threads",
        "1",
        "--quiet",
        *extra,
    ]


def tiny_config(out: Path, **settings):
    """The settings of a short, unscored run of a tiny random GPT-2 on the 40-record fixture
    (global batch 4, one step, one test answer), with ``settings`` on top."""
    from instructune.config import resolve_config
    from instructune.pipeline import parse_overrides

    flags = {
        "model": "gpt2",
        "init": "random",
        "model_overrides": parse_overrides(TINY_GPT2),
        "data": str(FIXTURES / "instructions-40.json"),
        "out": str(out),
        "threads": 1,
        "quiet": True,
        "batch_size": 4,
        "max_steps": 1,
        "max_length": 128,  # the tiny model's context length
        "eval_batches": 1,
        "max_new_tokens": 4,
        "test_limit": 1,
        "evaluate": False,
    }
    return resolve_config(flags={**flags, **settings})


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test will Ctrl-C: SIGINT back to its default.

    A shell starts background jobs with SIGINT ignored, and children inherit that; Python then
    installs no KeyboardInterrupt handler, so a test run from such a job (a CI script started
    with ``&``) would send a signal the child never sees.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Server:
    """The app on uvicorn in a thread, on a socket bound (port 0) before the thread starts, so
    a first request simply waits in the listen queue until the server accepts it."""

    def __init__(self, app) -> None:
        import socket
        import threading

        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})

    def __enter__(self) -> Server:
        import httpx

        self.thread.start()
        health = httpx.get(f"{self.url}/health", timeout=60)
        assert health.status_code == 200, health.text
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def save_tiny_llama(out: Path, tokenizer, *, context_length: int = 256) -> Path:
    """A 1-layer random Llama (SmolLM2's architecture) saved in ``out`` with ``tokenizer``."""
    import torch

    from instructune.checkpoints import save_model
    from instructune.models import build_model, get_config

    torch.manual_seed(0)
    cfg = get_config(
        "smollm2-135m",
        n_layers=1,
        emb_dim=32,
        n_heads=2,
        n_kv_heads=1,
        hidden_dim=64,
        vocab_size=tokenizer.vocab_size,
        context_length=context_length,
    )
    save_model(out, build_model(cfg), tokenizer, cfg)
    return out
