"""Pure-torch reference losses on logits for teacher -> student distillation.

Notation used throughout: ``p`` is the teacher distribution ``softmax(teacher_logits / T)``
and ``q`` the student distribution ``softmax(student_logits / T)``; ``KL(a || b) = sum_v a (log a - log b)``.

Every divergence:

* upcasts to fp32 (fp64 inputs stay fp64, so ``gradcheck`` works) before the softmax;
* treats the teacher as a constant (``teacher_logits`` is detached);
* multiplies the per-token value by ``T**2`` (Hinton et al. 2015), so gradient magnitudes
  do not shrink as the temperature grows;
* masks positions whose label equals ``ignore_index`` and reduces over the valid tokens only:
  ``"mean"`` divides the sum by the number of valid tokens, ``"sum"`` returns the sum so a
  trainer can divide by the valid tokens of a whole gradient-accumulation window;
* never clamps: a clamped KL has zero gradient exactly where the student is furthest off.

An all-masked input gives ``0.0`` that is still part of the autograd graph (zero gradient, no NaN).

The caller aligns vocabularies (see :func:`align_vocab`) and shifts labels for causal LM
(logits at position t score token t + 1); these functions only compare rows position by position.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum")


def _check_common(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    reduction: str,
) -> None:
    if teacher_logits is not None and student_logits.shape != teacher_logits.shape:
        if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
            raise ValueError(
                f"student_logits {tuple(student_logits.shape)} and teacher_logits "
                f"{tuple(teacher_logits.shape)} have different token dimensions"
            )
        raise ValueError(
            f"vocab sizes differ: student_logits has {student_logits.shape[-1]} columns, "
            f"teacher_logits has {teacher_logits.shape[-1]}; truncate both with "
            "align_vocab(student_logits, teacher_logits, vocab_size) first"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits shape without the vocab "
            f"dimension, {tuple(student_logits.shape[:-1])}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    # fp16/bf16 -> fp32; fp32 and fp64 are kept (fp64 for gradcheck).
    return torch.promote_types(logits.dtype, torch.float32)


def _upcast_valid_rows(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Upcast (..., V) logits and zero the rows of masked positions.

    Masked rows may hold anything (padding, NaN from a fully masked attention row); without
    this, a NaN there stays out of the value but its backward gives 0 * NaN = NaN gradients.
    """
    upcast = logits.to(_compute_dtype(logits))
    if _all_rows_valid_on_cpu(valid):
        return upcast  # the same values, without a pass over (..., V)
    return torch.where(valid.unsqueeze(-1), upcast, 0.0)


def _all_rows_valid_on_cpu(valid: torch.Tensor) -> bool:
    """Whether ``valid`` is on the CPU and all True. Only there is the answer read: on a GPU the read
    would wait for the device's queue, and the zeroing pass costs less than that wait. On the CPU the
    fused-linear loss's rows are its labelled positions, so the check saves a pass and its backward
    (about a fifth of a tiny run's training time)."""
    return valid.device.type == "cpu" and bool(valid.all())


def _log_probs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (log_q student, log_p teacher) at temperature T, both upcast; teacher detached."""
    valid = labels != ignore_index
    log_q = F.log_softmax(_upcast_valid_rows(student_logits, valid) / temperature, dim=-1)
    log_p = F.log_softmax(_upcast_valid_rows(teacher_logits.detach(), valid) / temperature, dim=-1)
    return log_q, log_p


def _reduce(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    """Sum (or mean over valid tokens) of ``per_token`` (shape (...)) where labels != ignore_index."""
    valid = labels != ignore_index
    # torch.where, not multiplication by the mask, so that no masked value can reach the sum.
    total = torch.where(valid, per_token, per_token.new_zeros(())).sum()
    if reduction == "sum":
        return total
    # The max(.., 1) is on an integer count only, so an all-masked batch returns 0 / 1 = 0.
    return total / valid.sum().clamp(min=1)


def _kl_from_log(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Per-token KL(a || b) = sum_v a (log a - log b), shape (...) from (..., V) log-probs."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), in log space (logsumexp of two terms); 0 < weight_a < 1."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Forward KL(p_teacher || q_student) * T**2: mode-covering, the standard Hinton KD loss.

    Equals ``F.kl_div(log_q, log_p, log_target=True)`` summed over the vocabulary: note that
    ``F.kl_div(input, target)`` computes KL(target || input), the reverse of the paper's order.

    Args:
        student_logits (torch.Tensor): shape (..., vocab_size), the student (gets the gradient).
        teacher_logits (torch.Tensor): shape (..., vocab_size), the teacher (treated as constant).
        labels (torch.Tensor): shape (...), int64; positions equal to ``ignore_index`` are masked.
        temperature (float): softmax temperature T > 0; the result is multiplied by T**2.
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    _check_common(student_logits, teacher_logits, labels, temperature, reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, labels, temperature, ignore_index)
    per_token = _kl_from_log(log_p, log_q) * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


def reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Reverse KL(q_student || p_teacher) * T**2: mode-seeking (MiniLLM, GKD beta=1).

    Equals ``F.kl_div(log_p, log_q, log_target=True)`` summed over the vocabulary (``F.kl_div``
    takes its arguments in the reverse of the paper's order).

    Args:
        student_logits (torch.Tensor): shape (..., vocab_size), the student (gets the gradient).
        teacher_logits (torch.Tensor): shape (..., vocab_size), the teacher (treated as constant).
        labels (torch.Tensor): shape (...), int64; positions equal to ``ignore_index`` are masked.
        temperature (float): softmax temperature T > 0; the result is multiplied by T**2.
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    _check_common(student_logits, teacher_logits, labels, temperature, reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, labels, temperature, ignore_index)
    per_token = _kl_from_log(log_q, log_p) * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence (GKD, Agarwal et al. 2024) * T**2.

    With the mixture m = beta * p_teacher + (1 - beta) * q_student (computed in log space):
    ``beta * KL(p_teacher || m) + (1 - beta) * KL(q_student || m)``. Same convention as TRL's
    ``GKDTrainer.generalized_jsd_loss`` and Liger's ``LigerJSD``. As there, the end points are
    special-cased: beta = 0 is exactly forward KL(p_teacher || q_student) and beta = 1 exactly
    reverse KL(q_student || p_teacher) (the formula itself tends to 0 at both ends, so the
    special cases are a deliberate discontinuity, kept for compatibility with TRL).
    beta = 0.5 is the symmetric JSD, bounded by log 2 * T**2.

    Args:
        student_logits (torch.Tensor): shape (..., vocab_size), the student (gets the gradient).
        teacher_logits (torch.Tensor): shape (..., vocab_size), the teacher (treated as constant).
        labels (torch.Tensor): shape (...), int64; positions equal to ``ignore_index`` are masked.
        beta (float): teacher weight in the mixture, in [0, 1].
        temperature (float): softmax temperature T > 0; the result is multiplied by T**2.
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"generalized_jsd: beta must be in [0, 1], got {beta}")
    kwargs = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, labels, **kwargs)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, labels, **kwargs)
    _check_common(student_logits, teacher_logits, labels, temperature, reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, labels, temperature, ignore_index)
    log_m = _log_mixture(log_p, log_q, beta)
    per_token = beta * _kl_from_log(log_p, log_m) + (1.0 - beta) * _kl_from_log(log_q, log_m)
    return _reduce(per_token * temperature**2, labels, ignore_index, reduction)


def skew_forward_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Skew forward KL (DistiLLM, Ko et al. 2024) * T**2.

    ``KL(p_teacher || alpha * p_teacher + (1 - alpha) * q_student)``; alpha = 0 is forward KL.
    Mixing some teacher into the second argument bounds the loss by -log(alpha) * T**2 and keeps
    its gradient from exploding where the student gives a teacher token almost no mass.

    Args:
        student_logits (torch.Tensor): shape (..., vocab_size), the student (gets the gradient).
        teacher_logits (torch.Tensor): shape (..., vocab_size), the teacher (treated as constant).
        labels (torch.Tensor): shape (...), int64; positions equal to ``ignore_index`` are masked.
        alpha (float): skew, the teacher weight in the mixture, in [0, 1).
        temperature (float): softmax temperature T > 0; the result is multiplied by T**2.
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_forward_kl: alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return forward_kl(
            student_logits, teacher_logits, labels,
            temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        )
    _check_common(student_logits, teacher_logits, labels, temperature, reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, labels, temperature, ignore_index)
    log_m = _log_mixture(log_p, log_q, alpha)
    per_token = _kl_from_log(log_p, log_m) * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Skew reverse KL (DistiLLM) * T**2.

    ``KL(q_student || alpha * q_student + (1 - alpha) * p_teacher)``; alpha = 0 is reverse KL.

    Args:
        student_logits (torch.Tensor): shape (..., vocab_size), the student (gets the gradient).
        teacher_logits (torch.Tensor): shape (..., vocab_size), the teacher (treated as constant).
        labels (torch.Tensor): shape (...), int64; positions equal to ``ignore_index`` are masked.
        alpha (float): skew, the student weight in the mixture, in [0, 1).
        temperature (float): softmax temperature T > 0; the result is multiplied by T**2.
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_reverse_kl: alpha must be in [0, 1), got {alpha}")
    if alpha == 0.0:
        return reverse_kl(
            student_logits, teacher_logits, labels,
            temperature=temperature, ignore_index=ignore_index, reduction=reduction,
        )
    _check_common(student_logits, teacher_logits, labels, temperature, reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, labels, temperature, ignore_index)
    log_m = _log_mixture(log_q, log_p, alpha)
    per_token = _kl_from_log(log_q, log_m) * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


def total_variation(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Total variation distance ``0.5 * sum_v |p_teacher - q_student|`` * T**2 (symmetric).

    The T**2 factor is applied as for the KL losses so every divergence shares one convention.

    Args:
        student_logits (torch.Tensor): shape (..., vocab_size), the student (gets the gradient).
        teacher_logits (torch.Tensor): shape (..., vocab_size), the teacher (treated as constant).
        labels (torch.Tensor): shape (...), int64; positions equal to ``ignore_index`` are masked.
        temperature (float): softmax temperature T > 0; the result is multiplied by T**2.
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    _check_common(student_logits, teacher_logits, labels, temperature, reduction)
    log_q, log_p = _log_probs(student_logits, teacher_logits, labels, temperature, ignore_index)
    per_token = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1) * temperature**2
    return _reduce(per_token, labels, ignore_index, reduction)


def cross_entropy(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """Token cross-entropy of the student against the labels, at T = 1, upcast to fp32.

    Args:
        student_logits (torch.Tensor): shape (..., vocab_size).
        labels (torch.Tensor): shape (...), int64 token ids in [0, vocab_size) or ``ignore_index``.
        ignore_index (int): label value of masked positions.
        reduction (str): "mean" (per valid token) or "sum" (over valid tokens).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs); 0.0 (with graph) when all are masked.
    """
    _check_common(student_logits, None, labels, 1.0, reduction)
    logits = _upcast_valid_rows(student_logits, labels != ignore_index).reshape(-1, student_logits.shape[-1])
    total = F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp(min=1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tv": total_variation,
}


def divergence(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> torch.Tensor:
    """Call the divergence named ``kind`` (a key of :data:`DIVERGENCES`).

    ``beta`` is passed only to ``"jsd"`` and ``alpha`` only to the two skew KLs; argument
    meanings, shapes and reductions are those of the function called.
    """
    try:
        fn = DIVERGENCES[kind]
    except KeyError:
        raise ValueError(f"unknown divergence {kind!r}; valid names: {sorted(DIVERGENCES)}") from None
    kwargs = dict(temperature=temperature, ignore_index=ignore_index, reduction=reduction)
    if kind == "jsd":
        kwargs["beta"] = beta
    elif kind in ("skew_forward_kl", "skew_reverse_kl"):
        kwargs["alpha"] = alpha
    return fn(student_logits, teacher_logits, labels, **kwargs)


def align_vocab(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncate both logits to their first ``vocab_size`` columns (views, no copy).

    Qwen2.5 models share a tokenizer but pad the lm_head differently (151,936 columns for the
    0.5B-3B models, 152,064 for 7B and up); the padded columns are not real tokens, so the
    common prefix is the shared vocabulary. Nothing else (no token remapping) is done here.

    Args:
        student_logits (torch.Tensor): shape (..., V_s).
        teacher_logits (torch.Tensor): shape (..., V_t).
        vocab_size (int): number of shared leading columns, 0 < vocab_size <= min(V_s, V_t).

    Returns:
        tuple[torch.Tensor, torch.Tensor]: (student, teacher), each of shape (..., vocab_size).
    """
    smallest = min(student_logits.shape[-1], teacher_logits.shape[-1])
    if not 0 < vocab_size <= smallest:
        raise ValueError(
            f"vocab_size must be in (0, {smallest}] (student has {student_logits.shape[-1]} "
            f"columns, teacher {teacher_logits.shape[-1]}), got {vocab_size}"
        )
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
