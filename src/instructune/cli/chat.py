"""``instructune chat``: talk to a model in the terminal, or answer one ``--prompt``.

A thin shell over ``instructune.chat``. Nothing heavy is imported at module level: torch and
the model code load when the command runs.
"""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  instructune chat --model smollm2-135m-instruct
  instructune chat --model runs/gpt2-medium/final --temperature 0.7 --seed 1
  instructune chat --model smollm2-135m-instruct --system "Answer in one sentence." \\
      --prompt "Why is the sky blue?"

In the chat: /reset forgets the conversation, /system TEXT sets the system prompt, /exit (or
Ctrl-D) ends it, /help lists the commands. Ctrl-C stops the answer being written; at the
prompt it ends the chat. The conversation is prompted in the model's saved style
(instructune.json): a chat-style model gets it through its chat template; an alpaca or phi3
model gets the last message as the instruction and the turns before it as its input. When the
conversation outgrows the context window, its oldest turns are dropped, with a notice.
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat",
        help="chat with a model in the terminal (answers stream; /reset, /system, /exit)",
        description=(
            "Chat with a model: type a message, read the answer as it is generated. Each turn "
            "is prompted with the conversation so far, in the model's prompt style. Greedy "
            "unless --temperature is above 0."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="registry name, hub id, directory or .gguf")
    p.add_argument(
        "--init",
        choices=("pretrained", "random"),
        default="pretrained",
        help="random: random weights for a registry name (tests, benchmarks)",
    )
    p.add_argument("--prompt", help="answer this one message, print the answer and exit")
    p.add_argument("--system", metavar="TEXT", help="the system prompt to start with")
    p.add_argument(
        "--style",
        help="prompt style: alpaca, phi3 or chat (default: the model's saved style, else alpaca)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="per answer; default 256")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among tokens holding this much probability")
    p.add_argument("--seed", type=int, help="seed for sampling (the same seed, the same answers)")
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="also stop an answer at this text (repeatable)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default), bf16 or fp16")
    p.set_defaults(func=run)


def _notify(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from instructune.chat import ChatSession, chat_loop, stream_answer
    from instructune.checkpoints import load_model
    from instructune.errors import InstructuneError
    from instructune.utils.devices import pick_device, resolve_dtype

    try:
        dtype = resolve_dtype(args.dtype)
    except ValueError as exc:
        raise InstructuneError(f"--dtype: {exc}") from None
    loaded = load_model(args.model, init=args.init, device=pick_device(args.device), dtype=dtype)
    session = ChatSession(
        loaded,
        style=args.style,
        system=args.system,
        stop_strings=args.stop,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        notify=_notify,
    )
    if args.prompt is not None:
        return 0 if stream_answer(session, args.prompt, sys.stdout) else 130
    # Ctrl-C is how a chat stops an answer. A shell starts background jobs with SIGINT ignored
    # and Python then raises no KeyboardInterrupt; a chat that was given a terminal wants it.
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # not on every platform; plain input() still works
            pass
        name = loaded.config.name or args.model
        _notify(
            f"chatting with {name} ({session.style} style, context {session.context_length} "
            "tokens); /help lists the commands, Ctrl-C stops an answer, /exit or Ctrl-D ends"
        )
    return chat_loop(session)
