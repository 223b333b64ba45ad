"""Sparse top-k KD losses (qwen_distillation.losses.topk): equal to the dense losses when the
top-k covers the vocabulary, equal to the stated approximation below it, masking, reductions,
gradients and argument errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_distillation.losses import (
    DIVERGENCES,
    TOPK_DIVERGENCES,
    divergence,
    sparse_logprobs,
    teacher_topk,
    topk_divergence,
    topk_divergence_from_logprobs,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_reverse_kl,
)
from qwen_distillation.losses.topk import LOG_ZERO

pytestmark = pytest.mark.usefixtures("single_thread")

IGNORE = -100
# (name, beta): the dense divergence of the same name (beta for jsd only).
CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.5), ("jsd", 1.0)]
TEMPERATURES = [1.0, 2.0, 4.0]
TAILS = ["renormalize", "bucket"]


def _inputs(shape=(2, 3), vocab=11, seed=0, scale=2.0, dtype=torch.float64):
    """Student (requires grad) and teacher logits (*shape, vocab), labels with two masked positions."""
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, vocab, generator=gen, dtype=dtype) * scale).requires_grad_()
    teacher = torch.randn(*shape, vocab, generator=gen, dtype=dtype) * scale
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels.view(-1)[1] = IGNORE
    labels.view(-1)[-1] = IGNORE
    return student, teacher, labels


def _cache(teacher, k, shuffle_seed=None):
    """teacher_topk, optionally with the k ids of each row in a random order."""
    entry = teacher_topk(teacher, k)
    if shuffle_seed is None:
        return entry
    gen = torch.Generator().manual_seed(shuffle_seed)
    order = torch.argsort(torch.rand(entry.ids.shape, generator=gen), dim=-1)
    return entry._replace(ids=entry.ids.gather(-1, order), logprobs=entry.logprobs.gather(-1, order))


def _sparse(kind, beta, student, entry, labels, **kwargs):
    return topk_divergence(kind, student, entry.ids, entry.logprobs, labels, teacher_tail_logmass=entry.tail_logmass,
                           beta=beta, **kwargs)


def _grad(loss, student):
    (grad,) = torch.autograd.grad(loss, student)
    return grad


# ------------------------------------------------------------------ k = V: the dense losses


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta", CASES)
def test_full_vocabulary_equals_dense_loss_and_gradient(kind, beta, temperature, tail):
    student, teacher, labels = _inputs()
    entry = _cache(teacher, teacher.shape[-1], shuffle_seed=1)  # ids in no particular order
    dense = divergence(kind, student, teacher, labels, temperature=temperature, beta=beta)
    sparse = _sparse(kind, beta, student, entry, labels, temperature=temperature, tail=tail)
    assert dense.item() > 0.05  # a loss well above float noise
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(sparse, student), _grad(dense, student), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,fn,kwargs", [("forward_kl", topk_forward_kl, {}), ("reverse_kl", topk_reverse_kl, {}),
                                            ("jsd", topk_generalized_jsd, {"beta": 0.3})])
def test_named_functions_equal_the_dispatcher_and_the_dense_loss(name, fn, kwargs):
    student, teacher, labels = _inputs(dtype=torch.float32)
    entry = teacher_topk(teacher, teacher.shape[-1])
    ids32 = entry.ids.to(torch.int32)  # the cache may store int32 ids
    value = fn(student, ids32, entry.logprobs, labels, teacher_tail_logmass=entry.tail_logmass, temperature=2.0,
               **kwargs)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, topk_divergence(name, student, entry.ids, entry.logprobs, labels,
                                                      teacher_tail_logmass=entry.tail_logmass, temperature=2.0,
                                                      **kwargs))
    torch.testing.assert_close(value, divergence(name, student, teacher, labels, temperature=2.0, **kwargs),
                               rtol=1e-5, atol=1e-6)


def test_names_are_those_of_the_dense_losses():
    assert set(TOPK_DIVERGENCES) == {"forward_kl", "reverse_kl", "jsd"} <= set(DIVERGENCES)


# ------------------------------------------------------------------ k < V: the stated approximations


def _completed_teacher(teacher, student, ids):
    """The teacher's T = 1 log-probs with its tail replaced by its own tail mass spread like the
    student's tail (constant): the module docstring's definition of tail='bucket'."""
    log_p, log_q = F.log_softmax(teacher, dim=-1), F.log_softmax(student.detach(), dim=-1)
    in_topk = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, ids, True)
    teacher_tail = torch.logsumexp(log_p.masked_fill(in_topk, -math.inf), dim=-1, keepdim=True)
    student_tail = torch.logsumexp(log_q.masked_fill(in_topk, -math.inf), dim=-1, keepdim=True)
    return torch.where(in_topk, log_p, teacher_tail + log_q - student_tail)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta", CASES)
def test_bucket_is_the_dense_loss_against_the_teacher_completed_by_the_student_tail(kind, beta, temperature):
    """The stated approximation of tail='bucket', pinned for k < V at every T (values and gradients)."""
    student, teacher, labels = _inputs(vocab=13, seed=2)
    entry = _cache(teacher, 4, shuffle_seed=3)
    expected = divergence(kind, student, _completed_teacher(teacher, student, entry.ids), labels,
                          temperature=temperature, beta=beta)
    sparse = _sparse(kind, beta, student, entry, labels, temperature=temperature, tail="bucket")
    dense = divergence(kind, student, teacher, labels, temperature=temperature, beta=beta)
    assert abs(sparse.item() - dense.item()) > 1e-3  # it is an approximation
    torch.testing.assert_close(sparse, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(sparse, student), _grad(expected, student), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta", CASES)
def test_renormalize_is_the_dense_loss_over_the_topk_columns(kind, beta, temperature):
    student, teacher, labels = _inputs(vocab=13, seed=3)
    entry = _cache(teacher, 5, shuffle_seed=4)
    expected = divergence(kind, student.gather(-1, entry.ids), teacher.gather(-1, entry.ids), labels,
                          temperature=temperature, beta=beta)
    sparse = _sparse(kind, beta, student, entry, labels, temperature=temperature, tail="renormalize")
    torch.testing.assert_close(sparse, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(_grad(sparse, student), _grad(expected, student), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind,beta", CASES)
def test_bucket_at_temperature_one_is_a_lower_bound_of_the_dense_loss(kind, beta):
    """Merging the tail into one outcome can only lose divergence (data processing inequality)."""
    student, teacher, labels = _inputs(vocab=13, seed=5)
    for k in (1, 4, 11):  # k = 12 leaves a one-token tail, which loses nothing
        sparse = _sparse(kind, beta, student, _cache(teacher, k), labels, tail="bucket", reduction="sum")
        dense = divergence(kind, student, teacher, labels, beta=beta, reduction="sum")
        assert sparse.item() < dense.item()


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_a_student_equal_to_the_teacher_has_zero_loss_and_gradient(tail, temperature):
    """At every T, not only at T = 1 (a teacher tail estimated apart from the student's would not give this)."""
    _, teacher, labels = _inputs(vocab=13, seed=6)
    student = teacher.clone().requires_grad_()
    for kind, beta in CASES:
        loss = _sparse(kind, beta, student, _cache(teacher, 3), labels, temperature=temperature, tail=tail)
        assert abs(loss.item()) < 1e-12
        assert _grad(loss, student).abs().max().item() < 1e-12


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_bucket_error_shrinks_as_k_grows_on_peaked_logits(temperature):
    gen = torch.Generator().manual_seed(7)
    vocab = 512
    # Peaked, Zipf-like teacher (logit ~ -1.5 log rank, shuffled) and a student near it.
    ranks = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(64)]) + 1.0
    teacher = (-1.5 * ranks.double().log()).reshape(8, 8, vocab)
    student = teacher + 0.7 * torch.randn(teacher.shape, generator=gen, dtype=torch.float64)
    labels = torch.zeros(8, 8, dtype=torch.long)
    dense = divergence("forward_kl", student, teacher, labels, temperature=temperature)
    errors = [abs(_sparse("forward_kl", 0.5, student, _cache(teacher, k), labels, temperature=temperature,
                          tail="bucket").item() - dense.item()) / dense.item() for k in (8, 32, 128, 511)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3 < errors[0]


# ------------------------------------------------------------------ the cache entry


def test_teacher_topk_format_and_an_exact_tiny_tail():
    logits = torch.tensor([[0.0, -1.0, -2.0, -40.0, -41.0], [3.0, 1.0, 2.0, 0.0, -1.0]])
    entry = teacher_topk(logits, 3)
    assert entry.ids.dtype == torch.int64
    assert entry.ids.tolist() == [[0, 1, 2], [0, 2, 1]]  # most probable first
    torch.testing.assert_close(entry.logprobs, F.log_softmax(logits, -1).gather(-1, entry.ids))
    # Row 0's tail holds ~1e-17 of the mass: 1 - sum(exp(logprobs)) is only fp32 rounding there.
    exact_tail = torch.logsumexp(F.log_softmax(logits.double(), -1)[:, 3:].gather(
        -1, torch.tensor([[0, 1], [1, 0]])), -1)
    torch.testing.assert_close(entry.tail_logmass.double(), exact_tail, rtol=1e-6, atol=0)
    assert entry.tail_logmass[0].item() < -38
    full = teacher_topk(logits, 5)
    assert (full.tail_logmass == LOG_ZERO).all()


def test_sparse_logprobs_path_equals_the_logits_path():
    """What a fused kernel would supply (sparse_logprobs of the student) gives the same loss and
    gradient as the student logits."""
    student, teacher, labels = _inputs(vocab=13, seed=8)
    entry = _cache(teacher, 4)
    for tail in TAILS:
        from_logprobs = topk_divergence_from_logprobs(
            "jsd", sparse_logprobs(student, entry.ids, 2.0), entry.logprobs, labels,
            teacher_tail_logmass=entry.tail_logmass, temperature=2.0, tail=tail, beta=0.3)
        from_logits = _sparse("jsd", 0.3, student, entry, labels, temperature=2.0, tail=tail)
        torch.testing.assert_close(from_logprobs, from_logits, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(_grad(from_logprobs, student), _grad(from_logits, student), rtol=1e-10,
                                   atol=1e-14)


def test_sparse_logprobs_tempered_tail():
    logits = torch.tensor([[2.0, 0.5, -1.0, -3.0, 0.0]], dtype=torch.float64)
    ids = torch.tensor([[0, 4]])
    out = sparse_logprobs(logits, ids, 3.0)
    q = F.softmax(logits, -1)[0]
    torch.testing.assert_close(out.topk, q[[0, 4]].log().unsqueeze(0))
    torch.testing.assert_close(out.tail, q[[1, 2, 3]].sum().log().reshape(1))
    torch.testing.assert_close(out.tempered_tail, (q[[1, 2, 3]] ** (1 / 3)).sum().log().reshape(1))
    assert torch.equal(sparse_logprobs(logits, ids).tempered_tail, sparse_logprobs(logits, ids).tail)


# ------------------------------------------------------------------ masking and reductions


@pytest.mark.parametrize("tail", TAILS)
def test_masked_rows_may_hold_anything(tail):
    student, teacher, labels = _inputs(vocab=13, seed=9)
    entry = _cache(teacher, 4)
    valid = labels != IGNORE
    poisoned_student = torch.where(valid.unsqueeze(-1), student, torch.nan)
    ids = torch.where(valid.unsqueeze(-1), entry.ids, -1)  # padding ids out of range
    logprobs = torch.where(valid.unsqueeze(-1), entry.logprobs, torch.nan)
    tail_logmass = torch.where(valid, entry.tail_logmass, torch.nan)
    loss = topk_divergence("reverse_kl", poisoned_student, ids, logprobs, labels, teacher_tail_logmass=tail_logmass,
                           temperature=2.0, tail=tail)
    rows = topk_divergence("reverse_kl", student[valid], entry.ids[valid], entry.logprobs[valid], labels[valid],
                           teacher_tail_logmass=entry.tail_logmass[valid], temperature=2.0, tail=tail)
    torch.testing.assert_close(loss, rows, rtol=1e-12, atol=1e-14)
    grad = _grad(loss, student)
    assert torch.isfinite(grad).all()
    assert (grad[~valid] == 0).all() and (grad[valid] != 0).any()


@pytest.mark.parametrize("tail", TAILS)
def test_all_masked_gives_zero_with_a_graph(tail):
    student, teacher, _ = _inputs(vocab=13, seed=10, dtype=torch.float32)
    entry = _cache(teacher, 4)
    labels = torch.full(student.shape[:-1], IGNORE)
    for kind, beta in CASES:
        loss = _sparse(kind, beta, student, entry, labels, temperature=2.0, tail=tail)
        assert loss.item() == 0.0 and loss.requires_grad
        grad = _grad(loss, student)
        assert (grad == 0).all()


@pytest.mark.parametrize("tail", TAILS)
def test_sum_is_mean_times_valid_tokens(tail):
    student, teacher, labels = _inputs(vocab=13, seed=11)
    entry = _cache(teacher, 4)
    mean = _sparse("forward_kl", 0.5, student, entry, labels, temperature=2.0, tail=tail)
    total = _sparse("forward_kl", 0.5, student, entry, labels, temperature=2.0, tail=tail, reduction="sum")
    torch.testing.assert_close(total, mean * (labels != IGNORE).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("tail,temperature", [("renormalize", 2.0), ("bucket", 1.0)])
def test_gradcheck_fp64(tail, temperature):
    """The gradient is the derivative of the value. Not so for bucket at T != 1, where the teacher's
    tail borrows the student's shape as a constant: that gradient is pinned against the dense
    loss with the completed teacher above."""
    student, teacher, labels = _inputs(shape=(3,), vocab=7, seed=12)
    entry = _cache(teacher, 3)
    for kind, beta in CASES:
        assert torch.autograd.gradcheck(
            lambda s: _sparse(kind, beta, s, entry, labels, temperature=temperature, tail=tail), (student,))


def test_low_precision_logits_are_upcast():
    student, teacher, labels = _inputs(vocab=13, seed=13, dtype=torch.float32)
    entry = _cache(teacher, 4)
    low = _sparse("forward_kl", 0.5, student.detach().bfloat16(), entry._replace(
        logprobs=entry.logprobs.bfloat16(), tail_logmass=entry.tail_logmass.bfloat16()), labels, tail="bucket")
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, _sparse("forward_kl", 0.5, student, entry, labels, tail="bucket"),
                               rtol=2e-2, atol=1e-3)


# ------------------------------------------------------------------ argument errors


def test_bad_arguments_raise_clear_value_errors():
    student, teacher, labels = _inputs(vocab=13, seed=14)
    entry = _cache(teacher, 4)
    tail = entry.tail_logmass

    def call(ids=entry.ids, logprobs=entry.logprobs, **kwargs):
        kwargs.setdefault("teacher_tail_logmass", tail)
        return topk_forward_kl(student, ids, logprobs, labels, **kwargs)

    too_many = torch.arange(14).expand(*labels.shape, 14)
    with pytest.raises(ValueError, match=r"k=14 ids .* vocabulary has 13 columns"):
        call(ids=too_many, logprobs=torch.zeros(too_many.shape, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"teacher_topk_ids shape \(3, 2, 4\) must be"):
        call(ids=entry.ids.transpose(0, 1))
    with pytest.raises(ValueError, match="teacher_topk_logprobs shape .* must equal teacher_topk_ids shape"):
        call(logprobs=entry.logprobs[..., :3])
    with pytest.raises(ValueError, match="integer token ids"):
        call(ids=entry.ids.double())
    with pytest.raises(ValueError, match=r"tail must be one of \('renormalize', 'bucket'\), got 'zero'"):
        call(tail="zero")
    with pytest.raises(ValueError, match="tail='bucket' needs teacher_tail_logmass"):
        call(teacher_tail_logmass=None)
    with pytest.raises(ValueError, match="teacher_tail_logmass shape"):
        call(teacher_tail_logmass=tail[0])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        call(temperature=0.0)
    with pytest.raises(ValueError, match="reduction must be one of"):
        call(reduction="none")
    with pytest.raises(ValueError, match=r"no sparse top-k version of divergence 'tv'"):
        topk_divergence("tv", student, entry.ids, entry.logprobs, labels, teacher_tail_logmass=tail)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 1\]"):
        topk_generalized_jsd(student, entry.ids, entry.logprobs, labels, teacher_tail_logmass=tail, beta=1.5)
    with pytest.raises(ValueError, match=r"k must be in \[1, 13\]"):
        teacher_topk(teacher, 14)
    # Without a tail, renormalize still works.
    assert call(teacher_tail_logmass=None, tail="renormalize").item() > 0
