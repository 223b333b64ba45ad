"""Atomic saves: a save that dies half-way never corrupts the previous checkpoint."""

from __future__ import annotations

import os
import re
from pathlib import Path

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


class _TensorEngine:
    """An engine whose state holds tensors the step loop goes on updating in place."""

    def __init__(self):
        import torch

        self.weight = torch.arange(6.0).reshape(2, 3)
        self.moments = [torch.ones(3), (torch.zeros(2), 7)]

    def save_state(self, directory):
        return {"module": {"w": self.weight}, "optimizer": {"state": self.moments, "lr": 0.1}}

    def load_state(self, directory, state):
        self.loaded = state


def _saved_state(path):
    import torch

    return torch.load(path / "state.pt", weights_only=False)


def test_a_background_save_writes_the_state_of_its_step_not_of_the_steps_after_it(tmp_path, monkeypatch):
    """train.async_checkpoint: the step loop changes the weights in place while the writer thread
    works; the checkpoint holds them as they were at the save, and equals a save in step."""
    import threading

    import torch

    from qwen_distillation.training import checkpoint
    from qwen_distillation.training.checkpoint import StageSaves

    engine, sampler = _TensorEngine(), _Recorder(5)
    save_stage_checkpoint(tmp_path / "in_step", keep=2, engine=engine, sampler=sampler, step=4,
                          extra={"best": 1.5, "recent_skipped": [False]})
    stepped, write = threading.Event(), checkpoint._write_state
    monkeypatch.setattr(checkpoint, "_write_state", lambda *args: stepped.wait(10) and write(*args))
    saves = StageSaves(background=True)
    target = saves.save(tmp_path / "background", keep=2, engine=engine, sampler=sampler, step=4,
                        extra={"best": 1.5, "recent_skipped": [False]})
    engine.weight.add_(100.0)  # the next steps, before the writer thread writes
    engine.moments[0].mul_(3.0)
    sampler.value = 6
    stepped.set()
    saves.wait()
    assert target == tmp_path / "background" / "checkpoint-4"
    in_step, background = _saved_state(tmp_path / "in_step" / "checkpoint-4"), _saved_state(target)
    assert torch.equal(background["engine"]["module"]["w"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(background["engine"]["optimizer"]["state"][0], torch.ones(3))
    assert background["sampler"] == {"value": 5} and background["step"] == 4
    for key in ("sampler", "step", "extra", "world_size"):
        assert background[key] == in_step[key], key
    torch.testing.assert_close(background["engine"], in_step["engine"], rtol=0, atol=0)
    assert (target / "meta.json").read_text() == (tmp_path / "in_step" / "checkpoint-4" / "meta.json").read_text()


def test_background_saves_keep_the_newest_and_each_waits_for_the_one_before(tmp_path):
    from qwen_distillation.training.checkpoint import StageSaves

    saves = StageSaves(background=True)
    for step in (3, 6, 9):
        saves.save(tmp_path, keep=2, engine=_Recorder(step), sampler=_Recorder(-step), step=step,
                   extra={"global_step": step})
    saves.wait()
    assert [p.name for p in stage_checkpoints(tmp_path)] == ["checkpoint-9", "checkpoint-6"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-9"]
    engine, sampler = _Recorder(), _Recorder()
    saved, path = load_stage_checkpoint(tmp_path, engine=engine, sampler=sampler)
    assert (saved["step"], engine.loaded, sampler.loaded, path.name) == (9, [9], [-9], "checkpoint-9")


def test_a_failed_background_save_is_raised_at_the_next_wait_and_keeps_the_older_checkpoints(tmp_path, monkeypatch):
    from qwen_distillation.training import checkpoint
    from qwen_distillation.training.checkpoint import StageSaves

    saves = StageSaves(background=True)
    saves.save(tmp_path, keep=2, engine=_Recorder(2), sampler=_Recorder(), step=2, extra={})
    saves.wait()

    def disk_full(directory, state):
        (directory / "state.pt").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "_write_state", disk_full)
    saves.save(tmp_path, keep=1, engine=_Recorder(4), sampler=_Recorder(), step=4, extra={})
    with pytest.raises(CheckpointError, match=r"could not write \S*checkpoint-4 \(.* MB free on .*\): \[Errno 28\] "
                                              r"No space left on device; free space"):
        saves.wait()
    saves.wait()  # reported once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert load_training_state(tmp_path / "checkpoint-2", engine=_Recorder(), sampler=_Recorder())["step"] == 2


def test_a_failed_background_save_of_another_kind_is_raised_as_such_at_the_next_wait(tmp_path, monkeypatch):
    from qwen_distillation.training import checkpoint
    from qwen_distillation.training.checkpoint import StageSaves

    def broken(directory, state):
        raise RuntimeError("not a write error")

    monkeypatch.setattr(checkpoint, "_write_state", broken)
    saves = StageSaves(background=True)
    saves.save(tmp_path, keep=1, engine=_Recorder(4), sampler=_Recorder(), step=4, extra={})
    with pytest.raises(CheckpointError, match=r"checkpoint-4: the background save failed \(RuntimeError: not a write"
                                              r".*earlier checkpoints are kept.*train.async_checkpoint=false"):
        saves.wait()
    assert list(tmp_path.iterdir()) == []


DISK_FULL = {"OSError": OSError(28, "No space left on device"),
             "RuntimeError": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 38990912 vs "
                                          "38990864")}


def _disk_full(error):
    """A ``torch.save`` that writes part of the file, then fails as on a full disk with ``error``."""
    def save(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"part of a file")
        raise error
    return save


@pytest.mark.parametrize("background", [False, True], ids=["in_step", "background"])
@pytest.mark.parametrize("kind", list(DISK_FULL))
def test_a_full_disk_while_saving_a_checkpoint_names_it_the_space_left_and_the_fix(tmp_path, monkeypatch, kind,
                                                                                   background):
    """A torch.save that fails for want of space (an OSError, or torch's zip writer's RuntimeError) is
    a CheckpointError naming the checkpoint, the space left and the options that save less, in step
    and in the background (train.async_checkpoint); the half-written directory is removed and the
    stage's older checkpoint is kept."""
    import torch

    from qwen_distillation.training.checkpoint import StageSaves

    stage = tmp_path / "stage1"
    _save(stage, 2)
    monkeypatch.setattr(torch, "save", _disk_full(DISK_FULL[kind]))
    saves = StageSaves(background=background)
    with pytest.raises(CheckpointError) as err:
        saves.save(stage, keep=1, engine=_Recorder(4), sampler=_Recorder(), step=4, extra={})
        saves.wait()
    message = str(err.value)
    assert message.startswith(f"could not write {stage / 'checkpoint-4'} (") and f"MB free on {stage}): " in message
    assert message.endswith(f"): {DISK_FULL[kind] if kind == 'RuntimeError' else '[Errno 28] No space left on device'}"
                            f"; free space, or keep fewer checkpoints (train.keep_checkpoints=1) / save less often "
                            f"(stage1.save_every=0: by train.save_every_minutes only)"), message
    assert isinstance(err.value.__cause__, OSError)
    monkeypatch.undo()
    assert sorted(p.name for p in stage.iterdir()) == ["checkpoint-2"]
    assert load_training_state(stage / "checkpoint-2", engine=_Recorder(), sampler=_Recorder())["step"] == 2


def test_an_error_that_is_not_a_write_error_is_raised_as_it_is(tmp_path):
    """Only what the writes raise is taken for a full disk: an engine's own error stays itself."""
    class Broken(_Recorder):
        def save_state(self, directory):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _save(tmp_path, 2)
    with pytest.raises(RuntimeError, match="CUDA error"):
        save_stage_checkpoint(tmp_path, keep=1, engine=Broken(), sampler=_Recorder(), step=4, extra={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]


def test_a_full_disk_while_exporting_or_saving_the_heads_names_the_path_and_the_space_left(tmp_path, monkeypatch):
    """A model export (safetensors, through save_pretrained) and heads.pt (torch.save) on a full disk:
    a CheckpointError naming the path; no partial file or directory, the previous one kept."""
    import torch
    from safetensors import SafetensorError

    from qwen_distillation.training.checkpoint import export_model, save_state_dict

    class Model:
        def save_pretrained(self, directory, **kwargs):
            (Path(directory) / "model.safetensors").write_bytes(b"part of a file")
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')

    best = tmp_path / "stage1" / "best"
    with atomic_dir(best) as tmp:
        (tmp / "model.safetensors").write_text("good")
    with pytest.raises(CheckpointError, match=rf"^could not write {re.escape(str(best))} \(.* MB free on "
                                              rf"{re.escape(str(best.parent))}\): Error while serializing: "
                                              r"IoError.*StorageFull.*; free space, or choose another output "
                                              r"directory$"):
        export_model(Model(), tokenizer=None, target=best)
    assert (best / "model.safetensors").read_text() == "good"
    heads = tmp_path / "stage1" / "heads.pt"
    save_state_dict(heads, {"w": torch.ones(1)})
    monkeypatch.setattr(torch, "save", _disk_full(DISK_FULL["RuntimeError"]))
    with pytest.raises(CheckpointError, match=rf"^could not write {re.escape(str(heads))} \(.* MB free on "
                                              rf"{re.escape(str(heads.parent))}\): \[enforce fail at "
                                              r"inline_container.cc:672\] . unexpected pos"):
        save_state_dict(heads, {"w": torch.zeros(1)})
    monkeypatch.undo()
    assert torch.load(heads)["w"].item() == 1.0
    assert sorted(p.name for p in best.parent.iterdir()) == ["best", "heads.pt"]


def test_background_saves_are_for_one_process():
    from qwen_distillation.training.checkpoint import StageSaves
    from qwen_distillation.training.distributed import Topology

    with pytest.raises(ValueError, match="one process"):
        StageSaves(background=True, topology=Topology(rank=0, world_size=2, local_rank=0))


def test_host_copy_copies_every_tensor_and_keeps_the_structure():
    import torch

    from qwen_distillation.training.checkpoint import host_copy

    original = {"a": torch.ones(2), "b": [torch.zeros(1), (3, torch.full((1,), 2.0))], "c": {"d": [1, 2]}}
    copied = host_copy(original)
    original["a"].add_(1.0)
    original["b"][1][1].add_(1.0)
    original["c"]["d"].append(3)
    assert torch.equal(copied["a"], torch.ones(2)) and torch.equal(copied["b"][1][1], torch.full((1,), 2.0))
    assert isinstance(copied["b"][1], tuple) and copied["b"][1][0] == 3 and copied["c"] == {"d": [1, 2]}


def _an_export(directory):
    (directory / "merged").mkdir(parents=True)
    for name, data in (("model.safetensors", b"weights"), ("config.json", b"{}"),
                       ("merged/model.safetensors", b"merged weights"), ("merged/tokenizer.json", b"tok")):
        (directory / name).write_bytes(data)
    return directory


def test_link_export_links_the_weights_copies_the_rest_and_replaces_the_target(tmp_path):
    """stageN/final when stageN/best was exported at the last step: the same files, the weights
    hard-linked, the small files (a user may edit them in place) copied."""
    from qwen_distillation.training.checkpoint import link_export

    best = _an_export(tmp_path / "best")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "stale.txt").write_text("from an earlier export")
    link_export(best, tmp_path / "final")
    final = tmp_path / "final"
    names = sorted(str(p.relative_to(final)) for p in final.rglob("*"))
    assert names == ["config.json", "merged", "merged/model.safetensors", "merged/tokenizer.json", "model.safetensors"]
    for name in names:
        if (best / name).is_file():
            assert (final / name).read_bytes() == (best / name).read_bytes()
            assert os.path.samefile(final / name, best / name) == name.endswith(".safetensors"), name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "final"]


def test_link_export_copies_where_the_file_system_has_no_hard_links(tmp_path, monkeypatch):
    from qwen_distillation.training.checkpoint import link_export

    def no_links(source, target):
        raise OSError(1, "Operation not permitted")

    best = _an_export(tmp_path / "best")
    monkeypatch.setattr(os, "link", no_links)
    link_export(best, tmp_path / "final")
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"weights"
    assert not os.path.samefile(tmp_path / "final" / "model.safetensors", best / "model.safetensors")


def test_an_adapter_whose_base_now_holds_other_weights_is_refused(tmp_path, tokenizer):
    """A rerun with overwrite_output_dir=true writes a new student_base where an earlier run's adapters
    (copied elsewhere) still point: peft applied them to the new weights without a word."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwen_distillation.config.schema import LoraConfig
    from qwen_distillation.modeling.loading import ADAPTER_BASE, load_student_checkpoint
    from qwen_distillation.modeling.pair import apply_lora
    from qwen_distillation.training.checkpoint import export_model

    def tiny(seed: int):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "qwen2", vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1))

    base = tmp_path / "student_base"
    tiny(0).save_pretrained(base)
    adapter = tmp_path / "adapter"
    peft_model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraConfig(enabled=True, r=2),
                            torch.device("cpu"), str(base))
    export_model(peft_model, tokenizer, adapter, base_model_dir=str(base))
    assert (adapter / ADAPTER_BASE).is_file()
    load_student_checkpoint(str(adapter), dtype=torch.float32)  # its own base: loads
    tiny(1).save_pretrained(base)  # another run's student_base at the same path
    with pytest.raises(CheckpointError, match=rf"^checkpoint_path={re.escape(str(adapter))}: the LoRA adapter's base "
                                              rf"model {re.escape(str(base))} now holds other weights than the ones it "
                                              rf"was trained on \(sampled fingerprint"):
        load_student_checkpoint(str(adapter), dtype=torch.float32)
    (adapter / ADAPTER_BASE).unlink()  # an adapter exported before the record existed is not checked
    load_student_checkpoint(str(adapter), dtype=torch.float32)


def test_the_adapter_base_fingerprint_is_read_once_while_the_base_files_are_unchanged(tmp_path, monkeypatch):
    """Every export of a LoRA run records its student_base's fingerprint: the base's weights are sampled
    once, and again only when a file the fingerprint reads changes (a rerun that rewrites the base)."""
    import json

    import qwen_distillation.data.generated as generated
    from qwen_distillation.modeling.loading import adapter_base_record

    base = tmp_path / "student_base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    weights = base / "model.safetensors"
    weights.write_bytes(b"\1" * 4096)
    reads = []
    sample_file = generated._sample_file
    monkeypatch.setattr(generated, "_sample_file", lambda digest, file: (reads.append(file.name),
                                                                         sample_file(digest, file)))
    first = adapter_base_record(str(base))
    assert adapter_base_record(str(base)) == first  # the second export reads no weights
    assert reads == ["config.json", "model.safetensors"]
    stat = weights.stat()
    weights.write_bytes(b"\2" * 4096)  # another run's base: same path, same size
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    second = adapter_base_record(str(base))
    assert reads == ["config.json", "model.safetensors"] * 2
    assert second["fingerprint"] != first["fingerprint"]
    assert second["fingerprint"] == generated.model_fingerprint(str(base))
