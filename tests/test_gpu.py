"""GPU runs of the pipeline (skipped on the CPU). Results are recorded in docs/gpu.md."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from conftest import compose_config, tiny_overrides, train_rows
from qwen_distillation.app import run

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
