"""The fused-linear KD loss: every kernel against the pure-torch reference.

On the CPU the Triton kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1
before triton is imported), on small shapes; the GPU matrix (marker ``gpu``) runs the compiled
kernel at Qwen's vocabulary size in bf16 and fp32. GPU results are recorded in
docs/performance.md with the command that produced them.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from qwen_distillation.losses import cross_entropy, divergence
from qwen_distillation.losses.fused import FusedLinearKDLoss, fused_linear_kd, resolve_kernel

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
CUDA = torch.cuda.is_available()
# The CPU tests of the kernel's code run it in Triton's interpreter, which conftest turns on only
# where no CUDA GPU is visible; a GPU machine runs the compiled kernel in the gpu matrix instead.
needs_interpreter = pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") != "1",
                                       reason="runs the Triton kernel in the interpreter (CPU machines)")

CASES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)]


def reference(hs, ws, ht, wt, labels, *, kind, beta, temperature, ce_weight, kd_weight, vocab_size, reduction):
    """Full logits, truncated to the shared vocabulary, through losses/logit.py; fp64."""
    hs = hs.detach().double().requires_grad_()
    ws = ws.detach().double().requires_grad_()
    s = (hs @ ws.T)[:, :vocab_size]
    t = (ht.double() @ wt.double().T)[:, :vocab_size]
    ce = cross_entropy(s, labels, reduction=reduction)
    kd = divergence(kind, s, t, labels, temperature=temperature, reduction=reduction, beta=beta)
    loss = ce_weight * ce + kd_weight * kd
    loss.backward()
    return float(loss), float(ce), float(kd), hs.grad, ws.grad


def make_inputs(n, hs_dim, ht_dim, v_student, v_teacher, *, dtype=torch.float32, device="cpu", seed=0,
                masked_every=3):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, hs_dim, generator=g)
    ws = torch.randn(v_student, hs_dim, generator=g) * hs_dim**-0.5 * 4
    ht = torch.randn(n, ht_dim, generator=g)
    wt = torch.randn(v_teacher, ht_dim, generator=g) * ht_dim**-0.5 * 4
    labels = torch.randint(0, min(v_student, v_teacher), (n,), generator=g)
    if masked_every:
        labels[::masked_every] = -100
    return [x.to(device=device, dtype=dtype) for x in (hs, ws, ht, wt)] + [labels.to(device)]


def run_kernel(kernel, hs, ws, ht, wt, labels, **kw):
    hs = hs.detach().clone().requires_grad_()
    ws = ws.detach().clone().requires_grad_()
    loss, parts = fused_linear_kd(hs, ws, ht, wt, labels, kernel=kernel, **kw)
    loss.backward()
    return float(loss), float(parts["ce"]), float(parts["kd"]), hs.grad, ws.grad


def assert_close_to(result, ref, *, rtol, atol_grad):
    for got, want in zip(result[:3], ref[:3]):
        assert got == pytest.approx(want, rel=rtol, abs=rtol)
    for got, want in zip(result[3:], ref[3:]):
        scale = want.abs().max().item() + 1e-12
        assert (got.double() - want).abs().max().item() <= atol_grad * scale


# ----------------------------------------------------------------------------- CPU
@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_torch_kernel_matches_full_logits_reference(kind, beta, temperature):
    inputs = make_inputs(29, 12, 20, 97, 101)
    kw = dict(kind=kind, beta=beta, temperature=temperature, ce_weight=0.3, kd_weight=0.7, vocab_size=97,
              reduction="sum")
    ref = reference(*[x.double() if x.is_floating_point() else x for x in inputs], **kw)
    got = run_kernel("torch", *[x.double() if x.is_floating_point() else x for x in inputs], chunk_size=8, **kw)
    assert_close_to(got, ref, rtol=1e-9, atol_grad=1e-9)


@needs_interpreter
@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 1.5, 2.0, 3.0, 4.0])  # 2-4: the CE from powers of the KD terms
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_triton_kernel_matches_reference_in_interpreter(kind, beta, temperature, reduction):
    # 37 tokens (not a power of two) in chunks of 16; vocab 300 in blocks of 256 (a partial
    # block); the teacher's vocabulary padded to 320 and cut to the shared 300.
    inputs = make_inputs(37, 16, 24, 300, 320)
    kw = dict(kind=kind, beta=beta, temperature=temperature, ce_weight=0.4, kd_weight=0.6, vocab_size=300,
              reduction=reduction)
    ref = reference(*inputs, **kw)
    got = run_kernel("triton", *inputs, chunk_size=16, **kw)
    assert_close_to(got, ref, rtol=2e-5, atol_grad=2e-5)


@needs_interpreter
def test_triton_kernel_all_masked_gives_zero_loss_and_gradients():
    hs, ws, ht, wt, labels = make_inputs(10, 8, 8, 50, 50, masked_every=0)
    labels[:] = -100
    loss, ce, kd, g_h, g_w = run_kernel("triton", hs, ws, ht, wt, labels, kind="forward_kl", temperature=2.0,
                                        ce_weight=0.5, kd_weight=0.5, reduction="mean")
    assert (loss, ce, kd) == (0.0, 0.0, 0.0)
    assert not g_h.any() and not g_w.any()


@needs_interpreter
def test_triton_kernel_takes_precomputed_teacher_logits_and_ce_only():
    hs, ws, ht, wt, labels = make_inputs(21, 8, 12, 64, 80)
    kw = dict(kind="forward_kl", temperature=2.0, ce_weight=0.5, kd_weight=0.5, vocab_size=64)
    by_hidden = run_kernel("triton", hs, ws, ht, wt, labels, **kw)
    by_logits = run_kernel("triton", hs, ws, None, None, labels, teacher_logits=ht @ wt.T, **kw)
    assert_close_to(by_logits, by_hidden, rtol=1e-6, atol_grad=1e-6)
    ce_only = run_kernel("triton", hs, ws, ht, wt, labels, kind="forward_kl", temperature=2.0, ce_weight=1.0,
                         kd_weight=0.0, vocab_size=64)
    ref = reference(hs, ws, ht, wt, labels, kind="forward_kl", beta=0.5, temperature=2.0, ce_weight=1.0,
                    kd_weight=0.0, vocab_size=64, reduction="sum")
    assert ce_only[2] == 0.0
    assert_close_to(ce_only[:2] + (0.0,) + ce_only[3:], ref[:2] + (0.0,) + ref[3:], rtol=2e-5, atol_grad=2e-5)


@pytest.mark.skipif(not HAS_LIGER, reason="needs liger-kernel")
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_liger_adapter_follows_the_project_conventions(kind, beta):
    # Liger averages and leaves out T**2; the adapter must give the reference's sums.
    inputs = make_inputs(24, 8, 12, 64, 64)
    kw = dict(kind=kind, beta=beta, temperature=2.0, ce_weight=0.3, kd_weight=0.7, vocab_size=64,
              reduction="sum")
    ref = reference(*inputs, **kw)
    got = run_kernel("liger", *inputs, chunk_size=8, **kw)
    assert_close_to(got, ref, rtol=2e-5, atol_grad=2e-5)


def test_kernel_choice_and_errors():
    assert resolve_kernel("auto", "cpu", "forward_kl") == "torch"
    assert resolve_kernel("torch", "cpu", "skew_forward_kl") == "torch"
    with pytest.raises(ValueError, match=r"loss.kernel='fast' is not one of"):
        resolve_kernel("fast", "cpu", "forward_kl")
    with pytest.raises(ValueError, match=r"loss.kernel=triton implements loss.kd in"):
        resolve_kernel("triton", "cpu", "total_variation")
    if CUDA and HAS_TRITON:
        assert resolve_kernel("auto", "cuda", "forward_kl") == "triton"
        assert resolve_kernel("auto", "cuda", "skew_reverse_kl") == "torch"


def test_module_form_equals_function():
    hs, ws, ht, wt, labels = make_inputs(16, 8, 8, 40, 40)
    module = FusedLinearKDLoss(kind="reverse_kl", temperature=2.0, ce_weight=0.2, kd_weight=0.8, kernel="torch")
    loss_m, _ = module(hs, ws, ht, wt, labels)
    loss_f, _ = fused_linear_kd(hs, ws, ht, wt, labels, kind="reverse_kl", temperature=2.0, ce_weight=0.2,
                                kd_weight=0.8, kernel="torch")
    assert float(loss_m) == float(loss_f)
    assert "reverse_kl" in repr(module)


# ----------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
QWEN_VOCAB, QWEN_PADDED = 151936, 152064


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("masking", ["every3", "prefix", "none"])
def test_gpu_triton_matches_torch_reference(dtype, kind, beta, temperature, masking):
    # 1,000 tokens (not a power of two) in chunks of 384; the teacher's padded vocabulary.
    hs, ws, ht, wt, labels = make_inputs(1000, 256, 384, QWEN_VOCAB, QWEN_PADDED, dtype=dtype, device="cuda",
                                         masked_every=3 if masking == "every3" else 0)
    if masking == "prefix":
        labels[:400] = -100
    kw = dict(kind=kind, beta=beta, temperature=temperature, ce_weight=0.5, kd_weight=0.5, vocab_size=QWEN_VOCAB,
              reduction="mean")
    # The reference sees the same rounded inputs the kernel sees, in fp32 on the GPU.
    ref = run_kernel("torch", *[x.float() if x.is_floating_point() else x for x in (hs, ws, ht, wt, labels)],
                     chunk_size=256, **kw)
    got = run_kernel("triton", hs, ws, ht, wt, labels, chunk_size=384, **kw)
    # bf16 logits (from bf16 GEMMs) against fp32 logits: the tolerance is bf16's.
    rtol, atol_grad = (2e-2, 3e-2) if dtype == torch.bfloat16 else (1e-4, 1e-4)
    assert_close_to(got, ref, rtol=rtol, atol_grad=atol_grad)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_triton_all_masked_and_bf16_logits_exact_against_torch(dtype):
    hs, ws, ht, wt, labels = make_inputs(333, 128, 192, QWEN_VOCAB, QWEN_PADDED, dtype=dtype, device="cuda",
                                         masked_every=0)
    labels[:] = -100
    loss, ce, kd, g_h, g_w = run_kernel("triton", hs, ws, ht, wt, labels, kind="jsd", beta=0.5, temperature=2.0,
                                        ce_weight=0.5, kd_weight=0.5, vocab_size=QWEN_VOCAB, reduction="mean")
    assert (loss, ce, kd) == (0.0, 0.0, 0.0) and not g_h.any() and not g_w.any()
    # Same bf16 logits on both sides (the torch path upcasts the same bf16 GEMM output), so
    # the two agree to fp32 rounding of the per-row statistics.
    hs, ws, ht, wt, labels = make_inputs(333, 128, 192, QWEN_VOCAB, QWEN_PADDED, dtype=dtype, device="cuda")
    kw = dict(kind="forward_kl", temperature=2.0, ce_weight=0.5, kd_weight=0.5, vocab_size=QWEN_VOCAB,
              reduction="sum", chunk_size=128)
    ref = run_kernel("torch", hs, ws, ht, wt, labels, **kw)
    got = run_kernel("triton", hs, ws, ht, wt, labels, **kw)
    assert_close_to(got, ref, rtol=1e-4, atol_grad=2e-2 if dtype == torch.bfloat16 else 1e-4)


# ----------------------------------------------------------------------------- config
def test_kernel_override_is_validated_and_resolved(tmp_path):
    from conftest import compose_config, tiny_overrides
    from qwen_distillation.app import run
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.training.distiller import Distiller

    # Checked when the run is constructed, before anything is read or written.
    with pytest.raises(ConfigError, match=r"stage2\.loss\.kernel='cuda' is not one of"):
        Distiller(validate_config(compose_config(["stage2.loss.kernel=cuda"])))
    with pytest.raises(ConfigError, match=r"stage1\.loss\.kernel=triton implements loss\.kd in"):
        Distiller(validate_config(compose_config(["stage1.loss.kernel=triton", "stage1.loss.kd=tv"])))
    if not CUDA:
        # Resolved when the run starts, before any output is written.
        out = tmp_path / "run"
        with pytest.raises(ConfigError, match=r"stage1\.loss\.kernel=triton needs a CUDA device"):
            run(compose_config(tiny_overrides(out, steps=1) + ["stage1.loss.kernel=triton"]))
        assert not (out / "stage1").exists()


def test_speed_levers_are_refused_where_they_cannot_run():
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.modeling.speed import apply_speedups

    with pytest.raises(ConfigError, match="choose one"):
        apply_speedups([], device=torch.device("cpu"), compile=True, liger_kernels=True)
    with pytest.raises(ConfigError, match=r"train\.liger_kernels=true needs a CUDA GPU"):
        apply_speedups([], device=torch.device("cpu"), liger_kernels=True)


def test_compile_lever_compiles_both_decoders(monkeypatch):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_distillation.modeling.speed import apply_speedups

    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    models = [Qwen2ForCausalLM(config), Qwen2ForCausalLM(config)]
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    assert apply_speedups(models, device=torch.device("cpu"), compile=True) == ["compile"]
    assert compiled == [m.model for m in models]
