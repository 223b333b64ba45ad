"""CE + sparse top-k KD from the student's final hidden states against a cached teacher.

The teacher side is an offline top-k cache entry per token (:mod:`qwen_distillation.losses.topk`:
``ids``, ``logprobs`` at T = 1, ``tail_logmass``); the student side is the hidden states and lm_head
weight, projected ``chunk_size`` tokens at a time with each chunk recomputed in backward (activation
checkpointing), so only one (chunk_size, V) block of student logits is alive, as in
:func:`qwen_distillation.losses.chunked.chunked_cross_entropy`. The divergence and its approximation
are :func:`qwen_distillation.losses.topk.topk_divergence`'s.
"""

from __future__ import annotations

import torch

from qwen_distillation.losses.logit import cross_entropy
from qwen_distillation.losses.topk import topk_divergence


def cached_teacher_kd(student_hidden: torch.Tensor, student_weight: torch.Tensor, targets: torch.Tensor,
                      teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_tail_logmass: torch.Tensor,
                      *, kind: str, temperature: float, tail: str = "bucket", beta: float = 0.5, ce: bool = True,
                      kd: bool = True, chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KD sum) over N response tokens, each a scalar fp32 with a graph on the student.

    Args:
        student_hidden (torch.Tensor): shape (N, H), the final hidden states predicting the tokens.
        student_weight (torch.Tensor): shape (V, H), the student's lm_head cut to the cache's vocabulary.
        targets (torch.Tensor): shape (N,), the next tokens.
        teacher_ids, teacher_logprobs (torch.Tensor): shape (N, k), the cached top-k ids and log-probs.
        teacher_tail_logmass (torch.Tensor): shape (N,), the cached log of the mass outside the ids.
        kind: ``forward_kl`` (KL(p_teacher || q_student)), ``reverse_kl`` (KL(q || p)) or ``jsd``
            (``beta``: 0 forward KL, 1 reverse KL), at ``temperature``, scaled by T**2.
        tail: ``bucket`` or ``renormalize`` (:mod:`qwen_distillation.losses.topk`).
        ce, kd: which of the two to compute (the other is a zero in the graph).
    """
    from torch.utils.checkpoint import checkpoint

    def chunk_terms(hidden, chunk_targets, ids, logprobs, tail_logmass):
        logits = hidden @ student_weight.T
        zero = logits.new_zeros((), dtype=torch.float32)
        ce_sum = cross_entropy(logits, chunk_targets, reduction="sum") if ce else zero
        kd_sum = (topk_divergence(kind, logits, ids, logprobs, chunk_targets, teacher_tail_logmass=tail_logmass,
                                  temperature=temperature, tail=tail, beta=beta, reduction="sum") if kd else zero)
        return ce_sum, kd_sum

    ce_total = kd_total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, student_hidden.shape[0], chunk_size):
        end = start + chunk_size
        ce_sum, kd_sum = checkpoint(chunk_terms, student_hidden[start:end], targets[start:end],
                                    teacher_ids[start:end], teacher_logprobs[start:end],
                                    teacher_tail_logmass[start:end], use_reentrant=False)
        ce_total, kd_total = ce_total + ce_sum, kd_total + kd_sum
    return ce_total, kd_total
