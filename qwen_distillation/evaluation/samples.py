"""Side-by-side answers of several models to a few fixed prompts (a qualitative check), and
their BLEU-4 / ROUGE-1/2/L against the prompts' optional reference answers."""

from __future__ import annotations

import math
import os
from pathlib import Path

from torch import nn

from qwen_distillation.data.loading import load_records, location
from qwen_distillation.errors import DataError
from qwen_distillation.evaluation.answers import TEXT_METRICS, greedy_answers, text_scores
from qwen_distillation.evaluation.prompting import render_prompt
from qwen_distillation.evaluation.sharding import Shard

PROMPT_FIELDS = ("lang", "domain", "prompt")
REFERENCE = "reference"  # optional field of a prompt record, and column of a sample row
SCORES = "scores"  # sample row field: model name -> {bleu4, rouge1, rouge2, rougeL}


def check_prompts_file(path: str) -> None:
    """Refuse a directory as ``eval.prompts``: read as a directory of data files, its records would
    be refused one by one for lacking ``prompt``. A run checks this before any model loads."""
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        raise DataError(f"eval.prompts={path}: a directory, not a file (looked at {local.resolve()}); "
                        "expected one JSONL file of prompts, one {\"prompt\": ...} object per line, e.g. "
                        "eval.prompts=package:qwen_distillation/data/demo/prompts.jsonl")


def load_prompts(path: str, max_prompts: int | None = None) -> list[dict]:
    """The first ``max_prompts`` (all when None) records of a prompts file such as
    ``data/demo/prompts.jsonl``: each needs a non-empty string ``prompt``; ``lang``, ``domain``
    and ``reference`` (a reference answer, for BLEU/ROUGE; null counts as absent) are optional.
    ``path`` is a local file (resolve ``package:`` paths first); see :func:`check_prompts_file`."""
    check_prompts_file(path)
    prompts = []
    for number, record in load_records(path, max_records=max_prompts):
        text = record.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{location(path, number)}: a prompt record needs a non-empty string field 'prompt'; "
                            f"fields found: {sorted(record)}")
        prompt = {field: str(record.get(field, "")) for field in PROMPT_FIELDS}
        reference = record.get(REFERENCE)
        if reference is not None:
            if not isinstance(reference, str) or not reference.strip():
                raise DataError(f"{location(path, number)}: 'reference' must be a non-empty string (a reference "
                                f"answer to the prompt) or be left out; found {reference!r}")
            prompt[REFERENCE] = reference
        prompts.append(prompt)
    return prompts


def quality_samples(models: dict[str, nn.Module], tokenizer, prompts: list[dict], *, max_new_tokens: int = 64,
                    chat_template_kwargs: dict | None = None, shard: Shard | None = None) -> list[dict]:
    """Greedy answers of each model to each prompt, rendered with the chat template.

    Args:
        models: display name -> causal LM (all sharing ``tokenizer``).
        prompts: dicts with ``prompt`` and optional ``lang``, ``domain``, ``reference`` (the
            rows of ``data/demo/prompts.jsonl``, as :func:`load_prompts` reads them).
        max_new_tokens: generation length limit per answer.
        shard: the prompts split over the ranks of a launch (``evaluation.sharding``).

    Returns:
        One row per prompt: ``{"lang", "domain", "prompt", ["reference",] <model name>: answer,
        ...}``; the answer is the decoded new tokens, special tokens skipped, whitespace
        stripped (any ``<think>`` block is kept).
    """
    rows = [{field: entry.get(field, "") for field in PROMPT_FIELDS} for entry in prompts]
    for row, entry in zip(rows, prompts):
        if entry.get(REFERENCE):
            row[REFERENCE] = entry[REFERENCE]
    encoded = [tokenizer(render_prompt(tokenizer, row["prompt"], chat_template_kwargs),
                         add_special_tokens=False)["input_ids"] for row in rows]
    for name, model in models.items():
        for row, answer in zip(rows, greedy_answers(model, tokenizer, encoded, max_new_tokens, shard), strict=True):
            row[name] = answer
    return rows


def score_samples(rows: list[dict], models: list[str]) -> list[dict]:
    """``rows`` with, on each row that has a ``reference``, ``scores``: model name -> its answer's
    ``bleu4``, ``rouge1``, ``rouge2``, ``rougeL`` (0-100, word level, ``<think>`` stripped)."""
    return [{**row, SCORES: {name: text_scores([(row[name], row[REFERENCE])], llamafactory=False)
                             for name in models}} if row.get(REFERENCE) else dict(row) for row in rows]


def mean_sample_scores(rows: list[dict], model: str) -> dict[str, float]:
    """The mean of each score of ``model`` over the rows scored for it, and ``n``, their number
    (scores NaN when none is)."""
    scored = [row[SCORES][model] for row in rows if model in (row.get(SCORES) or {})]
    means = {name: (math.fsum(s[name] for s in scored) / len(scored) if scored else math.nan)
             for name in TEXT_METRICS}
    return {**means, "n": len(scored)}


def sample_columns(rows: list[dict]) -> list[str]:
    """The text columns of sample rows: lang, domain, prompt, reference (when a row has one),
    then one per model in first-seen order."""
    columns = list(PROMPT_FIELDS)
    if any(REFERENCE in row for row in rows):
        columns.append(REFERENCE)
    for row in rows:
        columns += [key for key in row if key not in columns and key != SCORES]
    return columns


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def scores_markdown(rows: list[dict]) -> str:
    """The scores of rows scored by :func:`score_samples` as a Markdown table: one row per
    (prompt, model) with each model's mean last; empty when no row has scores."""
    models = [name for name in sample_columns(rows) if any(name in (row.get(SCORES) or {}) for row in rows)]
    if not models:
        return ""
    lines = ["| prompt | model | " + " | ".join(TEXT_METRICS) + " |", "|---|---" + "|---:" * len(TEXT_METRICS) + "|"]
    for row in rows:
        scores = row.get(SCORES) or {}
        lines += [f"| {_cell(row['prompt'])} | {name} | " + " | ".join(f"{scores[name][m]:.2f}" for m in TEXT_METRICS)
                  + " |" for name in models if name in scores]
    for name in models:
        mean = mean_sample_scores(rows, name)
        lines.append(f"| mean of {mean['n']} | {name} | " + " | ".join(f"{mean[m]:.2f}" for m in TEXT_METRICS) + " |")
    return "\n".join(lines) + "\n"


def samples_markdown(rows: list[dict]) -> str:
    """A Markdown table of ``quality_samples`` rows (columns: :func:`sample_columns`); pipes are
    escaped and line breaks become ``<br>``. Rows scored by :func:`score_samples` add a second
    table (:func:`scores_markdown`): each answer's BLEU-4 and ROUGE against the reference."""
    columns = sample_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    scores = scores_markdown(rows)
    if scores:
        lines += ["", "BLEU-4 and ROUGE-1/2/L F1 of each answer against the prompt's reference (0-100, word "
                  "level, `<think>` stripped; docs/evaluation.md says how to read them):", "", scores.rstrip("\n")]
    return "\n".join(lines) + "\n"
