"""The benchmarks' counts and names are checked as they are parsed: ``--rounds``/``--repeats``/``--steps`` that
leave nothing to time and an unknown shape or configuration are usage errors before any run, not a traceback
(``statistics.median([])``, a ``KeyError``) after the work, and no results file is written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("rounds", ["0", "-1"])
def test_rounds_below_one_is_a_usage_error(rounds, tmp_path):
    out = tmp_path / "async.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "async_checkpoint.py"), "--rounds", rounds,
                             "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert f"--rounds {rounds}: must be at least 1" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("script, args, message", [
    ("export_cost.py", ["--repeats", "0"], "--repeats 0: must be at least 1"),
    ("export_cost.py", ["--student", "9b"], "argument --student: invalid choice: '9b'"),
    ("loss_costs.py", ["--steps", "0"], "--steps must be at least 1"),
    ("loss_costs.py", ["--only", "nope"], "argument --only: invalid choice: 'nope'"),
])
def test_other_benchmarks_refuse_counts_that_leave_nothing_to_time(script, args, message, tmp_path):
    """export_cost.py built and exported the model, loss_costs.py built the pair, before ``statistics.median([])``
    (or ``QWEN[name]``, ``CONFIGS[name]``) failed with a traceback; now a usage error comes first."""
    out = tmp_path / "out.json"
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args, "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, message", [
    (["--students", "even,nope"], "unknown student(s) ['nope']"),
    (["--arm", "x"], "--arm x: unknown arm"),
    (["--calibration_examples", "0"], "--calibration_examples 0: must be at least 1"),  # was taken as not given
])
def test_pruned_students_refuses_unknown_names_before_any_student_runs(args, message, tmp_path):
    """experiments/pruned_students.py ran the students before an unknown one, then failed with a ``KeyError``
    (an unknown ``--arm``: a ``ValueError``) traceback."""
    out = tmp_path / "pruned"
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "pruned_students.py"), *args, "--out",
                             str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_pruned_students_reports_a_runs_config_error_in_one_line(tmp_path):
    """A student's run refused by its config (here a teacher path that does not exist) ended in a traceback."""
    result = subprocess.run([sys.executable, str(REPO / "experiments" / "pruned_students.py"), "--students", "even",
                             "--teacher_path", str(tmp_path / "nope"), "--out", str(tmp_path / "pruned")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: student even: model.teacher.path={tmp_path}")
    assert "Traceback" not in result.stderr


def test_async_checkpoint_removes_its_scratch_folder_when_terminated(tmp_path):
    """benchmarks/async_checkpoint.py stopped by SIGTERM (`timeout`, a scheduler) left its scratch folder of
    checkpoints behind (182 MB): Python's default SIGTERM ends the process without running the cleanup."""
    import os
    import signal
    import time

    env = {**os.environ, "TMPDIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "async_checkpoint.py"), "--rounds", "1",
                                "--out", str(tmp_path / "out.json")], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("async_checkpoint_*/*")):  # a run has started writing into it
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert not list(tmp_path.glob("async_checkpoint_*")) and not (tmp_path / "out.json").exists()
