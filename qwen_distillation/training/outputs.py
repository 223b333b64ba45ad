"""The output directory of a run: which configuration makes it the same run, and whether an
existing directory is a run to resume, a finished run to keep, or something not to touch.

The directory is only read until models and data have loaded (:func:`check_output_dir`), and
only then created or cleared (:func:`prepare_output_dir`): bad input never costs old outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None

from omegaconf import OmegaConf

from qwen_distillation.data.teacher_cache import identity_digest
from qwen_distillation.errors import CheckpointError, ConfigError
from qwen_distillation.evaluation.report import REPORT_NAMES
from qwen_distillation.modeling.pair import STAGED_BASE as STAGED_STUDENT_BASE, STUDENT_BASE
from qwen_distillation.modeling.prune import PRUNING_FILES
import qwen_distillation.paths as project_paths
from qwen_distillation.paths import PACKAGE_PREFIX, locate, refuse_file_in_the_way
from qwen_distillation.training import checkpoint as ckpt
from qwen_distillation.training.metrics import METRICS_FILE, TENSORBOARD_DIR, scrub_secrets

log = logging.getLogger(__name__)

# Sections whose change makes an existing output_dir a different run.
RUN_IDENTITY = ("model", "data", "stage1", "stage2", "stage3", "eval", "lora", "seed", "start_stage", "end_stage",
                "checkpoint_path")
# What a run writes at the top of its output_dir besides stageN/ and .stageN* (cleared on overwrite).
RUN_FILES = (METRICS_FILE, TENSORBOARD_DIR, "config.yaml", "summary.json", ckpt.RUN_STATE, *REPORT_NAMES,
             *PRUNING_FILES)
DATA_KEYS = ("data.", "eval.mcq", "model.student.prune.calibration")  # inputs read file by file when a directory
STAGE_ENTRY = re.compile(r"^\.?stage\d+(\..*)?$")  # stage1/, .stage2.tmp: never stages_plan.txt


LOCK_FILE = ".run.lock"  # held by the process that writes output_dir (hold_output_dir); never cleared


@contextlib.contextmanager
def hold_output_dir(output_dir: Path, hold: bool = True):
    """Hold ``output_dir`` for one run (``hold``: the main rank; the other ranks of a launch write through it):
    an exclusive ``flock`` on its ``LOCK_FILE`` for as long as the run goes on, released when it ends, also by a
    crash or a kill (the system releases it). A second process given the same ``output_dir`` meanwhile (the
    command rerun "to resume" while the first is still alive, a scheduler's requeue) is refused before it
    reads anything: the two wrote every metrics row twice and a report of steps that never ran. The lock file
    stays (a lock file removed while held can be locked twice); a directory this call created and nothing
    else wrote to is removed again."""
    if not hold or fcntl is None:
        yield
        return
    created = not output_dir.exists()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK_FILE, "a+")
    except OSError:  # a read-only place, a file in the way: check_output_dir names it, with its fix
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"output_dir={output_dir}: another run is writing to it ({holder}); let it end or stop it "
                          f"before resuming this run, or choose another output_dir") from None
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        yield
    finally:
        if created and [entry.name for entry in output_dir.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(output_dir, ignore_errors=True)  # refused before it wrote: leave no empty folder
        handle.close()  # releases the lock




def entries_to_clear(output_dir: Path, *, student_base: bool = True) -> list[Path]:
    """What ``overwrite_output_dir=true`` removes from ``output_dir``: a run's stage folders and
    files (RUN_FILES), and with ``student_base`` the base an earlier LoRA run saved there; nothing else.
    (A new LoRA run writes its own ``student_base`` while it builds its models, before the old run is
    cleared: that one stays.)"""
    if not output_dir.is_dir():
        return []
    return sorted(child for child in output_dir.iterdir() if STAGE_ENTRY.match(child.name) or child.name in RUN_FILES
                  or child.name == STAGED_STUDENT_BASE or (student_base and child.name == STUDENT_BASE))


def refuse_output_among_inputs(output: str | Path, key: str, inputs, *, why: str, fix: str,
                               holding: bool = False) -> None:
    """Refuse an output (``key``: the option as the user wrote it, ``output_dir=out/run``, ``--out out/x``)
    that lies inside a directory read as data: an input (``(config key, path)`` pairs) whose key starts
    with DATA_KEYS or is ``--data``; ``why`` says what would read the output back, ``fix`` what to do.
    With ``holding`` also an output that is, or holds, any existing input: writing it would replace that."""
    output = Path(os.path.expanduser(output)).resolve()
    for input_key, path in inputs:
        if str(path).startswith(PACKAGE_PREFIX):  # a file shipped inside an installed package
            continue
        resolved = Path(os.path.expanduser(locate(str(path)))).resolve()
        if input_key.startswith((*DATA_KEYS, "--data")) and resolved.is_dir() and (resolved == output
                                                                                     or resolved in output.parents):
            raise ConfigError(f"{key} lies inside {input_key}={path}, a directory read as data: {why}; {fix}")
        if holding and resolved.exists() and (resolved == output or output in resolved.parents):
            raise ConfigError(f"{key}: {'is' if resolved == output else 'holds'} {input_key}={path}, an input of "
                              f"this command, which writing the output would replace; {fix}")


def recorded_config(config) -> dict:
    """The run's resolved config as ``config.yaml`` records it (credentials scrubbed): what
    :func:`run_hash` and the change listings read."""
    return scrub_secrets(OmegaConf.to_container(OmegaConf.structured(config), resolve=True))


def refuse_sweep_job_over_another_run(job_dir: Path, config) -> None:
    """What a sweep job's own :func:`check_output_dir` would refuse in its ``job_dir`` (a finished or
    unfinished run of another configuration, a damaged run state), checked for every job before the first
    starts and before Hydra rewrites the sweep's ``multirun.yaml``; a finished run of this very config is
    left alone (the job skips it), and so is everything with ``overwrite_output_dir`` (the job checks it)."""
    if config.overwrite_output_dir or not job_dir.is_dir():
        return
    run_config = recorded_config(config)
    run_id = run_hash(run_config)
    if finished_run(job_dir, run_id):
        return
    check_output_dir(job_dir, run_id=run_id, resume=config.resume, overwrite=False, run_config=run_config,
                     checkpoint_path=config.checkpoint_path)


def finished_run(output_dir: Path, run_id: str) -> bool:
    """Whether ``output_dir`` holds the finished run of the config hashed to ``run_id``; False for a damaged
    run state too (:func:`check_output_dir` names it)."""
    try:
        state = ckpt.read_run_state(output_dir)
    except CheckpointError:
        return False
    return bool(state and state.get("finished") and state.get("run_hash") == run_id)


def run_hash(run_config: dict) -> str:
    """16 hex digits identifying the run: a hash of the RUN_IDENTITY sections of its config."""
    identity = json.dumps({key: run_config[key] for key in RUN_IDENTITY}, sort_keys=True, default=str)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _flat(tree, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {key: value for name, child in tree.items() for key, value in _flat(child, f"{prefix}{name}.").items()}


def _saved_config(output_dir: Path) -> dict:
    """The ``config.yaml`` of the run in ``output_dir`` as a dict; empty when it is missing or unreadable
    (what reads it only names changes in a message or a record)."""
    try:
        old = OmegaConf.to_container(OmegaConf.load(output_dir / "config.yaml"), resolve=False)
    except Exception:  # noqa: BLE001 - a hint in a message, a record: never a check
        return {}
    return old if isinstance(old, dict) else {}


def _changed_identity(output_dir: Path, run_config: dict) -> dict[str, tuple]:
    """Each run-identity key (flattened, e.g. ``stage1.lr``) where ``run_config`` differs from the
    ``config.yaml`` of the run in ``output_dir``: (old, new); empty when that file is missing or unreadable."""
    old = _saved_config(output_dir)
    if not old:
        return {}
    before = _flat({k: old.get(k) for k in RUN_IDENTITY})
    after = _flat({k: run_config.get(k) for k in RUN_IDENTITY})
    return {key.rstrip("."): (before.get(key), after.get(key)) for key in sorted(set(before) | set(after))
            if before.get(key) != after.get(key)}


def changed_keys(changes: dict[str, tuple], limit: int = 6) -> str:
    """`` (key: old -> new, ...)`` of :func:`_changed_identity`'s ``changes``; empty when there are none."""
    changed = [f"{key}: {old!r} -> {new!r}" for key, (old, new) in changes.items()]
    if not changed:
        return ""
    more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
    return f" (changed: {', '.join(changed[:limit])}{more})"


# train.* keys outside the run identity (a resume may change them) whose change changes the numbers of the
# steps after it; the others (threads, save timing, the side stream, the allocator) do not.
NUMERIC_TRAIN_KEYS = ("device", "precision", "compile", "liger_kernels", "packing", "pack_step", "pack_layout")


def changed_train_settings(output_dir: Path, run_config: dict) -> list[str]:
    """``train.KEY: old -> new`` for each of NUMERIC_TRAIN_KEYS where ``run_config`` differs from the
    ``config.yaml`` of the run in ``output_dir`` (none when that file is missing or unreadable)."""
    before = _saved_config(output_dir).get("train") or {}
    after = run_config.get("train") or {}
    return [f"train.{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in NUMERIC_TRAIN_KEYS
            if key in before and before.get(key) != after.get(key)]


def check_output_dir(output_dir: Path, *, run_id: str, resume: bool, overwrite: bool, inputs=(),
                     run_config: dict | None = None, checkpoint_path: str | None = None) -> dict | None:
    """Decide between a new run and a resume, reading only: never overwrite a finished run
    silently. Returns the run state to resume, or None for a new run. ``run_config`` (the run's
    resolved config) lets the error for an unfinished run of another configuration name the keys
    that differ. ``checkpoint_path`` (the saved stage a new run starts from) may not lie inside an
    output directory that the run would clear or that holds a finished run, and no other input the
    run reads (``inputs``: ``(config key, local path)`` pairs: the models, data, caches) inside an
    entry that ``overwrite`` would remove.

    Raises:
        ConfigError: the directory holds a finished run, an unfinished run of another
            configuration (or of this one with ``resume=false``), or files that are not a run; unless
            ``overwrite`` (``overwrite_output_dir=true``).
        CheckpointError: its ``run_state.json`` is damaged; unless ``overwrite``.
    """
    refuse_file_in_the_way(output_dir, f"output_dir={output_dir}",
                           "choose a directory for the run's outputs (e.g. output_dir=outputs/run)")
    existing = next(p for p in (output_dir, *output_dir.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):  # a read-only mount, another user's folder
        raise ConfigError(f"output_dir={output_dir}: cannot write in {existing} (read-only or not yours); choose "
                          f"a directory you can write to")
    try:
        state = ckpt.read_run_state(output_dir)
    except CheckpointError:
        if not overwrite:
            raise
        state = None  # a damaged run state is one more file of the run that overwriting clears
    clears = overwrite or bool(state and state.get("finished"))  # what a new run here would replace
    if checkpoint_path and clears and output_dir.resolve() in Path(checkpoint_path).resolve().parents:
        raise ConfigError(f"checkpoint_path={checkpoint_path} lies inside output_dir={output_dir}, which "
                          + ("overwrite_output_dir=true would clear" if overwrite else "holds a finished run")
                          + f"; start the new stages in another output_dir (e.g. output_dir={output_dir}_from_"
                          f"{Path(checkpoint_path).parent.name})")
    cleared = [entry.resolve() for entry in entries_to_clear(output_dir)] if overwrite else []
    refuse_output_among_inputs(output_dir, f"output_dir={output_dir}", inputs,
                               why="a resumed or later run would read this run's own files as records",
                               fix="write the run outside it (e.g. output_dir=outputs/run)")
    for key, path in inputs:
        resolved = Path(path).resolve()
        entry = next((e for e in cleared if e == resolved or e in resolved.parents), None)
        if entry is not None:
            raise ConfigError(f"{key}={path} lies inside {entry}, which overwrite_output_dir=true would remove; "
                              f"copy it out of output_dir={output_dir} first, or write the run to another "
                              f"output_dir")
        # The other way round: an input folder that is output_dir itself, such as `--student_model P output_dir=P`
        # over a prune output, whose pruning.json and scores the overwrite deleted. (An output_dir further down
        # an input folder clears the run's own files only.)
        held = next((e for e in cleared if e.parent == resolved), None)
        if held is not None:
            raise ConfigError(f"{key}={path} holds {held.relative_to(resolved)}, which overwrite_output_dir=true "
                              f"would remove from output_dir={output_dir}; write the run to another output_dir "
                              f"(e.g. output_dir={output_dir.with_name(output_dir.name + '_run')})")
    if state is not None:
        if overwrite:
            if not state.get("finished") and state.get("run_hash") == run_id:  # a rerun of an interrupted command
                log.warning("output_dir=%s holds an unfinished run of this configuration; overwrite_output_dir=true "
                            "starts over and removes it and its checkpoints. To resume it instead, rerun without "
                            "overwrite_output_dir=true", output_dir)
            return None
        done = state.get("completed_stages") or []
        last = max(done, default=0)
        # The flags of a new run that starts from the last finished stage's export (none after stage 3).
        continued = (f"--start_stage {last + 1} --checkpoint_path {output_dir / f'stage{last}' / 'final'} "
                     f"output_dir=NEW_DIR" if 0 < last < 3 else "")
        # What differs from the run's config.yaml, read once for the refusals below (not on a plain resume).
        refused = state.get("finished") or state.get("run_hash") != run_id
        changes = _changed_identity(output_dir, run_config) if run_config and refused else {}
        if state.get("finished"):
            # Continuing from its export applies only changes to the stages after it (and the evaluation).
            trained = [key for key in changes
                       if not key.startswith(tuple(f"stage{i}." for i in range(last + 1, 4)) + ("eval.", "end_stage"))]
            later = (f"; to train the stages after it, start a new run from it: {continued}" if continued and
                     not trained else "")
            # A sweep rerun with another value of a key it does not sweep is refused here: say what differs.
            other = f" of another configuration{changed_keys(changes)}" if state.get("run_hash") != run_id else ""
            raise ConfigError(f"output_dir={output_dir} holds a finished run (stages {done}){other}{later}; choose "
                              f"another output_dir or pass overwrite_output_dir=true to replace it")
        if state.get("run_hash") == run_id and not resume:
            raise ConfigError(f"output_dir={output_dir} holds an unfinished run of this configuration and resume=false "
                              f"does not resume it; drop resume=false to resume it, choose another output_dir, or "
                              f"pass overwrite_output_dir=true to start over")
        if state.get("run_hash") != run_id:
            changed = changed_keys(changes)
            kept = f", start a new run from its finished stage {last} ({continued})" if continued else ""
            raise ConfigError(f"output_dir={output_dir} holds an unfinished run with a different configuration"
                              f"{changed}; rerun its own command to resume it{kept}, choose another output_dir, "
                              f"or pass overwrite_output_dir=true to start over")
    # student_base/ alone is what a LoRA run that stopped before its first record left (an error found once its
    # models had loaded, a Ctrl-C while its data were read): the same command, rerun, writes it again.
    elif output_dir.exists() and any(e.name not in (LOCK_FILE, STUDENT_BASE, STAGED_STUDENT_BASE)
                                     for e in output_dir.iterdir()) and \
            not overwrite:
        raise ConfigError(f"output_dir={output_dir} exists, is not empty and holds no qwen_distillation run; "
                          f"choose a new directory or pass overwrite_output_dir=true to write into it")
    return state


def check_same_data(state: dict, data_sha256: dict[str, str]) -> None:
    """Refuse to resume a run whose data files changed since it started (``data_sha256``: the
    run's ``{"data.general[0]=PATH": sha256}``; a run state without them, from before they were
    recorded, is not checked)."""
    recorded = state.get("data_sha256")
    if recorded is None:
        return
    changed = [entry for entry in sorted(set(recorded) | set(data_sha256))
               if recorded.get(entry) != data_sha256.get(entry)]
    if changed:
        entry = changed[0]
        raise ConfigError(f"{entry}: changed since this run started (sha256 {str(recorded.get(entry))[:12]} -> "
                          f"{str(data_sha256.get(entry))[:12]}; {len(changed)} data entr"
                          f"{'y' if len(changed) == 1 else 'ies'} differ): its held-out split and the steps' "
                          f"examples would not be the run's; resume with the original data, or start over in "
                          f"another output_dir (or with overwrite_output_dir=true)")


def check_same_split(state: dict, split_sha256: str) -> None:
    """Refuse to resume a run whose training and held-out examples, built from the same data files, differ
    from those it started with (``split_sha256``: :func:`qwen_distillation.data.sources.examples_digest`;
    a run state without it, from before it was recorded, is not checked): the held-out split names a data
    file outside the project root by its path from the project root, so a clone of the project in another
    folder holds out other records of it, in pools of the same sizes that a checkpoint's sampler state
    fits; the resumed steps would train on held-out records and score trained ones."""
    recorded = state.get("split_sha256")
    if recorded is None or recorded == split_sha256:
        return
    started = state.get("project_root")
    raise ConfigError(f"the data's training and held-out examples differ from those this run started with (sha256 "
                      f"{recorded[:12]} -> {split_sha256[:12]}), though its data files are the same: the held-out "
                      f"split names a data file outside the project by its path from the project folder"
                      + (f", which was {started} and is now {project_paths.PROJECT_ROOT}" if started else "")
                      + " (or the tokenizer changed); resume from the project folder the run started in, or start "
                      "over in another output_dir (or with overwrite_output_dir=true)")


def check_same_checkpoint(state: dict, checkpoint_path: str | None, fingerprint: str | None) -> None:
    """Refuse to resume a run none of whose stages is complete (so that its student is loaded from
    ``checkpoint_path`` again, and its mid-stage checkpoints were trained from that model) when the model
    at ``checkpoint_path`` now holds other weights (``fingerprint``: its sampled fingerprint now; a run
    state without one, or a path with nothing to fingerprint, is not checked). The saved checkpoints
    then failed to load with a shape error and the advice to delete them, or a LoRA adapter went on
    over other base weights."""
    recorded = state.get("checkpoint_fingerprint")
    if state.get("completed_stages") or not checkpoint_path or not recorded or not fingerprint:
        return
    if recorded != fingerprint:
        raise ConfigError(f"checkpoint_path={checkpoint_path}: holds other weights than when this run started "
                          f"(sampled fingerprint {recorded[:12]} -> {fingerprint[:12]}), and the run's saved "
                          f"checkpoints continue the model that was there; put that model back to resume, or start "
                          f"from the new one in another output_dir (or with overwrite_output_dir=true)")


def check_same_caches(state: dict, caches: dict[str, dict], started: Iterable[str], where: dict[str, str]) -> None:
    """Refuse to resume a stage that reads a teacher cache (``caches``: stage key -> :func:`cache_record` of
    the cache there now) from its mid-stage checkpoints (``started``) when the cache at its path is another
    than the one the stage started with (``where``: stage key -> the cache path): the steps before the
    checkpoint were trained against the old one, the rest would be against the new one, without a word. A
    stage not started yet takes the cache as it is; a run state without records is not checked."""
    recorded = state.get("teacher_caches") or {}
    for key in started:
        old, new = recorded.get(key), caches.get(key)
        if old and new and old["digest"] != new["digest"]:
            raise ConfigError(
                f"{key}.teacher.cache={where[key]}: holds another cache than the one {key} started from (k/dtype "
                f"{old['k']}/{old['dtype']} -> {new['k']}/{new['dtype']}, identity {old['digest'][:12]} -> "
                f"{new['digest'][:12]}), and its saved checkpoints were trained against the old one; put that "
                f"cache back to resume, or start over in another output_dir (or with overwrite_output_dir=true)")


def cache_record(identity: dict) -> dict:
    """What a run state records of a teacher cache's identity for :func:`check_same_caches`."""
    return {"digest": identity_digest(identity), "k": identity.get("k"), "dtype": identity.get("dtype")}


def prepare_output_dir(output_dir: Path, state: dict | None, *, run_id: str, run_config: dict,
                       overwrite: bool, data_sha256: dict[str, str] | None = None,
                       split_sha256: str | None = None, checkpoint_fingerprint: str | None = None,
                       teacher_caches: dict[str, dict] | None = None, wrote_student_base: bool = False,
                       staged_student_base: str | None = None) -> dict:
    """Create the output directory (clearing a previous run's files when overwriting, and its
    ``student_base`` unless this run ``wrote_student_base`` as it built its LoRA student; the one it
    wrote beside an earlier run's, ``staged_student_base``, then takes its place), write
    its ``config.yaml`` and run state; returns the run state (a fresh one for a new run, recording
    ``data_sha256`` for :func:`check_same_data`, ``split_sha256`` (and the project root) for
    :func:`check_same_split` and ``checkpoint_fingerprint`` for
    :func:`check_same_checkpoint`; the ``teacher_caches`` of the stages to run, for
    :func:`check_same_caches`, on a new run and a resume alike)."""
    if state is None and overwrite:
        for child in entries_to_clear(output_dir, student_base=not wrote_student_base):
            if child.name != STAGED_STUDENT_BASE or not staged_student_base:
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    output_dir.mkdir(parents=True, exist_ok=True)
    if staged_student_base:  # written while the earlier run's stood in its place: that run's base goes now
        shutil.rmtree(output_dir / STUDENT_BASE, ignore_errors=True)
        os.replace(staged_student_base, output_dir / STUDENT_BASE)
    if state is None:
        state = {"run_hash": run_id, "finished": False, "completed_stages": [], "initial_eval": None,
                 "data_sha256": data_sha256 or {}}
        if checkpoint_fingerprint:
            state["checkpoint_fingerprint"] = checkpoint_fingerprint
    else:  # a resume: a train.* setting that changes the numbers may differ from the run's (not its identity)
        for index in state.get("completed_stages") or []:
            # A run killed after it recorded a stage complete, before it removed that stage's mid-stage
            # checkpoints, left them (full training states) for good: nothing reads them again.
            ckpt.remove_stage_checkpoints(output_dir / f"stage{index}")
        changed = changed_train_settings(output_dir, run_config)
        if changed:
            log.warning("output_dir=%s: resumed with %s; the steps after the checkpoint it resumes from run with the "
                        "new value, those before ran with the old (recorded as resumed_with_changes in run_state.json "
                        "and summary.json); to keep one setting, rerun with the old value", output_dir,
                        ", ".join(changed))
            state["resumed_with_changes"] = [*state.get("resumed_with_changes", []),
                                             {"completed_stages": list(state.get("completed_stages") or []),
                                              "changed": changed}]
    if split_sha256 and "split_sha256" not in state:  # a new run, or a resume of one from before it was recorded
        state.update(split_sha256=split_sha256, project_root=str(project_paths.PROJECT_ROOT))
    if teacher_caches:
        state["teacher_caches"] = {**(state.get("teacher_caches") or {}), **teacher_caches}
    (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(run_config))
    ckpt.write_json_atomic(output_dir / ckpt.RUN_STATE, state)
    return state
