"""Scoring model responses: judge-free text metrics, and an LLM judge over Ollama or any
OpenAI-compatible server (the book's section 7.8, made robust) through the project's LLM
client, ``instructune.llm``. Torch-free.

Main entry points: :func:`evaluate_responses` (what ``instructune evaluate`` and the fine-tuning
job call) and :func:`compare_runs` (``instructune evaluate --compare A.json B.json``).
"""

from __future__ import annotations

from instructune.evaluation.cache import Judgement, JudgementCache, judgement_key
from instructune.evaluation.evaluate import evaluate_responses, load_responses
from instructune.evaluation.judge import judge_one, judge_prompts
from instructune.evaluation.prompt import (
    BOOK_OPTIONS,
    PROMPT_VERSION,
    build_judge_prompt,
    parse_score,
)
from instructune.evaluation.report import (
    compare_runs,
    format_comparison,
    load_scores,
    record_id,
)
from instructune.evaluation.textmetrics import (
    bootstrap_ci,
    exact_match,
    normalize_text,
    pearson,
    rouge_l,
    spearman,
    text_metrics,
    token_f1,
)
from instructune.llm.client import LLMError as JudgeError
from instructune.llm.client import LLMUnavailableError as JudgeUnavailableError

__all__ = [
    "BOOK_OPTIONS",
    "PROMPT_VERSION",
    "JudgeError",
    "JudgeUnavailableError",
    "Judgement",
    "JudgementCache",
    "bootstrap_ci",
    "build_judge_prompt",
    "compare_runs",
    "evaluate_responses",
    "exact_match",
    "format_comparison",
    "judge_one",
    "judge_prompts",
    "judgement_key",
    "load_responses",
    "load_scores",
    "normalize_text",
    "parse_score",
    "pearson",
    "record_id",
    "rouge_l",
    "spearman",
    "text_metrics",
    "token_f1",
]
