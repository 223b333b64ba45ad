"""Unit tests for the pure-torch reference losses (qwen_distillation.losses.logit / .chunked)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen_distillation.losses import (
    DIVERGENCES,
    align_vocab,
    chunked_kd_loss,
    cross_entropy,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
)

KINDS = sorted(DIVERGENCES)
IGNORE = -100


# Tiny tensors: one intra-op thread avoids contention (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- plain-Python references


def _py_softmax(logits: list[float], temperature: float) -> list[float]:
    top = max(logits)
    exps = [math.exp((z - top) / temperature) for z in logits]
    total = sum(exps)
    return [e / total for e in exps]


def _py_kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b))


def _py_divergence(kind: str, student: list[float], teacher: list[float], temperature: float,
                   beta: float = 0.5, alpha: float = 0.1) -> float:
    p = _py_softmax(teacher, temperature)  # teacher
    q = _py_softmax(student, temperature)  # student
    if kind == "forward_kl":
        value = _py_kl(p, q)
    elif kind == "reverse_kl":
        value = _py_kl(q, p)
    elif kind == "jsd":
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
        value = beta * _py_kl(p, m) + (1 - beta) * _py_kl(q, m)
    elif kind == "skew_forward_kl":
        value = _py_kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q)])
    elif kind == "skew_reverse_kl":
        value = _py_kl(q, [alpha * y + (1 - alpha) * x for x, y in zip(p, q)])
    elif kind == "tv":
        value = 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    else:
        raise AssertionError(kind)
    return value * temperature**2


# Two valid tokens over V = 3, plus a masked third token with extreme logits.
STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [80.0, -80.0, 0.0]]
TEACHER = [[2.0, 0.0, 1.0], [0.5, 0.5, -2.0], [-60.0, 0.0, 60.0]]
LABELS = [0, 2, IGNORE]


def _tiny(dtype=torch.float32):
    return (
        torch.tensor(STUDENT, dtype=dtype, requires_grad=True),
        torch.tensor(TEACHER, dtype=dtype),
        torch.tensor(LABELS),
    )


def _random_inputs(shape=(2, 3, 5), dtype=torch.float64, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()
    teacher = torch.randn(*shape, generator=gen, dtype=dtype) * scale
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    labels[0, 0] = IGNORE
    labels[1, 2] = IGNORE
    return student, teacher, labels


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_value_matches_plain_python(kind, temperature, reduction):
    student, teacher, labels = _tiny()
    per_token = [_py_divergence(kind, STUDENT[i], TEACHER[i], temperature, beta=0.3, alpha=0.2) for i in (0, 1)]
    expected = sum(per_token) / (2 if reduction == "mean" else 1)
    got = divergence(kind, student, teacher, labels, temperature=temperature, reduction=reduction,
                     beta=0.3, alpha=0.2)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_squared_factor(kind):
    student, teacher, labels = _tiny()
    got = divergence(kind, student, teacher, labels, temperature=2.0)
    # The same divergence on softmax(z / 2) without the T**2 factor, times 4.
    unscaled = [_py_divergence(kind, [z / 2 for z in STUDENT[i]], [z / 2 for z in TEACHER[i]], 1.0) for i in (0, 1)]
    assert got.item() == pytest.approx(4.0 * sum(unscaled) / 2, rel=1e-5)


def test_closed_form_two_token_vocab():
    # teacher p = (1/2, 1/2), student q = (3/4, 1/4)
    student = torch.tensor([[math.log(3.0), 0.0]])
    teacher = torch.zeros(1, 2)
    labels = torch.tensor([0])
    assert forward_kl(student, teacher, labels).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    assert reverse_kl(student, teacher, labels).item() == pytest.approx(
        0.75 * math.log(1.5) - 0.25 * math.log(2.0), rel=1e-6)
    assert divergence("tv", student, teacher, labels).item() == pytest.approx(0.25, rel=1e-6)
    # jsd(beta=1/2) with m = (5/8, 3/8)
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)) \
        + 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375))
    assert generalized_jsd(student, teacher, labels).item() == pytest.approx(jsd, rel=1e-5)


def test_cross_entropy_matches_plain_python():
    student, _, labels = _tiny()
    expected = [-math.log(_py_softmax(STUDENT[i], 1.0)[LABELS[i]]) for i in (0, 1)]
    assert cross_entropy(student, labels).item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert cross_entropy(student, labels, reduction="sum").item() == pytest.approx(sum(expected), rel=1e-6)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature, beta, alpha", [(1.0, 0.5, 0.1), (2.5, 0.3, 0.4)])
def test_gradcheck_divergences(kind, temperature, beta, alpha):
    student, teacher, labels = _random_inputs()

    def fn(s):
        return divergence(kind, s, teacher, labels, temperature=temperature, beta=beta, alpha=alpha)

    assert torch.autograd.gradcheck(fn, (student,))


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_gradcheck_jsd_end_points(beta):
    student, teacher, labels = _random_inputs()
    assert torch.autograd.gradcheck(lambda s: generalized_jsd(s, teacher, labels, beta=beta), (student,))


def test_gradcheck_cross_entropy():
    student, _, labels = _random_inputs()
    assert torch.autograd.gradcheck(lambda s: cross_entropy(s, labels), (student,))
    assert torch.autograd.gradcheck(lambda s: cross_entropy(s, labels, reduction="sum"), (student,))


def test_teacher_gets_no_gradient():
    student, teacher, labels = _random_inputs()
    teacher.requires_grad_()
    for kind in KINDS:
        divergence(kind, student, teacher, labels).backward()
    assert teacher.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_gradient_survives_large_divergence(kind):
    # Logits differing by 50: the divergence is large, the gradient must still be there (no clamping).
    student = torch.tensor([[0.0, 50.0, 0.0], [50.0, 0.0, -50.0]], requires_grad=True)
    teacher = torch.tensor([[50.0, 0.0, 0.0], [-50.0, 0.0, 50.0]])
    labels = torch.tensor([0, 1])
    loss = divergence(kind, student, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    assert (student.grad.abs().sum(dim=-1) > 0).all()
    if kind in ("forward_kl", "reverse_kl"):
        assert loss.item() > 40.0


def test_forward_kl_gradient_is_q_minus_p_at_large_gap():
    student = torch.tensor([[0.0, 50.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[50.0, 0.0, 0.0]])
    forward_kl(student, teacher, torch.tensor([0]), temperature=2.0).backward()
    # d/dz_s [T^2 KL(p || q)] = T (q - p)
    q = torch.softmax(student.detach() / 2, -1)
    p = torch.softmax(teacher / 2, -1)
    torch.testing.assert_close(student.grad, 2.0 * (q - p))
    assert student.grad.abs().max() > 1.9


# ---------------------------------------------------------------- equivalences


def test_jsd_end_points_are_the_kls():
    student, teacher, labels = _random_inputs()
    for temperature in (1.0, 3.0):
        kw = dict(temperature=temperature)
        torch.testing.assert_close(generalized_jsd(student, teacher, labels, beta=0.0, **kw),
                                   forward_kl(student, teacher, labels, **kw))
        torch.testing.assert_close(generalized_jsd(student, teacher, labels, beta=1.0, **kw),
                                   reverse_kl(student, teacher, labels, **kw))
    # close to the end points the formula is continuous in its own right (and tends to 0)
    assert generalized_jsd(student, teacher, labels, beta=1e-6).item() < 1e-4


def test_jsd_half_is_symmetric():
    student, teacher, labels = _random_inputs()
    torch.testing.assert_close(generalized_jsd(student, teacher, labels, beta=0.5),
                               generalized_jsd(teacher, student.detach(), labels, beta=0.5))
    assert generalized_jsd(student, teacher, labels, beta=0.5).item() <= math.log(2)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kls_match_torch_kl_div(temperature):
    student, teacher, labels = _random_inputs()
    valid = labels != IGNORE
    log_q = F.log_softmax(student[valid] / temperature, -1)
    log_p = F.log_softmax(teacher[valid] / temperature, -1)
    scale = temperature**2
    # F.kl_div(input, target) is KL(target || input): the reverse of the paper's argument order.
    kl_p_q = F.kl_div(log_q, log_p, log_target=True, reduction="sum") * scale
    kl_q_p = F.kl_div(log_p, log_q, log_target=True, reduction="sum") * scale
    n_valid = valid.sum()
    kw = dict(temperature=temperature)
    torch.testing.assert_close(forward_kl(student, teacher, labels, reduction="sum", **kw), kl_p_q)
    torch.testing.assert_close(forward_kl(student, teacher, labels, **kw), kl_p_q / n_valid)
    torch.testing.assert_close(reverse_kl(student, teacher, labels, **kw), kl_q_p / n_valid)


def test_cross_entropy_matches_torch():
    student, _, labels = _random_inputs()
    expected = F.cross_entropy(student.reshape(-1, 5), labels.reshape(-1), ignore_index=IGNORE)
    torch.testing.assert_close(cross_entropy(student, labels), expected)


# ---------------------------------------------------------------- masking and reduction


def _loss_fns():
    fns = {kind: (lambda kind: lambda s, t, y, **kw: divergence(kind, s, t, y, temperature=1.7, **kw))(kind)
           for kind in KINDS}
    fns["cross_entropy"] = lambda s, t, y, **kw: cross_entropy(s, y, **kw)
    return fns


LOSS_FNS = _loss_fns()


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_masked_positions_change_nothing(name):
    fn = LOSS_FNS[name]
    student, teacher, labels = _random_inputs()
    masked = labels == IGNORE
    value = fn(student, teacher, labels)
    (grad,) = torch.autograd.grad(value, student)

    student2 = student.detach().clone()
    teacher2 = teacher.clone()
    student2[masked] = torch.tensor([60.0, -60.0, 0.0, 1e4, -3.0], dtype=student2.dtype)
    teacher2[masked] = torch.tensor([-1e4, 5.0, 60.0, 0.0, 2.0], dtype=teacher2.dtype)
    student2.requires_grad_()
    value2 = fn(student2, teacher2, labels)
    (grad2,) = torch.autograd.grad(value2, student2)

    assert value2.item() == value.item()
    torch.testing.assert_close(grad2[~masked], grad[~masked], rtol=0, atol=0)
    assert (grad2[masked] == 0).all() and (grad[masked] == 0).all()


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_non_finite_masked_positions_do_not_leak(name):
    # e.g. NaN from a fully masked attention row of a padding position
    student, teacher, labels = _random_inputs()
    masked = labels == IGNORE
    value = LOSS_FNS[name](student, teacher, labels)
    (grad,) = torch.autograd.grad(value, student)
    student2 = student.detach().clone()
    teacher2 = teacher.clone()
    student2[masked] = torch.tensor([float("nan"), float("inf"), 0.0, 1.0, -float("inf")], dtype=student2.dtype)
    teacher2[masked] = torch.tensor([-float("inf"), float("nan"), 0.0, float("inf"), 2.0], dtype=teacher2.dtype)
    student2.requires_grad_()
    value2 = LOSS_FNS[name](student2, teacher2, labels)
    (grad2,) = torch.autograd.grad(value2, student2)
    assert value2.item() == value.item()
    assert torch.equal(grad2, grad)


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_masked_is_zero_with_graph(name, reduction, dtype):
    student, teacher, labels = _random_inputs(dtype=torch.float32)
    student = student.detach().to(dtype).requires_grad_()
    labels = torch.full_like(labels, IGNORE)
    value = LOSS_FNS[name](student, teacher.to(dtype), labels, reduction=reduction)
    assert value.requires_grad
    assert value.item() == 0.0
    value.backward()
    assert not torch.isnan(student.grad).any()
    assert (student.grad == 0).all()


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_sum_is_mean_times_valid_tokens(name):
    fn = LOSS_FNS[name]
    student, teacher, labels = _random_inputs()
    n_valid = (labels != IGNORE).sum().item()
    assert n_valid == 4
    torch.testing.assert_close(fn(student, teacher, labels, reduction="sum"),
                               fn(student, teacher, labels, reduction="mean") * n_valid)


@pytest.mark.parametrize("kind", KINDS)
def test_identical_distributions_give_zero(kind):
    student, _, labels = _random_inputs(dtype=torch.float32)
    value = divergence(kind, student, student.detach().clone(), labels, temperature=2.0)
    assert abs(value.item()) < 1e-6


def test_ignore_index_is_respected():
    student, teacher, labels = _random_inputs()
    labels7 = torch.where(labels == IGNORE, torch.full_like(labels, 7), labels)
    torch.testing.assert_close(forward_kl(student, teacher, labels7, ignore_index=7),
                               forward_kl(student, teacher, labels))


# ---------------------------------------------------------------- dtypes


@pytest.mark.parametrize("name", sorted(LOSS_FNS))
def test_bf16_inputs_are_upcast(name):
    fn = LOSS_FNS[name]
    student, teacher, labels = _random_inputs(shape=(3, 7, 33), dtype=torch.float32)
    student_bf16 = student.detach().to(torch.bfloat16)
    teacher_bf16 = teacher.to(torch.bfloat16)
    got = fn(student_bf16, teacher_bf16, labels)
    assert got.dtype == torch.float32
    # Exactly the fp32 computation on the bf16-rounded values ...
    assert got.item() == fn(student_bf16.float(), teacher_bf16.float(), labels).item()
    # ... and close to the fp32 computation on the unrounded values.
    assert got.item() == pytest.approx(fn(student.detach(), teacher, labels).item(), rel=2e-2, abs=1e-3)


# ---------------------------------------------------------------- validation and helpers


def test_shape_errors():
    student, teacher, labels = _random_inputs()
    with pytest.raises(ValueError, match="vocab sizes differ"):
        forward_kl(student, teacher[..., :4], labels)
    with pytest.raises(ValueError, match="token dimensions"):
        forward_kl(student, teacher[:1], labels)
    with pytest.raises(ValueError, match="labels shape"):
        forward_kl(student, teacher, labels[:, :2])
    with pytest.raises(ValueError, match="labels shape"):
        cross_entropy(student, labels[:1])


def test_argument_range_errors():
    student, teacher, labels = _random_inputs()
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(student, teacher, labels, beta=1.5)
    with pytest.raises(ValueError, match="alpha"):
        divergence("skew_forward_kl", student, teacher, labels, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        divergence("skew_reverse_kl", student, teacher, labels, alpha=-0.1)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(student, teacher, labels, temperature=0.0)
    with pytest.raises(ValueError, match="reduction"):
        forward_kl(student, teacher, labels, reduction="batchmean")
    with pytest.raises(ValueError, match="valid names.*forward_kl"):
        divergence("kl", student, teacher, labels)


def test_skew_alpha_zero_is_plain_kl():
    student, teacher, labels = _random_inputs()
    torch.testing.assert_close(divergence("skew_forward_kl", student, teacher, labels, alpha=0.0),
                               forward_kl(student, teacher, labels))
    torch.testing.assert_close(divergence("skew_reverse_kl", student, teacher, labels, alpha=0.0),
                               reverse_kl(student, teacher, labels))


def test_align_vocab_truncates_both():
    student = torch.randn(2, 3, 10)
    teacher = torch.randn(2, 3, 12)
    s, t = align_vocab(student, teacher, 10)
    assert s.shape == t.shape == (2, 3, 10)
    assert torch.equal(t, teacher[..., :10]) and torch.equal(s, student)
    with pytest.raises(ValueError, match="vocab_size"):
        align_vocab(student, teacher, 11)


# ---------------------------------------------------------------- chunked loss


def _reference_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, *, kind,
                  temperature, ce_weight, kd_weight, vocab_size, reduction, beta=0.5, alpha=0.1):
    student_logits, teacher_logits = align_vocab(student_hidden @ student_weight.T,
                                                 teacher_hidden @ teacher_weight.T, vocab_size)
    ce = cross_entropy(student_logits, labels, reduction=reduction)
    kd = divergence(kind, student_logits, teacher_logits, labels, temperature=temperature,
                    reduction=reduction, beta=beta, alpha=alpha)
    return ce_weight * ce + kd_weight * kd, ce, kd


def _hidden_inputs(num_tokens=37, hidden_s=6, hidden_t=10, vocab_s=11, vocab_t=13, seed=0):
    gen = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(num_tokens, hidden_s, generator=gen, dtype=torch.float64).requires_grad_()
    student_weight = torch.randn(vocab_s, hidden_s, generator=gen, dtype=torch.float64).requires_grad_()
    teacher_hidden = torch.randn(num_tokens, hidden_t, generator=gen, dtype=torch.float64)
    # Teacher lm_head is padded (V_t > V_s), like Qwen2.5-7B (152,064) vs 0.5B (151,936).
    teacher_weight = torch.randn(vocab_t, hidden_t, generator=gen, dtype=torch.float64).requires_grad_()
    labels = torch.randint(0, vocab_s - 2, (num_tokens,), generator=gen)
    labels[::5] = IGNORE
    labels[-3:] = IGNORE
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


@pytest.mark.parametrize("kind", KINDS)
# vocab_size 11 = V_s (only the teacher is padded); 9 < V_s (both truncated)
@pytest.mark.parametrize("reduction, vocab_size", [("sum", 11), ("mean", 9)])
def test_chunked_matches_unchunked(kind, reduction, vocab_size):
    inputs = _hidden_inputs()
    kw = dict(kind=kind, temperature=2.0, ce_weight=0.3, kd_weight=0.7, vocab_size=vocab_size,
              reduction=reduction, beta=0.4, alpha=0.2)
    loss, terms = chunked_kd_loss(*inputs, chunk_size=8, **kw)
    grads = torch.autograd.grad(loss * 1.7, inputs[:2])  # grad_output != 1
    ref_loss, ref_ce, ref_kd = _reference_kd(*inputs, **kw)
    ref_grads = torch.autograd.grad(ref_loss * 1.7, inputs[:2])

    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(terms["ce"], ref_ce.detach())
    torch.testing.assert_close(terms["kd"], ref_kd.detach())
    assert not terms["ce"].requires_grad and not terms["kd"].requires_grad
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected)


def test_chunked_gives_teacher_no_gradient_and_keeps_weight_grad_outside_vocab_zero():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _hidden_inputs()
    loss, _ = chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                              kind="forward_kl", temperature=1.0, ce_weight=1.0, kd_weight=1.0,
                              vocab_size=9, chunk_size=8)
    loss.backward()
    assert teacher_weight.grad is None
    assert (student_weight.grad[9:] == 0).all() and (student_weight.grad[:9] != 0).any()


def test_chunked_never_projects_more_than_a_chunk(monkeypatch):
    import qwen_distillation.losses.chunked as chunked

    rows_seen = []
    original = chunked.cross_entropy

    def recording_cross_entropy(student_logits, labels, **kw):
        rows_seen.append(student_logits.shape[0])
        return original(student_logits, labels, **kw)

    monkeypatch.setattr(chunked, "cross_entropy", recording_cross_entropy)
    inputs = _hidden_inputs()
    loss, _ = chunked_kd_loss(*inputs, kind="jsd", temperature=1.0, ce_weight=1.0, kd_weight=1.0,
                              vocab_size=11, chunk_size=8)
    forward_rows = list(rows_seen)
    assert forward_rows == [8, 8, 8, 8, 5]
    # Whatever autograd saves, inside a chunk or for backward, never spans more than one
    # chunk of logits: no (rows > chunk_size, V) tensor exists at any time.
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        loss, _ = chunked_kd_loss(*inputs, kind="jsd", temperature=1.0, ce_weight=1.0, kd_weight=1.0,
                                  vocab_size=11, chunk_size=8)
    assert not any(len(shape) == 2 and shape[-1] == 11 and 8 < shape[0] != 11 for shape in saved), saved
    rows_seen.clear()
    loss.backward()
    # Gradients were formed in the forward pass: backward recomputes no chunk.
    assert rows_seen == []


def test_chunked_same_vocab_without_vocab_size():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _hidden_inputs(vocab_t=11)
    kw = dict(kind="forward_kl", temperature=1.0, ce_weight=1.0, kd_weight=0.5, reduction="mean")
    loss, _ = chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                              chunk_size=100, **kw)
    ref, _, _ = _reference_kd(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                              vocab_size=11, **kw)
    torch.testing.assert_close(loss, ref)


def test_chunked_all_masked_and_errors():
    student_hidden, student_weight, teacher_hidden, teacher_weight, labels = _hidden_inputs()
    kw = dict(kind="reverse_kl", temperature=1.0, ce_weight=1.0, kd_weight=1.0, chunk_size=8)
    loss, terms = chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                  torch.full_like(labels, IGNORE), vocab_size=11, reduction="mean", **kw)
    loss.backward()
    assert loss.item() == 0.0 and terms["kd"].item() == 0.0
    assert (student_hidden.grad == 0).all() and (student_weight.grad == 0).all()
    with pytest.raises(ValueError, match="vocab sizes differ"):
        chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, **kw)
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                        vocab_size=12, **kw)
    with pytest.raises(ValueError, match="valid names"):
        chunked_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                        vocab_size=11, **{**kw, "kind": "kl"})
    with pytest.raises(ValueError, match="token counts"):
        chunked_kd_loss(student_hidden, student_weight, teacher_hidden[:-1], teacher_weight, labels,
                        vocab_size=11, **kw)


def test_the_cpu_shortcut_for_all_valid_rows_changes_no_value_or_gradient_and_reads_no_device():
    """On the CPU, rows that are all valid skip the zeroing pass; the divergence and its gradient are
    bit-equal to the zeroed path's. On any other device the check reads nothing (a meta tensor would
    raise if it were read)."""
    from qwen_distillation.losses import logit

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 50, requires_grad=True), torch.randn(6, 50)
    labels = torch.arange(6)
    results = []
    for shortcut in (True, False):
        original = logit._all_rows_valid_on_cpu
        logit._all_rows_valid_on_cpu = original if shortcut else (lambda valid: False)
        try:
            value = logit.forward_kl(student, teacher, labels, temperature=2.0)
        finally:
            logit._all_rows_valid_on_cpu = original
        results.append((value, *torch.autograd.grad(value, student)))
    assert logit._all_rows_valid_on_cpu(labels != -100)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert not logit._all_rows_valid_on_cpu(torch.ones(3, dtype=torch.bool, device="meta"))
