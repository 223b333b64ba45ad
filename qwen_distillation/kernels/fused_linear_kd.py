"""Triton fused-linear distillation loss: CE + forward KL / reverse KL / generalised JSD.

The reference for every number here is :class:`qwen_distillation.losses.chunked.TorchFusedLinearKD`
(plain torch, chunked) and, below it, the full-logits functions of ``losses/logit.py``; the
dispatcher :func:`qwen_distillation.losses.fused.fused_linear_kd` chooses between them.

Per chunk of ``chunk_size`` tokens:

1. two cuBLAS matmuls form the student and teacher logits ``[c, V]`` in the input dtype
   (bf16 on a GPU: the tensor cores; fp32 accumulation inside the GEMM);
2. one Triton program per row streams both rows in blocks of ``BLOCK`` columns and keeps
   online log-sum-exp statistics (student at T, teacher at T, student at T = 1 for CE) and
   the divergence's running sum, all in fp32 registers: the divergence and CE of the row are
   known after one pass (two for JSD, whose mixture needs both normalisers first);
3. a last pass over the row writes ``d loss / d student_logits`` over the student logits,
   in place, in the input dtype;
4. two more matmuls turn that gradient into ``d/d hidden`` (this chunk's rows) and
   ``d/d lm_head weight`` (accumulated).

So the full ``[tokens, vocab]`` logits never exist, no fp32 copy of a chunk's logits is ever
made (the statistics are per row), and backward only scales the stored gradients. Memory above
the inputs: two ``[c, V]`` buffers in the input dtype, one ``[N, H_s]`` and one ``[V, H_s]``
gradient.

Gradients with respect to the raw student logits ``s`` (``s' = s / T``, ``q = softmax(s')``,
``p = softmax(t / T)``, the divergence multiplied by T**2 as in the references):

* CE: ``softmax(s) - onehot(label)``;
* forward KL(p || q) * T**2: ``T * (q - p)``;
* reverse KL(q || p) * T**2: ``T * q * (log q - log p - KL(q || p))``;
* JSD(beta) * T**2 with ``m = beta p + (1 - beta) q``: since
  ``d JSD / d q_i = (1 - beta) log(q_i / m_i)``, it is
  ``T * (1 - beta) * q * (log(q / m) - KL(q || m))``.

beta = 0 and beta = 1 are forward and reverse KL exactly, as in ``generalized_jsd`` (TRL's
convention); the caller maps them before launching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qwen_distillation.kernels import interpreting

try:  # Triton is optional: CPUs use the torch path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

FORWARD_KL, REVERSE_KL, JSD = 0, 1, 2
KIND_CODES = {"forward_kl": FORWARD_KL, "reverse_kl": REVERSE_KL, "jsd": JSD}


@dataclass(frozen=True)
class KDOptions:
    """Everything a fused-linear KD computation needs besides its tensors, for every kernel.

    kind: the divergence (``losses.logit.DIVERGENCES``; the Triton kernel: ``KIND_CODES``).
    temperature: T of the divergence (CE is at T = 1); the divergence is multiplied by T**2.
    ce_weight, kd_weight: ``loss = ce_weight * CE + kd_weight * KD``.
    chunk_size: tokens whose logits exist at once.
    ignore_index: label of masked tokens.
    beta: JSD mixture weight; alpha: skew of the skew-KL kinds (torch only).
    reduction: ``sum`` over valid tokens or ``mean`` per valid token.
    kernel: the implementation that runs, already resolved: ``triton``, ``liger`` or ``torch``.
    """

    kind: str = "forward_kl"
    temperature: float = 1.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    chunk_size: int = 1024
    ignore_index: int = -100
    beta: float = 0.5
    alpha: float = 0.1
    reduction: str = "sum"
    kernel: str = "torch"


def triton_available() -> bool:
    return triton is not None


if triton is not None:

    def _kd_rows(
        s_ptr, s_stride, t_ptr, t_stride, labels_ptr, ce_ptr, kd_ptr,
        V: tl.constexpr, inv_t, temperature, ce_scale, kd_scale, beta, log_beta, log_1m_beta, ignore_index,
        KIND: tl.constexpr, HAS_CE: tl.constexpr, HAS_KD: tl.constexpr, T_IS_ONE: tl.constexpr,
        CE_POW: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One row of ``[c, V]`` student logits ``s_ptr`` (overwritten with the gradient when
        WRITE_GRAD) and teacher logits ``t_ptr``; writes the row's CE and T**2-scaled
        divergence (unweighted, unscaled) to ``ce_ptr`` / ``kd_ptr``.

        CE_POW = k > 1 when T is the integer k: the CE's terms are then powers of the divergence's,
        ``exp(s - k * m) = exp(s / T - m) ** k`` with the student's running max ``m`` of ``s / T``,
        so the CE costs multiplies instead of a second ``exp`` per logit in each pass."""
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        label = tl.load(labels_ptr + row)
        offs = tl.arange(0, BLOCK)
        neg_inf = float("-inf")
        if label == ignore_index:
            if WRITE_GRAD:
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    tl.store(s_row + cols, tl.zeros([BLOCK], dtype=s_ptr.dtype.element_ty), mask=cols < V)
            tl.store(ce_ptr + row, 0.0)
            tl.store(kd_ptr + row, 0.0)
        else:
            # ---- pass 1: online log-sum-exp of s/T, t/T, s (CE) and the KL's running sum
            m_s = tl.full((), neg_inf, tl.float32)
            d_s = tl.zeros((), tl.float32)
            m_c = tl.full((), neg_inf, tl.float32)
            d_c = tl.zeros((), tl.float32)
            m_t = tl.full((), neg_inf, tl.float32)
            d_t = tl.zeros((), tl.float32)
            acc = tl.zeros((), tl.float32)
            for start in range(0, V, BLOCK):
                cols = start + offs
                mask = cols < V
                s = tl.load(s_row + cols, mask=mask, other=neg_inf).to(tl.float32)
                if T_IS_ONE:
                    s_t = s
                else:
                    s_t = s * inv_t
                new_m_s = tl.maximum(m_s, tl.max(s_t, axis=0))
                e_s = tl.exp(s_t - new_m_s)
                scale_s = tl.exp(m_s - new_m_s)
                d_s = d_s * scale_s + tl.sum(e_s, axis=0)
                if HAS_CE:
                    if CE_POW > 1:
                        e_c = e_s
                        scale_c = scale_s
                        for _ in tl.static_range(CE_POW - 1):
                            e_c = e_c * e_s
                            scale_c = scale_c * scale_s
                        d_c = d_c * scale_c + tl.sum(e_c, axis=0)
                    elif not T_IS_ONE:
                        new_m_c = tl.maximum(m_c, tl.max(s, axis=0))
                        d_c = d_c * tl.exp(m_c - new_m_c) + tl.sum(tl.exp(s - new_m_c), axis=0)
                        m_c = new_m_c
                if HAS_KD:
                    t_t = tl.load(t_row + cols, mask=mask, other=neg_inf).to(tl.float32)
                    if not T_IS_ONE:
                        t_t = t_t * inv_t
                    new_m_t = tl.maximum(m_t, tl.max(t_t, axis=0))
                    e_t = tl.exp(t_t - new_m_t)
                    scale_t = tl.exp(m_t - new_m_t)
                    d_t = d_t * scale_t + tl.sum(e_t, axis=0)
                    diff = tl.where(mask, t_t - s_t, 0.0)
                    if KIND == 0:
                        acc = acc * scale_t + tl.sum(e_t * diff, axis=0)
                    elif KIND == 1:
                        acc = acc * scale_s - tl.sum(e_s * diff, axis=0)
                    m_t = new_m_t
                m_s = new_m_s
            lse_s = m_s + tl.log(d_s)
            if T_IS_ONE:
                lse_c = lse_s
            elif CE_POW > 1:
                lse_c = CE_POW * m_s + tl.log(d_c)
            else:
                lse_c = m_c + tl.log(d_c)
            lse_t = m_t + tl.log(d_t)

            ce = tl.zeros((), tl.float32)
            if HAS_CE:
                ce = lse_c - tl.load(s_row + label).to(tl.float32)
            kl = tl.zeros((), tl.float32)
            if HAS_KD:
                if KIND == 0:
                    kl = acc / d_t - lse_t + lse_s
                elif KIND == 1:
                    kl = acc / d_s - lse_s + lse_t
                else:
                    # ---- pass 2 (JSD only): the mixture needs both normalisers first
                    sum_p = tl.zeros((), tl.float32)
                    sum_q = tl.zeros((), tl.float32)
                    for start in range(0, V, BLOCK):
                        cols = start + offs
                        mask = cols < V
                        s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                        log_q = s * inv_t - lse_s
                        log_p = t * inv_t - lse_t
                        a = log_p + log_beta
                        b = log_q + log_1m_beta
                        mx = tl.maximum(a, b)
                        log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                        sum_p += tl.sum(tl.where(mask, tl.exp(log_p) * (log_p - log_m), 0.0), axis=0)
                        sum_q += tl.sum(tl.where(mask, tl.exp(log_q) * (log_q - log_m), 0.0), axis=0)
                    kl = beta * sum_p + (1.0 - beta) * sum_q
                    acc = sum_q  # KL(q || m), needed by the gradient
            tl.store(ce_ptr + row, ce)
            tl.store(kd_ptr + row, kl * temperature * temperature)

            # ---- last pass: d loss / d s, written over the student logits
            if WRITE_GRAD:
                inv_d_s = 1.0 / d_s
                inv_d_c = 1.0 / d_c
                for start in range(0, V, BLOCK):
                    cols = start + offs
                    mask = cols < V
                    s = tl.load(s_row + cols, mask=mask, other=0.0).to(tl.float32)
                    grad = tl.zeros([BLOCK], tl.float32)
                    if CE_POW > 1:
                        # e = exp(s / T - m_s) <= 1: q = e / d_s, and the CE's softmax is e**k / d_c
                        e = tl.exp(s * inv_t - m_s)
                        soft = e
                        for _ in tl.static_range(CE_POW - 1):
                            soft = soft * e
                        soft = soft * inv_d_c
                        grad += ce_scale * tl.where(cols == label, soft - 1.0, soft)
                    elif HAS_CE:
                        soft = tl.exp(s - lse_c)
                        grad += ce_scale * tl.where(cols == label, soft - 1.0, soft)
                    if HAS_KD:
                        t = tl.load(t_row + cols, mask=mask, other=0.0).to(tl.float32)
                        if T_IS_ONE:
                            log_q = s - lse_s
                            log_p = t - lse_t
                        else:
                            log_q = s * inv_t - lse_s
                            log_p = t * inv_t - lse_t
                        if CE_POW > 1:
                            q = e * inv_d_s
                        else:
                            q = tl.exp(log_q)
                        if KIND == 0:
                            grad += (kd_scale * temperature) * (q - tl.exp(log_p))
                        elif KIND == 1:
                            grad += (kd_scale * temperature) * q * (log_q - log_p - kl)
                        else:
                            a = log_p + log_beta
                            b = log_q + log_1m_beta
                            mx = tl.maximum(a, b)
                            log_m = mx + tl.log(tl.exp(a - mx) + tl.exp(b - mx))
                            grad += (kd_scale * temperature * (1.0 - beta)) * q * (log_q - log_m - acc)
                    tl.store(s_row + cols, grad.to(s_ptr.dtype.element_ty), mask=mask)

    _kd_rows_jit = triton.jit(_kd_rows)


def kd_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, *,
            kind: str, temperature: float, ce_scale: float, kd_scale: float, beta: float = 0.5,
            ignore_index: int = -100, write_grad: bool = True, has_ce: bool = True,
            block: int | None = None, num_warps: int | None = None,
            out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the row kernel on one chunk of logits.

    Args:
        student_logits: ``[c, V]`` (last dim contiguous), bf16/fp16/fp32; overwritten with
            ``ce_scale * dCE/ds + kd_scale * dKD/ds`` when ``write_grad``.
        teacher_logits: ``[c, >= V]`` (only the first V columns are read), or None for CE only.
        labels: ``[c]`` int64 targets, ``ignore_index`` where masked (those rows get zero).
        kind: ``forward_kl``, ``reverse_kl`` or ``jsd`` (0 < beta < 1).
        temperature: the divergence's T (CE is at T = 1).
        ce_scale, kd_scale: gradient multipliers (weights, divided by the token count for a mean).
        out: two contiguous fp32 ``[c]`` tensors to write ``(ce, kd)`` into.

    Returns:
        ``(ce, kd)``: fp32 ``[c]`` per-row CE and T**2-scaled divergence, zero on masked rows.
    """
    if kind not in KIND_CODES:
        raise ValueError(f"the Triton kernel implements {sorted(KIND_CODES)}, not {kind!r}")
    rows, vocab = student_logits.shape
    if student_logits.stride(1) != 1 or (teacher_logits is not None and teacher_logits.stride(1) != 1):
        raise ValueError("kd_rows needs logits whose last dimension is contiguous")
    has_kd = teacher_logits is not None
    if out is None:
        out = (torch.empty(rows, dtype=torch.float32, device=student_logits.device),
               torch.empty(rows, dtype=torch.float32, device=student_logits.device))
    ce, kd = out
    if rows == 0:
        return ce, kd
    teacher = teacher_logits if has_kd else student_logits
    interpret = student_logits.device.type == "cpu"
    if interpret and not interpreting():
        raise RuntimeError("the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before importing "
                           "triton, for tests on a CPU); use kernel='torch' on a CPU")
    if block is None:
        # 2,048 columns a block with 4 warps: the fastest of the launch configurations timed on
        # an H100 at V = 151,936 (benchmarks/kd_kernels.py loss --row-configs, docs/performance.md).
        block = min(triton.next_power_of_2(vocab), 256 if interpret else 2048)
    code = KIND_CODES[kind]
    beta_c = min(max(beta, 1e-12), 1 - 1e-12)
    args = (student_logits, student_logits.stride(0), teacher, teacher.stride(0), labels, ce, kd,
            vocab, 1.0 / temperature, float(temperature), float(ce_scale), float(kd_scale), float(beta),
            math.log(beta_c), math.log1p(-beta_c), int(ignore_index))
    # An integer T of 2-8 lets the CE's exponentials be powers of the divergence's (see _kd_rows).
    ce_pow = int(temperature) if has_ce and float(temperature) in (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0) else 0
    meta = dict(KIND=code, HAS_CE=bool(has_ce), HAS_KD=has_kd, T_IS_ONE=float(temperature) == 1.0,
                CE_POW=ce_pow, WRITE_GRAD=bool(write_grad), BLOCK=block)
    if interpret:
        _kd_rows_jit[(rows,)](*args, **meta)
    else:
        _kd_rows_jit[(rows,)](*args, **meta, num_warps=num_warps or 4)
    return ce, kd


def teacher_rows(teacher_logits, start: int, end: int, student_logits: torch.Tensor) -> torch.Tensor:
    """Rows ``start:end`` of the teacher's logits for a chunk whose student logits are
    ``student_logits`` (c, V): a slice of a ``(N, V)`` tensor, or what a *row source* builds for the
    chunk (an object with ``rows(start, end, student_logits) -> (c, V)``, e.g. a cached top-k teacher
    completed with the student's tail, :class:`qwen_distillation.losses.cached.CompletedTopK`); called
    before the kernel overwrites ``student_logits`` with their gradient."""
    if hasattr(teacher_logits, "rows"):
        return teacher_logits.rows(start, end, student_logits)
    return teacher_logits[start:end]


def _matmul_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the projections run in: autocast's when it is on for the tensors' device,
    else the common dtype of the inputs."""
    device_type = tensors[0].device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def _accumulate_weight_grad(grad_weight: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """``grad_weight += grad_logits.T @ hidden``, into an fp32 accumulator without a
    parameter-sized temporary where cuBLAS allows it (bf16/fp16 operands on CUDA)."""
    if grad_weight.dtype == grad_logits.dtype:
        grad_weight.addmm_(grad_logits.T, hidden)
    elif grad_weight.device.type == "cuda" and grad_weight.dtype == torch.float32:
        torch.addmm(grad_weight, grad_logits.T, hidden, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight += (grad_logits.T @ hidden).to(grad_weight.dtype)


class TritonFusedLinearKD(torch.autograd.Function):
    """``w_ce * CE + w_kd * KD`` from hidden states, gradients computed in the forward pass.

    Inputs are already flattened to tokens and truncated to the shared vocabulary (see
    :func:`qwen_distillation.losses.fused.fused_linear_kd`); ``options`` is a :class:`KDOptions`
    (``alpha`` and ``kernel`` unused). Returns ``(loss, ce, kd)``, the last two detached, each
    summed over valid tokens or averaged per valid token.

    Nothing here waits for the GPU: the token count of a mean stays a device tensor and scales
    the stored gradients in backward.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels,
                options):
        kind, temperature, ce_weight, kd_weight = (options.kind, options.temperature, options.ce_weight,
                                                   options.kd_weight)
        chunk_size, ignore_index, beta = options.chunk_size, options.ignore_index, options.beta
        need_grad = student_hidden.requires_grad or student_weight.requires_grad
        dtype = _matmul_dtype(student_hidden, student_weight)
        hidden = student_hidden.detach().to(dtype)
        weight = student_weight.detach().to(dtype)
        has_kd = kd_weight != 0 and (teacher_logits is not None or teacher_hidden is not None)
        t_hidden = t_weight = None
        if has_kd and teacher_logits is None:
            t_dtype = _matmul_dtype(teacher_hidden, teacher_weight)
            t_hidden, t_weight = teacher_hidden.detach().to(t_dtype), teacher_weight.detach().to(t_dtype)
        num_tokens = hidden.shape[0]
        ce_rows = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        kd_rows_ = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        # The weight gradient accumulates in the weight's own dtype (fp32 master weights: fp32;
        # pure bf16 training: bf16, as Liger does), which keeps its memory at one weight's size.
        acc_dtype = student_weight.dtype
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_grad else None
        for start in range(0, num_tokens, chunk_size):
            end = min(start + chunk_size, num_tokens)
            logits = hidden[start:end] @ weight.T
            t_logits = None
            if has_kd:
                t_logits = (teacher_rows(teacher_logits, start, end, logits) if teacher_logits is not None
                            else t_hidden[start:end] @ t_weight.T)
            kd_rows(logits, t_logits, labels[start:end], kind=kind, temperature=temperature, ce_scale=ce_weight,
                    kd_scale=kd_weight, beta=beta, ignore_index=ignore_index, write_grad=need_grad,
                    out=(ce_rows[start:end], kd_rows_[start:end]))
            del t_logits
            if need_grad:
                torch.mm(logits, weight, out=grad_hidden[start:end])
                _accumulate_weight_grad(grad_weight, logits, hidden[start:end])
            del logits
        scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        if options.reduction == "mean":
            scale = 1.0 / (labels != ignore_index).sum().clamp(min=1).float()
        ce_total = ce_rows.sum() * scale
        kd_total = kd_rows_.sum() * scale
        loss = ce_weight * ce_total + kd_weight * kd_total
        if need_grad:
            ctx.save_for_backward(grad_hidden.to(student_hidden.dtype), grad_weight.to(student_weight.dtype), scale)
        ctx.need_grad = need_grad
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        if not ctx.need_grad:
            return (None,) * 7
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        factor = grad_loss * scale
        return (grad_hidden * factor.to(grad_hidden.dtype), grad_weight * factor.to(grad_weight.dtype),
                None, None, None, None, None)
