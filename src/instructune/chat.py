"""Talking to a model turn by turn: a :class:`ChatSession` and the terminal loop around it.

A session keeps the conversation (an optional system prompt, then user and assistant turns)
and answers each new user message with the whole conversation as the prompt, built by
``data.conversation.format_conversation`` in the model's own prompt style, so the terminal
chat and the server prompt a model the same way. Answers stream as the tokens come
(``generation.stream``). Before each answer the oldest turns are dropped, with a notice, until
the prompt and ``max_new_tokens`` fit the model's context window.

:func:`chat_loop` is the interactive part of ``instructune chat``: it reads lines, runs the
``/reset``, ``/system TEXT``, ``/exit`` commands and streams answers; Ctrl-C during an answer
stops that answer only, and Ctrl-C or Ctrl-D at the prompt ends the chat.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import IO, TYPE_CHECKING

from instructune.data.conversation import fit_history, format_conversation
from instructune.data.prompts import extract_response, get_style, trained_system_prompt
from instructune.errors import InstructuneError
from instructune.generation import encode_prompt, stop_ids_for, stream, style_and_stops
from instructune.generation.sampling import Sampler

if TYPE_CHECKING:
    from instructune.checkpoints.load import LoadedModel

PROMPT = ">>> "
STOPPED = "[stopped]"
HELP = """\
commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (/system alone shows it; /system - clears it)
  /exit           end the chat (also Ctrl-D, or Ctrl-C at the prompt)
  /help           this list
Ctrl-C while an answer streams stops that answer; what was said stays in the conversation."""


class ChatError(InstructuneError):
    """A message the chat cannot answer (too long for the context); the chat goes on."""


class ChatSession:
    """One conversation with a loaded model.

    Args:
        loaded: the model, its tokenizer and saved prompt format (``load_model``'s result).
        style: prompt style (default: the model's saved one, else ``alpaca``).
        system: the system prompt, or None.
        stop_strings: extra strings that end an answer, besides the style's.
        max_new_tokens, temperature, top_k, top_p, seed: as for ``generation.stream``; with a
            seed every answer samples from a generator seeded ``seed``, so the same
            conversation gets the same answers.
        notify: receives one-line notices (turns dropped to fit the context, a system prompt
            the style cannot show); default: ignore them.

    Raises:
        InstructuneError: ``max_new_tokens`` leaves no room for a prompt, a sampling setting
            is out of range, or the style cannot be used with this model (``chat`` without a
            chat template).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        style: str | None = None,
        system: str | None = None,
        stop_strings: Sequence[str] = (),
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.style, stops = style_and_stops(loaded, style)
        self.stop_strings = stops + [s for s in stop_strings if s]
        self.options = dict(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
        )
        Sampler(temperature, top_k, top_p)  # bad sampling settings fail now, not per message
        self.notify = notify or (lambda message: None)
        self.context_length = loaded.config.context_length
        self.budget = self.context_length - max_new_tokens
        if self.budget < 1:
            raise ChatError(
                f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's "
                f"context of {self.context_length} tokens; lower it"
            )
        self.system: str | None = None
        self.turns: list[dict[str, str]] = []  # user and assistant messages, oldest first
        # The saved format (its system prompt included) when chatting in the trained style.
        fmt = loaded.prompt_format
        self._format = fmt if fmt is not None and fmt.style == self.style else self.style
        # Render once now, so a style this model cannot use fails before the first message.
        format_conversation([{"role": "user", "content": "hi"}], self._format, self._template)
        if system:
            self.set_system(system)

    @property
    def _template(self) -> str | None:
        return self.loaded.tokenizer.chat_template

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation as messages: the system prompt (when set), then the turns."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [dict(m) for m in self.turns]

    def reset(self) -> None:
        """Forget every turn; the system prompt stays."""
        self.turns.clear()

    @property
    def trained_system(self) -> str | None:
        """The system prompt the model was trained with, used while none is set (or None)."""
        return trained_system_prompt(self.loaded.prompt_format, self.style)

    def set_system(self, text: str | None) -> None:
        """Set the system prompt (None or blank clears it: the trained one applies again)."""
        self.system = text.strip() if text and text.strip() else None
        if self.system and not get_style(self.style).system_turn:
            # Training drops a record's system turn in these styles too (system_turn_notice),
            # so the model would not know what to do with one; say so rather than pretend.
            self.notify(
                f"note: the {self.style} style has no place for a system prompt; this model "
                "will not see it (a model using the chat style does)"
            )

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The token ids the model is prompted with for ``messages`` (BOS as it was trained)."""
        text = format_conversation(messages, self._format, self._template)
        fmt = self.loaded.prompt_format
        add_bos = fmt.add_bos if fmt is not None else None
        return encode_prompt(self.loaded.tokenizer, text, add_bos=add_bos)

    def _fit(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids for ``messages`` after dropping the oldest turns that do not fit."""
        kept, dropped = fit_history(messages, lambda m: len(self.prompt_ids(m)), self.budget)
        ids = self.prompt_ids(kept)
        if len(ids) > self.budget:
            # Cropping the prompt's start would cut the template's header (the Alpaca preamble,
            # the system turn), which leaves the model nothing sensible to answer.
            raise ChatError(
                f"the message is too long: its prompt has {len(ids)} tokens, and the model's "
                f"context of {self.context_length} tokens leaves room for {self.budget} with "
                f"max_new_tokens={self.options['max_new_tokens']}; shorten it"
            )
        if dropped:
            self.turns = [m for m in kept if m["role"] != "system"][:-1]
            self.notify(
                f"note: dropped the {dropped} oldest message{'s' if dropped > 1 else ''} of the "
                f"conversation to fit the model's context of {self.context_length} tokens"
            )
        return ids

    def reply(self, text: str) -> Iterator[str]:
        """Answer the user message ``text``: yields the answer's text pieces as they come.

        The exchange joins the conversation when the answer ends, also when it is cut short
        (the iterator closed, or an exception such as KeyboardInterrupt inside it): the part
        that was said is kept.

        Raises:
            ChatError: at once, before anything is generated, when the message does not fit
                the context even with every earlier turn dropped.
        """
        user = {"role": "user", "content": text}
        ids = self._fit(self.messages + [user])
        return self._answer(user, ids)

    def _answer(self, user: dict[str, str], ids: list[int]) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in stream(
                self.loaded.model,
                self.loaded.tokenizer,
                ids,
                stop_ids=stop_ids_for(self.loaded),
                stop_strings=self.stop_strings,
                **self.options,
            ):
                pieces.append(piece)
                yield piece
        finally:
            answer = extract_response("".join(pieces), self.style)
            self.turns += [user, {"role": "assistant", "content": answer}]


def stream_answer(session: ChatSession, text: str, out: IO[str]) -> bool:
    """Write the answer to ``text`` to ``out`` as it streams; Ctrl-C stops it.

    Returns:
        True when the answer ended by itself, False when Ctrl-C stopped it (a ``[stopped]``
        line follows what was written).
    """
    pieces = None
    try:
        pieces = session.reply(text)
        for piece in pieces:
            out.write(piece)
            out.flush()
    except KeyboardInterrupt:
        # Raised inside the generator, this already ended it; raised while writing, it did
        # not: close() ends it either way, and the partial answer joins the conversation.
        if pieces is not None:
            pieces.close()
        out.write(f"\n{STOPPED}\n")
        out.flush()
        return False
    out.write("\n")
    out.flush()
    return True


def _command(session: ChatSession, line: str, err: IO[str]) -> bool:
    """Run a ``/command``; False when it ends the chat."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return False
    if name == "/reset":
        session.reset()
        err.write("conversation reset\n")
    elif name == "/system":
        if not arg:
            trained = session.trained_system
            if session.system:
                err.write(f"system prompt: {session.system}\n")
            elif trained is not None:
                err.write(f"system prompt: the trained one, {trained!r}\n")
            else:
                err.write("system prompt: (none)\n")
        elif arg == "-":
            session.set_system(None)
            trained = session.trained_system
            back = "" if trained is None else f" (the trained one, {trained!r}, applies again)"
            err.write(f"system prompt cleared{back}\n")
        else:
            session.set_system(arg)
            err.write("system prompt set\n")
    elif name in ("/help", "/?"):
        err.write(HELP + "\n")
    else:
        err.write(f"unknown command {name}; /help lists them\n")
    err.flush()
    return True


def chat_loop(
    session: ChatSession,
    *,
    read_line: Callable[[str], str] = input,
    out: IO[str] | None = None,
    err: IO[str] | None = None,
) -> int:
    """Read lines and answer them until ``/exit``, end of input or Ctrl-C at the prompt.

    Answers go to ``out`` (stdout), everything else (command replies, notices, errors) to
    ``err`` (stderr). A message the model cannot take (:class:`ChatError`, or any other
    ``InstructuneError``) is reported and the chat goes on.

    Returns:
        The exit code: 0.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    while True:
        try:
            line = read_line(PROMPT)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")  # end the prompt's line, so the shell's prompt starts on its own
            out.flush()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(session, line, err):
                return 0
            continue
        try:
            stream_answer(session, line, out)
        except InstructuneError as exc:  # e.g. too long for the context: say so, go on
            err.write(f"error: {exc}\n")
            err.flush()
