"""`qwen_distillation.distill`, the command line's run from Python (a notebook, a script of one's own)."""

from __future__ import annotations

import json

import pytest

import qwen_distillation
from conftest import run_cli, tiny_overrides
from qwen_distillation.errors import ConfigError, DataError


def test_distill_runs_what_the_command_line_runs(tmp_path, capsys):
    """The same arguments, classic flags among them, train the same student: distill returns the summary the
    command line writes, and its scores equal the command line's."""
    args = ["--end_stage", "1", "--seed=7"]
    summary = qwen_distillation.distill(*args, *tiny_overrides(tmp_path / "api", steps=1))
    code, output = run_cli(args + tiny_overrides(tmp_path / "cli", steps=1), capsys)
    assert code == 0, output
    written = json.loads((tmp_path / "api" / "summary.json").read_text())
    assert json.loads(json.dumps(summary, default=str)) == written
    cli = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["stages"] == cli["stages"] == [1]
    assert summary["student_after_stage"] == cli["student_after_stage"]
    assert summary["student_before"] == cli["student_before"]
    assert (tmp_path / "api" / "stage1" / "final" / "config.json").is_file()


@pytest.mark.parametrize("args,error,message", [
    (["stage1.lr=abc"], ConfigError, "stage1.lr=abc: Value 'abc' of type 'str' could not be converted to Float"),
    (["stage2.eval_evry=3"], ConfigError, "no such config key: stage2.eval_evry (did you mean stage2.eval_every?)"),
    (["--bogus"], ConfigError, "unknown flag --bogus"),
    (["model=nosuch"], ConfigError, "Could not find 'model/nosuch'"),
    (["end_stage=5"], ConfigError, "end_stage=5: stages are numbered 1..3"),
    (["-m", "seed=1,2"], ConfigError, "-m: qwen_distillation.distill takes classic flags"),
    (["--cfg", "job"], ConfigError, "--cfg: qwen_distillation.distill takes classic flags"),
    (["data.medical=[nothere.jsonl]"], DataError, "data.medical[0]=nothere.jsonl: file not found"),
])
def test_distill_raises_what_the_command_line_prints(args, error, message, tmp_path):
    """Each input the command line refuses with exit status 2 raises a DistillationError with its message,
    before anything is written."""
    out = tmp_path / "run"
    with pytest.raises(error) as raised:
        qwen_distillation.distill(*tiny_overrides(out, steps=1), *args)
    assert message in str(raised.value)
    assert not out.exists()
