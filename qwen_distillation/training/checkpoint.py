"""Atomic checkpoints: exported models (``stageN/best``, ``stageN/final``) and full
training state (``stageN/checkpoint-STEP``, the newest few of a stage in progress), plus the
run state of an output directory.

Every directory is written under a temporary name and swapped in by ``os.replace``, so a
save killed half-way leaves the previous checkpoint intact; a checkpoint that is unreadable
anyway (a disk error, a file truncated by hand) is passed over for the one before it.

With ``train.async_checkpoint`` a single-device run writes its mid-stage checkpoints on a
background thread (:class:`StageSaves`): the step loop waits only for a host copy of the state,
and the files are the same as a save in step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import pickle
import random
import re
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from qwen_distillation.errors import CheckpointError, first_line
from qwen_distillation.modeling.loading import ADAPTER_BASE, adapter_base_record
from qwen_distillation.training.distributed import SINGLE, Topology, all_reduce_sum, barrier

log = logging.getLogger(__name__)

RUN_STATE = "run_state.json"
CHECKPOINT_PREFIX = "checkpoint-"
# stageN/checkpoint-STEP, or what a swap killed between its two renames left of one.
_CHECKPOINT_NAME = re.compile(rf"^\.?{CHECKPOINT_PREFIX}(\d+)(\.old)?$")
# What a write that fails (a full disk, a read-only or broken file system) raises: OSError, or safetensors' own
# error (save_pretrained). torch.save's RuntimeError is raised as an OSError by _torch_save.
_WRITE_ERRORS = (OSError, SafetensorError)
_WRITE_FIX = "free space, or choose another output directory"


def checkpoint_dir(stage_dir: Path, step: int) -> Path:
    """Where a stage's training checkpoint of ``step`` lives: ``stage_dir/checkpoint-STEP``."""
    return Path(stage_dir) / f"{CHECKPOINT_PREFIX}{step}"


def _old(target: Path) -> Path:
    return target.parent / f".{target.name}.old"


def recover(target: Path) -> Path:
    """If a swap was killed between its two renames, put the previous copy back."""
    target = Path(target)
    if not target.exists() and _old(target).exists():
        os.replace(_old(target), target)
    return target


def _write_failure(target: Path, err: BaseException, fix: str = _WRITE_FIX) -> CheckpointError:
    """The error for a failed write of ``target``: its path, the space left on the nearest existing
    directory above it (when it can be read), the original message and ``fix``."""
    target = Path(target)
    free = ""
    directory = next((parent for parent in target.parents if parent.is_dir()), None)
    if directory is not None:
        with contextlib.suppress(OSError):
            free = f" ({shutil.disk_usage(directory).free / 1e6:.1f} MB free on {directory})"
    return CheckpointError(f"could not write {target}{free}: {first_line(err)}; {fix}")


def _torch_save(obj, path: Path) -> None:
    """``torch.save``, a failed write raised as the OSError it is: torch's zip writer reports one (a
    full disk) as a RuntimeError, ``[enforce fail at inline_container.cc:...] . unexpected pos ...``."""
    try:
        torch.save(obj, path)
    except RuntimeError as err:
        raise OSError(first_line(err)) from err


@contextlib.contextmanager
def atomic_dir(target: Path, topology: Topology = SINGLE, *, fix: str = _WRITE_FIX):
    """Yield a temporary directory; on success it replaces ``target`` in one rename.

    On an exception the temporary directory is removed and ``target`` is untouched. In a launch
    of several ranks every rank enters (and writes its own files into the same temporary
    directory, on a file system they share); rank 0 swaps it in once all of them have written,
    so a rank killed mid-save leaves ``target`` as it was.

    Raises:
        CheckpointError: a write into the temporary directory failed (an OSError or a safetensors
            error: a full disk), naming ``target``, the space left and ``fix``; any other error is
            raised as it is.
    """
    target = Path(target)
    tmp = target.parent / f".{target.name}.tmp"
    if topology.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier(topology)
    try:
        yield tmp
    except BaseException as err:
        if topology.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, _WRITE_ERRORS):
            raise _write_failure(target, err, fix) from err
        raise
    barrier(topology)
    if topology.is_main:
        old = _old(target)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    barrier(topology)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) under a temporary name and rename it over ``path``: a reader
    sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str))


def export_model(model, tokenizer, target: Path, *, base_model_dir: str | None = None, merge: bool = False,
                 state_dict: dict | None = None) -> None:
    """Write a model that ``AutoModelForCausalLM.from_pretrained(target)`` loads.

    A plain model is saved as safetensors with its tokenizer. A peft model is saved as its
    adapter (``base_model_dir`` recorded as the base, with its weights' sampled fingerprint in
    ``adapter_base.json``) and, with ``merge``, the merged
    full model under ``target/merged``. ``state_dict``: the weights to write instead of the
    model's own (a model partitioned over ranks, consolidated).
    """
    extra = {} if state_dict is None else {"state_dict": state_dict}
    with atomic_dir(target) as tmp:
        if hasattr(model, "peft_config"):
            for peft_config in model.peft_config.values():
                peft_config.base_model_name_or_path = base_model_dir
            model.save_pretrained(tmp, safe_serialization=True, **extra)
            base = adapter_base_record(base_model_dir) if base_model_dir else None
            if base is not None:  # a later load refuses the adapter if other weights replace its base
                (tmp / ADAPTER_BASE).write_text(json.dumps(base, indent=2) + "\n")
            if merge:
                import copy

                merged = copy.deepcopy(model).merge_and_unload()
                merged.save_pretrained(tmp / "merged", safe_serialization=True)
                tokenizer.save_pretrained(tmp / "merged")
        else:
            model.save_pretrained(tmp, safe_serialization=True, **extra)
        tokenizer.save_pretrained(tmp)


def link_export(source: Path, target: Path) -> None:
    """Make ``target`` an export with the files of ``source`` (an export of the same weights), under
    a temporary directory swapped in like any export (:func:`atomic_dir`): the weight files
    (``*.safetensors``) hard-linked, or copied where the file system refuses links, every other file
    (config, tokenizer: small, and what a user might edit in place) copied. The package never
    changes an export's files in place (each export is written anew and swapped in)."""
    source = Path(source)
    with atomic_dir(target) as tmp:
        for path in sorted(source.rglob("*")):
            copy_to = tmp / path.relative_to(source)
            if path.is_dir():
                copy_to.mkdir(parents=True, exist_ok=True)
                continue
            if path.suffix == ".safetensors":
                with contextlib.suppress(OSError):  # no hard links here: copied below
                    os.link(path, copy_to)
                    continue
            shutil.copy2(path, copy_to)


def rng_state() -> dict:
    """Python's, numpy's, torch's and (on CUDA) every device's random generator states."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    if state.get("numpy") is not None:  # absent from checkpoints written before it was saved
        np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (all of them, or only LoRA's and the heads'), detached, not
    copied (as the optimizer's own ``state_dict`` holds its state): ``torch.save`` copies them as it
    writes, and a background save takes its own copy (:func:`host_copy`)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def save_training_state(target: Path, *, engine, sampler, step: int, extra: dict,
                        topology: Topology = SINGLE) -> None:
    """Everything needed to continue a stage exactly: the engine's state (weights, optimizer,
    schedule, balancer), RNG states, the data sampler's cursor and the step counters. In a launch
    of several ranks each writes its engine state and RNG states, and rank 0 the rest."""
    with atomic_dir(target, topology, fix=_checkpoint_fix(target)) as tmp:
        engine_state = engine.save_state(tmp)
        if topology.world_size > 1:
            _torch_save(rng_state(), tmp / _rng_file(topology.rank))
        if topology.is_main:
            _write_state(tmp, _state(engine_state, sampler, step, extra, topology.world_size))


def _state(engine_state: dict, sampler, step: int, extra: dict, world_size: int) -> dict:
    """What ``state.pt`` holds."""
    return {"engine": engine_state, "rng": rng_state(), "sampler": sampler.state_dict(), "step": step,
            "extra": extra, "world_size": world_size}


def _checkpoint_fix(target: Path) -> str:
    """How to make room for a stage's training checkpoints (``target``: ``stageN/checkpoint-STEP``)."""
    return (f"free space, or keep fewer checkpoints (train.keep_checkpoints=1) / save less often "
            f"({target.parent.name}.save_every=0: by train.save_every_minutes only)")


def _write_state(directory: Path, state: dict) -> None:
    _torch_save(state, directory / "state.pt")
    meta = {"step": state["step"], "world_size": state["world_size"], "kind": state["engine"].get("kind")}
    (directory / "meta.json").write_text(json.dumps(meta, indent=2))


def checkpoint_meta(target: Path) -> dict:
    """A training checkpoint's ``meta.json`` (its step, launch size and engine kind), read without
    loading its state; empty when it is missing or unreadable (the load then finds out what is wrong)."""
    try:
        meta = json.loads((Path(target) / "meta.json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def other_launch(target: Path, saved_world: int, world_size: int) -> str:
    """Why the checkpoint ``target``, written by a launch of ``saved_world`` processes, cannot resume in
    one of ``world_size``, and the fix."""
    return (f"{Path(target) / 'state.pt'}: written by a launch of {saved_world} process(es), this one has "
            f"{world_size}; resume with the same launch, or delete {target} to restart the stage from an older "
            f"checkpoint or its beginning")


def load_training_state(target: Path, *, engine, sampler, topology: Topology = SINGLE) -> dict:
    """Restore what :func:`save_training_state` wrote into ``engine`` and ``sampler`` (and the
    RNGs); returns the saved dict (``step``, ``extra``).

    Raises:
        CheckpointError: ``state.pt`` is missing, unreadable (truncated, not a checkpoint) or
            does not fit this run's model, optimizer or data; the message names the file.
    """
    target = recover(Path(target))
    path = target / "state.pt"
    if not path.exists():
        raise CheckpointError(f"{path}: missing; the training checkpoint {target} is incomplete. Delete {target} "
                              f"to restart the stage from its beginning")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        step, extra = int(state["step"]), dict(state["extra"])
    except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, pickle.UnpicklingError,
            zipfile.BadZipFile) as err:
        raise CheckpointError(f"{path}: unreadable training state ({type(err).__name__}: {err}); the file is "
                              f"truncated or is not a checkpoint. Delete {target} to resume from an older "
                              f"checkpoint of the stage (or its beginning)") from err
    saved_world = state.get("world_size", 1)
    if saved_world != topology.world_size:
        raise CheckpointError(other_launch(target, saved_world, topology.world_size))
    try:
        engine.load_state(target, state["engine"])
        sampler.load_state_dict(state["sampler"])
        rng = state["rng"]
        if topology.world_size > 1:
            rng = torch.load(target / _rng_file(topology.rank), map_location="cpu", weights_only=False)
        set_rng_state(rng)
    except CheckpointError as err:  # the engine's or the sampler's own account of what differs
        raise CheckpointError(f"{path}: {err}") from err
    except (KeyError, ValueError, RuntimeError, TypeError, IndexError) as err:
        raise CheckpointError(f"{path}: does not fit this run ({type(err).__name__}: {err}); was it written with "
                              f"another model, loss, LoRA or data setting? Delete {target} to restart the stage "
                              f"from an older checkpoint or its beginning") from err
    return {**state, "step": step, "extra": extra}


def stage_checkpoints(stage_dir: Path) -> list[Path]:
    """The training checkpoints of a stage in progress (``stageN/checkpoint-STEP``), newest
    first; a swap killed between its renames is completed first (:func:`recover`)."""
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        return []
    steps = set()
    for entry in stage_dir.iterdir():
        match = _CHECKPOINT_NAME.match(entry.name)
        if match and entry.is_dir() and (match.group(2) is None) == (not entry.name.startswith(".")):
            steps.add(int(match.group(1)))
    found = [recover(checkpoint_dir(stage_dir, step)) for step in sorted(steps, reverse=True)]
    return [path for path in found if path.is_dir()]


def save_stage_checkpoint(stage_dir: Path, *, keep: int, engine, sampler, step: int, extra: dict,
                          topology: Topology = SINGLE) -> Path:
    """Save the training state as ``stage_dir/checkpoint-STEP`` (:func:`save_training_state`),
    then delete all but the newest ``keep`` checkpoints of the stage. Returns the new one."""
    target = checkpoint_dir(stage_dir, step)
    save_training_state(target, engine=engine, sampler=sampler, step=step, extra=extra, topology=topology)
    if topology.is_main:
        _prune(stage_dir, keep)
    barrier(topology)
    return target


def _prune(stage_dir: Path, keep: int) -> None:
    for old in stage_checkpoints(stage_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)


def host_copy(obj, buffers: dict | None = None, key: tuple = ()):
    """A copy of ``obj`` (dicts, lists and tuples of tensors and other values) that later in-place
    updates of its tensors do not reach: each tensor copied into host memory, everything else
    deep-copied. With ``buffers`` (a dict kept between calls), a GPU tensor is copied into the pinned
    host tensor kept there under its place in ``obj`` when shape and dtype still match (allocated
    there otherwise), without blocking, and the copies are waited for once at the end."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach()
        if obj.device.type != "cuda" or buffers is None:
            return obj.to("cpu", copy=True)
        buffer = buffers.get(key)
        if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
            buffer = buffers[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
        return buffer.copy_(obj, non_blocking=True)
    if isinstance(obj, dict):
        out = {name: host_copy(value, buffers, key + (name,)) for name, value in obj.items()}
    elif isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        out = type(obj)(host_copy(value, buffers, key + (i,)) for i, value in enumerate(obj))
    else:
        return copy.deepcopy(obj)
    if not key and torch.cuda.is_available():
        torch.cuda.synchronize()  # the non-blocking copies into pinned memory have landed
    return out


class StageSaves:
    """Saves a stage's mid-stage checkpoints (:func:`save_stage_checkpoint`), in step or, with
    ``background`` (``train.async_checkpoint``, one process only), on a background thread.

    In the background, :meth:`save` first waits for the previous save, then takes a host copy of the
    training state (:func:`host_copy`; pinned buffers reused from save to save on a GPU), hands it to
    a writer thread and returns: the step loop goes on while the files are written and the older
    checkpoints pruned. The files, and the atomic swap that keeps the previous checkpoint whole if the
    process dies mid-write, are the same as in step. The cost is one host copy of the trainable weights
    and the optimizer's state, held from one save to the next. :meth:`wait` joins the writer and
    raises its error, if it had one; call it before a stage's checkpoints are read or removed.
    """

    def __init__(self, *, background: bool = False, topology: Topology = SINGLE):
        if background and topology.world_size > 1:
            raise ValueError("background saves are for one process; a launch over several saves in step")
        self.background, self.topology = background, topology
        self._thread: threading.Thread | None = None
        self._failure: tuple[Path, BaseException] | None = None
        self._buffers: dict = {}

    def save(self, stage_dir: Path, *, keep: int, engine, sampler, step: int, extra: dict) -> Path:
        if not self.background:
            return save_stage_checkpoint(stage_dir, keep=keep, engine=engine, sampler=sampler, step=step,
                                         extra=extra, topology=self.topology)
        self.wait()
        target = checkpoint_dir(stage_dir, step)
        # The single-device engine keeps its whole state in the returned dict; the directory stays unused.
        state = host_copy(_state(engine.save_state(target), sampler, step, extra, 1), self._buffers)
        self._thread = threading.Thread(target=self._write, args=(Path(stage_dir), target, state, keep),
                                        name=f"save {target.name}")
        self._thread.start()
        return target

    def _write(self, stage_dir: Path, target: Path, state: dict, keep: int) -> None:
        try:
            with atomic_dir(target, fix=_checkpoint_fix(target)) as tmp:
                _write_state(tmp, state)
            _prune(stage_dir, keep)
        except BaseException as err:  # noqa: BLE001 - handed to the step loop by wait()
            self._failure = (target, err)

    def wait(self) -> None:
        """Block until the save in flight (if any) is written.

        Raises:
            CheckpointError: the background save failed; the message names the checkpoint and the
                reason, and the stage's earlier checkpoints are as they were.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._failure is not None:
            (target, err), self._failure = self._failure, None
            if isinstance(err, CheckpointError):  # a failed write: the same error as a save in step
                raise err
            raise CheckpointError(f"{target}: the background save failed ({type(err).__name__}: {err}); the "
                                  f"stage's earlier checkpoints are kept. Free space or fix the output directory "
                                  f"and resume, or set train.async_checkpoint=false") from err


def load_stage_checkpoint(stage_dir: Path, *, engine, sampler,
                          topology: Topology = SINGLE) -> tuple[dict, Path] | None:
    """Restore the newest readable checkpoint of a stage; returns (saved state, its directory),
    or None when the stage has none. An unreadable checkpoint is reported and passed over for
    the one before it (its directory is left as it is, for inspection).

    Raises:
        CheckpointError: the stage has checkpoints and none of them can be restored.
    """
    if topology.is_main:
        stage_checkpoints(stage_dir)  # completes a swap a kill interrupted, before the others look
    barrier(topology)
    candidates = stage_checkpoints(stage_dir)
    failures = []
    for i, target in enumerate(candidates):
        try:
            saved, error = load_training_state(target, engine=engine, sampler=sampler, topology=topology), None
        except CheckpointError as err:
            saved, error = None, err
        # The ranks fall back together: a checkpoint one of them cannot read is passed over by all.
        (failed,) = all_reduce_sum(topology, [0.0 if error is None else 1.0])
        if not failed:
            return saved, target
        if error is None:
            error = CheckpointError(f"{target}: another rank of the launch cannot restore it")
        failures.append(str(error))
        if i + 1 < len(candidates):
            log.warning("%s\nfalling back to the previous checkpoint, %s", error, candidates[i + 1])
    if failures:
        raise CheckpointError(f"no checkpoint of {stage_dir} can be restored:\n  " + "\n  ".join(failures)
                              + f"\nDelete {Path(stage_dir) / (CHECKPOINT_PREFIX + '*')} to restart the stage "
                              f"from its beginning")
    return None


def remove_stage_checkpoints(stage_dir: Path) -> None:
    """Delete a finished stage's training checkpoints (and any half-written one)."""
    stage_dir = Path(stage_dir)
    if stage_dir.is_dir():
        for entry in stage_dir.iterdir():
            if entry.is_dir() and (_CHECKPOINT_NAME.match(entry.name)
                                   or re.match(rf"^\.{CHECKPOINT_PREFIX}\d+\.tmp$", entry.name)):
                shutil.rmtree(entry, ignore_errors=True)


def read_run_state(output_dir: Path) -> dict | None:
    """The run state of ``output_dir`` (None when there is none).

    Raises:
        CheckpointError: ``run_state.json`` does not parse or is not a run state, naming it and
            the fix (start over with ``overwrite_output_dir=true``, or another output_dir).
    """
    path = Path(output_dir) / RUN_STATE
    if not path.exists():
        return None
    fix = "start over with overwrite_output_dir=true (which clears this run's outputs) or choose another output_dir"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: unreadable JSON, the run state is damaged ({err}); {fix}") from err
    if not isinstance(state, dict) or not isinstance(state.get("completed_stages"), list):
        raise CheckpointError(f"{path}: not a run state (a JSON object with completed_stages); {fix}")
    return state


def save_heads(path: Path, heads: torch.nn.Module) -> None:
    """The trainable distillation heads (feature/contrastive projections) beside a stage's model."""
    save_state_dict(path, heads.state_dict())


def save_state_dict(path: Path, state: dict) -> None:
    """``torch.save(state)`` under a temporary name, renamed over ``path``.

    Raises:
        CheckpointError: the write failed (a full disk), naming ``path``; no temporary file is left.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        _torch_save(state, tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_failure(path, err) from err


def load_heads(path: Path, heads: torch.nn.Module) -> None:
    """Restore the heads a completed stage saved into ``heads``; nothing when there is no file.

    Raises:
        CheckpointError: the file is truncated or damaged, or holds heads of another shape,
            naming it and the fix (delete it and the heads start anew, or start over).
    """
    path = Path(path)
    if not path.exists():
        return
    fix = (f"delete {path} to go on with new heads (the feature and contrastive projections start again from "
           f"random weights) or start over with overwrite_output_dir=true")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types (EOFError, RuntimeError, pickle errors)
        # The first sentence: torch goes on with advice that does not apply here (weights_only=False).
        reason = first_line(err).split(". ")[0]
        raise CheckpointError(f"{path}: truncated or damaged, torch cannot load it ({reason}); {fix}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds no heads (a {type(state).__name__}, not a state dict); {fix}")
    expected = heads.state_dict()
    differences = [f"missing {key}" for key in sorted(expected.keys() - state.keys())]
    differences += [f"unexpected {key}" for key in sorted(state.keys() - expected.keys())]
    differences += [f"{key} has shape {tuple(state[key].shape)}, this run's {tuple(expected[key].shape)}"
                    for key in sorted(expected.keys() & state.keys())
                    if getattr(state[key], "shape", None) != expected[key].shape]
    if differences:
        raise CheckpointError(f"{path}: holds heads that do not match this run's ({'; '.join(differences[:3])}); "
                              f"{fix}")
    heads.load_state_dict(state)
