"""One entry point for the fused-linear distillation loss, whichever kernel computes it.

``kernel`` (the ``loss.kernel`` config field):

* ``torch``: :class:`qwen_distillation.losses.chunked.TorchFusedLinearKD`, plain torch chunks;
  runs everywhere and is the reference;
* ``triton``: :class:`qwen_distillation.kernels.fused_linear_kd.TritonFusedLinearKD`, cuBLAS
  projections and one Triton pass per row for the loss and its gradient (CUDA);
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSDFunction`` (forward KL, reverse KL and JSD
  only; for comparison), adapted to this project's conventions (divergence times T**2, sums);
* ``auto``: ``triton`` on a CUDA device when Triton is importable and the divergence is one it
  implements, else ``torch``.

:func:`kd_options` checks the options and resolves the kernel once (a training stage does this
at start-up); :func:`apply_fused_kd` runs a resolved :class:`KDOptions` on tensors; and
:func:`fused_linear_kd` does both per call. All return the same thing: ``(loss, {"ce": ..,
"kd": ..})`` with ``loss = ce_weight * CE + kd_weight * KD``; CE at T = 1 over the first
``vocab_size`` student columns; KD = ``divergence(kind, .., temperature=T)`` (already multiplied
by T**2); both summed over valid tokens (``reduction="sum"``) or averaged (``"mean"``).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
from torch import nn

from qwen_distillation.kernels import interpreting
from qwen_distillation.kernels.fused_linear_kd import KIND_CODES, KDOptions, TritonFusedLinearKD, triton_available
from qwen_distillation.losses.chunked import TorchFusedLinearKD, prepare_fused_inputs
from qwen_distillation.losses.logit import DIVERGENCES, REDUCTIONS

KERNELS = ("auto", "triton", "liger", "torch")
TRITON_KINDS = frozenset(KIND_CODES)


def _triton_runs_on(device: torch.device, allow_interpreter: bool) -> bool:
    return triton_available() and (device.type == "cuda" or (allow_interpreter and interpreting()))


def resolve_kernel(kernel: str, device: torch.device | str, kind: str, *, allow_interpreter: bool = False) -> str:
    """The kernel that will run: ``auto`` resolved, the others checked. The one place that
    decides which divergence each kernel can compute on which device.

    ``allow_interpreter`` lets ``triton`` run on CPU tensors under ``TRITON_INTERPRET=1``
    (tests of the kernel's code on small shapes; far too slow for training).

    Raises:
        ValueError: unknown name, or a kernel that cannot run ``kind`` on ``device`` (the
            message names ``loss.kernel`` / ``loss.kd`` and says which setting to change).
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


def kd_options(*, kind: str = "forward_kl", temperature: float = 1.0, ce_weight: float = 0.5,
               kd_weight: float = 0.5, chunk_size: int = 1024, ignore_index: int = -100, beta: float = 0.5,
               alpha: float = 0.1, reduction: str = "sum", kernel: str = "auto",
               device: torch.device | str = "cpu", allow_interpreter: bool = False) -> KDOptions:
    """Checked :class:`KDOptions` with ``kernel`` resolved for ``device`` (see
    :func:`resolve_kernel`). Raises ValueError on an unknown divergence or reduction, a chunk
    size below 1, or a JSD ``beta`` outside [0, 1]."""
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; valid names: {sorted(DIVERGENCES)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
    kernel = resolve_kernel(kernel, device, kind, allow_interpreter=allow_interpreter)
    return KDOptions(kind=kind, temperature=float(temperature), ce_weight=float(ce_weight),
                     kd_weight=float(kd_weight), chunk_size=int(chunk_size), ignore_index=int(ignore_index),
                     beta=float(beta), alpha=float(alpha), reduction=reduction, kernel=kernel)


def _liger_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, options: KDOptions):
    from liger_kernel.chunked_loss.jsd_loss import LigerFusedLinearJSDFunction

    temperature = options.temperature
    liger_beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(options.kind, options.beta)
    # Liger averages over valid tokens and leaves the divergence unscaled by T**2.
    loss, soft, hard = LigerFusedLinearJSDFunction.apply(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, None, None, options.ce_weight,
        options.kd_weight * temperature**2, liger_beta, options.ignore_index, temperature, student_hidden.is_cuda,
        options.chunk_size, True)
    kd = soft.detach() * temperature**2
    ce = hard.detach()
    if options.reduction == "sum":
        count = (labels != options.ignore_index).sum().clamp(min=1)
        loss, ce, kd = loss * count, ce * count, kd * count
    return loss, ce, kd


def apply_fused_kd(options: KDOptions, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                   teacher_hidden: torch.Tensor | None, teacher_weight: torch.Tensor | None, labels: torch.Tensor, *,
                   teacher_logits: torch.Tensor | None = None,
                   vocab_size: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """:func:`fused_linear_kd` with options already checked and the kernel resolved
    (:func:`kd_options`): what a training stage calls for every micro-batch."""
    student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels = prepare_fused_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, teacher_logits=teacher_logits,
        vocab_size=vocab_size)
    if options.kernel == "triton":
        if options.kind == "jsd" and options.beta in (0.0, 1.0):
            # beta = 0 / 1 are exactly forward / reverse KL (TRL's convention, as in generalized_jsd).
            options = dataclasses.replace(options, kind="forward_kl" if options.beta == 0.0 else "reverse_kl")
        loss, ce, kd = TritonFusedLinearKD.apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                 teacher_logits, labels, options)
    elif options.kernel == "liger":
        if teacher_logits is not None:
            raise ValueError("loss.kernel=liger needs teacher hidden states and lm_head weight, not teacher logits")
        loss, ce, kd = _liger_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, options)
    elif options.kernel == "torch":
        num_valid = ((labels != options.ignore_index).sum().clamp(min=1) if options.reduction == "mean" else None)
        loss, ce, kd = TorchFusedLinearKD.apply(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                teacher_logits, labels, options, num_valid)
    else:
        raise ValueError(f"KDOptions.kernel={options.kernel!r}: resolve it first with kd_options()")
    return loss, {"ce": ce, "kd": kd}


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
    options = kd_options(kind=kind, temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                         chunk_size=chunk_size, ignore_index=ignore_index, beta=beta, alpha=alpha,
                         reduction=reduction, kernel=kernel, device=student_hidden.device, allow_interpreter=True)
    return apply_fused_kd(options, student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                          teacher_logits=teacher_logits, vocab_size=vocab_size)


def chunked_kd_loss(*args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The plain-torch path of :func:`fused_linear_kd` (same arguments, ``kernel="torch"``):
    ``ce_weight * CE + kd_weight * KD`` computed ``chunk_size`` tokens at a time.

    Equal in value and gradient to projecting all tokens at once, truncating both logits to
    their first ``vocab_size`` columns and calling :func:`cross_entropy` and
    ``divergence(kind, ..)`` on the result, for every divergence of ``DIVERGENCES``. The CE
    therefore also uses only the first ``vocab_size`` student columns, so both terms see the
    same support (labels must be < vocab_size).
    """
    return fused_linear_kd(*args, kernel="torch", **kwargs)


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
