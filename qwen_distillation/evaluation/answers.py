"""Greedy answers of a model, and their BLEU-4 / ROUGE-1/2/L against reference answers.

Two callers: the held-out sets (``eval.text_metrics``; each example's context and reference
response come from its encoded tokens, :func:`heldout_references`) and the quality-sample
prompts that carry a ``reference`` answer (``samples.py``). The scores are those of
``text_metrics.corpus_scores`` (``<think>`` blocks stripped, 0-100), under the names the logs
use: ``bleu4``, ``rouge1``, ``rouge2``, ``rougeL`` for our word-level convention and the same
four after ``llamafactory/`` for LLaMA-Factory's (see the ``text_metrics`` docstring).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from qwen_distillation.data.encode import split_last_turn
from qwen_distillation.evaluation.prompting import model_device
from qwen_distillation.evaluation.sharding import Shard, map_shared
from qwen_distillation.evaluation.text_metrics import corpus_scores
from qwen_distillation.modeling.tokenizer import pad_token_id

# corpus_scores' key -> the name of the logged metric (``eval/<set>_<name>``)
SCORE_NAMES = {"bleu-4": "bleu4", "rouge-1": "rouge1", "rouge-2": "rouge2", "rouge-l": "rougeL"}
TEXT_METRICS = tuple(SCORE_NAMES.values())
LLAMAFACTORY = "llamafactory/"


def greedy_config(model: nn.Module, tokenizer, max_new_tokens: int):
    """Greedy decoding of at most ``max_new_tokens`` tokens, stopping at the model's eos."""
    return sampling_config(model, tokenizer, max_new_tokens, temperature=0.0)


def sampling_config(model: nn.Module, tokenizer, max_new_tokens: int, *, temperature: float, top_p: float = 1.0):
    """At most ``max_new_tokens`` tokens, stopping at the model's eos: sampled at ``temperature``
    with nucleus ``top_p`` (no top-k cut), or greedy when ``temperature`` is 0."""
    # A copy of the model's own config (its eos ids stay) with the sampling knobs set
    # explicitly: a released checkpoint's temperature/top_p/top_k would otherwise apply (or,
    # under greedy decoding, trigger "ignored flag" warnings), and None would be filled back
    # in from the model's config by generate().
    config = copy.deepcopy(model.generation_config)
    config.num_beams, config.max_new_tokens = 1, max_new_tokens
    if temperature > 0:
        config.do_sample, config.temperature, config.top_p, config.top_k = True, temperature, top_p, 0
    else:
        config.do_sample, config.temperature, config.top_p, config.top_k = False, 1.0, 1.0, 50
    if config.pad_token_id is None:
        config.pad_token_id = pad_token_id(tokenizer)
    if config.eos_token_id is None:
        config.eos_token_id = tokenizer.eos_token_id
    return config


@torch.no_grad()
def greedy_answers(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                   shard: Shard | None = None) -> list[str]:
    """The greedy continuation of each prompt (token ids, chat template already applied): the
    new tokens decoded, special tokens skipped, whitespace stripped (a ``<think>`` block is
    kept); the prompts split over the ranks of ``shard``. Leaves the model in the mode it was in."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    config = greedy_config(model, tokenizer, max_new_tokens)
    synced = {"synced_gpus": True} if shard is not None and shard.synced else {}

    def answer(ids: list[int]) -> str:
        # One prompt at a time: no padding, so no left-padding requirement on the tokenizer.
        input_ids = torch.tensor([ids], dtype=torch.long, device=device)
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                generation_config=config, **synced)
        return tokenizer.decode(output[0, input_ids.shape[1]:], skip_special_tokens=True).strip()

    answers = map_shared(answer, prompts, shard)
    model.train(was_training)
    return answers


def heldout_references(examples: list[dict], tokenizer) -> list[tuple[list[int], str]]:
    """``(prompt_ids, reference)`` of each encoded held-out example (``data.encode``): the
    context of its last assistant turn and that turn decoded (special tokens skipped). The
    reference is the response as the NLL scores it, so ``data.max_length`` may have cut it.
    Examples without a response token are left out."""
    out = []
    for example in examples:
        prompt_ids, response_ids = split_last_turn(example)
        if prompt_ids and response_ids:
            out.append((prompt_ids, tokenizer.decode(response_ids, skip_special_tokens=True).strip()))
    return out


def text_scores(pairs: list[tuple[str, str]], llamafactory: bool = True) -> dict[str, float]:
    """Mean BLEU-4 and ROUGE-1/2/L (0-100) of ``(answer, reference)`` pairs, ``<think>``
    stripped: ``bleu4``, ``rouge1``, ``rouge2``, ``rougeL`` (word level) and, with
    ``llamafactory``, the same after ``llamafactory/`` (LLaMA-Factory's conventions). NaN
    without pairs."""
    scores = corpus_scores(pairs)
    out = {name: scores[key] for key, name in SCORE_NAMES.items()}
    if llamafactory:
        out.update({LLAMAFACTORY + name: scores[LLAMAFACTORY + key] for key, name in SCORE_NAMES.items()})
    return out


def heldout_text_metrics(model: nn.Module, tokenizer, references: list[tuple[list[int], str]],
                         max_new_tokens: int, shard: Shard | None = None) -> dict[str, float]:
    """:func:`text_scores` of the model's greedy answers to the ``references`` of one held-out
    set (from :func:`heldout_references`), the prompts split over the ranks of ``shard``."""
    answers = greedy_answers(model, tokenizer, [prompt for prompt, _ in references], max_new_tokens, shard)
    return text_scores([(answer, reference) for answer, (_, reference) in zip(answers, references, strict=True)])
