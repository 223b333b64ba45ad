"""Sparse top-k versions of the KD divergences, for a teacher cached offline (issue 13).

Notation as in :mod:`qwen_distillation.losses.logit`: ``p`` is the teacher, ``q`` the student,
``p_T = softmax(teacher_logits / T)``, ``KL(a || b) = sum_v a (log a - log b)``; ``K`` is the set
of the teacher's k most probable tokens at a position and the *tail* the other ``V - k`` tokens.

**The cache format** (per response token; what :func:`teacher_topk` returns):

* ``teacher_topk_ids`` (N, k) int32 or int64: the ids of K, distinct (any order);
* ``teacher_topk_logprobs`` (N, k) float: ``log_softmax(teacher_logits)[ids]`` at T = 1;
* ``teacher_tail_logmass`` (N,) float: ``log p_1(tail)``, the log of the teacher's T = 1 mass
  outside K, computed from the full logits (a log-sum-exp over the tail columns). It equals
  ``log(1 - sum(exp(logprobs)))`` in exact arithmetic, but that difference is rounding noise
  once the tail is below ~1e-6 (a log-prob near 0 computed in fp32 carries an absolute error of
  ~1e-6), and the ``bucket`` loss raises the tail mass to the power 1/T, which turns such noise
  into a visible weight (1e-7 ** (1/4) ~ 0.02). One float per token buys an exact tail.
  ``-inf`` (no tail, k = V) is allowed; values below ``LOG_ZERO`` count as zero mass.

The teacher's log-sum-exp is deliberately *not* part of the format: every quantity below is a
tempered softmax, which does not change when all logits of a row move by the same amount, and
``logit_v = logprob_v + lse`` differs from ``logprob_v`` by exactly such a per-row constant
(``lse / T`` after tempering). The ids must index the student's columns: run the writer on
teacher logits cut to the shared vocabulary (:func:`~qwen_distillation.losses.logit.align_vocab`).

**What is exact and what is approximated.** From the stored log-probs the teacher's tempered
distribution *within* K is exact at any T (``p_T(v) / p_T(u) = exp((lp_v - lp_u) / T)``), and so
is its tail mass at T = 1. Its tail mass at T != 1, ``sum_tail p_1(u) ** (1/T)`` up to the
normaliser, depends on how the tail mass is spread over the V - k tokens, which no per-token
summary of fixed size holds for every T. Two treatments (``tail=``):

* ``"renormalize"``: the divergence between the teacher and the student both *conditioned on
  K*: ``D(p_T(. | K) || q_T(. | K))``, over the k tokens only. Exact at any T as a conditional
  divergence; the tail, and how much mass the student puts on K, get no loss and no gradient.
  (arcee-ai/DistillKit's default ``missing=ZERO`` renormalises the teacher only and keeps the
  student's full softmax, which is ``D_renormalize - log q_T(K)`` for forward KL and is
  infinite for reverse KL and JSD; renormalising both gives one definition for all three.)
* ``"bucket"``: the divergence over k + 1 outcomes, the k tokens of K and one bucket for the
  tail, for both models. Exactly: the dense divergence at temperature T between the student and
  the teacher *completed with the student's tail shape*: outside K the teacher's T = 1
  distribution is taken to be ``p_1(tail) * q_1(u) / q_1(tail)``, its own exact tail mass spread
  like the student's. Tails proportional at T = 1 stay proportional at every T, so the divergence
  inside the tail is zero and k + 1 outcomes carry it all. At T = 1 this is
  ``D(coarse p_1 || coarse q_1)``, the dense divergence minus the tail-internal term (for forward
  KL, minus ``p_1(tail) * KL(p_1(. | tail) || q_1(. | tail))``), with nothing estimated; at
  T != 1 the teacher's tempered tail mass, ``(p_1(tail) / q_1(tail)) ** (1/T) * sum_tail
  q_1(u) ** (1/T)`` up to the normaliser, is an estimate. The completed teacher is a constant:
  the gradient is that of the divergence against it, not the derivative of the value through the
  borrowed shape (which would reward the student for reshaping its own tail to move the
  teacher's). The loss is zero, with zero gradient, exactly when the student's T = 1 top-k
  log-probs and tail mass equal the teacher's, at every T. Treatments that temper the student's
  true tail but a teacher tail estimated on its own (DistillKit's ``missing=SYMMETRIC_UNIFORM``
  tempers it as if it were one token, ``p_1(tail) ** (1/T)``; a flat tail would give
  ``(V - k) ** (1 - 1/T) * p_1(tail) ** (1/T)``) are minimised by a student sharper or flatter
  than the teacher at T != 1.

Both treatments equal the dense losses when K covers the vocabulary (k = V). What the error is
on real text (benchmarks/topk_error.py, docs/teacher_offline.md): small for forward KL and JSD
at T = 1 with ``bucket``, a gradient still close to the dense one for forward KL at T = 2, and
large for reverse KL at any T and for everything at T = 4 when the student is far from its
teacher, because then most of the dense gradient lies outside the teacher's top-k, where a cache
has no teacher information; the gradient of ``renormalize`` is never the closer of the two.

**Student side.** The losses use the student only through its T = 1 log-probs at the k ids,
the log of its T = 1 tail mass, and (T != 1, ``bucket``) the log of ``sum_tail q_1(u) ** (1/T)``
(:func:`sparse_logprobs`): the log-sum-exp of the logits, the logits at the ids and two
log-sum-exps over the columns not in the ids (of z and of z / T). A fused hidden-state kernel can
produce those in its pass over the vocabulary and call :func:`topk_divergence_from_logprobs`
without forming (N, V) logits. ``renormalize`` needs only the student's logits at the ids.

Conventions are those of :mod:`~qwen_distillation.losses.logit`: fp32 compute (fp64 kept), the
teacher is constant, the value is multiplied by T**2, positions whose label is ``ignore_index``
are masked (their rows may hold anything: padding ids, NaN), ``"mean"`` divides by the valid
tokens and ``"sum"`` does not, and an all-masked batch gives 0 still in the graph. JSD(beta)
has the same end points: beta = 0 is forward KL, beta = 1 reverse KL.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from qwen_distillation.losses.logit import REDUCTIONS, _kl_from_log, _log_mixture, _reduce, _upcast_valid_rows

TAILS = ("renormalize", "bucket")
# A log-mass below this is zero mass: exp(LOG_ZERO / T) underflows to 0 in fp32 and fp64 for
# every T <= 10, and it keeps empty tails finite so no 0 * inf = NaN reaches the value or gradient.
LOG_ZERO = -1.0e4


class TeacherTopK(NamedTuple):
    """One cache entry per token: see the module docstring for the meaning of each field.

    ids (torch.Tensor): shape (..., k), int64, the teacher's top-k token ids, most probable first.
    logprobs (torch.Tensor): shape (..., k), fp32 (fp64 for fp64 logits), log-probs at T = 1.
    tail_logmass (torch.Tensor): shape (...), log of the T = 1 mass outside ``ids``
        (``LOG_ZERO`` when k = V).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor


class SparseLogProbs(NamedTuple):
    """What the sparse losses need of the student at each position (module docstring).

    topk (torch.Tensor): shape (..., k), ``log_softmax(logits)`` at the ids (T = 1).
    tail (torch.Tensor): shape (...), ``log q_1(tail)``, the log of the T = 1 mass outside the ids.
    tempered_tail (torch.Tensor): shape (...), ``log sum_tail q_1(u) ** (1/T)``; equals ``tail``
        at T = 1.
    """

    topk: torch.Tensor
    tail: torch.Tensor
    tempered_tail: torch.Tensor


def sparse_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0) -> SparseLogProbs:
    """The T = 1 log-probs at ``ids`` and the log-masses of the other columns (:class:`SparseLogProbs`).

    The tail log-masses are log-sum-exps over the columns not in ``ids``, exact however small
    the tail (``log(1 - sum(exp(topk)))`` would be rounding noise below ~1e-6), floored at
    ``LOG_ZERO``, so ids covering the vocabulary give ``LOG_ZERO`` with a zero, not NaN, gradient.

    Args:
        logits (torch.Tensor): shape (..., V); upcast to fp32 (fp64 kept); differentiable.
        ids (torch.Tensor): shape (..., k), integer, distinct ids in [0, V) per row.
        temperature (float): the T of ``tempered_tail``.

    Returns:
        SparseLogProbs: ``topk`` (..., k), ``tail`` (...), ``tempered_tail`` (...).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    ids = ids.long()
    lse = torch.logsumexp(logits, dim=-1)
    # finfo.min, not -inf: a row whose columns are all ids then has a finite log-sum-exp, whose
    # backward is 0 * softmax instead of NaN.
    outside = logits.scatter(-1, ids, torch.finfo(logits.dtype).min)
    tail = (torch.logsumexp(outside, dim=-1) - lse).clamp(min=LOG_ZERO)
    if temperature == 1.0:
        tempered = tail
    else:
        tempered = (torch.logsumexp(outside / temperature, dim=-1) - lse / temperature).clamp(min=LOG_ZERO)
    return SparseLogProbs(logits.gather(-1, ids) - lse.unsqueeze(-1), tail, tempered)


@torch.no_grad()
def teacher_topk(teacher_logits: torch.Tensor, k: int) -> TeacherTopK:
    """What the cache stores for each position: the teacher's top-k ids, their log-probs at
    T = 1 and the log of its T = 1 mass outside them.

    Args:
        teacher_logits (torch.Tensor): shape (..., V), cut to the vocabulary shared with the
            student (the ids index the student's columns).
        k (int): 1 <= k <= V.

    Returns:
        TeacherTopK: ``ids`` (..., k) int64 (most probable first), ``logprobs`` (..., k) and
        ``tail_logmass`` (...), fp32 (fp64 for fp64 logits).
    """
    vocab_size = teacher_logits.shape[-1]
    if not 1 <= k <= vocab_size:
        raise ValueError(f"teacher_topk: k must be in [1, {vocab_size}] (the vocabulary size), got {k}")
    ids = torch.topk(teacher_logits, k, dim=-1).indices
    student_like = sparse_logprobs(teacher_logits, ids)
    return TeacherTopK(ids, student_like.topk, student_like.tail)


def _check_topk(
    vocab_size: int | None,
    logits_shape: tuple[int, ...] | None,
    teacher_topk_ids: torch.Tensor | None,
    teacher_topk_logprobs: torch.Tensor,
    teacher_tail_logmass: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    tail: str,
    reduction: str,
) -> None:
    k = teacher_topk_logprobs.shape[-1] if teacher_topk_logprobs.dim() else 0
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if logits_shape is not None and labels.shape != logits_shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the student logits shape without the "
                         f"vocab dimension, {tuple(logits_shape[:-1])}")
    expected = f"({', '.join(map(str, labels.shape))}, k)"
    if teacher_topk_ids is not None:
        if teacher_topk_ids.dtype.is_floating_point or teacher_topk_ids.dtype == torch.bool:
            raise ValueError(f"teacher_topk_ids must hold integer token ids, got dtype {teacher_topk_ids.dtype}")
        if teacher_topk_ids.shape[:-1] != labels.shape or teacher_topk_ids.dim() != labels.dim() + 1:
            raise ValueError(f"teacher_topk_ids shape {tuple(teacher_topk_ids.shape)} must be (*labels.shape, k) "
                             f"= {expected}: one row of k ids per position")
        if teacher_topk_logprobs.shape != teacher_topk_ids.shape:
            raise ValueError(f"teacher_topk_logprobs shape {tuple(teacher_topk_logprobs.shape)} must equal "
                             f"teacher_topk_ids shape {tuple(teacher_topk_ids.shape)}")
    elif teacher_topk_logprobs.shape[:-1] != labels.shape or teacher_topk_logprobs.dim() != labels.dim() + 1:
        raise ValueError(f"teacher_topk_logprobs shape {tuple(teacher_topk_logprobs.shape)} must be "
                         f"(*labels.shape, k) = {expected}")
    if vocab_size is not None and not 1 <= k <= vocab_size:
        raise ValueError(f"the cache holds k={k} ids per position but the student vocabulary has {vocab_size} "
                         "columns; k must be in [1, vocab_size] (was the cache written for a larger vocabulary? "
                         "cut the teacher logits to the shared vocabulary before teacher_topk)")
    if tail == "bucket":
        if teacher_tail_logmass is None:
            raise ValueError("tail='bucket' needs teacher_tail_logmass, the log of the teacher's mass outside its "
                             "top-k (TeacherTopK.tail_logmass from teacher_topk); pass it or use tail='renormalize'")
        if teacher_tail_logmass.shape != labels.shape:
            raise ValueError(f"teacher_tail_logmass shape {tuple(teacher_tail_logmass.shape)} must equal the "
                             f"labels shape {tuple(labels.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_kind(kind: str, beta: float) -> None:
    if kind not in TOPK_DIVERGENCES:
        raise ValueError(f"no sparse top-k version of divergence {kind!r}; valid names: {sorted(TOPK_DIVERGENCES)}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")


def _per_token(kind: str, log_p: torch.Tensor, log_q: torch.Tensor, beta: float) -> torch.Tensor:
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl_from_log(log_p, log_q)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl_from_log(log_q, log_p)
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_from_log(log_p, log_m) + (1.0 - beta) * _kl_from_log(log_q, log_m)


def _sparse_loss(kind, student, teacher_topk_logprobs, teacher_tail_logmass, labels, *, temperature, tail, beta,
                 ignore_index, reduction):
    """The divergence from the student's :class:`SparseLogProbs` (masked rows already zeroed;
    ``topk`` may be any per-row shift for renormalize) and the teacher's cache entries."""
    valid = labels != ignore_index
    dtype = student.topk.dtype
    teacher = _upcast_valid_rows(teacher_topk_logprobs.detach().to(dtype), valid)
    log_q_topk = student.topk / temperature
    if tail == "renormalize":
        log_p = F.log_softmax(teacher / temperature, dim=-1)
        log_q = F.log_softmax(log_q_topk, dim=-1)
    else:
        # Both in units of q_1 ** (1/T): the teacher's tail is its exact T = 1 mass spread like
        # the student's, a constant (the student's part detached), so only the bucket is estimated.
        teacher_tail = torch.where(valid, teacher_tail_logmass.detach().to(dtype), 0.0).clamp(min=LOG_ZERO)
        teacher_tail = (teacher_tail - student.tail.detach()) / temperature + student.tempered_tail.detach()
        log_p = F.log_softmax(torch.cat([teacher / temperature, teacher_tail.unsqueeze(-1)], dim=-1), dim=-1)
        log_q = F.log_softmax(torch.cat([log_q_topk, student.tempered_tail.unsqueeze(-1)], dim=-1), dim=-1)
    per_token = _per_token(kind, log_p, log_q, beta) * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


def topk_divergence_from_logprobs(
    kind: str,
    student: SparseLogProbs,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_tail_logmass: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`topk_divergence` from the student's sparse log-probs instead of its logits: the
    entry point for a kernel that computes those from hidden states (module docstring).

    Args:
        kind (str): "forward_kl" (KL(p || q)), "reverse_kl" (KL(q || p)) or "jsd".
        student (SparseLogProbs): the student at the teacher's top-k ids, as
            ``sparse_logprobs(student_logits, ids, temperature)`` returns it (gets the gradient);
            renormalize reads only ``topk``, which may then be the logits at the ids.
        teacher_topk_logprobs (torch.Tensor): shape (..., k), the cache's log-probs.
        labels (torch.Tensor): shape (...); positions equal to ``ignore_index`` are masked.
        teacher_tail_logmass (torch.Tensor | None): shape (...); required for ``tail="bucket"``.
        temperature, tail, beta, ignore_index, reduction: as in :func:`topk_forward_kl`.

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    _check_kind(kind, beta)
    _check_topk(None, None, None, teacher_topk_logprobs, teacher_tail_logmass, labels, temperature, tail, reduction)
    if student.topk.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"student.topk shape {tuple(student.topk.shape)} must equal teacher_topk_logprobs shape "
                         f"{tuple(teacher_topk_logprobs.shape)}")
    if tail == "bucket" and any(t is None or t.shape != labels.shape for t in (student.tail, student.tempered_tail)):
        raise ValueError(f"tail='bucket' needs student.tail and student.tempered_tail of shape {tuple(labels.shape)}")
    valid = labels != ignore_index
    topk = _upcast_valid_rows(student.topk, valid)
    if tail == "bucket":
        student = SparseLogProbs(topk, *(torch.where(valid, t.to(topk.dtype), 0.0)
                                         for t in (student.tail, student.tempered_tail)))
    else:
        student = SparseLogProbs(topk, None, None)
    return _sparse_loss(kind, student, teacher_topk_logprobs, teacher_tail_logmass, labels, temperature=temperature,
                        tail=tail, beta=beta, ignore_index=ignore_index, reduction=reduction)


def topk_divergence(
    kind: str,
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_tail_logmass: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    beta: float = 0.5,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """The sparse version of ``divergence(kind, ...)`` (``kind`` a key of :data:`TOPK_DIVERGENCES`,
    the same names as the dense :data:`~qwen_distillation.losses.logit.DIVERGENCES`) against a
    cached teacher; ``beta`` is used by ``"jsd"`` only. Arguments as in :func:`topk_forward_kl`.
    """
    _check_kind(kind, beta)
    _check_topk(student_logits.shape[-1], tuple(student_logits.shape), teacher_topk_ids, teacher_topk_logprobs,
                teacher_tail_logmass, labels, temperature, tail, reduction)
    valid = labels != ignore_index
    logits = _upcast_valid_rows(student_logits, valid)
    # Padding rows may hold any id (-1, V, ...): index column 0 there instead.
    ids = torch.where(valid.unsqueeze(-1), teacher_topk_ids.long(), 0)
    if tail == "renormalize":
        # A per-row shift does not change the renormalised softmax: the logits at the ids will do.
        student = SparseLogProbs(logits.gather(-1, ids), None, None)
    else:
        student = sparse_logprobs(logits, ids, temperature)
    return _sparse_loss(kind, student, teacher_topk_logprobs, teacher_tail_logmass, labels, temperature=temperature,
                        tail=tail, beta=beta, ignore_index=ignore_index, reduction=reduction)


def topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_tail_logmass: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL(p_teacher || q_student) * T**2 against a top-k teacher cache (mode-covering).

    ``tail`` decides what stands for the tokens outside the top-k (module docstring): over the
    k ids and one tail bucket (``"bucket"``; exact at T = 1 as a divergence of the k + 1
    outcomes, the teacher's tail shape taken from the student's at T != 1), or over the k ids
    only, both models renormalised (``"renormalize"``). Equal to :func:`~qwen_distillation.losses.logit.forward_kl`
    when the ids cover the vocabulary.

    Args:
        student_logits (torch.Tensor): shape (..., V), the student (gets the gradient).
        teacher_topk_ids (torch.Tensor): shape (..., k), integer, the teacher's top-k ids (distinct).
        teacher_topk_logprobs (torch.Tensor): shape (..., k), the teacher's T = 1 log-probs at them
            (treated as constant).
        labels (torch.Tensor): shape (...), int64; positions equal to ``ignore_index`` are masked.
        teacher_tail_logmass (torch.Tensor | None): shape (...), log of the teacher's T = 1 mass
            outside its top-k; required for ``tail="bucket"``.
        temperature (float): softmax temperature T > 0; the result is multiplied by T**2.
        tail (str): "bucket" or "renormalize".
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    return topk_divergence("forward_kl", student_logits, teacher_topk_ids, teacher_topk_logprobs, labels,
                           teacher_tail_logmass=teacher_tail_logmass, temperature=temperature, tail=tail,
                           ignore_index=ignore_index, reduction=reduction)


def topk_reverse_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_tail_logmass: torch.Tensor | None = None,
    temperature: float = 1.0,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reverse KL(q_student || p_teacher) * T**2 against a top-k teacher cache (mode-seeking).

    Same arguments, shapes and tail treatments as :func:`topk_forward_kl`; equal to
    :func:`~qwen_distillation.losses.logit.reverse_kl` when the ids cover the vocabulary.
    """
    return topk_divergence("reverse_kl", student_logits, teacher_topk_ids, teacher_topk_logprobs, labels,
                           teacher_tail_logmass=teacher_tail_logmass, temperature=temperature, tail=tail,
                           ignore_index=ignore_index, reduction=reduction)


def topk_generalized_jsd(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    *,
    teacher_tail_logmass: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: str = "bucket",
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized JSD * T**2 against a top-k teacher cache: with m = beta * p_teacher +
    (1 - beta) * q_student over the k (+ 1) outcomes, ``beta * KL(p || m) + (1 - beta) * KL(q || m)``;
    beta = 0 is exactly forward KL(p || q) and beta = 1 reverse KL(q || p), as in
    :func:`~qwen_distillation.losses.logit.generalized_jsd`, which it equals when the ids cover
    the vocabulary. Other arguments as in :func:`topk_forward_kl`; ``beta`` in [0, 1].
    """
    return topk_divergence("jsd", student_logits, teacher_topk_ids, teacher_topk_logprobs, labels,
                           teacher_tail_logmass=teacher_tail_logmass, temperature=temperature, tail=tail,
                           beta=beta, ignore_index=ignore_index, reduction=reduction)


TOPK_DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": topk_forward_kl,
    "reverse_kl": topk_reverse_kl,
    "jsd": topk_generalized_jsd,
}
