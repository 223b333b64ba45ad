"""benchmarks/fp8_fused_gemms.py's command line: ``--help`` prints its usage (it was taken for the output
path), and a machine without CUDA gets a usage error, not torch's traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "fp8_fused_gemms.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


def test_help_prints_the_usage():
    result = run("--help")
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout and "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for a machine without CUDA")
def test_without_cuda_it_stops_with_a_usage_error(tmp_path):
    result = run(str(tmp_path / "out.json"))
    assert result.returncode == 2
    assert "needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.json").exists()
