"""``instructune chat``: talk to a model in the terminal, or answer one ``--prompt``.

A thin shell over ``instructune.chat``. Nothing heavy is imported at module level: torch and
the model code load when the command runs.
"""

from __future__ import annotations

import argparse
import sys

from instructune.cli.options import add_load_options, add_sampling_options, load_from_args

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
    add_load_options(p)
    p.add_argument("--prompt", help="answer this one message, print the answer and exit")
    p.add_argument("--system", metavar="TEXT", help="the system prompt to start with")
    p.add_argument(
        "--style",
        help="prompt style: alpaca, phi3 or chat (default: the model's saved style, else alpaca)",
    )
    add_sampling_options(p)
    p.set_defaults(func=run)


def _notify(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    from instructune.chat import ChatSession, chat_loop, stream_answer

    loaded = load_from_args(args)
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
