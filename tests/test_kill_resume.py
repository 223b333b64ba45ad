"""A run killed with SIGKILL mid-stage, with the default checkpoint settings, resumes from its
newest saved step and ends where an uninterrupted run ends; with the newest checkpoint
corrupted, it falls back to the one before it and still ends there.

Each test runs the real command line in a subprocess (tiny random Qwen2 pair on the demo set,
stage 1 only, 12 steps): by default a stage saves every quarter of its steps (3, 6, 9) and
keeps the newest two. The kill lands once ``stage1/checkpoint-6`` is complete."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import tiny_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
STEPS = 12


def _command(out: Path) -> list[str]:
    # No stageN.save_every / train.save_every_minutes / train.keep_checkpoints: the defaults.
    return [sys.executable, "run_distillation.py", *tiny_overrides(out, steps=STEPS), "end_stage=1"]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _run(out: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(_command(out), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_after(out: Path, checkpoint: str) -> None:
    """Start the run and SIGKILL it as soon as ``stage1/<checkpoint>`` has been swapped in."""
    process = subprocess.Popen(_command(out), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    target = out / "stage1" / checkpoint
    deadline = time.monotonic() + 600
    while not (target / "state.pt").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / "stage1" / "final").exists(), "the kill landed after the stage ended"


def _train_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    drop = ("tokens_per_s",)
    return [{k: v for k, v in row.items() if k not in drop} for row in rows if "skipped" in row]


def _weights(out: Path) -> dict:
    return load_file(out / "stage1" / "final" / "model.safetensors")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    _run(out)
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """A run killed right after its step-6 checkpoint; each test resumes a copy of it."""
    out = tmp_path_factory.mktemp("killed") / "run"
    _kill_after(out, "checkpoint-6")
    return out


def _copy(killed: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    return out


def _assert_same_run(out: Path, reference: Path) -> None:
    assert _train_rows(out) == _train_rows(reference)
    assert [r["step"] for r in _train_rows(out)] == list(range(1, STEPS + 1))
    ours, theirs = _weights(out), _weights(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].equal(theirs[name]), name
    assert not list((out / "stage1").glob("checkpoint-*")), "a finished stage keeps no training checkpoints"


def test_sigkill_mid_stage_resumes_from_the_newest_checkpoint(tmp_path, killed, uninterrupted):
    out = _copy(killed, tmp_path)
    kept = sorted(p.name for p in (out / "stage1").glob("checkpoint-*"))
    assert kept == ["checkpoint-3", "checkpoint-6"]  # the default keeps the newest two
    done = _run(out)
    assert "stage1: resuming at step 6/12" in done.stdout + done.stderr
    _assert_same_run(out, uninterrupted)


def test_an_unreadable_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, killed, uninterrupted):
    out = _copy(killed, tmp_path)
    state = out / "stage1" / "checkpoint-6" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])  # truncated
    log = _run(out)
    log = log.stdout + log.stderr
    assert f"{state}: unreadable training state" in log
    assert "falling back to the previous checkpoint" in log
    assert "stage1: resuming at step 3/12" in log
    _assert_same_run(out, uninterrupted)
