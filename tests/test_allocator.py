"""train.cuda_alloc_conf: validated at config time, applied to the CUDA caching allocator on a GPU
unless PYTORCH_CUDA_ALLOC_CONF is set, recorded in summary.json."""

from __future__ import annotations

import pytest
import torch

from qwen_distillation.cli import compose_run_config
from qwen_distillation.errors import ConfigError
from qwen_distillation.training import allocator


@pytest.fixture
def calls(monkeypatch):
    seen = []

    def fake(conf):
        if "bogus" in conf:
            raise RuntimeError("Unrecognized key 'bogus' in CUDA allocator config.")
        seen.append(conf)

    monkeypatch.setattr(allocator, "_setter", lambda: fake)
    monkeypatch.setattr(allocator, "_applied", None)
    monkeypatch.delenv(allocator.ENV, raising=False)
    return seen


def test_the_default_is_pytorchs_allocator_and_a_malformed_value_names_the_key():
    assert compose_run_config([]).train.cuda_alloc_conf is None
    conf = compose_run_config(["train.cuda_alloc_conf=expandable_segments:True"]).train.cuda_alloc_conf
    assert conf == "expandable_segments:True"
    for bad in ("expandable_segments", "expandable_segments:", " "):
        with pytest.raises(ConfigError, match=r"train\.cuda_alloc_conf=.*option:value pairs"):
            compose_run_config([f"train.cuda_alloc_conf='{bad}'"])


def test_the_config_value_is_applied_unless_the_environment_sets_its_own(calls, monkeypatch):
    assert allocator.set_cuda_allocator("expandable_segments:True") == "expandable_segments:True"
    assert calls == ["expandable_segments:True"]
    # null after an earlier run in the same process: the allocator keeps that run's settings, and says so
    assert allocator.set_cuda_allocator(None) == "expandable_segments:True" and len(calls) == 1
    monkeypatch.setenv(allocator.ENV, "max_split_size_mb:256")
    assert allocator.set_cuda_allocator("expandable_segments:True") == "max_split_size_mb:256"
    assert len(calls) == 1


def test_null_in_a_fresh_process_leaves_pytorchs_default(calls):
    assert allocator.set_cuda_allocator(None) is None and calls == []


def test_a_setting_pytorch_refuses_is_a_config_error_naming_the_key(calls):
    with pytest.raises(ConfigError, match=r"train\.cuda_alloc_conf=bogus:1: PyTorch refused it .*Unrecognized key"):
        allocator.set_cuda_allocator("bogus:1")
    assert allocator._applied is None


def test_the_setter_exists_in_this_torch():
    assert callable(allocator._setter())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pytorch_takes_the_default_setting_on_a_gpu(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.set_cuda_allocator("expandable_segments:True") == "expandable_segments:True"
    x = torch.empty(3, 1 << 20, device="cuda")
    del x
