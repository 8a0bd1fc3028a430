"""Prompt styles: ONE place that turns a record into the text a model sees.

(Helper H1 completes this module: format_prompt, format_example, extract_response, styles.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


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
    """

    style: str = "alpaca"
    eos_token: str = "<|endoftext|>"
    eos_id: int = 50256
    stop_strings: list[str] = field(default_factory=list)
    add_bos: bool = False
    bos_id: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PromptFormat:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)
