"""Tests for layer capture (qwen_distillation.modeling.capture) and attention distillation
(qwen_distillation.losses.attention), on tiny random models built from config."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from qwen_distillation.errors import ConfigError
from qwen_distillation.losses.attention import (
    attention_distillation_loss,
    attention_probs_reference,
    expand_kv,
    relation_kl,
    split_relation_heads,
)
from qwen_distillation.modeling.capture import Capture


# Tiny tensors: one intra-op thread avoids contention (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- tiny models and batches

FAMILIES = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXForCausalLM),  # its attention module is `attention`, not `self_attn`
}


def tiny_model(family: str = "qwen2", *, hidden_size: int = 32, heads: int = 4, kv_heads: int = 2,
               head_dim: int | None = None, layers: int = 3, attn: str = "sdpa", seed: int = 0):
    config_cls, model_cls = FAMILIES[family]
    kwargs = dict(vocab_size=101, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    if head_dim is not None:
        kwargs["head_dim"] = head_dim
    config = config_cls(**kwargs)
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return model_cls(config).eval()


def eager_copy(model):
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    return eager


def padded_batch(seed: int = 1):
    """Three rows of length 9: full, right-padded (6 tokens), left-padded (5 tokens)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 101, (3, 9), generator=generator)
    attention_mask = torch.ones(3, 9, dtype=torch.long)
    attention_mask[1, 6:] = 0
    attention_mask[2, :4] = 0
    return input_ids, attention_mask


def decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()


def hook_counts(model):
    return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()]


# ---------------------------------------------------------------- capture


def test_capture_hidden_and_qkv_of_chosen_layers_only():
    model = tiny_model()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        reference = decoder(model)(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        with Capture(model, hidden_layers=[0, 1], qkv_layers=[1]) as capture:
            decoder(model)(input_ids=input_ids, attention_mask=attention_mask)
    assert sorted(capture.hidden) == [0, 1] and sorted(capture.qkv) == [1]
    for index in (0, 1):
        torch.testing.assert_close(capture.hidden[index], reference.hidden_states[index + 1], rtol=0, atol=0)
    q, k, v = capture.qkv[1]
    assert q.shape == (3, 4, 9, 8) and k.shape == (3, 2, 9, 8) and v.shape == (3, 2, 9, 8)


def test_capture_restores_everything_after_exit_and_on_error():
    model = tiny_model()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        before = decoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hooks_before = hook_counts(model)
    configs_before = [layer.self_attn.config for layer in model.model.layers]
    with Capture(model, hidden_layers=[0, 2], qkv_layers=[0, 2]):
        assert hook_counts(model) != hooks_before
        assert model.model.layers[0].self_attn.config is not configs_before[0]
    with pytest.raises(KeyError, match="boom"):
        with Capture(model, hidden_layers=[1], qkv_layers=[1]):
            raise KeyError("boom")
    assert hook_counts(model) == hooks_before
    assert [layer.self_attn.config for layer in model.model.layers] == configs_before
    assert all(config is model.config for config in configs_before)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        after = decoder(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_capture_with_empty_lists_installs_nothing():
    model = tiny_model()
    hooks_before = hook_counts(model)
    with Capture(model) as capture:
        assert hook_counts(model) == hooks_before
        assert all(layer.self_attn.config is model.config for layer in model.model.layers)
        with torch.no_grad():
            decoder(model)(input_ids=torch.tensor([[1, 2, 3]]))
    assert capture.hidden == {} and capture.qkv == {}


@pytest.mark.parametrize("kind", ["hidden_layers", "qkv_layers"])
@pytest.mark.parametrize("index", [3, -1])
def test_capture_rejects_out_of_range_layer(kind, index):
    model = tiny_model()
    with pytest.raises(ConfigError, match=rf"{kind} index {index} is out of range.*3 decoder layers"):
        Capture(model, **{kind: [index]})


def test_captured_qkv_keep_the_graph_of_the_student():
    model = tiny_model()
    input_ids, attention_mask = padded_batch()
    with Capture(model, hidden_layers=[0], qkv_layers=[1]) as capture:
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask)
    q, k, v = capture.qkv[1]
    (q.square().sum() + k.sum() + v.sum() + capture.hidden[0].sum()).backward()
    layers = model.model.layers
    assert layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    assert layers[2].self_attn.q_proj.weight.grad is None  # nothing after layer 1 is involved


def test_capture_with_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    teacher_qkv = _random_qkv(4, 2, 8, batch=3, length=9, seed=21)
    input_ids, attention_mask = padded_batch()
    valid = attention_mask.bool()
    grads = []
    for checkpointing in (False, True):
        student = copy.deepcopy(model).train()
        if checkpointing:
            student.gradient_checkpointing_enable()  # non-reentrant by default in transformers 5
        with Capture(student, qkv_layers=[1]) as capture:
            decoder(student)(input_ids=input_ids, attention_mask=attention_mask)
        attention_distillation_loss(capture.qkv[1], teacher_qkv, valid, valid, relation_heads=4).backward()
        grads.append(student.model.layers[0].self_attn.q_proj.weight.grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0])


def test_capture_through_peft_lora():
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    input_ids, attention_mask = padded_batch()
    with torch.no_grad(), Capture(model, hidden_layers=[1], qkv_layers=[1]) as plain:
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    hooks_before = hook_counts(peft_model)
    with Capture(peft_model, hidden_layers=[1], qkv_layers=[1]) as capture:
        decoder(peft_model)(input_ids=input_ids, attention_mask=attention_mask)
    assert hook_counts(peft_model) == hooks_before
    # lora_B starts at zero, so the adapted model computes the same q/k/v as the base model.
    for got, want in zip(capture.qkv[1], plain.qkv[1]):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(capture.hidden[1], plain.hidden[1])
    capture.qkv[1][0].square().sum().backward()
    lora_b = peft_model.base_model.model.model.layers[1].self_attn.q_proj.lora_B["default"].weight
    assert lora_b.grad.abs().sum() > 0


# ---------------------------------------------------------------- SDPA vs eager


def _captured_qkv(model, input_ids, attention_mask, layers):
    with torch.no_grad(), Capture(model, qkv_layers=layers) as capture:
        decoder(model)(input_ids=input_ids, attention_mask=attention_mask)
    return capture.qkv


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sdpa_capture_reproduces_eager_attention_maps(family):
    model = tiny_model(family)
    eager = eager_copy(model)
    input_ids, attention_mask = padded_batch()
    with torch.no_grad():
        maps = decoder(eager)(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True).attentions
    sdpa_qkv = _captured_qkv(model, input_ids, attention_mask, [0, 2])
    eager_qkv = _captured_qkv(eager, input_ids, attention_mask, [0, 2])
    valid = attention_mask.bool()
    for layer in (0, 2):
        for q, k, _ in (sdpa_qkv[layer], eager_qkv[layer]):
            probs = attention_probs_reference(q, k, valid)
            # (B, H, L, L) -> (valid queries, H, L): compare only the rows of real tokens.
            got, want = probs.transpose(1, 2)[valid], maps[layer].transpose(1, 2)[valid]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["attention", "relations"])
def test_loss_from_sdpa_captures_equals_loss_from_eager_captures(mode):
    student = tiny_model(seed=0)
    teacher = tiny_model(hidden_size=64, heads=4, kv_heads=2, seed=1)  # head_dim 16 vs 8
    input_ids, attention_mask = padded_batch()
    valid = attention_mask.bool()
    losses = []
    for s, t in ((student, teacher), (eager_copy(student), eager_copy(teacher))):
        s_qkv = _captured_qkv(s, input_ids, attention_mask, [1])[1]
        t_qkv = _captured_qkv(t, input_ids, attention_mask, [2])[2]
        losses.append(attention_distillation_loss(s_qkv, t_qkv, valid, valid, mode=mode, relation_heads=4,
                                                  chunk_size=4))
    assert losses[0] > 1e-3  # teacher and student differ, so the check is not on float noise
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- relation_kl


def _loop_relation_kl(s_a, s_b, t_a, t_b, query_mask, key_mask, relation_heads, reduction="sum"):
    """Explicit-loop forward KL(teacher || student) of relation heads, in Python floats."""

    def relation_rows(x, r):
        # Concatenate heads: (B, n, L, d) -> (B, L, n * d), then take relation head r's columns.
        batch, n, length, d = x.shape
        width = n * d // relation_heads
        flat = x.permute(0, 2, 1, 3).reshape(batch, length, n * d).double()
        return flat[:, :, r * width:(r + 1) * width].tolist(), width

    batch, _, length, _ = s_a.shape
    total, count = 0.0, 0
    rows = [[relation_rows(x, r) for r in range(relation_heads)] for x in (s_a, s_b, t_a, t_b)]
    for b in range(batch):
        for i in range(length):
            if not query_mask[b, i]:
                continue
            keys = [j for j in range(i + 1) if key_mask[b, j]]
            count += 1
            per_head = 0.0
            for r in range(relation_heads):
                dists = []
                for (a_rows, width), (b_rows, _) in ((rows[0][r], rows[1][r]), (rows[2][r], rows[3][r])):
                    scores = [sum(x * y for x, y in zip(a_rows[b][i], b_rows[b][j])) / math.sqrt(width)
                              for j in keys]
                    top = max(scores)
                    exps = [math.exp(s - top) for s in scores]
                    dists.append([e / sum(exps) for e in exps])
                student, teacher = dists
                per_head += sum(p * math.log(p / q) for p, q in zip(teacher, student))
            total += per_head / relation_heads
    return total if reduction == "sum" else total / max(count, 1)


def _random_qkv(heads, kv_heads, head_dim, *, batch=2, length=7, seed=0, dtype=torch.float32, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, head_dim, generator=generator, dtype=dtype) * scale
    k = torch.randn(batch, kv_heads, length, head_dim, generator=generator, dtype=dtype) * scale
    v = torch.randn(batch, kv_heads, length, head_dim, generator=generator, dtype=dtype) * scale
    return q, k, v


def _masks(batch=2, length=7):
    key_mask = torch.ones(batch, length, dtype=torch.bool)
    key_mask[0, length - 2:] = False  # right padding
    key_mask[1, :2] = False           # left padding
    query_mask = key_mask.clone()
    query_mask[0, 1] = False  # e.g. a prompt token that is not distilled
    return query_mask, key_mask


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("mode", ["attention", "relations"])
def test_loss_matches_explicit_loop(mode, reduction):
    student = _random_qkv(2, 1, 8, seed=0)   # 2 query heads, 1 kv head (GQA), d = 8
    teacher = _random_qkv(4, 2, 12, seed=1)  # 4 query heads, 2 kv heads, d = 12
    query_mask, key_mask = _masks()
    got = attention_distillation_loss(student, teacher, query_mask, key_mask, mode=mode, relation_heads=2,
                                      chunk_size=3, reduction=reduction)
    q_s, k_s, v_s = student[0], expand_kv(student[1], 2), expand_kv(student[2], 2)
    q_t, k_t, v_t = teacher[0], expand_kv(teacher[1], 4), expand_kv(teacher[2], 4)
    if mode == "attention":
        want = _loop_relation_kl(q_s, k_s, q_t, k_t, query_mask, key_mask, 2, reduction)
    else:
        want = sum(_loop_relation_kl(s, s, t, t, query_mask, key_mask, 2, reduction)
                   for s, t in ((q_s, q_t), (k_s, k_t), (v_s, v_t))) / 3
    assert want > 1e-2
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_expand_kv_and_split_relation_heads_layout():
    k = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)
    expanded = expand_kv(k, 4)
    assert torch.equal(expanded[:, 0], k[:, 0]) and torch.equal(expanded[:, 1], k[:, 0])
    assert torch.equal(expanded[:, 2], k[:, 1]) and torch.equal(expanded[:, 3], k[:, 1])
    assert torch.equal(split_relation_heads(k, 2), k)
    merged = split_relation_heads(k, 1)
    assert merged.shape == (2, 1, 3, 8)
    assert torch.equal(merged[0, 0, 1], torch.cat([k[0, 0, 1], k[0, 1, 1]]))
    with pytest.raises(ValueError, match="relation_heads=3 must divide"):
        split_relation_heads(k, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        expand_kv(k, 3)


def test_attention_mode_with_one_relation_head_per_head_is_attention_probability_kl():
    student, teacher = _random_qkv(4, 2, 8, seed=2), _random_qkv(4, 4, 8, seed=3)
    query_mask, key_mask = _masks()
    got = attention_distillation_loss(student, teacher, query_mask, key_mask, mode="attention", relation_heads=4)
    p = attention_probs_reference(teacher[0], teacher[1], key_mask)  # (B, H, L, L)
    q = attention_probs_reference(student[0], student[1], key_mask)
    allowed = p > 0
    kl = torch.where(allowed, p * (p.log() - q.log()), 0.0).sum(-1).mean(1)  # (B, L)
    torch.testing.assert_close(got, kl[query_mask].sum(), rtol=1e-5, atol=1e-6)


def test_gradcheck_float64():
    s_a, s_b, _ = _random_qkv(2, 2, 3, batch=2, length=5, seed=4, dtype=torch.float64)
    t_a, t_b, _ = _random_qkv(2, 2, 3, batch=2, length=5, seed=5, dtype=torch.float64)
    query_mask, key_mask = _masks(2, 5)
    s_a.requires_grad_(), s_b.requires_grad_()

    def loss(a, b):
        return relation_kl(a, b, t_a, t_b, query_mask, key_mask, relation_heads=3, chunk_size=2)

    assert loss(s_a, s_b).dtype == torch.float64
    assert torch.autograd.gradcheck(loss, (s_a, s_b))


@pytest.mark.parametrize("mode", ["attention", "relations"])
def test_chunk_size_does_not_change_value_or_gradients(mode):
    student = [x.requires_grad_() for x in _random_qkv(4, 2, 8, length=11, seed=6)]
    teacher = _random_qkv(2, 1, 16, length=11, seed=7)
    query_mask, key_mask = _masks(2, 11)
    results = []
    for chunk_size in (4, 11, 64):
        loss = attention_distillation_loss(student, teacher, query_mask, key_mask, mode=mode, relation_heads=4,
                                           chunk_size=chunk_size)
        used = student if mode == "relations" else student[:2]  # "attention" does not use v
        results.append((loss.detach(), torch.autograd.grad(loss, used)))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-6, atol=1e-6)
        for grad, grad_0 in zip(grads, results[0][1]):
            torch.testing.assert_close(grad, grad_0, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["attention", "relations"])
def test_padding_and_masked_queries_change_nothing(mode):
    student, teacher = _random_qkv(4, 2, 8, seed=8), _random_qkv(4, 2, 8, seed=9)
    query_mask, key_mask = _masks()
    base = attention_distillation_loss(student, teacher, query_mask, key_mask, mode=mode, relation_heads=2)

    def perturb(qkv, positions):
        out = []
        for x in qkv:
            x = x.clone()
            x[positions] = torch.randn_like(x[positions]) * 100  # (B, heads, L, d) -> batch/position index
            out.append(x)
        return out

    padding = (torch.tensor([0, 0, 1, 1]), slice(None), torch.tensor([5, 6, 0, 1]))
    # q/k/v at padding positions, in both models: invisible.
    changed = attention_distillation_loss(perturb(student, padding), perturb(teacher, padding), query_mask,
                                          key_mask, mode=mode, relation_heads=2)
    torch.testing.assert_close(changed, base, rtol=1e-6, atol=1e-6)
    # Query 1 of row 0 is masked: only its role as a key may matter, so drop it from the keys too
    # and changing it must change nothing; with it as a key but not a query, the value differs.
    key_mask_2 = key_mask.clone()
    key_mask_2[0, 1] = False
    without = attention_distillation_loss(student, teacher, query_mask, key_mask_2, mode=mode, relation_heads=2)
    masked_query = (torch.tensor([0]), slice(None), torch.tensor([1]))
    changed = attention_distillation_loss(perturb(student, masked_query), teacher, query_mask, key_mask_2,
                                          mode=mode, relation_heads=2)
    torch.testing.assert_close(changed, without, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(without, base)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_all_masked_gives_attached_zero(reduction):
    student = [x.requires_grad_() for x in _random_qkv(4, 2, 8, seed=10)]
    teacher = _random_qkv(4, 2, 8, seed=11)
    query_mask, key_mask = torch.zeros(2, 7, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)
    for keys in (key_mask, torch.ones_like(key_mask)):
        loss = attention_distillation_loss(student, teacher, query_mask, keys, mode="relations",
                                           relation_heads=2, chunk_size=3, reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
        for grad in torch.autograd.grad(loss, student):
            assert torch.equal(grad, torch.zeros_like(grad))


def test_different_head_counts_and_dims():
    student = [x.requires_grad_() for x in _random_qkv(2, 2, 8, seed=12)]  # 2 heads x 8
    query_mask, key_mask = _masks()
    for teacher in (_random_qkv(4, 4, 8, seed=13), _random_qkv(4, 2, 16, seed=14)):  # 4 x 8, 4 x 16 GQA
        for mode in ("attention", "relations"):
            loss = attention_distillation_loss(student, teacher, query_mask, key_mask, mode=mode, relation_heads=2)
            grads = torch.autograd.grad(loss, student, allow_unused=True)
            assert loss.item() > 0 and torch.isfinite(loss)
            assert all(g is None or torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="relation_heads=3 must divide"):
        attention_distillation_loss(student, teacher, query_mask, key_mask, relation_heads=3)


@pytest.mark.parametrize("mode", ["attention", "relations"])
def test_identical_inputs_give_zero(mode):
    qkv = [x.requires_grad_() for x in _random_qkv(4, 2, 8, seed=15)]
    query_mask, key_mask = _masks()
    loss = attention_distillation_loss(qkv, [x.detach() for x in qkv], query_mask, key_mask, mode=mode,
                                       relation_heads=4, chunk_size=2)
    assert abs(loss.item()) < 1e-6
    for grad in torch.autograd.grad(loss, qkv, allow_unused=True):
        assert grad is None or grad.abs().max() < 1e-5


def test_teacher_gets_no_gradient():
    student = [x.requires_grad_() for x in _random_qkv(2, 2, 8, seed=16)]
    teacher = [x.requires_grad_() for x in _random_qkv(2, 2, 8, seed=17)]
    query_mask, key_mask = _masks()
    attention_distillation_loss(student, teacher, query_mask, key_mask, relation_heads=2).backward()
    assert all(x.grad is not None for x in student) and all(x.grad is None for x in teacher)


def test_adam_on_student_qkv_reduces_loss():
    torch.manual_seed(18)
    teacher = _random_qkv(4, 2, 8, seed=19, scale=2.0)
    student = [torch.nn.Parameter(x) for x in _random_qkv(2, 1, 8, seed=20)]
    query_mask, key_mask = _masks()
    optimizer = torch.optim.Adam(student, lr=0.05)
    losses = []
    for _ in range(30):
        loss = attention_distillation_loss(student, teacher, query_mask, key_mask, mode="relations",
                                           relation_heads=2, chunk_size=4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses
