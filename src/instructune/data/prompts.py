"""Prompt styles: ONE place that turns a record into the text a model sees.

Training, generation, evaluation and serving all build prompts with :func:`format_prompt` /
:func:`format_example`, so a model is always prompted the way it was fine-tuned.

Styles:

* ``alpaca``: the book's ``format_input`` (chapter 7.2) followed by ``"\\n\\n### Response:\\n"``.
* ``phi3``: the book's exercise 7.1 (``<|user|>\\n{instruction}``, ``\\n{input}`` when there is
  one, then ``\\n<|assistant|>:\\n`` and the output).
* ``chat``: the tokenizer's own Jinja chat template, rendered with ``jinja2``: the record's
  ``system`` turn when it has one (else the run's ``system_prompt``, when one is set; else
  whatever the template does without one), one user message (the instruction, plus
  ``"\\n\\n" + input`` when there is one) and the generation prompt.
  A multi-turn record (one with ``messages``) is its conversation instead: the turns before
  the last answer and the generation prompt; :func:`format_parts` gives every answer.

``alpaca`` and ``phi3`` have no place for a system turn; :func:`system_turn_notice` says how
many records lose theirs. Templates that call ``strftime_now`` see the date fixed with
:func:`use_prompt_date` (today's otherwise).

The response text never contains the end token: tokenisation appends it as an id.
"""

from __future__ import annotations

import contextvars
import datetime
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from instructune.errors import DataError

# The Alpaca preamble as printed in the book's chapter 7.2 (`format_input`); exact text.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_RESPONSE_MARKER = "### Response:"
# The Phi-3 markers of the book's exercise 7.1.
PHI3_USER = "<|user|>"
PHI3_ASSISTANT = "<|assistant|>:"


@dataclass
class PromptFormat:
    """How a model was trained to be prompted; saved beside its weights as ``instructune.json``.

    Every command that prompts a saved model (generate, evaluate, chat, serve, export) reads
    this, unless the user overrides it.

    Attributes:
        style: prompt style name (``alpaca``, ``phi3``, ``chat``).
        eos_token: the text of the end token the model learned to emit after a response.
        eos_id: its id.
        stop_strings: extra strings at which generation stops (e.g. ``"### Instruction:"``).
        add_bos: whether a beginning-of-sequence token is put in front of every sequence.
        bos_id: that token's id, when ``add_bos``.
        system_prompt: the system turn of a prompt that brings none (``chat`` style): the one
            the model was trained with. None: the chat template's own default (SmolLM2's adds
            "You are a helpful AI assistant named SmolLM, ..."); ``""``: an empty system turn.
    """

    style: str = "alpaca"
    eos_token: str = "<|endoftext|>"
    eos_id: int = 50256
    stop_strings: list[str] = field(default_factory=list)
    add_bos: bool = False
    bos_id: int | None = None
    system_prompt: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptFormat:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


def _text(record: Mapping[str, Any], key: str) -> str:
    value = record.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"record field {key!r} must be a string, got {type(value).__name__}")
    return value


def format_input(record: Mapping[str, Any]) -> str:
    """The book's ``format_input``: preamble, instruction, and the input section when non-empty.

    This is the text the book's judge prompt quotes as the instruction, and the alpaca prompt
    without its response marker.
    """
    text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{_text(record, 'instruction')}"
    inp = _text(record, "input")
    return text + (f"\n\n### Input:\n{inp}" if inp else "")


# --- styles -----------------------------------------------------------------------------------


def _alpaca(
    record: Mapping[str, Any], chat_template: str | None, system_prompt: str | None
) -> tuple[str, str]:
    return format_input(record) + f"\n\n{ALPACA_RESPONSE_MARKER}\n", _text(record, "output")


def _phi3(
    record: Mapping[str, Any], chat_template: str | None, system_prompt: str | None
) -> tuple[str, str]:
    inp = _text(record, "input")
    prompt = f"{PHI3_USER}\n{_text(record, 'instruction')}" + (f"\n{inp}" if inp else "")
    return prompt + f"\n{PHI3_ASSISTANT}\n", _text(record, "output")


def user_message(record: Mapping[str, Any]) -> str:
    """The user turn the ``chat`` style sends: the instruction, then ``"\\n\\n" + input``."""
    inp = _text(record, "input")
    return _text(record, "instruction") + (f"\n\n{inp}" if inp else "")


def system_message(record: Mapping[str, Any]) -> str:
    """The record's ``system`` turn (from a chat-format line), or ``""`` when it has none."""
    return _text(record, "system")


def record_conversation(record: Mapping[str, Any]) -> list[dict[str, str]] | None:
    """The conversation of a multi-turn record (its ``messages``, with several assistant turns),
    or None for other records.

    Its last assistant turn is the record's ``output``, so that a record given another answer
    (a preference pair's ``chosen`` or ``rejected``, see ``dataset.tokenize_pair``) is that
    conversation with the other answer.
    """
    messages = record.get("messages")
    if not isinstance(messages, list):
        return None
    turns = [{"role": m["role"], "content": m["content"]} for m in messages]
    if sum(turn["role"] == "assistant" for turn in turns) < 2:
        return None  # one exchange: the plain record's fields say it all
    if "output" in record:
        turns[-1]["content"] = _text(record, "output")
    return turns


def _need_template(chat_template: str | None) -> str:
    if not chat_template:
        raise DataError(
            "prompt style 'chat' needs the tokenizer's chat template, and none was given "
            "(this tokenizer has none: use --style alpaca or --style phi3)"
        )
    return chat_template


def with_system_prompt(
    messages: list[dict[str, str]], system_prompt: str | None
) -> list[dict[str, str]]:
    """``messages`` opened by a ``system_prompt`` turn when they have no system turn of their
    own; as they are when ``system_prompt`` is None (the template's own default then)."""
    if system_prompt is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def trained_system_prompt(fmt: PromptFormat | None, style: str) -> str | None:
    """The system prompt for a model saved with ``fmt`` and prompted in ``style``: the one it
    was trained with; None (the template's own) when it has none or ``style`` is another."""
    return fmt.system_prompt if fmt is not None and fmt.style == style else None


def _chat(
    record: Mapping[str, Any], chat_template: str | None, system_prompt: str | None
) -> tuple[str, str]:
    template = _need_template(chat_template)
    turns = record_conversation(record)
    if turns is not None:
        # The last exchange, in the context of the turns before it.
        turns = with_system_prompt(turns, system_prompt)
        prompt = render_chat_template(template, turns[:-1], add_generation_prompt=True)
        return prompt, turns[-1]["content"]
    messages = [{"role": "user", "content": user_message(record)}]
    system = system_message(record)
    if system:
        # Given to the template as the first turn, so a template with a default system prompt
        # (SmolLM2's) uses the record's instead of its own.
        messages.insert(0, {"role": "system", "content": system})
    messages = with_system_prompt(messages, system_prompt)
    return render_chat_template(template, messages, add_generation_prompt=True), _text(
        record, "output"
    )


@dataclass(frozen=True)
class PromptStyle:
    """A named prompt style.

    Attributes:
        name: the name used on the command line and in ``instructune.json``.
        build: ``(record, chat_template, system_prompt) -> (prompt, response)``.
        markers: the strings the book's extraction removes from generated text.
        stop_strings: strings at which generation stops: the start of a new turn.
        description: one line for ``--help``.
    """

    name: str
    build: Callable[[Mapping[str, Any], str | None, str | None], tuple[str, str]]
    markers: tuple[str, ...]
    stop_strings: tuple[str, ...]
    description: str
    system_turn: bool = False  # whether a record's ``system`` turn reaches the prompt


STYLES: dict[str, PromptStyle] = {
    "alpaca": PromptStyle(
        "alpaca",
        _alpaca,
        markers=(ALPACA_RESPONSE_MARKER,),
        # A base model that keeps going usually starts a new Alpaca section on a new line.
        stop_strings=("\n### Instruction:", "\n### Input:", "\n### Response:"),
        description="the book's Alpaca format (chapter 7.2)",
    ),
    "phi3": PromptStyle(
        "phi3",
        _phi3,
        markers=(PHI3_ASSISTANT,),
        stop_strings=(PHI3_USER, "<|assistant|>"),
        description="the book's Phi-3 format (exercise 7.1)",
    ),
    "chat": PromptStyle(
        "chat",
        _chat,
        markers=(),
        # The template's own end token (an id) ends the turn; no text markers needed.
        stop_strings=(),
        description="the tokenizer's own Jinja chat template",
        system_turn=True,
    ),
}


def get_style(style: str) -> PromptStyle:
    """The registered style called ``style``; a clear error lists the known ones."""
    try:
        return STYLES[style]
    except KeyError:
        known = ", ".join(sorted(STYLES))
        raise DataError(f"unknown prompt style {style!r}; known styles: {known}") from None


def style_names() -> list[str]:
    return list(STYLES)


def format_example(
    record: Mapping[str, Any],
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> tuple[str, str]:
    """``(prompt, response)`` for a record; ``prompt + response`` is the training text.

    The prompt ends with the style's response marker; the end token is not part of the response
    text (tokenisation appends it as an id). ``system_prompt`` is the system turn of a record
    without one (``chat`` style; see ``PromptFormat.system_prompt``).
    """
    return get_style(style).build(record, chat_template, system_prompt)


def format_parts(
    record: Mapping[str, Any],
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
    end_token: str = "",
    system_prompt: str | None = None,
) -> list[tuple[str, str]]:
    """The training text of a record as ``[(prompt, response), ...]``: one pair per response.

    Every record gives the one pair of :func:`format_example`, except a multi-turn record
    (one with ``messages``, see ``records.record_from_messages``) in the ``chat`` style: one
    pair per assistant turn, where each prompt is the text between the end of the previous
    answer and the start of this one (the first prompt starts the conversation). Tokenisation
    puts the end token (as an id) after each response; ``end_token`` is its text, which the
    template writes after an answer and the next prompt therefore leaves out.

    With the alpaca and phi3 styles a multi-turn record is the one exchange of its last turn,
    the earlier turns being its ``input``: only the last answer is a response.
    """
    turns = record_conversation(record) if style == "chat" else None
    if turns is None:
        return [
            format_example(record, style, chat_template=chat_template, system_prompt=system_prompt)
        ]
    turns = with_system_prompt(turns, system_prompt)
    return chat_parts(turns, _need_template(chat_template), end_token=end_token)


def chat_parts(
    messages: list[dict[str, str]], chat_template: str, *, end_token: str = ""
) -> list[tuple[str, str]]:
    """A conversation rendered by ``chat_template`` as ``[(prompt, response), ...]``, one pair
    per assistant turn, such that the prompts and responses, with ``end_token`` after each
    response but the last, concatenate to the rendered conversation.

    The boundaries come from rendering prefixes of the conversation, never from searching the
    text for markers. The prompt of assistant turn k is what the template renders for the
    messages before it *with the generation prompt* (for SmolLM2
    ``...<|im_start|>assistant\\n``), less the text already given to earlier pairs; the response
    is the turn's content. So an answer's opening belongs to the prompt exactly as it does when
    the model is asked to answer (generation sends that same prefix), and the response holds
    the content alone. How the template wrote an answer is read from the next prefix, which
    contains it: the content (or, for templates that ``trim`` it, the stripped content), then,
    when the template ends the turn with ``end_token`` (SmolLM2's ``<|im_end|>``), that token,
    which tokenisation supplies as an id. Anything else the template writes between turns
    (``\\n<|im_start|>user\\n...``) is prompt.

    Raises:
        DataError: the template does not render the conversation as growing prefixes (it
            rewrites earlier turns, or its generation prompt is not how it starts an answer),
            so the answers cannot be separated exactly.
    """
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    parts: list[tuple[str, str]] = []
    done = ""  # the rendered text already placed in earlier parts
    prefix = render_chat_template(chat_template, messages[: answers[0]], add_generation_prompt=True)
    for n, at in enumerate(answers):
        if not prefix.startswith(done):
            raise _not_prefixes(at)
        prompt, content = prefix[len(done) :], messages[at]["content"]
        if n == len(answers) - 1:
            # The last answer is followed only by the end token, as in a single-turn record.
            parts.append((prompt, content))
            break
        following = render_chat_template(
            chat_template, messages[: answers[n + 1]], add_generation_prompt=True
        )
        if not following.startswith(prefix):
            raise _not_prefixes(at)
        written = following[len(prefix) :]
        if written.startswith(content):
            response = content
        elif written.startswith(content.strip()):
            response = content.strip()
        else:
            raise _not_prefixes(at)
        done = prefix + response
        if end_token and written[len(response) :].startswith(end_token):
            done += end_token
        # Otherwise the template ends a turn some other way (or with an ``eos_token`` variable,
        # rendered empty): the end id still follows the answer, as it does for the last one.
        parts.append((prompt, response))
        prefix = following
    return parts


def _not_prefixes(at: int) -> DataError:
    return DataError(
        f"messages[{at}]: the chat template does not render this conversation as a sequence "
        "of growing prefixes (it rewrites earlier turns, or starts an answer differently from "
        "its generation prompt), so its assistant turns cannot be separated exactly; use one "
        "exchange a record, or --style alpaca"
    )


def format_prompt(
    record: Mapping[str, Any],
    style: str = "alpaca",
    *,
    chat_template: str | None = None,
    system_prompt: str | None = None,
) -> str:
    """Everything the model sees before its answer, ending with the style's response marker."""
    prompt, _ = format_example(
        record, style, chat_template=chat_template, system_prompt=system_prompt
    )
    return prompt


def extract_response(generated_text: str, style: str = "alpaca") -> str:
    """The book's chapter 7.7 extraction, applied to the newly generated text only.

    The book removes a ``"### Response:"`` marker the model may repeat and strips whitespace;
    the same is done here with the style's markers (``"<|assistant|>:"`` for phi3).
    """
    text = generated_text
    for marker in get_style(style).markers:
        text = text.replace(marker, "")
    return text.strip()


def system_turn_notice(records: Iterable[Mapping[str, Any]], style: str) -> str | None:
    """One line saying how many ``records`` carry a system turn that ``style`` leaves out.

    None when the style passes system turns on (``chat``) or no record has one. Meant to be
    printed once per data set, not once per record.
    """
    spec = get_style(style)
    total = with_system = 0
    for record in records:
        total += 1
        system = record.get("system")
        with_system += isinstance(system, str) and bool(system.strip())
    if spec.system_turn or not with_system:
        return None
    return (
        f"note: {with_system} of {total} records have a system turn, which the {style} style "
        "cannot express: it is left out of their prompts (--style chat passes it to the "
        "model's chat template)"
    )


def multi_turn_notice(records: Iterable[Mapping[str, Any]], style: str) -> str | None:
    """One line saying how many ``records`` are conversations of several exchanges of which
    ``style`` trains only the last answer (None for ``chat``, or when there are none)."""
    total = multi = 0
    for record in records:
        total += 1
        multi += record_conversation(record) is not None
    if style == "chat" or not multi:
        return None
    return (
        f"note: {multi} of {total} records are conversations of several exchanges; the {style} "
        "style trains only their last answer, with the earlier turns as its input (--style "
        "chat trains every assistant turn through the model's chat template)"
    )


def stop_strings_for(style: str) -> list[str]:
    """Default strings at which generation should stop for ``style`` (new-turn markers)."""
    return list(get_style(style).stop_strings)


def check_system_prompt(style: str, system_prompt: str | None) -> None:
    """Raise DataError for a ``system_prompt`` given with a style that has no system turn: it
    would be dropped silently otherwise."""
    if system_prompt is not None and not get_style(style).system_turn:
        raise DataError(
            f"a system prompt needs a style with a system turn (chat); the {style} style has none"
        )


def prompt_format_for(
    tokenizer: Any, style: str = "alpaca", system_prompt: str | None = None
) -> PromptFormat:
    """The :class:`PromptFormat` a model fine-tuned with ``tokenizer`` and ``style`` (and
    ``system_prompt``) is saved with.

    ``tokenizer`` is any :class:`instructune.tokenization.Tokenizer`. Raises DataError for a
    ``system_prompt`` with a style that has no system turn.
    """
    check_system_prompt(style, system_prompt)
    if style == "chat" and not tokenizer.chat_template:
        raise DataError(f"prompt style 'chat' needs a chat template; {tokenizer.name} has none")
    return PromptFormat(
        style=style,
        eos_token=tokenizer.eos_token,
        eos_id=tokenizer.eos_id,
        stop_strings=stop_strings_for(style),
        add_bos=bool(tokenizer.add_bos),
        bos_id=tokenizer.bos_id if tokenizer.add_bos else None,
        system_prompt=system_prompt,
    )


# --- chat templates ---------------------------------------------------------------------------

# The date ``strftime_now`` reports; None means today. A context variable, read at render time,
# so the cached compiled templates below need no recompiling when a run fixes its date.
_PROMPT_DATE: contextvars.ContextVar[datetime.date | None] = contextvars.ContextVar(
    "instructune_prompt_date", default=None
)


@contextmanager
def use_prompt_date(date: datetime.date | None) -> Iterator[None]:
    """Make chat templates that call ``strftime_now`` render ``date`` (None: today) inside.

    A template such as Llama 3's puts the current date into every prompt; fixing it keeps a
    run's prompts (and so its tokens) the same on any day. A plain date renders as midnight;
    a ``datetime`` is used as it is. The setting is per thread/task (a context variable):
    threads started inside do not inherit it unless run in a copied context.
    """
    token = _PROMPT_DATE.set(date)
    try:
        yield
    finally:
        _PROMPT_DATE.reset(token)


def prompt_now() -> datetime.datetime:
    """What ``strftime_now`` formats: the date fixed by :func:`use_prompt_date`, else now."""
    date = _PROMPT_DATE.get()
    if date is None:
        return datetime.datetime.now()
    if isinstance(date, datetime.datetime):
        return date
    return datetime.datetime.combine(date, datetime.time())


@lru_cache(maxsize=8)
def _compile_template(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, indent=None):
        import json

        return json.dumps(value, indent=indent, ensure_ascii=False)

    def strftime_now(fmt: str) -> str:
        return prompt_now().strftime(fmt)

    # The settings transformers uses for chat templates, so templates render the same way.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise DataError(f"the chat template is not valid Jinja: {exc}") from None


def render_chat_template(
    template: str,
    messages: list[dict[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
) -> str:
    """Render a Jinja chat template as transformers' ``apply_chat_template`` does (as text).

    ``bos_token`` defaults to ``""`` because instructune puts BOS in front as an id (see
    ``Tokenizer.add_bos``); rendering it as text as well would give two.
    """
    import jinja2

    compiled = _compile_template(template)
    try:
        return compiled.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise DataError(f"the chat template failed to render: {exc}") from None
