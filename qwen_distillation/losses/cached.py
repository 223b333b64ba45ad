"""CE + sparse top-k KD from the student's final hidden states against a cached teacher.

The teacher side is an offline top-k cache entry per token (:mod:`qwen_distillation.losses.topk`:
``ids``, ``logprobs`` at T = 1, ``tail_logmass``). Two student sides, the same numbers:

* ``tail="bucket"`` runs through the fused-linear kernels of the online teacher
  (:func:`qwen_distillation.losses.fused.apply_fused_kd`: Triton on a GPU, the torch reference on a
  CPU) with :class:`CompletedTopK` as the teacher's logits: the ``bucket`` divergence *is* the dense
  divergence against the teacher completed with the student's T = 1 tail shape (the
  :mod:`~qwen_distillation.losses.topk` docstring), so per chunk the completed teacher rows are
  built from the student's own logits and the dense kernel does the rest, gradients included;
* :func:`cached_teacher_kd` (``renormalize``, and the reference): the student's logits projected
  ``chunk_size`` tokens at a time with each chunk recomputed in backward (activation
  checkpointing), and :func:`qwen_distillation.losses.topk.topk_divergence` on them.

Either way only one (chunk_size, V) block of student logits is alive.
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


class CompletedTopK:
    """A cached top-k teacher as dense T = 1 log-probs, one chunk of rows at a time, completed with
    the student's tail shape: the teacher of the ``bucket`` treatment (:mod:`~qwen_distillation.losses.topk`).

    Row ``n``, column ``u``: ``logprobs[n, i]`` where ``u = ids[n, i]``; elsewhere
    ``tail_logmass[n] + log q_1(u | tail)``, the teacher's exact T = 1 tail mass spread like the
    student's, ``z_u - logsumexp_{v not in ids} z_v`` from the student's logits ``z``. The dense
    divergence D(softmax(t / T) || softmax(z / T)) * T**2 against these rows, the rows held
    constant, is ``topk_divergence(..., tail="bucket")`` in value and gradient, for forward KL,
    reverse KL and JSD at any T. A row source for the fused-linear kernels
    (:func:`qwen_distillation.kernels.fused_linear_kd.teacher_rows`).

    Args:
        ids (torch.Tensor): shape (N, k), the cached top-k ids (< the student logits' width).
        logprobs (torch.Tensor): shape (N, k), their T = 1 log-probs.
        tail_logmass (torch.Tensor): shape (N,), log of the T = 1 mass outside ``ids``.

    ``student_tail_mass``: after :meth:`rows` has built rows, the sum over them of the student's T = 1
    mass outside ``ids`` (a 0-d fp32 tensor on the rows' device; None before), what the bucket cannot
    resolve: the sparse loss's gradient is near the dense one's only where it is small
    (docs/teacher_offline.md). Reading it costs a (c, k) gather per chunk, no device wait.
    """

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, tail_logmass: torch.Tensor):
        self.ids, self.logprobs, self.tail_logmass = ids.long(), logprobs, tail_logmass
        self.student_tail_mass: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.ids.shape[0]

    @torch.no_grad()
    def rows(self, start: int, end: int, student_logits: torch.Tensor) -> torch.Tensor:
        """(end - start, V) fp32 teacher log-probs for the student logits (end - start, V) of the chunk."""
        ids = self.ids[start:end]
        rows = student_logits.detach().to(torch.float32, copy=True)  # the student logits stay as they are
        in_ids = torch.logsumexp(rows.gather(1, ids), dim=-1, keepdim=True)
        rows.scatter_(1, ids, float("-inf"))
        outside = torch.logsumexp(rows, dim=-1, keepdim=True)
        mass = torch.exp(outside - torch.logaddexp(outside, in_ids)).sum()  # the student's, outside the ids
        self.student_tail_mass = mass if self.student_tail_mass is None else self.student_tail_mass + mass
        rows -= outside  # log q_1(u | tail); -inf at the ids
        rows += self.tail_logmass[start:end, None].float()
        rows.scatter_(1, ids, self.logprobs[start:end].float())
        return rows

