"""One entry point for the fused-linear distillation loss, whichever kernel computes it.

``kernel`` (the ``loss.kernel`` config field):

* ``torch``: :func:`qwen_distillation.losses.chunked.chunked_kd_loss`, plain torch chunks; runs
  everywhere and is the reference;
* ``triton``: :class:`qwen_distillation.losses.triton_kd.TritonFusedLinearKD`, cuBLAS
  projections and one Triton pass per row for the loss and its gradient (CUDA);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDFunction`` (forward KL, reverse KL and JSD
  only; for comparison), adapted to this project's conventions (divergence times T**2, sums);
* ``auto``: ``triton`` on a CUDA device when Triton is importable and the divergence is one it
  implements, else ``torch``.

All of them return the same thing: ``(loss, {"ce": .., "kd": ..})`` with
``loss = ce_weight * CE + kd_weight * KD``; CE at T = 1 over the first ``vocab_size`` student
columns; KD = ``divergence(kind, .., temperature=T) `` (already multiplied by T**2); both summed
over valid tokens (``reduction="sum"``) or averaged (``"mean"``).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from qwen_distillation.losses.chunked import _FusedLinearKD, prepare_fused_inputs
from qwen_distillation.losses.triton_kd import KIND_CODES, TritonFusedLinearKD, triton_available

KERNELS = ("auto", "triton", "liger", "torch")
TRITON_KINDS = frozenset(KIND_CODES)


def _triton_runs_on(device: torch.device, allow_interpreter: bool) -> bool:
    interpreting = allow_interpreter and os.environ.get("TRITON_INTERPRET") == "1"
    return triton_available() and (device.type == "cuda" or interpreting)


def resolve_kernel(kernel: str, device: torch.device | str, kind: str, *, allow_interpreter: bool = False) -> str:
    """The kernel that will run: ``auto`` resolved, the others checked.

    ``allow_interpreter`` lets ``triton`` run on CPU tensors under ``TRITON_INTERPRET=1``
    (tests of the kernel's code on small shapes; far too slow for training).

    Raises:
        ValueError: unknown name, or a kernel that cannot run ``kind`` on ``device`` (the
            message says which setting to change).
    """
    device = torch.device(device)
    if kernel not in KERNELS:
        raise ValueError(f"loss.kernel={kernel!r} is not one of {list(KERNELS)}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and triton_available() and kind in TRITON_KINDS else "torch"
    if kernel == "triton":
        if kind not in TRITON_KINDS:
            raise ValueError(f"loss.kernel=triton implements loss.kd in {sorted(TRITON_KINDS)}, not {kind!r}; "
                             "use loss.kernel=torch (or auto) for it")
        if not _triton_runs_on(device, allow_interpreter):
            raise ValueError(f"loss.kernel=triton needs a CUDA device and the triton package (running on "
                             f"{device}, triton {'installed' if triton_available() else 'not installed'}); "
                             "use loss.kernel=auto or torch")
    if kernel == "liger":
        if kind not in TRITON_KINDS:
            raise ValueError(f"loss.kernel=liger supports loss.kd in {sorted(TRITON_KINDS)}, not {kind!r}")
        if importlib.util.find_spec("liger_kernel") is None:
            raise ValueError("loss.kernel=liger needs Liger-Kernel: pip install liger-kernel")
    return kernel


def _liger_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, kind, temperature,
                ce_weight, kd_weight, chunk_size, ignore_index, beta, reduction):
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    liger_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(kind, beta)
    # Liger averages over valid tokens and leaves the divergence unscaled by T**2.
    loss, soft, hard = LigerFusedLinearJSDFunction.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, None, None, ce_weight,
        kd_weight * temperature**2, liger_beta, ignore_index, temperature, student_hidden.is_cuda, chunk_size, True)
    kd = soft.detach() * temperature**2
    ce = hard.detach()
    if reduction == "sum":
        count = (labels != ignore_index).sum().clamp(min=1)
        loss, ce, kd = loss * count, ce * count, kd * count
    return loss, ce, kd


def fused_linear_kd(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    ce_weight: float = 0.5,
    kd_weight: float = 0.5,
    vocab_size: int | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    beta: float = 0.5,
    alpha: float = 0.1,
    reduction: str = "sum",
    kernel: str = "auto",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``ce_weight * CE + kd_weight * KD`` from final hidden states, never materialising the
    ``[N, V]`` logits, with the kernel chosen by ``kernel``.

    Args:
        student_hidden: shape (N, H_s) or (..., H_s), the student's final hidden states (after
            the final norm); gets the gradient.
        student_weight: shape (V_s, H_s), the student lm_head weight; gets the gradient.
        teacher_hidden: shape (N, H_t) or (..., H_t), constant; None with ``teacher_logits``.
        teacher_weight: shape (V_t, H_t), constant (a padded vocabulary, e.g. 152,064 rows
            against 151,936, is cut to ``vocab_size``).
        labels: shape (N,) or (...), int64, shifted for next-token prediction, ``ignore_index``
            where masked; must be < ``vocab_size`` elsewhere.
        teacher_logits: shape (N, V_t), precomputed teacher logits instead of hidden + weight.
        kind: ``forward_kl`` = KL(p_teacher || q_student), ``reverse_kl`` = KL(q || p), ``jsd``
            (generalised, mixture ``beta p + (1 - beta) q``) with any kernel; the other
            ``DIVERGENCES`` with ``kernel="torch"`` (and ``auto``, which then picks torch).
        temperature: T of the divergence (CE is at T = 1); the divergence is multiplied by T**2.
        ce_weight, kd_weight: term weights.
        vocab_size: shared leading vocabulary columns; None requires equal vocabularies.
        chunk_size: tokens per chunk (memory: two ``[chunk_size, V]`` buffers in the input dtype
            for ``triton``).
        beta: JSD mixture weight; alpha: skew of the skew-KL kinds (torch only).
        reduction: ``sum`` over valid tokens or ``mean`` per valid token.
        kernel: ``auto``, ``triton``, ``liger`` or ``torch`` (see the module docstring).

    Returns:
        ``(loss, {"ce": ce, "kd": kd})``: scalar loss with a gradient to the student's hidden
        states and weight, and the two unweighted terms, detached.
    """
    student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels = prepare_fused_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, teacher_logits=teacher_logits,
        kind=kind, vocab_size=vocab_size, chunk_size=chunk_size, reduction=reduction)
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    name = resolve_kernel(kernel, student_hidden.device, kind, allow_interpreter=True)
    if name == "triton":
        # beta = 0 / 1 are exactly forward / reverse KL (TRL's convention, as in generalized_jsd).
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, kind) if kind == "jsd" else kind
        loss, ce, kd = TritonFusedLinearKD.apply(
            student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels,
            (kind, float(temperature), float(ce_weight), float(kd_weight), int(chunk_size), int(ignore_index),
             float(beta), reduction))
    elif name == "liger":
        if teacher_logits is not None:
            raise ValueError("loss.kernel=liger needs teacher hidden states and lm_head weight, not teacher logits")
        loss, ce, kd = _liger_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                   kind=kind, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                                   chunk_size=chunk_size, ignore_index=ignore_index, beta=beta, reduction=reduction)
    else:
        num_valid = (labels != ignore_index).sum().clamp(min=1) if reduction == "mean" else None
        loss, ce, kd = _FusedLinearKD.apply(
            student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels,
            (kind, temperature, ce_weight, kd_weight, chunk_size, ignore_index, beta, alpha), num_valid)
    return loss, {"ce": ce, "kd": kd}


class FusedLinearKDLoss(nn.Module):
    """``nn.Module`` form of :func:`fused_linear_kd` with the options fixed at construction.

    Example::

        loss_fn = FusedLinearKDLoss(kind="forward_kl", temperature=2.0, ce_weight=0.5, kd_weight=0.5)
        loss, parts = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden,
                              teacher.lm_head.weight, labels, vocab_size=151936)
    """

    def __init__(self, *, kind: str = "forward_kl", temperature: float = 1.0, ce_weight: float = 0.5,
                 kd_weight: float = 0.5, chunk_size: int = 1024, ignore_index: int = -100, beta: float = 0.5,
                 alpha: float = 0.1, reduction: str = "sum", kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"kernel={kernel!r} is not one of {list(KERNELS)}")
        self.options = dict(kind=kind, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                            chunk_size=chunk_size, ignore_index=ignore_index, beta=beta, alpha=alpha,
                            reduction=reduction, kernel=kernel)

    def forward(self, student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, labels=None, *,
                teacher_logits=None, vocab_size=None):
        if labels is None:
            raise ValueError("labels are required")
        return fused_linear_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                               teacher_logits=teacher_logits, vocab_size=vocab_size, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
