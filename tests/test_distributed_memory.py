"""benchmarks/distributed_memory.py: the parameter-count formula agrees with a real (tiny) Qwen2ForCausalLM,
the Qwen2.5 counts are pinned, and a few cells of the memory table equal their formula."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import REPO

spec = importlib.util.spec_from_file_location("distributed_memory", REPO / "benchmarks" / "distributed_memory.py")
dm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dm)

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("tie", [True, False])
def test_formula_counts_a_real_qwen2_model(tie):
    shape = {**TINY, "tie_word_embeddings": tie}
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**shape))
    assert dm.param_count(shape) == sum(p.numel() for p in model.parameters())
    assert dm.layer_params(shape) == sum(p.numel() for p in model.model.layers[0].parameters())
    assert dm.vocab_matrix_params(shape) == model.lm_head.weight.numel()


def test_qwen25_parameter_counts():
    counts = {name: dm.param_count(shape) for name, shape in dm.QWEN.items()}
    assert counts == {"0.5b": 494_032_768, "1.5b": 1_543_714_304, "7b": 7_615_616_512, "72b": 72_706_203_648}
    for name, published in (("1.5b", 1.54e9), ("7b", 7.62e9), ("72b", 72.7e9)):
        assert counts[name] == pytest.approx(published, rel=0.005)


def cell(pair, engine, gpus):
    return next(r for r in dm.cells() if (r["pair"], r["engine"], r["gpus"]) == (pair, engine, gpus))


def test_zero3_on_8_gpus_for_72b_to_7b_is_the_formula():
    p_t, p_s = 72_706_203_648, 7_615_616_512
    t, s = dm.QWEN["72b"], dm.QWEN["7b"]
    working_set = 4 * (dm.layer_params(s) + 152064 * 3584) + 2 * (dm.layer_params(t) + 152064 * 8192)
    expected = ((16 * p_s + 2 * p_t) // 8 + working_set) / 2**30
    row = cell("72b->7b", "zero3", 8)
    assert row["gpu_gib"] == round(expected, 1) == 38.0
    assert row["fits_h200"] and row["cpu_gib_per_node"] is None
    assert cell("72b->7b", "fsdp2", 8)["gpu_gib"] == row["gpu_gib"]


def test_other_cells():
    p_t, p_s = 7_615_616_512, 1_543_714_304
    assert cell("7b->1.5b", "none", 1)["gpu_gib"] == round((16 * p_s + 2 * p_t) / 2**30, 1) == 37.2
    assert cell("7b->1.5b", "zero2", 1)["gpu_gib"] == 37.2
    assert cell("7b->1.5b", "zero2", 4)["gpu_gib"] == round((4 * p_s + 12 * p_s // 4 + 2 * p_t) / 2**30, 1)
    assert cell("7b->1.5b", "none", 2)["gpu_gib"] is None
    offload = cell("72b->7b", "zero3_offload", 4)
    assert offload["cpu_gib_per_node"] == round(16 * 7_615_616_512 / 2**30, 1)
    assert not cell("72b->7b", "zero2", 8)["fits_h200"] and not cell("72b->7b", "none", 1)["fits_h200"]
    assert "| 72b->7b | zero2 | 248.9 ✗ | 206.4 ✗ |" in dm.markdown(dm.cells())
