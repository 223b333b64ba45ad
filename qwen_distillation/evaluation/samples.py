"""Side-by-side answers of several models to a few fixed prompts (a qualitative check)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from qwen_distillation.data.loading import load_records
from qwen_distillation.errors import DataError
from qwen_distillation.evaluation.prompting import model_device, render_prompt

PROMPT_FIELDS = ("lang", "domain", "prompt")


def load_prompts(path: str, max_prompts: int | None = None) -> list[dict]:
    """The first ``max_prompts`` (all when None) records of a prompts file such as
    ``data/demo/prompts.jsonl``: each needs a non-empty string ``prompt``; ``lang`` and
    ``domain`` are optional. ``path`` is a local file (resolve ``package:`` paths first)."""
    prompts = []
    for number, record in load_records(path, max_records=max_prompts):
        text = record.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} record {number}: a prompt record needs a non-empty string field 'prompt'; "
                            f"fields found: {sorted(record)}")
        prompts.append({field: str(record.get(field, "")) for field in PROMPT_FIELDS})
    return prompts


def _greedy_config(model: nn.Module, tokenizer, max_new_tokens: int):
    # A copy of the model's own config (its eos ids stay) with the sampling knobs at their
    # neutral values: a released checkpoint's temperature/top_p would trigger "ignored flag"
    # warnings, and None would be filled back in from the model's config by generate().
    config = copy.deepcopy(model.generation_config)
    config.do_sample, config.num_beams, config.max_new_tokens = False, 1, max_new_tokens
    config.temperature, config.top_p, config.top_k = 1.0, 1.0, 50
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


@torch.no_grad()
def quality_samples(models: dict[str, nn.Module], tokenizer, prompts: list[dict], *, max_new_tokens: int = 64,
                    chat_template_kwargs: dict | None = None) -> list[dict]:
    """Greedy answers of each model to each prompt, rendered with the chat template.

    Args:
        models: display name -> causal LM (all sharing ``tokenizer``).
        prompts: dicts with ``prompt`` and optional ``lang``, ``domain`` (the rows of
            ``data/demo/prompts.jsonl``).
        max_new_tokens: generation length limit per answer.

    Returns:
        One row per prompt: ``{"lang", "domain", "prompt", <model name>: answer, ...}``; the
        answer is the decoded new tokens, special tokens skipped, whitespace stripped (any
        ``<think>`` block is kept).
    """
    rows = [{field: entry.get(field, "") for field in PROMPT_FIELDS} for entry in prompts]
    encoded = [tokenizer(render_prompt(tokenizer, row["prompt"], chat_template_kwargs), add_special_tokens=False,
                         return_tensors="pt")["input_ids"] for row in rows]
    for name, model in models.items():
        was_training = model.training
        model.eval()
        device = model_device(model)
        config = _greedy_config(model, tokenizer, max_new_tokens)
        for row, input_ids in zip(rows, encoded):
            # One prompt at a time: no padding, so no left-padding requirement on the tokenizer.
            input_ids = input_ids.to(device)
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    generation_config=config)
            row[name] = tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()
        model.train(was_training)
    return rows


def _cell(value) -> str:
    return str(value).replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def samples_markdown(rows: list[dict]) -> str:
    """A Markdown table of ``quality_samples`` rows: lang, domain, prompt, then one column per
    model (in first-seen order). Pipes are escaped and line breaks become ``<br>``."""
    columns = list(PROMPT_FIELDS)
    for row in rows:
        columns += [key for key in row if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(column, "")) for column in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"
