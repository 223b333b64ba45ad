"""Distillation loss from final hidden states, without materialising all (N, V) logits.

With a 151,936-column vocabulary, fp32 logits for 16k tokens take ~10 GB per model, and autograd
would keep several such tensors for backward. Here the lm_head projection, cross-entropy and
divergence run on ``chunk_size`` tokens at a time, and each chunk's gradients with respect to the
student hidden states and lm_head weight are computed in the forward pass (the logits are
freed right after): peak memory is O(chunk_size * V) plus one (N, H) and one (V, H) gradient,
and backward recomputes nothing.
"""

from __future__ import annotations

import torch

from qwen_distillation.kernels.fused_linear_kd import teacher_rows
from qwen_distillation.losses.logit import cross_entropy, divergence


class TorchFusedLinearKD(torch.autograd.Function):
    """The plain-torch reference of the fused-linear KD loss (``kernel="torch"``): loss and
    its gradients in one pass over the chunks. ``options`` is a
    :class:`~qwen_distillation.kernels.fused_linear_kd.KDOptions` (its ``reduction`` and
    ``kernel`` are unused: ``num_valid`` divides for a mean).

    For each chunk the logits are formed, the weighted CE + divergence is computed, and its
    gradient with respect to the chunk's logits is turned at once into gradients for the
    student hidden states and lm_head weight; the logits are then freed. Backward only
    scales the stored gradients, so nothing is recomputed and no (N, V) tensor is kept.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels, options,
                num_valid):
        kind, temperature, ce_weight, kd_weight = (options.kind, options.temperature, options.ce_weight,
                                                   options.kd_weight)
        chunk_size, ignore_index, beta, alpha = options.chunk_size, options.ignore_index, options.beta, options.alpha
        hidden, weight = student_hidden.detach(), student_weight.detach()
        sum_dtype = torch.promote_types(hidden.dtype, torch.float32)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.promote_types(weight.dtype, torch.float32))
        ce_total = hidden.new_zeros((), dtype=sum_dtype)
        kd_total = hidden.new_zeros((), dtype=sum_dtype)
        for start in range(0, hidden.shape[0], chunk_size):
            end = min(start + chunk_size, hidden.shape[0])
            chunk_labels = labels[start:end]
            with torch.enable_grad():
                logits = (hidden[start:end] @ weight.T).requires_grad_()
                ce_sum = cross_entropy(logits, chunk_labels, ignore_index=ignore_index, reduction="sum")
                total = ce_weight * ce_sum
                kd_sum = torch.zeros((), dtype=sum_dtype, device=hidden.device)
                if kd_weight != 0:
                    with torch.no_grad():
                        if teacher_logits is not None:
                            chunk_teacher = teacher_rows(teacher_logits, start, end, logits)
                        else:
                            chunk_teacher = teacher_hidden[start:end] @ teacher_weight.T
                    kd_sum = divergence(kind, logits, chunk_teacher, chunk_labels, temperature=temperature,
                                        ignore_index=ignore_index, reduction="sum", beta=beta, alpha=alpha)
                    total = total + kd_weight * kd_sum
                (grad_logits,) = torch.autograd.grad(total, logits)
            grad_logits = grad_logits.to(weight.dtype)
            grad_hidden[start:end] = (grad_logits @ weight).to(grad_hidden.dtype)
            grad_weight += (grad_logits.T @ hidden[start:end]).to(grad_weight.dtype)
            ce_total += ce_sum.detach()
            kd_total += kd_sum.detach()
        if num_valid is not None:
            ce_total, kd_total = ce_total / num_valid, kd_total / num_valid
            grad_hidden, grad_weight = grad_hidden / num_valid, grad_weight / num_valid
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        loss = ce_weight * ce_total + kd_weight * kd_total
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None, None, None, None


def prepare_fused_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *,
                         teacher_logits=None, vocab_size):
    """Check and flatten the inputs of a fused-linear KD loss (any kernel).

    Returns ``(student_hidden (N, H_s), student_weight (V, H_s), teacher_hidden (N, H_t) | None,
    teacher_weight (V, H_t) | None, teacher_logits (N, V) view | None, labels (N,))`` with both
    weights (or the teacher logits' columns) cut to the shared ``V = vocab_size`` rows.
    """
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = labels.reshape(-1)
    num_tokens = student_hidden.shape[0]
    if labels.shape[0] != num_tokens:
        raise ValueError(f"token counts differ: student_hidden {num_tokens}, labels {labels.shape[0]}")
    if student_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(
            f"student_weight {tuple(student_weight.shape)} does not match hidden size {student_hidden.shape[1]}"
        )
    vocab_student = student_weight.shape[0]
    if hasattr(teacher_logits, "rows"):  # a row source (kernels.fused_linear_kd.teacher_rows): N rows, any V
        if len(teacher_logits) != num_tokens:
            raise ValueError(f"token counts differ: student_hidden {num_tokens}, teacher rows {len(teacher_logits)}")
        vocab_teacher = vocab_size or vocab_student
        teacher_hidden = teacher_weight = None
    elif teacher_logits is not None:
        teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1]).detach()
        if teacher_logits.shape[0] != num_tokens:
            raise ValueError(f"token counts differ: student_hidden {num_tokens}, teacher_logits "
                             f"{teacher_logits.shape[0]}")
        vocab_teacher = teacher_logits.shape[1]
        teacher_hidden = teacher_weight = None
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("pass teacher_hidden and teacher_weight, or teacher_logits")
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        if teacher_hidden.shape[0] != num_tokens:
            raise ValueError(f"token counts differ: student_hidden {num_tokens}, teacher_hidden "
                             f"{teacher_hidden.shape[0]}")
        if teacher_weight.shape[1] != teacher_hidden.shape[1]:
            raise ValueError(
                f"teacher_weight {tuple(teacher_weight.shape)} does not match hidden size {teacher_hidden.shape[1]}"
            )
        vocab_teacher = teacher_weight.shape[0]
    if vocab_size is None:
        if vocab_student != vocab_teacher:
            raise ValueError(
                f"vocab sizes differ (student {vocab_student}, teacher {vocab_teacher}); "
                "pass vocab_size to compare the shared leading columns"
            )
        vocab_size = vocab_student
    elif not 0 < vocab_size <= min(vocab_student, vocab_teacher):
        raise ValueError(
            f"vocab_size must be in (0, {min(vocab_student, vocab_teacher)}], got {vocab_size}"
        )
    # Truncating the weight rows equals truncating the logit columns, and skips the padded matmul.
    student_weight = student_weight[:vocab_size]
    if hasattr(teacher_logits, "rows"):
        pass  # built per chunk at the student's width
    elif teacher_logits is not None:
        teacher_logits = teacher_logits[:, :vocab_size]
    else:
        teacher_weight = teacher_weight[:vocab_size].detach()
    return student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int) -> torch.Tensor:
    """Sum of token CE from hidden states, never forming more than ``chunk_size`` rows of logits.

    Args:
        hidden: shape (N, H), final hidden states of the positions to score.
        weight: shape (V, H), the lm_head weight (cut to the shared vocabulary by the caller).
        targets: shape (N,), the next tokens.
        chunk_size: rows per chunk; each chunk is recomputed in backward (activation
            checkpointing), so only one (chunk_size, V) block of logits is ever alive.

    Returns:
        Scalar fp32 sum over the N tokens.
    """
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            lambda h, t: cross_entropy(h @ weight.T, t, reduction="sum"), hidden[start:end], targets[start:end],
            use_reentrant=False)
    return total
