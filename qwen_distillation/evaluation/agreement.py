"""How closely the student follows the teacher on held-out text, token by token.

Measured on response positions only (``modeling.parts.position_mask``: positions whose next
token is labelled), over the first ``vocab_size`` logit columns of both models (the tokens
they share; padded lm_head columns are dropped), at temperature 1.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen_distillation.evaluation.prompting import model_device
from qwen_distillation.evaluation.sharding import Shard, map_shared
from qwen_distillation.modeling.parts import decoder_and_head, position_mask, response_targets, supports_hidden_path

AGREEMENT_KEYS = ("nll", "top1_agreement", "topk_overlap", "kl_to_teacher")


@torch.no_grad()
def response_states(model: nn.Module, batch: dict[str, torch.Tensor],
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """Final hidden states at the response positions (``position_mask(batch["labels"])``
    unless ``mask`` is given), (N, H); or, for a model whose logits are not a plain
    projection of them, its logits there, (N, V'). A frozen teacher's states can be kept
    and passed to :func:`teacher_agreement` as ``teacher_states``."""
    if mask is None:
        mask = position_mask(batch["labels"])
    device = model_device(model)
    inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
              "use_cache": False}
    if supports_hidden_path(model):
        decoder, _ = decoder_and_head(model)
        return decoder(**inputs).last_hidden_state[mask.to(device)]
    return model(**inputs).logits[mask.to(device)]


def _chunk_logits(model: nn.Module, states: torch.Tensor, vocab_size: int, device) -> torch.Tensor:
    """fp32 logits (n, vocab_size) of a chunk of ``_response_states`` rows, on ``device``."""
    if supports_hidden_path(model):
        states = states @ decoder_and_head(model)[1].weight[:vocab_size].T
    return states[:, :vocab_size].to(device=device, dtype=torch.float32)


@torch.no_grad()
def teacher_agreement(student: nn.Module, teacher: nn.Module, batches: list[dict[str, torch.Tensor]],
                      vocab_size: int, *, topk: int = 5, chunk_size: int = 1024,
                      teacher_states: list[torch.Tensor] | None = None, shard: Shard | None = None) -> dict[str, float]:
    """Student-vs-teacher agreement on the response tokens of pre-collated batches.

    Args:
        student, teacher: causal LMs sharing the first ``vocab_size`` token ids.
        batches: ``data.manager.collate`` outputs: input_ids, attention_mask, labels (B, L).
        vocab_size: number of leading logit columns to compare (``len(tokenizer)``).
        topk: k of ``topk_overlap``.
        chunk_size: response positions whose logits are formed at once; memory holds two
            (chunk_size, vocab_size) fp32 blocks, never the logits of all N positions.
        teacher_states: ``response_states(teacher, batch)`` of each batch, computed earlier
            (the teacher is frozen, so they do not change): the teacher's decoder is not run
            again, only its lm_head on chunks of them. ``None`` runs the teacher.
        shard: the batches split over the ranks of a launch (``evaluation.sharding``).

    Returns:
        ``nll``: mean student negative log-likelihood of the labelled next token;
        ``top1_agreement``: share of positions where argmax student == argmax teacher;
        ``topk_overlap``: mean |top-k student ∩ top-k teacher| / k;
        ``kl_to_teacher``: mean forward KL(p_teacher || q_student) = sum_v p_t (log p_t - log q_s)
        per token, in nats (the teacher is the reference distribution);
        ``tokens``: number of positions N. With N = 0 the four means are NaN, and so are
        ``top1_agreement`` and ``topk_overlap`` when a model's distribution is not finite at a
        position (a NaN weight): the argmax and top k of NaN logits pick token ids by chance.
    """
    if not 1 <= topk <= vocab_size:
        raise ValueError(f"topk must be between 1 and vocab_size ({vocab_size}), got {topk}")
    modes = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    device = model_device(student)
    if teacher_states is not None and len(teacher_states) != len(batches):
        raise ValueError(f"teacher_states holds {len(teacher_states)} entries for {len(batches)} batches")

    def batch_sums(index: int) -> tuple[dict[str, float], int, bool]:
        sums = dict.fromkeys(AGREEMENT_KEYS, 0.0)
        broken = False  # a position whose distribution is NaN (a -inf logit is a valid zero probability)
        batch = batches[index]
        labels = batch["labels"]
        mask = position_mask(labels)
        targets = response_targets(labels).to(device)
        s_states = response_states(student, batch, mask)
        t_states = teacher_states[index] if teacher_states is not None else response_states(teacher, batch, mask)
        if t_states.shape[0] != targets.shape[0]:
            raise ValueError(f"teacher_states[{index}] has {t_states.shape[0]} rows; batch {index} has "
                             f"{targets.shape[0]} response positions")
        for start in range(0, targets.shape[0], chunk_size):
            end = start + chunk_size
            s_logits = _chunk_logits(student, s_states[start:end], vocab_size, device)
            t_logits = _chunk_logits(teacher, t_states[start:end], vocab_size, device)
            s_logprobs = torch.log_softmax(s_logits, dim=-1)
            t_logprobs = torch.log_softmax(t_logits, dim=-1)
            broken = broken or bool(s_logprobs.isnan().any() or t_logprobs.isnan().any())
            sums["nll"] += float(-s_logprobs.gather(1, targets[start:end, None]).sum())
            sums["top1_agreement"] += float((s_logits.argmax(-1) == t_logits.argmax(-1)).sum())
            s_top, t_top = s_logits.topk(topk, dim=-1).indices, t_logits.topk(topk, dim=-1).indices
            shared = (s_top[:, :, None] == t_top[:, None, :]).any(-1).sum(-1)
            sums["topk_overlap"] += float(shared.sum()) / topk
            # Columns with p_t == 0 contribute 0 (not 0 * -inf = NaN when a logit is -inf).
            t_probs = t_logprobs.exp()
            kl = torch.where(t_probs > 0, t_probs * (t_logprobs - s_logprobs), 0.0)
            sums["kl_to_teacher"] += float(kl.sum())
        return sums, int(targets.shape[0]), broken

    sums = dict.fromkeys(AGREEMENT_KEYS, 0.0)
    tokens, broken = 0, False
    for batch_sum, batch_tokens, batch_broken in map_shared(batch_sums, list(range(len(batches))), shard):
        for name, value in batch_sum.items():
            sums[name] += value
        tokens += batch_tokens
        broken = broken or batch_broken
    student.train(modes[0])
    teacher.train(modes[1])
    result = {name: (value / tokens if tokens else float("nan")) for name, value in sums.items()}
    if broken:  # the nll and KL sums are NaN already; the match counts would be chance
        result["top1_agreement"] = result["topk_overlap"] = float("nan")
    result["tokens"] = tokens
    return result
