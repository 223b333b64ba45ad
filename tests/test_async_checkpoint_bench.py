"""benchmarks/async_checkpoint.py's arguments: ``--rounds`` below 1 is a usage error before any run, not
``statistics.median``'s traceback after the parse (no run to take medians of), and no results file is written."""

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
