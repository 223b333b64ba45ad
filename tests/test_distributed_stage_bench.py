"""benchmarks/distributed_stage.py --gpus: each count's real command line (torchrun beyond one GPU, the
per-GPU work held fixed by scaling grad_accum) and the scaling ratios it reports against the targets."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("distributed_stage", REPO / "benchmarks" / "distributed_stage.py")
ds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ds)

ARGS = argparse.Namespace(steps=12, batch_size=4, grad_accum=2, max_length=2048, overrides=["seed=1"],
                          pair="7b-1.5b", draw=False)


def test_one_gpu_runs_the_command_itself_and_several_run_it_under_torchrun_with_the_work_per_gpu_fixed():
    one = ds.engine_command("zero3", 1, Path("/m"), Path("/o/zero3"), ARGS)
    two = ds.engine_command("zero3", 2, Path("/m"), Path("/o/zero3_2gpu"), ARGS)
    assert one[:2] == [sys.executable, "run_distillation.py"]
    assert two[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert two[5] == "run_distillation.py" and two[-1] == "seed=1"
    assert "stage1.grad_accum=2" in one and "stage1.grad_accum=4" in two
    assert "stage1.batch_size=4" in two and "data.max_length=2048" in two and "distributed=zero3" in two
    with pytest.raises(SystemExit, match="--engines none runs on one device"):
        ds.engine_command("none", 2, Path("/m"), Path("/o"), ARGS)


def test_scaling_is_each_count_over_its_own_engine_on_one_gpu_beside_its_target():
    results = [{"engine": "zero3", "gpus": 1, "tokens_per_s_median": 1000.0},
               {"engine": "zero3", "gpus": 2, "tokens_per_s_median": 1900.0},
               {"engine": "fsdp2", "gpus": 1, "tokens_per_s_median": 2000.0},
               {"engine": "fsdp2", "gpus": 2, "tokens_per_s_median": 3600.0},
               {"engine": "fsdp2", "gpus": 8, "tokens_per_s_median": 14500.0},
               {"engine": "zero2", "gpus": 2, "tokens_per_s_median": 500.0}]
    ds.add_scaling(results)
    assert results[1]["scaling_vs_1_gpu"] == pytest.approx(1.9) and results[1]["scaling_target_met"] is True
    assert results[3]["scaling_vs_1_gpu"] == pytest.approx(1.8) and results[3]["scaling_target_met"] is False
    assert results[4]["scaling_vs_1_gpu"] == pytest.approx(7.25) and results[4]["scaling_target"] == 7.0
    assert results[4]["scaling_target_met"] is True
    assert "scaling_vs_1_gpu" not in results[0] and "scaling_vs_1_gpu" not in results[5]  # no one-GPU run of zero2


def test_draw_builds_both_models_at_load_from_the_pairs_shapes_and_72b_is_never_saved(tmp_path):
    """--draw (the 72B -> 7B run of docs/distributed.md): no saved pair, each model drawn from its
    Qwen2.5 shape at load (partitioned over the ranks under ZeRO-3); the user's overrides come last."""
    drawn = ds.engine_command("zero3", 2, None, Path("/o"), argparse.Namespace(**{**vars(ARGS), "pair": "72b-7b",
                                                                                      "draw": True}))
    assert not any(arg.startswith("model.") and "/m/" in arg for arg in drawn)
    for role, size in (("teacher", "72b"), ("student", "7b")):
        assert f"model.{role}.path=null" in drawn and f"model.{role}.random_init.model_type=qwen2" in drawn
        for key, value in ds.QWEN[size].items():
            assert f"model.{role}.random_init.{key}={value}" in drawn
    assert "model.teacher.random_init.hidden_size=8192" in drawn and drawn[-1] == "seed=1"
    saved = ds.engine_command("zero3", 1, Path("/m"), Path("/o"), ARGS)
    assert "model.teacher.path=/m/teacher" in saved and "model.student.random_init=null" in saved
    with pytest.raises(SystemExit, match="--draw"):
        ds.prepare("72b-7b", tmp_path)
