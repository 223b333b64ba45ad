"""GPU runs of the pipeline (skipped on the CPU). Results are recorded in docs/gpu.md."""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from conftest import compose_config, tiny_overrides, train_rows
from qwen_distillation.app import run
from qwen_distillation.training import allocator

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_three_stages_on_cuda_in_bf16(tmp_path):
    out = tmp_path / "run"
    summary = run(compose_config(tiny_overrides(out, steps=3) + ["train.device=cuda"]))
    assert summary["device"].startswith("cuda") and summary["precision"] == "bf16"
    rows = train_rows(out)
    assert len(rows) == 9 and all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)
    assert summary["student_after_stage"]["3"]["eval/medical_nll"] < summary["student_before"]["eval/medical_nll"]


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="QLoRA needs bitsandbytes")
def test_qlora_trains_4bit_student_adapters(tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "qlora"
    run(compose_config(tiny_overrides(out, steps=2) + ["train.device=cuda", "end_stage=2", "lora.enabled=true",
                                                       "lora.quantize_4bit=true", "lora.r=4"]))
    first = load_file(out / "stage1" / "final" / "adapter_model.safetensors")
    second = load_file(out / "stage2" / "final" / "adapter_model.safetensors")
    assert first and any(not torch.equal(first[k], second[k]) for k in first)
    assert all(math.isfinite(r["loss"]) for r in train_rows(out))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the fused path needs triton")
def test_stages_run_through_the_fused_kernel_by_default_and_match_the_torch_path(tmp_path):
    # Stages 1 and 2 (KL + CE, then with feature, attention and contrastive terms) of the tiny
    # Qwen-vocabulary pair (teacher 152,064 rows, student 151,936) on the same batches, once
    # with the default kernel (auto -> triton) and once with the torch reference.
    losses = {}
    for kernel in ("auto", "torch"):
        out = tmp_path / kernel
        kernel_overrides = [] if kernel == "auto" else [f"stage{i}.loss.kernel=torch" for i in (1, 2)]
        summary = run(compose_config(tiny_overrides(out, steps=4) + ["train.device=cuda", "end_stage=2"]
                                     + kernel_overrides))
        assert summary["loss_kernels"] == ({"1": "triton", "2": "triton"} if kernel == "auto"
                                           else {"1": "torch", "2": "torch"})
        losses[kernel] = [(r["stage"], r["step"], r["loss"], r["loss/ce"], r["loss/kd"]) for r in train_rows(out)]
    assert len(losses["auto"]) == len(losses["torch"]) == 8
    for fused, reference in zip(losses["auto"], losses["torch"]):
        assert fused[:2] == reference[:2]
        # bf16 autocast on both paths; the updates drift apart a little over the steps.
        for got, want in zip(fused[2:], reference[2:]):
            assert got == pytest.approx(want, rel=2e-2, abs=2e-2), (fused, reference)


def test_teacher_stream_overlaps_without_changing_the_losses(tmp_path):
    # Stages 1 and 2 (stage 2 with feature, attention and contrastive terms: captured teacher
    # states cross from the side stream to the student's) with the teacher's forward on a side
    # stream (the default on CUDA) and without: the same kernels on the same batches.
    losses = {}
    for enabled in (True, False):
        out = tmp_path / str(enabled)
        summary = run(compose_config(tiny_overrides(out, steps=4) + ["train.device=cuda", "end_stage=2",
                                                                    f"train.teacher_stream={enabled}"]))
        assert summary["teacher_stream"] is enabled
        # The process's allocator settings: PyTorch's default (null), or an earlier test's in this process.
        own = os.environ.get(allocator.ENV)
        assert summary["cuda_alloc_conf"] == (own if own is not None else allocator._applied)
        losses[enabled] = [(r["stage"], r["step"], r["loss"], r["loss/ce"], r["loss/kd"]) for r in train_rows(out)]
    assert len(losses[True]) == len(losses[False]) == 8
    for overlapped, serial in zip(losses[True], losses[False]):
        assert overlapped[:2] == serial[:2]
        for got, want in zip(overlapped[2:], serial[2:]):
            assert got == pytest.approx(want, rel=1e-3, abs=1e-4), (overlapped, serial)


# compile first: Liger's patches replace the model family's RMSNorm / RoPE for the whole process.
@pytest.mark.parametrize("lever", ["train.compile=true", "train.liger_kernels=true"])
def test_speed_levers_run_a_stage(tmp_path, lever):
    if lever.startswith("train.liger") and importlib.util.find_spec("liger_kernel") is None:
        pytest.skip("needs liger-kernel")
    out = tmp_path / "run"
    summary = run(compose_config(tiny_overrides(out, steps=3) + ["train.device=cuda", "end_stage=1", lever]))
    assert summary["speedups"] == [lever.split(".")[1].split("=")[0]]
    rows = train_rows(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows)


def test_a_padding_free_stage_logs_the_losses_of_packed_rows(tmp_path):
    """Stage 2 (all five terms) with PyTorch's flash varlen kernel, bf16: one row per micro-batch
    (train.pack_layout=padding_free) logs the rows layout's tokens and, to bf16 rounding, losses,
    with no padding."""
    from qwen_distillation.modeling.varlen import varlen_available

    if not varlen_available():
        pytest.skip("this torch has no torch.nn.attention.varlen")
    rows = {}
    for layout in ("rows", "padding_free"):
        out = tmp_path / layout
        run(compose_config(tiny_overrides(out, steps=2) + [
            "train.device=cuda", "train.packing=true", f"train.pack_layout={layout}",
            "model.teacher.attn_implementation=varlen", "model.student.attn_implementation=varlen",
            "data.max_length=256", "start_stage=2", "end_stage=2", "stage2.batch_size=4"]))
        rows[layout] = train_rows(out)
    assert len(rows["padding_free"]) == 2
    for packed, flat in zip(rows["rows"], rows["padding_free"]):
        assert flat["tokens"] == packed["tokens"] and flat["padding"] == 0 < packed["padding"]
        for key in ("loss/ce", "loss/kd"):
            assert flat[key] == pytest.approx(packed[key], rel=2e-2), key


def test_a_background_save_copies_the_gpu_state_into_pinned_buffers_it_reuses():
    """train.async_checkpoint on a GPU: host_copy copies each CUDA tensor into a pinned host buffer
    without blocking and waits once; the copy holds the values of the moment, and the next save of
    the same shapes reuses the buffers."""
    from qwen_distillation.training.checkpoint import host_copy

    state = {"module": {"w": torch.randn(1024, 512, device="cuda")},
             "optimizer": {"state": {0: {"exp_avg": torch.randn(4096, device="cuda"), "step": torch.tensor(3.0)}},
                           "param_groups": [{"lr": 0.1, "params": [0]}]}}
    buffers = {}
    first = host_copy(state, buffers)
    expected = state["module"]["w"].cpu()
    state["module"]["w"].add_(1.0)  # the steps after the save
    assert torch.equal(first["module"]["w"], expected) and first["module"]["w"].is_pinned()
    assert first["optimizer"]["state"][0]["step"].item() == 3.0 and first["optimizer"]["param_groups"][0]["lr"] == 0.1
    second = host_copy(state, buffers)
    assert second["module"]["w"].data_ptr() == first["module"]["w"].data_ptr()
    assert torch.equal(second["module"]["w"], state["module"]["w"].cpu())
