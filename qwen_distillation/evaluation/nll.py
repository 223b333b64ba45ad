"""Negative log-likelihood of the response tokens: held-out NLL/PPL of a set, and the mean
NLL of each example (the scores of hard-example sampling)."""

from __future__ import annotations

import math

import torch
from torch import nn

from qwen_distillation.losses.chunked import chunked_cross_entropy
from qwen_distillation.evaluation.sharding import Shard, map_shared
from qwen_distillation.losses.logit import cross_entropy
from qwen_distillation.modeling.parts import (decoder_and_head, model_inputs, position_mask, response_targets,
                                              supports_hidden_path)


@torch.no_grad()
def response_nll_sum(model: nn.Module, batch: dict[str, torch.Tensor], vocab_size: int,
                     chunk_size: int = 1024) -> float:
    """Summed NLL (nats) of the response tokens of one collated batch (input_ids,
    attention_mask, labels: (B, L)), over the first ``vocab_size`` logit columns; computed
    from hidden states ``chunk_size`` positions at a time where the model allows it."""
    mask, targets = position_mask(batch["labels"]), response_targets(batch["labels"])
    if supports_hidden_path(model):
        decoder, head = decoder_and_head(model)
        hidden = decoder(**model_inputs(batch)).last_hidden_state[mask]
        return float(chunked_cross_entropy(hidden, head.weight[:vocab_size], targets, chunk_size))
    logits = model(**model_inputs(batch)).logits[:, :-1][mask[:, :-1]][:, :vocab_size]
    return float(cross_entropy(logits, targets, reduction="sum"))


@torch.no_grad()
def heldout_nll(model: nn.Module, batches: list[dict[str, torch.Tensor]], vocab_size: int,
                chunk_size: int = 1024, shard: Shard | None = None) -> dict[str, float]:
    """``{"nll", "ppl", "tokens"}``: mean NLL per response token over pre-collated batches, its
    perplexity (exp of the NLL, capped at exp(50)) and the number of tokens; the batches split
    over the ranks of ``shard``. Leaves the model in eval mode."""
    model.eval()
    per_batch = map_shared(lambda batch: (response_nll_sum(model, batch, vocab_size, chunk_size),
                                          int(response_targets(batch["labels"]).numel())), batches, shard)
    total, count = 0.0, 0
    for value, tokens in per_batch:
        total += value
        count += tokens
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": count}


@torch.no_grad()
def per_example_nll(model: nn.Module, batch: dict[str, torch.Tensor], vocab_size: int,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Mean NLL per response token of each sequence, shape (B,); NaN for a sequence with
    no response token. Used to score examples for hard-example sampling."""
    labels = batch["labels"]
    mask = position_mask(labels)
    decoder, head = decoder_and_head(model)
    hidden = decoder(**model_inputs(batch)).last_hidden_state
    rows = mask.nonzero()[:, 0]
    targets = response_targets(labels)
    valid = hidden[mask]
    sums = torch.zeros(labels.shape[0], device=hidden.device)
    weight = head.weight[:vocab_size]
    for start in range(0, valid.shape[0], chunk_size):
        logits = (valid[start:start + chunk_size] @ weight.T).float()
        nll = torch.nn.functional.cross_entropy(logits, targets[start:start + chunk_size], reduction="none")
        sums.index_add_(0, rows[start:start + chunk_size], nll)
    counts = mask.sum(dim=1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
