"""``modeling.speed.rope_over_rows``: Liger's RoPE called with the batch folded into the sequence
(one compilation of its kernel for every row count a packed micro-batch brings) gives the same
values and gradients, to the bit, as the call it replaces."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from qwen_distillation.modeling.speed import _fold_liger_rope, rope_over_rows

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None and importlib.util.find_spec("triton") is not None
needs_interpreter = pytest.mark.skipif(not HAS_LIGER or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs Liger's Triton RoPE kernel in Triton's interpreter (CPU machines)")


def _inputs(bsz, seq, n_q=4, n_kv=2, head_dim=16, cos_rows=None, seed=0, device="cpu", dtype=torch.float32):
    """q and k as transformers' attention hands them (transposed views of (bsz, seq, heads, d)), and
    cos/sin of RoPE's form (the two halves of each row equal) for ``cos_rows`` rows (bsz or 1)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(bsz, seq, n_q, head_dim, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(bsz, seq, n_kv, head_dim, generator=g).to(device, dtype).transpose(1, 2)
    rows = bsz if cos_rows is None else cos_rows
    angles = torch.randn(rows, seq, head_dim // 2, generator=g)
    angles = torch.cat([angles, angles], dim=-1)
    return q, k, angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def _run(rope, q, k, cos, sin):
    """Outputs and the gradients of q and k under a fixed upstream gradient."""
    q, k = q.clone().requires_grad_(), k.clone().requires_grad_()
    q_out, k_out = rope(q.clone(), k.clone(), cos, sin)
    g = torch.Generator().manual_seed(1)
    upstream_q, upstream_k = (torch.randn(x.shape, generator=g).to(x.device, x.dtype) for x in (q_out, k_out))
    ((q_out * upstream_q).sum() + (k_out * upstream_k).sum()).backward()
    return q_out.detach(), k_out.detach(), q.grad, k.grad


@pytest.mark.parametrize("bsz,seq,cos_rows", [(3, 5, None), (2, 16, None), (4, 7, 1), (1, 9, None)])
def test_folding_the_batch_gives_the_reference_ropes_values_and_gradients(bsz, seq, cos_rows):
    """The fold's shapes on transformers' own (torch) RoPE: the same outputs and gradients, the
    outputs of the same shape as the unfolded call's, for per-row cos (packed rows) and shared cos."""
    q, k, cos, sin = _inputs(bsz, seq, cos_rows=cos_rows)
    plain = _run(apply_rotary_pos_emb, q, k, cos, sin)
    folded = _run(rope_over_rows(apply_rotary_pos_emb), q, k, cos, sin)
    for a, b in zip(plain, folded):
        assert a.shape == b.shape and torch.equal(a, b)


def test_calls_it_cannot_fold_go_to_the_function_unchanged():
    """One row, a 4-D cos, cos rows that match neither 1 nor the batch, or a tensor among the other
    arguments (position_ids): the wrapped function gets the call as is; other arguments pass on."""
    seen = []

    def rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        seen.append((tuple(q.shape), tuple(cos.shape), unsqueeze_dim))
        return q, k

    folded = rope_over_rows(rope)
    q, k, cos, sin = _inputs(1, 5)
    folded(q, k, cos, sin)
    q, k, cos, sin = _inputs(3, 5)
    folded(q, k, cos[:, None], sin[:, None])
    q2, k2, cos2, sin2 = _inputs(3, 5, cos_rows=2)
    folded(q2, k2, cos2, sin2)
    folded(q, k, cos, sin, torch.zeros(3, 5, dtype=torch.long))
    folded(q, k, cos, sin, unsqueeze_dim=1)
    assert seen == [((1, 4, 5, 16), (1, 5, 16), 1), ((3, 4, 5, 16), (3, 1, 5, 16), 1), ((3, 4, 5, 16), (2, 5, 16), 1),
                    ((3, 4, 5, 16), (3, 5, 16), 1), ((1, 4, 15, 16), (1, 15, 16), 1)]


@needs_interpreter
@pytest.mark.parametrize("bsz,seq,cos_rows", [(3, 5, None), (2, 16, None), (4, 7, 1)])
def test_liger_rope_folded_equals_liger_rope_in_the_interpreter(bsz, seq, cos_rows):
    """Liger's own kernel (Triton's interpreter on the CPU): folded, the same values and gradients to
    the bit as unfolded, and as transformers' RoPE."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    q, k, cos, sin = _inputs(bsz, seq, cos_rows=cos_rows)
    plain = _run(liger_rotary_pos_emb, q, k, cos, sin)
    folded = _run(rope_over_rows(liger_rotary_pos_emb), q, k, cos, sin)
    reference = _run(apply_rotary_pos_emb, q, k, cos, sin)
    for a, b, c in zip(plain, folded, reference):
        assert torch.equal(a, b)
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel")
def test_the_liger_patch_routes_the_model_familys_rope_through_the_fold(monkeypatch):
    """After Liger swapped the modeling module's RoPE function, the model's family calls the folded one;
    a function that is not Liger's is left alone."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    model = modeling_qwen2.Qwen2ForCausalLM(modeling_qwen2.Qwen2Config(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1))
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", liger_rotary_pos_emb)
    _fold_liger_rope(model)
    assert modeling_qwen2.apply_rotary_pos_emb.__wrapped__ is liger_rotary_pos_emb
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", apply_rotary_pos_emb)
    _fold_liger_rope(model)
    assert modeling_qwen2.apply_rotary_pos_emb is apply_rotary_pos_emb


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_LIGER, reason="needs a CUDA GPU and liger-kernel")
def test_on_the_gpu_liger_rope_folded_is_bit_equal_and_compiles_once_for_every_row_count():
    """On the GPU: Liger's RoPE folded gives the unfolded kernel's values and gradients to the bit
    (bf16, per-row cos of packed rows), and further row counts add no compilation of its kernel,
    where three row counts unfolded added at least three."""
    from liger_kernel.ops import rope as liger_rope
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    kernel = liger_rope._triton_rope
    if not hasattr(kernel, "device_caches"):
        pytest.skip("this Triton keeps no per-device kernel cache to count")
    device = torch.cuda.current_device()

    def compiled():
        return len(kernel.device_caches[device][0]) if device in kernel.device_caches else 0

    def inputs(bsz):
        return _inputs(bsz, 200, n_q=12, n_kv=2, head_dim=128, seed=bsz, device="cuda", dtype=torch.bfloat16)

    folded = rope_over_rows(liger_rotary_pos_emb)
    _run(folded, *inputs(2))  # compile the folded variants first
    before = compiled()
    for bsz in (3, 5, 7):
        for a, b in zip(_run(liger_rotary_pos_emb, *inputs(bsz)), _run(folded, *inputs(bsz))):
            assert torch.equal(a, b)
    unfolded_added = compiled() - before
    before = compiled()
    for bsz in (4, 6, 9):
        _run(folded, *inputs(bsz))
    assert compiled() - before == 0 and unfolded_added >= 3
