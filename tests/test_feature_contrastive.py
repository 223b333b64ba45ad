"""Unit tests for hidden-state (feature) and contrastive distillation losses."""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.func import functional_call

from qwen_distillation.errors import ConfigError
from qwen_distillation.losses.contrastive import ContrastiveHead, info_nce, masked_mean_pool
from qwen_distillation.losses.feature import (
    FeatureProjector,
    feature_loss,
    masked_feature_loss,
    proportional_layer_map,
    validate_layer_map,
)

KEY = "stage2.loss.feature.layer_map"


# Tiny tensors: one intra-op thread avoids contention (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- plain-Python references


def _py_standardize(v: list[float], eps: float = 1e-5) -> list[float]:
    mean = sum(v) / len(v)
    var = sum((x - mean) ** 2 for x in v) / len(v)
    return [(x - mean) / math.sqrt(var + eps) for x in v]


def _py_feature_loss(students, teachers, loss, normalize, reduction) -> float:
    """students/teachers: list (pairs) of list (tokens) of list (hidden) floats."""
    num_tokens = len(students[0])
    total = 0.0
    for n in range(num_tokens):
        token = 0.0
        for s_pair, t_pair in zip(students, teachers):
            s, t = s_pair[n], t_pair[n]
            if normalize:
                s, t = _py_standardize(s), _py_standardize(t)
            if loss == "mse":
                token += sum((a - b) ** 2 for a, b in zip(s, t)) / len(s)
            else:
                dot = sum(a * b for a, b in zip(s, t))
                norm = math.sqrt(sum(a * a for a in s)) * math.sqrt(sum(b * b for b in t))
                token += 1.0 - dot / norm
        total += token / len(students)
    return total if reduction == "sum" else total / max(num_tokens, 1)


def _py_info_nce(zs, zt, temperature, domains=None, valid=None) -> float:
    """Explicit loops: symmetric (supervised-)InfoNCE over valid rows."""
    rows = [i for i in range(len(zs)) if valid is None or valid[i]]
    if not rows:
        return 0.0

    def score(a, b):
        return sum(x * y for x, y in zip(a, b)) / temperature

    def anchor_loss(anchor, others, i):
        # anchor: vector; others: dict j -> vector over valid rows
        logs = {j: score(anchor, v) for j, v in others.items()}
        lse = math.log(sum(math.exp(x) for x in logs.values()))
        pos = [j for j in others if (j == i if domains is None else domains[j] == domains[i])]
        return -sum(logs[j] - lse for j in pos) / len(pos)

    total = 0.0
    for i in rows:
        st = anchor_loss(zs[i], {j: zt[j] for j in rows}, i)
        ts = anchor_loss(zt[i], {j: zs[j] for j in rows}, i)
        total += 0.5 * (st + ts)
    return total / len(rows)


def _tolist(x: torch.Tensor):
    return x.detach().double().tolist()


# ---------------------------------------------------------------- layer maps


def test_proportional_layer_map_hand_cases():
    assert proportional_layer_map(2, 4) == [(0, 1), (1, 3)]
    assert proportional_layer_map(15, 30) == [(s, 2 * s + 1) for s in range(15)]
    assert proportional_layer_map(15, 30, num_pairs=3) == [(4, 9), (9, 19), (14, 29)]
    assert proportional_layer_map(15, 30, num_pairs=1) == [(14, 29)]
    assert proportional_layer_map(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    # Qwen2.5-0.5B (24 layers) -> 7B (28 layers): 6/24 of the way is 7/28 of the way.
    pairs = dict(proportional_layer_map(24, 28))
    assert pairs[0] == 0 and pairs[5] == 6 and pairs[11] == 13 and pairs[23] == 27
    # Student deeper than twice the teacher: clamped at teacher layer 0, never -1.
    assert proportional_layer_map(4, 1) == [(0, 0), (1, 0), (2, 0), (3, 0)]


@pytest.mark.parametrize("S,T", [(1, 1), (2, 7), (5, 3), (24, 28), (28, 36), (3, 64)])
def test_proportional_layer_map_properties(S, T):
    for num_pairs in (None, 1, max(1, S // 2), S):
        pairs = proportional_layer_map(S, T, num_pairs)
        assert pairs[-1] == (S - 1, T - 1)
        assert len(pairs) == (S if num_pairs is None else num_pairs)
        students = [s for s, _ in pairs]
        teachers = [t for _, t in pairs]
        assert students == sorted(set(students)) and teachers == sorted(teachers)
        assert validate_layer_map(pairs, S, T, KEY) == pairs


def test_proportional_layer_map_rejects_bad_counts():
    with pytest.raises(ValueError, match="num_pairs"):
        proportional_layer_map(4, 8, num_pairs=5)
    with pytest.raises(ValueError, match="num_pairs"):
        proportional_layer_map(4, 8, num_pairs=0)
    with pytest.raises(ValueError, match="layer counts"):
        proportional_layer_map(0, 8)


def test_num_pairs_above_the_students_depth_pairs_every_layer_and_says_so(caplog):
    """A num_pairs a sweep shares between students of several depths was clamped to the student's without a word."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_distillation.training.plan import layer_pairs

    def model(layers):
        return Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=layers, hidden_size=16, intermediate_size=32,
                                            num_attention_heads=2, num_key_value_heads=1, vocab_size=64))

    student, teacher = model(2), model(4)
    with caplog.at_level("WARNING", logger="qwen_distillation.training.plan"):
        pairs = layer_pairs(OmegaConf.create({"layer_map": None, "num_pairs": 6}), "stage2.loss.feature", student,
                            teacher)
    assert pairs == proportional_layer_map(2, 4, 2)
    assert "stage2.loss.feature.num_pairs=6: the student has 2 layers, so the term pairs all 2 of them" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="qwen_distillation.training.plan"):
        layer_pairs(OmegaConf.create({"layer_map": None, "num_pairs": 2}), "stage2.loss.feature", student, teacher)
    assert not caplog.text


def test_validate_layer_map_accepts_yaml_lists():
    node = OmegaConf.create({"layer_map": [[0, 1], [1, 3]]}).layer_map
    assert validate_layer_map(node, 2, 4, KEY) == [(0, 1), (1, 3)]
    assert validate_layer_map([(0, 0)], 2, 4, KEY) == [(0, 0)]


@pytest.mark.parametrize(
    "pairs,needle",
    [
        ([], "non-empty"),
        (None, "non-empty"),
        ("0,1", "non-empty"),
        ([[0, 4]], "teacher layer 4"),
        ([[2, 0]], "student layer 2"),
        ([[-1, 0]], "student layer -1"),
        ([[0, -1]], "teacher layer -1"),
        ([[0, 1, 2]], "pair"),
        ([[0]], "pair"),
        ([5], "pair"),
        ([[0.0, 1]], "two integers"),
        ([[True, 1]], "two integers"),
        ([["0", "1"]], "two integers"),
        ([[0, 1], [0, 1]], "more than once"),
    ],
)
def test_validate_layer_map_errors_name_the_key(pairs, needle):
    with pytest.raises(ConfigError) as info:
        validate_layer_map(pairs, 2, 4, KEY)
    message = str(info.value)
    assert message.startswith(KEY) and needle in message
    assert f"`{KEY}=" in message  # an override that fixes it


# ---------------------------------------------------------------- feature loss


def _states(num_pairs, n, h, *, dtype=torch.float64, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, generator=g, dtype=dtype).requires_grad_(requires_grad) for _ in range(num_pairs)]


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_feature_loss_matches_reference(loss, normalize, reduction):
    students = _states(3, 7, 5, seed=1)
    teachers = [t * 3.0 + 0.5 for t in _states(3, 7, 5, seed=2)]  # different scale and offset
    got = feature_loss(students, teachers, loss=loss, normalize=normalize, reduction=reduction)
    want = _py_feature_loss([_tolist(s) for s in students], [_tolist(t) for t in teachers], loss, normalize, reduction)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)


def test_feature_loss_normalize_is_scale_free():
    students = _states(2, 6, 8, seed=3)
    teachers = _states(2, 6, 8, seed=4)
    for loss in ("mse", "cosine"):
        base = feature_loss(students, teachers, loss=loss, normalize=True)
        scaled = feature_loss([s * 7.0 + 2.0 for s in students], [t * 3.0 - 3.0 for t in teachers],
                              loss=loss, normalize=True)
        # Equal up to layer_norm's eps (1e-5 on the variance).
        assert scaled.item() == pytest.approx(base.item(), rel=1e-4)
    # Identical up to scale and shift -> ~0 only when standardised.
    assert feature_loss(students, [s * 10 + 1 for s in students], normalize=True).item() < 1e-6
    assert feature_loss(students, [s * 10 + 1 for s in students], normalize=False).item() > 1.0


def test_feature_loss_upcasts_low_precision():
    students = _states(1, 4, 6, dtype=torch.bfloat16, seed=5)
    teachers = _states(1, 4, 6, dtype=torch.bfloat16, seed=6)
    got = feature_loss(students, teachers)
    assert got.dtype == torch.float32
    want = feature_loss([s.float() for s in students], [t.float() for t in teachers])
    assert torch.equal(got, want)


def test_feature_loss_rejects_bad_arguments():
    s, t = _states(1, 3, 4), _states(1, 3, 4, seed=9)
    with pytest.raises(ValueError, match="loss must be"):
        feature_loss(s, t, loss="l1")
    with pytest.raises(ValueError, match="reduction"):
        feature_loss(s, t, reduction="none")
    with pytest.raises(ValueError, match="project the student"):
        feature_loss(_states(1, 3, 5), t)
    with pytest.raises(ValueError, match="at least one pair"):
        feature_loss([], [])


def _masked_setup(hs=3, ht=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L = 2, 5
    mask = torch.tensor([[True, True, False, True, False], [False, True, True, True, True]])
    students = [torch.randn(B, L, hs, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    teachers = [torch.randn(B, L, ht, generator=g, dtype=torch.float64) for _ in range(2)]
    torch.manual_seed(seed)
    projector = FeatureProjector([(0, 1), (1, 3)], hs, ht).double()
    return students, teachers, mask, projector


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_masked_feature_loss_gradcheck_through_projector(loss, normalize):
    students, teachers, mask, projector = _masked_setup()
    names = [name for name, _ in projector.named_parameters()]
    weights = [p.detach().clone().requires_grad_() for _, p in projector.named_parameters()]

    def fn(s0, s1, *ws):
        projected = functional_call(projector, dict(zip(names, ws)), ([s0[mask], s1[mask]],))
        teacher = [t[mask] for t in teachers]
        return feature_loss(projected, teacher, loss=loss, normalize=normalize, reduction="mean")

    assert torch.autograd.gradcheck(fn, (*students, *weights))
    # ... and the convenience wrapper computes the same function.
    wrapped = masked_feature_loss(students, teachers, mask, projector, loss=loss, normalize=normalize,
                                  reduction="mean")
    assert wrapped.item() == pytest.approx(fn(*students, *weights).item(), rel=1e-12)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_masked_feature_loss_ignores_masked_positions(loss):
    students, teachers, mask, projector = _masked_setup()

    def run(s_list, t_list):
        s_list = [s.detach().clone().requires_grad_() for s in s_list]
        projector.zero_grad()
        value = masked_feature_loss(s_list, t_list, mask, projector, loss=loss, normalize=True)
        value.backward()
        return value.detach(), [s.grad for s in s_list], [p.grad.clone() for p in projector.parameters()]

    value, grads, pgrads = run(students, teachers)
    garbage = ~mask.unsqueeze(-1)
    students2 = [torch.where(garbage, torch.full_like(s, float("nan")), s) for s in students]
    teachers2 = [torch.where(garbage, torch.full_like(t, 1e6), t) for t in teachers]
    value2, grads2, pgrads2 = run(students2, teachers2)
    assert torch.equal(value, value2)
    for a, b in zip(grads + pgrads, grads2 + pgrads2):
        assert torch.equal(a, b)
    for g in grads:
        assert torch.all(g[~mask] == 0)


@pytest.mark.parametrize("loss", ["mse", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_masked_feature_loss_is_zero_with_graph(loss, normalize, reduction):
    students, teachers, mask, projector = _masked_setup()
    empty = torch.zeros_like(mask)
    value = masked_feature_loss(students, teachers, empty, projector, loss=loss, normalize=normalize,
                                reduction=reduction)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    for t in [*students, *projector.parameters()]:
        assert t.grad is not None and torch.all(t.grad == 0) and not torch.isnan(t.grad).any()


def test_projector_width_mismatch_has_trainable_maps():
    torch.manual_seed(0)
    projector = FeatureProjector([(1, 3), (0, 1)], 3, 5)
    assert sorted(projector.state_dict()) == ["projections.s0_t1.weight", "projections.s1_t3.weight"]
    for p in projector.parameters():
        assert p.shape == (5, 3)
        # Orthogonal init: an isometry from the student's width into the teacher's.
        assert torch.allclose(p.T @ p, torch.eye(3), atol=1e-5)
    students = [torch.randn(4, 3, requires_grad=True) for _ in range(2)]
    teachers = [torch.randn(4, 5, requires_grad=True) for _ in range(2)]
    projected = projector(students)
    assert [p.shape for p in projected] == [(4, 5), (4, 5)]
    feature_loss(projected, teachers).backward()
    for p in projector.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    for s in students:
        assert s.grad is not None and s.grad.abs().sum() > 0
    for t in teachers:
        assert t.grad is None  # the teacher is a constant
    with pytest.raises(ValueError, match="layer pairs"):
        projector(students[:1])


def test_projector_equal_widths_is_identity():
    projector = FeatureProjector([(0, 1), (1, 3)], 6, 6)
    assert list(projector.parameters()) == [] and projector.state_dict() == {}
    states = [torch.randn(3, 6), torch.randn(3, 6)]
    out = projector(states)
    assert all(a is b for a, b in zip(out, states))
    teacher = [torch.randn(2, 4, 6, requires_grad=True)]
    student = [torch.randn(2, 4, 6, requires_grad=True)]
    masked_feature_loss(student, teacher, torch.ones(2, 4, dtype=torch.bool), None).backward()
    assert teacher[0].grad is None and student[0].grad is not None


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_feature_loss_optimisation_converges(loss):
    torch.manual_seed(0)
    pairs = [(0, 1), (1, 3)]
    projector = FeatureProjector(pairs, 4, 6)
    students = [torch.nn.Parameter(torch.randn(10, 4)) for _ in pairs]
    teachers = [torch.randn(10, 4) @ torch.randn(4, 6) for _ in pairs]  # reachable through a 4 -> 6 map
    optimizer = torch.optim.Adam([*students, *projector.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        value = feature_loss(projector(students), teachers, loss=loss, reduction="mean")
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] <= 0.5 * losses[0], losses


# ---------------------------------------------------------------- contrastive


def test_masked_mean_pool_matches_loop_and_ignores_masked():
    g = torch.Generator().manual_seed(0)
    states = torch.randn(3, 4, 2, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    pooled = masked_mean_pool(states, mask)
    assert pooled.shape == (3, 2)
    for b in range(3):
        rows = [states[b, l].tolist() for l in range(4) if mask[b, l]]
        want = [sum(col) / len(rows) for col in zip(*rows)] if rows else [0.0, 0.0]
        assert pooled[b].tolist() == pytest.approx(want, rel=1e-12)
    poisoned = torch.where(mask.unsqueeze(-1), states, float("nan"))
    again = masked_mean_pool(poisoned, mask)
    assert torch.equal(again, pooled)
    again.sum().backward()
    assert not torch.isnan(states.grad).any() and torch.all(states.grad[~mask] == 0)
    assert masked_mean_pool(states.bfloat16(), mask).dtype == torch.float32


def _z(batch, dim, *, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(batch, dim, generator=g, dtype=dtype), dim=-1)


@pytest.mark.parametrize("temperature", [0.1, 0.5, 2.0])
@pytest.mark.parametrize("variant", ["plain", "domains", "valid", "domains+valid"])
def test_info_nce_matches_reference(temperature, variant):
    zs, zt = _z(6, 4, seed=1), _z(6, 4, seed=2)
    domains = torch.tensor([0, 1, 0, 2, 1, 0]) if "domains" in variant else None
    valid = torch.tensor([True, True, False, True, True, False]) if "valid" in variant else None
    got = info_nce(zs, zt, temperature=temperature, domains=domains, valid=valid)
    want = _py_info_nce(_tolist(zs), _tolist(zt), temperature,
                        None if domains is None else domains.tolist(), None if valid is None else valid.tolist())
    assert got.item() == pytest.approx(want, rel=1e-10)


def test_info_nce_plain_equals_symmetric_cross_entropy():
    zs, zt = _z(5, 3, seed=3), _z(5, 3, seed=4)
    logits = zs @ zt.T / 0.2
    target = torch.arange(5)
    ce = torch.nn.functional.cross_entropy
    want = 0.5 * (ce(logits, target) + ce(logits.T, target))
    assert info_nce(zs, zt, temperature=0.2).item() == pytest.approx(want.item(), rel=1e-12)
    # Each row its own domain is plain InfoNCE.
    assert info_nce(zs, zt, temperature=0.2, domains=torch.arange(5)).item() == pytest.approx(want.item(), rel=1e-12)


@pytest.mark.parametrize("with_domains", [False, True])
def test_info_nce_gradcheck(with_domains):
    zs = _z(5, 3, seed=5).requires_grad_()
    zt = _z(5, 3, seed=6).requires_grad_()
    domains = torch.tensor([0, 0, 1, 1, 0]) if with_domains else None
    valid = torch.tensor([True, True, True, False, True])
    assert torch.autograd.gradcheck(
        lambda a, b: info_nce(a, b, temperature=0.3, domains=domains, valid=valid), (zs, zt)
    )


def test_gradcheck_through_contrastive_head():
    torch.manual_seed(0)
    head = ContrastiveHead(3, 5, 4).double()
    names = [name for name, _ in head.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in head.named_parameters()]
    states = torch.randn(4, 6, 3, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 6, 5, dtype=torch.float64)
    mask = torch.rand(4, 6) > 0.3
    mask[:, 0] = True

    def fn(s, *ps):
        pooled = (masked_mean_pool(s, mask), masked_mean_pool(teacher, mask))
        z_s, z_t = functional_call(head, dict(zip(names, ps)), pooled)
        return info_nce(z_s, z_t, temperature=0.5, domains=torch.tensor([0, 1, 0, 1]))

    assert torch.autograd.gradcheck(fn, (states, *params))


@pytest.mark.parametrize("with_domains", [False, True])
def test_info_nce_invalid_row_changes_nothing(with_domains):
    domains = torch.tensor([0, 1, 0, 1, 1]) if with_domains else None
    valid = torch.tensor([True, True, False, True, True])

    def run(zs, zt):
        zs, zt = zs.clone().requires_grad_(), zt.clone().requires_grad_()
        value = info_nce(zs, zt, temperature=0.1, domains=domains, valid=valid)
        value.backward()
        return value.detach(), zs.grad, zt.grad

    zs, zt = _z(5, 3, seed=7), _z(5, 3, seed=8)
    value, gs, gt = run(zs, zt)
    zs2, zt2 = zs.clone(), zt.clone()
    zs2[2], zt2[2] = float("nan"), 1e3
    value2, gs2, gt2 = run(zs2, zt2)
    assert torch.equal(value, value2) and torch.equal(gs, gs2) and torch.equal(gt, gt2)
    assert torch.all(gs[2] == 0) and torch.all(gt[2] == 0)
    # ... and it equals the loss on the batch without that row.
    keep = valid.nonzero().squeeze(-1)
    dropped = info_nce(zs[keep], zt[keep], temperature=0.1, domains=None if domains is None else domains[keep])
    assert value.item() == pytest.approx(dropped.item(), rel=1e-12)


@pytest.mark.parametrize(
    "batch,valid", [(1, None), (3, torch.tensor([False, True, False])), (2, torch.tensor([False, False]))]
)
@pytest.mark.parametrize("with_domains", [False, True])
def test_info_nce_without_negatives_is_zero_with_graph(batch, valid, with_domains):
    zs = _z(batch, 4, seed=9).requires_grad_()
    zt = _z(batch, 4, seed=10).requires_grad_()
    domains = torch.zeros(batch, dtype=torch.long) if with_domains else None
    value = info_nce(zs, zt, temperature=0.05, domains=domains, valid=valid)
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    for t in (zs, zt):
        assert torch.all(t.grad == 0) and not torch.isnan(t.grad).any()


def test_info_nce_same_domain_everywhere_is_finite():
    zs, zt = _z(4, 3, seed=11).requires_grad_(), _z(4, 3, seed=12).requires_grad_()
    value = info_nce(zs, zt, temperature=0.1, domains=torch.full((4,), 3))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(zs.grad).all() and torch.isfinite(zt.grad).all()
    # All candidates positive: -mean_j log softmax_j, bounded below by log(B).
    assert value.item() >= math.log(4) - 1e-9
    want = _py_info_nce(_tolist(zs), _tolist(zt), 0.1, [3] * 4)
    assert value.item() == pytest.approx(want, rel=1e-10)


def test_info_nce_prefers_aligned_pairs():
    z = _z(8, 16, seed=13)
    aligned = info_nce(z, z, temperature=0.05)
    shuffled = info_nce(z, z[torch.roll(torch.arange(8), 1)], temperature=0.05)
    assert aligned.item() < 0.1 < shuffled.item()


def test_info_nce_rejects_bad_arguments():
    zs, zt = _z(3, 2, seed=0), _z(3, 2, seed=1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(zs, zt, temperature=0.0)
    with pytest.raises(ValueError, match="must both be"):
        info_nce(zs, zt[:2])
    with pytest.raises(ValueError, match="domains"):
        info_nce(zs, zt, domains=torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="valid"):
        info_nce(zs, zt, valid=torch.tensor([True, False]))


def test_contrastive_head_shapes_and_gradient_flow():
    torch.manual_seed(0)
    head = ContrastiveHead(3, 5, 4)
    student = torch.randn(6, 3, requires_grad=True)
    teacher = torch.randn(6, 5, requires_grad=True)
    z_s, z_t = head(student, teacher)
    assert z_s.shape == z_t.shape == (6, 4)
    assert torch.allclose(z_s.norm(dim=-1), torch.ones(6)) and torch.allclose(z_t.norm(dim=-1), torch.ones(6))
    info_nce(z_s, z_t).backward()
    assert teacher.grad is None  # never into the teacher model
    assert student.grad is not None and student.grad.abs().sum() > 0
    for p in head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    # An all-zero pooled row (a sequence with no valid token) still gives a finite z.
    z, _ = head(torch.zeros(2, 3), torch.zeros(2, 5))
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("with_domains", [False, True])
def test_contrastive_optimisation_converges(with_domains):
    torch.manual_seed(0)
    head = ContrastiveHead(4, 6, 8)
    student = torch.nn.Parameter(torch.randn(8, 4))
    teacher = torch.randn(8, 6)
    domains = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]) if with_domains else None
    optimizer = torch.optim.Adam([student, *head.parameters()], lr=0.05)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        value = info_nce(*head(student, teacher), temperature=0.1, domains=domains)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] <= 0.5 * losses[0], losses


def test_the_contrastive_term_is_averaged_over_the_micro_batches_that_hold_a_pair():
    """A token budget (stageN.tokens_per_step) of 5 examples at batch_size 4 ran micro-batches of 4 and 1; the
    one-example micro-batch has no negatives and a contrastive term of exactly 0, and dividing by both
    micro-batches halved the term and its gradient. Packed rows count their examples, not their rows."""
    from qwen_distillation.training.module import pair_batches, per_step_mean

    def batch(examples, rows=None):
        return {"input_ids": torch.zeros(rows or examples, 8, dtype=torch.long),
                "domain": torch.zeros(examples, dtype=torch.long)}

    assert pair_batches([batch(4), batch(1)]) == 1
    assert pair_batches([batch(3, rows=1), batch(1)]) == 1  # a packed row of three examples holds pairs
    assert pair_batches([batch(1), batch(1)]) == 0
    z = torch.nn.functional.normalize(torch.randn(1, 4), dim=-1)
    assert float(info_nce(z, z.clone())) == 0.0  # a single example: no negatives
    means = per_step_mean({"contrastive": torch.tensor(1.6), "kd": torch.tensor(30.0)}, tokens=10,
                          micro_batches=pair_batches([batch(4), batch(1)]))
    assert float(means["contrastive"]) == pytest.approx(1.6) and float(means["kd"]) == pytest.approx(3.0)
