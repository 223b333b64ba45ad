"""Atomic saves: a save that dies half-way never corrupts the previous checkpoint."""

from __future__ import annotations

import os

import pytest

from qwen_distillation.training.checkpoint import atomic_dir, recover


def test_failed_save_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_dir(target) as tmp:
        (tmp / "state.pt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "state.pt").write_text("half")
            raise RuntimeError("killed while writing")
    assert (target / "state.pt").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_kill_between_the_two_renames_is_recovered(tmp_path):
    target = tmp_path / "checkpoint"
    with atomic_dir(target) as tmp:
        (tmp / "state.pt").write_text("good")
    # What a kill right after `target -> .old` and before `tmp -> target` leaves behind.
    os.replace(target, tmp_path / ".checkpoint.old")
    assert not target.exists()
    assert (recover(target) / "state.pt").read_text() == "good"


def test_successful_save_replaces(tmp_path):
    target = tmp_path / "checkpoint"
    for text in ("one", "two"):
        with atomic_dir(target) as tmp:
            (tmp / "state.pt").write_text(text)
    assert (target / "state.pt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_the_saved_rng_state_includes_numpy():
    """Every generator a step may draw from continues exactly after a resume (issue 14)."""
    import random

    import numpy as np
    import torch

    from qwen_distillation.training.checkpoint import rng_state, set_rng_state

    saved = rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.random(), np.random.rand(), torch.rand(3)  # move every generator on
    set_rng_state(saved)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
