"""Atomic saves: a save that dies half-way never corrupts the previous checkpoint."""

from __future__ import annotations

import os

import pytest

from qwen_distillation.errors import CheckpointError
from qwen_distillation.training.checkpoint import (atomic_dir, load_stage_checkpoint, load_training_state, recover,
                                                  remove_stage_checkpoints, save_stage_checkpoint,
                                                  stage_checkpoints)


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


class _Recorder:
    """Stands in for an engine or a sampler: its state is a number, and it records loads."""

    def __init__(self, value=0):
        self.value, self.loaded = value, []

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.loaded.append(state["value"])

    # An engine's side of a checkpoint (training/engine.py): its state in the returned dict.
    def save_state(self, directory):
        return self.state_dict()

    def load_state(self, directory, state):
        self.load_state_dict(state)


def _save(stage_dir, step, keep=2):
    return save_stage_checkpoint(stage_dir, keep=keep, engine=_Recorder(step), sampler=_Recorder(-step), step=step,
                                 extra={"global_step": step})


def test_a_stage_keeps_its_newest_checkpoints(tmp_path):
    for step in (3, 6, 9, 12):
        _save(tmp_path, step)
    assert [p.name for p in stage_checkpoints(tmp_path)] == ["checkpoint-12", "checkpoint-9"]
    _save(tmp_path, 15, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-15"]


def test_checkpoints_are_found_newest_first_and_a_half_swapped_one_is_recovered(tmp_path):
    for step in (2, 10):
        _save(tmp_path, step, keep=5)
    os.replace(tmp_path / "checkpoint-10", tmp_path / ".checkpoint-10.old")  # killed between the renames
    (tmp_path / ".checkpoint-12.tmp").mkdir()  # killed while writing: never a candidate
    assert [p.name for p in stage_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-2"]
    remove_stage_checkpoints(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    for step in (3, 6):
        _save(tmp_path, step)
    state = tmp_path / "checkpoint-6" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    engine, sampler = _Recorder(), _Recorder()
    saved, directory = load_stage_checkpoint(tmp_path, engine=engine, sampler=sampler)
    assert directory.name == "checkpoint-3" and saved["step"] == 3 and saved["extra"] == {"global_step": 3}
    assert engine.loaded == [3] and sampler.loaded == [-3]
    assert f"{state}: unreadable training state" in caplog.text and "falling back" in caplog.text


def test_no_readable_checkpoint_is_an_error_naming_each_file_and_the_fix(tmp_path):
    _save(tmp_path, 4)
    (tmp_path / "checkpoint-4" / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError) as err:
        load_stage_checkpoint(tmp_path, engine=_Recorder(), sampler=_Recorder())
    message = str(err.value)
    assert f"{tmp_path / 'checkpoint-4' / 'state.pt'}: unreadable training state" in message
    assert f"Delete {tmp_path / 'checkpoint-*'} to restart the stage" in message
    assert load_stage_checkpoint(tmp_path / "none", engine=_Recorder(), sampler=_Recorder()) is None


def test_a_checkpoint_of_another_run_is_refused_with_its_path(tmp_path):
    _save(tmp_path, 4)

    class Mismatch(_Recorder):
        def load_state_dict(self, state):
            raise RuntimeError("size mismatch for weight")

    with pytest.raises(CheckpointError, match=r"checkpoint-4/state\.pt: does not fit this run \(RuntimeError: size"):
        load_training_state(tmp_path / "checkpoint-4", engine=Mismatch(), sampler=_Recorder())
