"""Load and check instruction records, and split them the way the book does (chapter 7.2).

A record is a plain ``dict`` with string ``instruction``, ``input`` and ``output``; any other
keys are kept untouched. Files are a JSON list of records (``.json``) or one record a line
(``.jsonl``); a JSONL line may also be a chat conversation ``{"messages": [...]}`` of one
or several exchanges (see :func:`record_from_messages`).

Every problem names the file, the record (its index in a JSON list, or its line in a JSONL
file) and the field. Problems with one record are collected and reported together; with
``skip_invalid=True`` those records are dropped and listed in :attr:`LoadResult.skipped`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructune.data.conversation import conversation_record
from instructune.errors import DataError

Record = dict[str, Any]
BOM = b"\xef\xbb\xbf"
# How many record problems an error message lists before it says "and N more".
MAX_LISTED = 20


@dataclass(frozen=True)
class Issue:
    """One problem found while loading.

    Attributes:
        kind: ``"error"`` (the record is invalid) or ``"warning"``.
        code: ``invalid``, ``duplicate``, ``conflict`` or ``bom``.
        file: the file (or ``<records>`` for in-memory data).
        where: ``record 12`` (index in a JSON list), ``line 13`` (JSONL) or ``file``.
        field: the field concerned (``-`` when none).
        message: what is wrong.
    """

    kind: str
    code: str
    file: str
    where: str
    field: str
    message: str

    def __str__(self) -> str:
        if self.where == "file":  # about the whole file (a byte-order mark): no record or field
            return f"{self.file}: {self.message}"
        return f"{self.file}: {self.where}: field {self.field!r}: {self.message}"


class LoadResult(list):
    """The valid records (it *is* the list of them) plus what was found while loading.

    Attributes:
        source: the file the records came from.
        warnings: duplicates, conflicting duplicates and a byte-order mark, each listed.
        skipped: the errors of records dropped with ``skip_invalid=True``.
        locations: where each kept record was in the file (``record 3`` / ``line 4``).
    """

    def __init__(
        self,
        records: Iterable[Record] = (),
        *,
        source: str = "<records>",
        warnings: Sequence[Issue] = (),
        skipped: Sequence[Issue] = (),
        locations: Sequence[str] = (),
    ):
        super().__init__(records)
        self.source = source
        self.warnings = list(warnings)
        self.skipped = list(skipped)
        self.locations = list(locations)

    @property
    def records(self) -> list[Record]:
        return list(self)

    @property
    def duplicates(self) -> list[Issue]:
        return [w for w in self.warnings if w.code == "duplicate"]

    @property
    def conflicts(self) -> list[Issue]:
        return [w for w in self.warnings if w.code == "conflict"]

    @property
    def skipped_locations(self) -> list[str]:
        return sorted({issue.where for issue in self.skipped}, key=_location_key)


def _location_key(where: str) -> tuple[str, int]:
    label, _, number = where.partition(" ")
    return (label, int(number) if number.isdigit() else -1)


# --- records ---------------------------------------------------------------------------------


def check_turns(messages: Any) -> tuple[str, str] | None:
    """The first problem of a chat conversation as ``(field, problem)``, or None when it is valid.

    A conversation is an optional leading ``system`` turn, then ``user`` and ``assistant``
    turns alternating, ending with an assistant turn (the answer to learn); user and assistant
    contents are non-empty strings.
    """
    if not isinstance(messages, list) or not messages:
        return "messages", "must be a non-empty list of {role, content} turns"
    for number, turn in enumerate(messages):
        if not isinstance(turn, dict):
            return f"messages[{number}]", "must be an object with role and content"
        role, content = turn.get("role"), turn.get("content")
        if role not in ("system", "user", "assistant"):
            return f"messages[{number}].role", f"must be system, user or assistant, not {role!r}"
        if not isinstance(content, str):
            return f"messages[{number}].content", "must be a string"
        if role != "system" and not content.strip():
            return f"messages[{number}].content", f"is empty (a {role} turn needs text)"
    roles = [turn["role"] for turn in messages]
    # The ending first: a conversation that stops before an answer has nothing to learn.
    if roles[-1] != "assistant":
        return (
            "messages",
            "turns must be [system,] user, assistant[, user, assistant ...], ending with an "
            f"assistant turn; got {', '.join(roles)}",
        )
    first = 1 if roles[0] == "system" else 0
    for number in range(first, len(roles)):
        expected = "user" if (number - first) % 2 == 0 else "assistant"
        if roles[number] == "system":
            return f"messages[{number}].role", "a system turn may only be the first turn"
        if roles[number] != expected:
            return (
                f"messages[{number}].role",
                f"must be {expected!r}: after an optional system turn, turns alternate user, "
                f"assistant (got {roles[number]!r})",
            )
    return None


def record_from_messages(messages: Any, extra: Mapping[str, Any]) -> tuple[Record | None, str, str]:
    """Map a chat conversation to an instruction record.

    The conversation is an optional ``system`` turn, then user and assistant turns alternating,
    ending with an assistant turn (see :func:`check_turns`). One exchange becomes the plain
    record: the user turn is ``instruction``, the assistant turn ``output``, ``input`` is empty,
    and the system turn is kept under ``system``.

    A conversation of several exchanges also keeps its turns under ``messages`` (the ``chat``
    style trains on every assistant turn from them) and is given the fields that the other
    styles, the judge and the duplicate checks read, as ``conversation.conversation_record``
    makes them for the chat and the server: ``instruction`` is the last user turn, ``input``
    the earlier turns as ``User: ...`` / ``Assistant: ...`` lines, ``output`` the last assistant
    turn and ``system`` the system turn when it is not empty. Other keys of the line are kept.

    Returns ``(record, "", "")`` or ``(None, field, problem)``.
    """
    problem = check_turns(messages)
    if problem is not None:
        return None, *problem
    record: Record = {k: v for k, v in extra.items() if k != "messages"}
    turns = [{"role": turn["role"], "content": turn["content"]} for turn in messages]
    if sum(turn["role"] == "assistant" for turn in turns) == 1:
        by_role = {turn["role"]: turn["content"] for turn in turns}
        record.update(instruction=by_role["user"], input="", output=by_role["assistant"])
        if "system" in by_role:
            record["system"] = by_role["system"]
        return record, "", ""
    derived = conversation_record(turns[:-1])
    record.update(instruction=derived["instruction"], input=derived["input"])
    record["output"] = turns[-1]["content"]
    if "system" in derived:
        record["system"] = derived["system"]
    record["messages"] = turns
    return record, "", ""


def check_record(obj: Any) -> tuple[Record | None, list[tuple[str, str]]]:
    """Validate one parsed record: ``(record, [])`` or ``(None, [(field, problem), ...])``.

    A missing ``input`` becomes ``""``; other keys are kept.
    """
    if not isinstance(obj, dict):
        return None, [("-", f"must be an object, not {_json_type(obj)}")]
    if "messages" in obj and "instruction" not in obj:
        record, field, problem = record_from_messages(obj["messages"], obj)
        return (record, []) if record is not None else (None, [(field, problem)])
    problems = []
    if "messages" in obj:
        # A record written out with its conversation (``data split`` of a multi-turn file):
        # the chat style trains on these turns, so they are checked as on first reading.
        problem = check_turns(obj["messages"])
        if problem is not None:
            problems.append(problem)
    instruction = obj.get("instruction")
    if "instruction" not in obj:
        problems.append(("instruction", "is missing"))
    elif not isinstance(instruction, str):
        problems.append(("instruction", f"must be a string, not {_json_type(instruction)}"))
    elif not instruction.strip():
        problems.append(("instruction", "is empty"))
    if "output" not in obj:
        problems.append(("output", "is missing"))
    elif not isinstance(obj["output"], str):
        problems.append(("output", f"must be a string, not {_json_type(obj['output'])}"))
    if "input" in obj and not isinstance(obj["input"], str):
        problems.append(("input", f"must be a string, not {_json_type(obj['input'])}"))
    if problems:
        return None, problems
    record = dict(obj)
    record.setdefault("input", "")
    return record, []


def check_preference_record(obj: Any) -> tuple[Record | None, list[tuple[str, str]]]:
    """Validate one preference record (DPO): ``instruction`` (non-empty), optional ``input``,
    and non-empty ``chosen`` and ``rejected`` responses; ``output`` and other keys are kept.
    Returns ``(record, [])`` or ``(None, [(field, problem), ...])``."""
    if not isinstance(obj, dict):
        return None, [("-", f"must be an object, not {_json_type(obj)}")]
    problems = []
    for key in ("instruction", "chosen", "rejected"):
        value = obj.get(key)
        if key not in obj:
            problems.append((key, "is missing"))
        elif not isinstance(value, str):
            problems.append((key, f"must be a string, not {_json_type(value)}"))
        elif not value.strip():
            problems.append((key, "is empty"))
    for key in ("input", "output"):
        if key in obj and not isinstance(obj[key], str):
            problems.append((key, f"must be a string, not {_json_type(obj[key])}"))
    if problems:
        return None, problems
    record = dict(obj)
    record.setdefault("input", "")
    return record, []


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return "a number"
    return names.get(type(value), type(value).__name__)


# --- files -----------------------------------------------------------------------------------


def _decode(data: bytes, name: str, warnings: list[Issue]) -> str:
    if data.startswith(BOM):
        data = data[len(BOM) :]
        warnings.append(
            Issue(
                "warning", "bom", name, "file", "-", "starts with a UTF-8 byte-order mark (ignored)"
            )
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{name}: line {line}: not valid UTF-8 (byte {exc.start}: {exc.reason}); "
            "save the file as UTF-8"
        ) from None
    if not text.strip():
        raise DataError(f"{name}: the file is empty")
    return text


def _is_jsonl(path: Path, text: str) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return True
    if suffix == ".json":
        return False
    # Unknown suffix (a URL's cache file, stdin...): a JSON list starts with '['.
    return not text.lstrip().startswith("[")


def _parse_json(text: str, name: str) -> list[tuple[str, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = " (one record a line? name the file .jsonl)" if exc.msg == "Extra data" else ""
        raise DataError(
            f"{name}: line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg}){hint}"
        ) from None
    if not isinstance(data, list):
        hint = " (one record a line? name the file .jsonl)" if isinstance(data, dict) else ""
        raise DataError(
            f"{name}: the top level must be a list of records, not {_json_type(data)}{hint}"
        )
    if not data:
        raise DataError(f"{name}: the list of records is empty")
    return [(f"record {i}", obj) for i, obj in enumerate(data)]


@dataclass(frozen=True)
class _BadLine:
    """A JSONL line that is not JSON: an error of that one record, not of the whole file."""

    message: str


def _parse_jsonl(text: str) -> list[tuple[str, Any]]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as exc:
            items.append(
                (f"line {number}", _BadLine(f"not valid JSON ({exc.msg}, column {exc.colno})"))
            )
    return items


def _check_all(
    items: list[tuple[str, Any]],
    name: str,
    skip_invalid: bool,
    warnings: list[Issue],
    check: Callable[[Any], tuple[Record | None, list[tuple[str, str]]]] = check_record,
    answers: tuple[str, ...] = ("output",),
) -> LoadResult:
    records, locations, errors = [], [], []
    for where, obj in items:
        if isinstance(obj, _BadLine):
            errors.append(Issue("error", "invalid", name, where, "-", obj.message))
            continue
        record, problems = check(obj)
        if record is None:
            errors.extend(Issue("error", "invalid", name, where, f, p) for f, p in problems)
        else:
            records.append(record)
            locations.append(where)
    if errors and not skip_invalid:
        listed = "\n  ".join(str(e) for e in errors[:MAX_LISTED])
        more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
        bad = len({e.where for e in errors})
        raise DataError(
            f"{name}: {bad} invalid record(s) (use --skip-invalid / skip_invalid=True to drop "
            f"them):\n  {listed}{more}"
        )
    if not records:
        raise DataError(f"{name}: no valid records")
    warnings.extend(find_duplicates(records, locations, name, answers=answers))
    return LoadResult(records, source=name, warnings=warnings, skipped=errors, locations=locations)


def find_duplicates(
    records: Sequence[Mapping[str, Any]],
    locations: Sequence[str],
    name: str,
    *,
    answers: tuple[str, ...] = ("output",),
) -> list[Issue]:
    """Warnings for exact duplicates and for same instruction + input with different answers
    (``answers``: the fields a record answers with; ``chosen`` and ``rejected`` for preference
    records)."""
    first_exact: dict[tuple[str, ...], str] = {}
    first_prompt: dict[tuple[str, str], tuple[str, tuple[str, ...]]] = {}
    issues = []
    fields = ", ".join(("instruction", "input", *answers))
    for record, where in zip(records, locations, strict=True):
        prompt = (record["instruction"], record.get("input", ""))
        answer = tuple(record[key] for key in answers)
        exact = (*prompt, *answer)
        if exact in first_exact:
            issues.append(
                Issue(
                    "warning", "duplicate", name, where, fields, f"duplicates {first_exact[exact]}"
                )
            )
            continue
        first_exact[exact] = where
        if prompt in first_prompt and first_prompt[prompt][1] != answer:
            issues.append(
                Issue(
                    "warning",
                    "conflict",
                    name,
                    where,
                    ", ".join(answers),
                    f"same instruction and input as {first_prompt[prompt][0]} but a different "
                    + ("output" if answers == ("output",) else "pair"),
                )
            )
        else:
            first_prompt.setdefault(prompt, (where, answer))
    return issues


def load_records(
    source: str | os.PathLike | Sequence[Mapping[str, Any]], *, skip_invalid: bool = False
) -> LoadResult:
    """Load and validate instruction records from a ``.json`` / ``.jsonl`` file (or a list).

    Returns a :class:`LoadResult`: the list of valid records, with ``.warnings`` (duplicates,
    conflicting outputs, a byte-order mark) and ``.skipped`` (errors of dropped records).

    Raises:
        DataError: the file is missing, empty, not UTF-8, not JSON, or its top level is not a
            list; or a record is invalid and ``skip_invalid`` is false (every invalid record is
            listed, with its index or line number and the field).
    """
    return _load(source, skip_invalid, check_record, ("output",))


def load_preference_records(
    source: str | os.PathLike | Sequence[Mapping[str, Any]], *, skip_invalid: bool = False
) -> LoadResult:
    """Load and validate preference records (``instruction``, optional ``input``, non-empty
    ``chosen`` and ``rejected``: the book's ``instruction-data-with-preference.json``), with the
    same files, errors and warnings as :func:`load_records`."""
    return _load(source, skip_invalid, check_preference_record, ("chosen", "rejected"))


def _load(
    source: str | os.PathLike | Sequence[Mapping[str, Any]],
    skip_invalid: bool,
    check: Callable[[Any], tuple[Record | None, list[tuple[str, str]]]],
    answers: tuple[str, ...],
) -> LoadResult:
    warnings: list[Issue] = []
    if not isinstance(source, (str, os.PathLike)):
        items = [(f"record {i}", obj) for i, obj in enumerate(source)]
        if not items:
            raise DataError("<records>: the list of records is empty")
        return _check_all(items, "<records>", skip_invalid, warnings, check, answers)
    path = Path(source)
    name = str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{name}: is a directory, not a .json or .jsonl file") from None
    except OSError as exc:
        raise DataError(f"{name}: cannot read it ({exc.strerror})") from None
    text = _decode(data, name, warnings)
    items = _parse_jsonl(text) if _is_jsonl(path, text) else _parse_json(text, name)
    return _check_all(items, name, skip_invalid, warnings, check, answers)


def split_records(
    records: Sequence[Record],
    *,
    train: float = 0.85,
    test: float = 0.10,
    shuffle_seed: int | None = None,
) -> tuple[list[Record], list[Record], list[Record]]:
    """The book's split: ``(train, test, val)``.

    train = the first ``int(n * 0.85)`` records, test = the next ``int(n * 0.1)``, validation =
    the rest (935 / 110 / 55 for the book's 1,100). With ``shuffle_seed`` the records are first
    shuffled with ``random.Random(shuffle_seed)``.
    """
    if not (0 <= train <= 1 and 0 <= test <= 1 and train + test <= 1):
        raise ValueError(f"split shares must be in [0, 1] and sum to at most 1: {train=}, {test=}")
    data = list(records)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(data)
    # Exactly the book's arithmetic (int() of the float product), so the split is bit for bit.
    train_portion = int(len(data) * train)
    test_portion = int(len(data) * test)
    return (
        data[:train_portion],
        data[train_portion : train_portion + test_portion],
        data[train_portion + test_portion :],
    )
