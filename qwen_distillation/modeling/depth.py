"""Which decoder layers a slimmed student keeps (depth pruning), chosen by measured importance.

Three methods, all keeping ``keep`` of the teacher's ``L`` decoder layers in their original order:

* ``even``: evenly spaced layers, the first and last always kept. Needs no data.
* ``block_influence`` (ShortGPT, Men et al. 2024): layer ``i``'s Block Influence is
  ``BI_i = 1 - mean_t cos(x_i[t], y_i[t])``, where ``x_i`` is the hidden state entering the layer and
  ``y_i`` the one leaving it (before the final norm, for the last layer), averaged over every
  non-padding token ``t`` of the calibration set. A layer that barely turns the residual stream
  has a low BI; the ``keep`` layers with the highest BI are kept. One forward pass.
* ``perplexity``: the calibration set's NLL on its response tokens with layer ``i`` skipped (its
  input passed straight on). ``search="single"`` scores every layer once, against the whole
  model, and keeps the ``keep`` layers whose removal raises the NLL most (``L`` forward passes);
  ``search="greedy"`` removes one layer at a time, each time the one whose removal (on top of the
  removals so far) raises the NLL least, and so sees how removals interact
  (``L + (L-1) + ... + (keep+1)`` forward passes).

Ties break towards the lower layer index, so the choice is a deterministic function of the scores.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Sequence

import torch
from torch import nn

from qwen_distillation.data.encode import IGNORE_INDEX
from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.parts import base_model, model_inputs

METHODS = ("even", "block_influence", "perplexity")
SEARCHES = ("single", "greedy")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a causal LM (``model.layers`` of its decoder)."""
    decoder = base_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"model.student.prune: {type(base_model(model)).__name__} has no decoder `layers` list; "
                          f"depth pruning supports decoder-only models such as Llama, Qwen2, Mistral")
    return layers


def evenly_spaced_layers(num_layers: int, keep: int) -> list[int]:
    """Indices of ``keep`` layers out of ``num_layers``, first and last always kept."""
    check_keep(num_layers, keep)
    if keep == 1:
        return [num_layers - 1]
    return sorted({round(i * (num_layers - 1) / (keep - 1)) for i in range(keep)})


def check_keep(num_layers: int, keep: int) -> None:
    if not 1 <= keep <= num_layers:
        raise ConfigError(f"model.student.keep_layers={keep}: the teacher has {num_layers} layers; "
                          f"choose 1..{num_layers}")


def keep_highest(scores: Sequence[float], keep: int) -> list[int]:
    """The ``keep`` indices with the highest scores, in layer order (ties: the lower index)."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep])


def _hidden(value) -> torch.Tensor:
    """A decoder layer's hidden state, whether it returns a tensor or a tuple led by one."""
    return value if torch.is_tensor(value) else value[0]


@torch.no_grad()
def block_influence(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> list[float]:
    """ShortGPT's Block Influence of every decoder layer: ``1 - mean cos(input, output)`` over the
    non-padding tokens of ``batches`` (collated: input_ids and attention_mask (B, S)). The cosine is
    taken in fp32 on each token's hidden vector (hidden_size,). Returns one float per layer."""
    layers = decoder_layers(model)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    count = 0
    mask: torch.Tensor | None = None
    inputs: dict[int, torch.Tensor] = {}

    def before(index):
        def hook(module, args, kwargs):
            inputs[index] = _hidden(args[0] if args else kwargs["hidden_states"])
        return hook

    def after(index):
        def hook(module, args, kwargs, output):
            x, y = inputs.pop(index).float(), _hidden(output).float()
            cos = nn.functional.cosine_similarity(x, y, dim=-1)  # (B, S)
            totals[index] += cos[mask].double().sum().cpu()
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(after(i), with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            mask = batch["attention_mask"].bool()
            count += int(mask.sum())
            model(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if count == 0:
        raise ConfigError("model.student.prune.calibration: the calibration set holds no tokens")
    return [1.0 - float(t) / count for t in totals]


@contextlib.contextmanager
def skipping(model: nn.Module, skipped: Iterable[int]):
    """Run ``model`` with the decoder layers ``skipped`` left out (their input passes straight on)."""
    decoder = base_model(model).get_decoder()
    layers = decoder.layers
    skipped = set(skipped)
    decoder.layers = nn.ModuleList([layer for i, layer in enumerate(layers) if i not in skipped])
    try:
        yield
    finally:
        decoder.layers = layers


@torch.no_grad()
def response_nll(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Mean next-token NLL (nats) over the response tokens (labels != IGNORE_INDEX) of ``batches``."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(**model_inputs(batch)).logits[:, :-1].float()
        targets = batch["labels"][:, 1:]
        total += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                                   ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((targets != IGNORE_INDEX).sum())
    if count == 0:
        raise ConfigError("model.student.prune.calibration: the calibration set holds no response tokens")
    return total / count


def perplexity_scores(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], keep: int,
                      search: str = "single") -> tuple[list[int], list[float | None]]:
    """(kept layers, score per layer) by the NLL of ``batches`` with layers skipped.

    ``single``: a layer's score is the NLL with it alone skipped; the ``keep`` highest are kept.
    ``greedy``: a layer's score is the NLL after the removal round it was removed in (None for the
    layers kept to the end); each round removes the layer whose removal gives the lowest NLL.
    """
    layers = decoder_layers(model)
    check_keep(len(layers), keep)
    if search not in SEARCHES:
        raise ConfigError(f"model.student.prune.perplexity_search={search}: choose one of {', '.join(SEARCHES)}")
    was_training = model.training
    model.eval()
    try:
        if search == "single":
            scores = []
            for i in range(len(layers)):
                with skipping(model, [i]):
                    scores.append(response_nll(model, batches))
            return keep_highest(scores, keep), scores
        removed: list[int] = []
        scores: list[float | None] = [None] * len(layers)
        while len(layers) - len(removed) > keep:
            trial = {}
            for i in range(len(layers)):
                if i not in removed:
                    with skipping(model, removed + [i]):
                        trial[i] = response_nll(model, batches)
            best = min(trial, key=lambda i: (trial[i], i))
            removed.append(best)
            scores[best] = trial[best]
        return sorted(set(range(len(layers))) - set(removed)), scores
    finally:
        model.train(was_training)


def choose_layers(model: nn.Module, keep: int, method: str, batches: Sequence[dict[str, torch.Tensor]] | None,
                  search: str = "single") -> tuple[list[int], list[float | None] | None]:
    """(the kept layers, in order; each layer's score, or None for ``even``) by ``method``."""
    num_layers = len(decoder_layers(model))
    check_keep(num_layers, keep)
    if method == "even":
        return evenly_spaced_layers(num_layers, keep), None
    if method == "block_influence":
        scores = block_influence(model, batches)
        return keep_highest(scores, keep), scores
    if method == "perplexity":
        return perplexity_scores(model, batches, keep, search)
    raise ConfigError(f"model.student.prune.method={method}: choose one of {', '.join(METHODS)}")
