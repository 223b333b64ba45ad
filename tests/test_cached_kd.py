"""The student side of a cached-teacher stage: the ``bucket`` loss through the fused-linear kernels
(torch reference; Triton in its interpreter on a CPU) with the completed cached teacher as their
logits equals the checkpointed-chunk reference (:func:`cached_teacher_kd`), values and gradients."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.nn.functional as F

from qwen_distillation.losses.cached import CompletedTopK, cached_teacher_kd
from qwen_distillation.losses.fused import apply_fused_kd, kd_options
from qwen_distillation.losses.topk import teacher_topk

pytestmark = pytest.mark.usefixtures("single_thread")

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
needs_interpreter = pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs the Triton kernel in the interpreter (CPU machines)")
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)]


def _problem(tokens=13, hidden=8, vocab=40, k=5, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(tokens, hidden, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype) * 0.7
    teacher_logits = torch.randn(tokens, vocab, generator=gen, dtype=dtype) * 2.0
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    return student_hidden, weight, targets, teacher_topk(teacher_logits, k)


def test_completed_rows_sum_the_students_mass_outside_the_cached_ids_over_every_chunk():
    student_hidden, weight, _, entry = _problem(dtype=torch.float64)
    logits = student_hidden @ weight.T
    source = CompletedTopK(*entry)
    assert source.student_tail_mass is None
    half = logits.shape[0] // 2
    source.rows(0, half, logits[:half])
    source.rows(half, logits.shape[0], logits[half:])
    expected = 1 - F.softmax(logits, -1).gather(1, entry.ids).sum(-1)  # (N,), exact in fp64
    assert 0.05 < float(expected.mean()) < 0.95  # neither nothing nor everything outside: the test can fail
    torch.testing.assert_close(source.student_tail_mass.double(), expected.sum(), rtol=1e-5, atol=0)


def test_completed_rows_keep_the_cache_and_spread_its_tail_like_the_student():
    student_hidden, weight, _, entry = _problem(dtype=torch.float64)
    logits = student_hidden @ weight.T
    rows = CompletedTopK(*entry).rows(0, logits.shape[0], logits)
    assert rows.dtype == torch.float32 and rows.shape == logits.shape
    torch.testing.assert_close(rows.gather(1, entry.ids).double(), entry.logprobs, rtol=0, atol=1e-6)
    in_topk = torch.zeros_like(logits, dtype=torch.bool).scatter(1, entry.ids, True)
    tail = torch.logsumexp(rows.double().masked_fill(in_topk, -math.inf), dim=-1)
    torch.testing.assert_close(tail, entry.tail_logmass, rtol=0, atol=1e-5)  # the teacher's exact tail mass
    shape = rows.double() - F.log_softmax(logits, -1)  # a constant per row in the tail
    spread = shape.masked_fill(in_topk, -math.inf).max(-1).values - shape.masked_fill(in_topk, math.inf).min(-1).values
    assert spread.abs().max() < 1e-5
    torch.testing.assert_close(torch.logsumexp(rows.double(), -1), torch.zeros(rows.shape[0], dtype=torch.float64),
                               rtol=0, atol=1e-5)


def _run(kernel, kind, beta, temperature, *, chunk_size=4, device="cpu", tokens=13, vocab=40):
    student_hidden, weight, targets, entry = _problem(seed=1, tokens=tokens, vocab=vocab)
    student_hidden, weight, targets = student_hidden.to(device), weight.to(device), targets.to(device)
    entry = type(entry)(*(x.to(device) for x in entry))
    hidden = student_hidden.clone().requires_grad_()
    head = weight.clone().requires_grad_()
    if kernel == "reference":
        ce, kd = cached_teacher_kd(hidden, head, targets, *entry, kind=kind, temperature=temperature, tail="bucket",
                                   beta=beta, chunk_size=chunk_size)
        loss = 0.3 * ce + 0.7 * kd
    else:
        options = kd_options(kind=kind, temperature=temperature, ce_weight=0.3, kd_weight=0.7, beta=beta,
                             chunk_size=chunk_size, kernel=kernel, device=device, allow_interpreter=True)
        loss, parts = apply_fused_kd(options, hidden, head, None, None, targets,
                                     teacher_logits=CompletedTopK(*entry), vocab_size=weight.shape[0])
        ce, kd = parts["ce"], parts["kd"]
    loss.backward()
    return loss.detach(), ce.detach(), kd.detach(), hidden.grad, head.grad


def _assert_same(got, want, tol):
    for name, a, b in zip(("loss", "ce", "kd", "d hidden", "d weight"), got, want):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_fused_torch_path_equals_the_checkpointed_reference(kind, beta, temperature):
    _assert_same(_run("torch", kind, beta, temperature), _run("reference", kind, beta, temperature), 2e-5)


@needs_interpreter
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_triton_kernel_path_equals_the_checkpointed_reference(kind, beta, temperature):
    _assert_same(_run("triton", kind, beta, temperature), _run("reference", kind, beta, temperature), 5e-5)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("kind,beta", CASES)
def test_triton_kernel_on_the_gpu_equals_the_checkpointed_reference(kind, beta, temperature):
    """The compiled kernel, fp32, with rows spanning several column blocks of the kernel."""
    torch.backends.cuda.matmul.allow_tf32 = False
    run = dict(device="cuda", tokens=300, vocab=5000, chunk_size=128)
    _assert_same(_run("triton", kind, beta, temperature, **run), _run("reference", kind, beta, temperature, **run),
                 1e-4)


def test_the_completed_teacher_changes_with_the_student_and_the_row_count_is_checked():
    student_hidden, weight, targets, entry = _problem()
    source = CompletedTopK(*entry)
    a = source.rows(0, 4, student_hidden[:4] @ weight.T)
    b = source.rows(0, 4, (student_hidden[:4] * 2.0) @ weight.T)
    assert not torch.allclose(a, b)  # outside the top-k the rows follow the student's tail
    torch.testing.assert_close(a.gather(1, entry.ids[:4]), b.gather(1, entry.ids[:4]))
    options = kd_options(kernel="torch", device="cpu")
    with pytest.raises(ValueError, match="token counts differ"):
        apply_fused_kd(options, student_hidden[:5], weight, None, None, targets[:5], teacher_logits=source,
                       vocab_size=weight.shape[0])
