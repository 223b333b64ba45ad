"""Bad input stops the run with a clear message and a non-zero exit, and an existing
finished run in output_dir (even with overwrite_output_dir=true) is left untouched."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, tiny_overrides
from qwen_distillation.cli import main


def _snapshot(directory) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    saved = sys.argv
    sys.argv = ["run_distillation.py"]
    try:
        main(argv)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = saved
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    saved = sys.argv
    sys.argv = ["run_distillation.py"]
    try:
        main(tiny_overrides(out, steps=1) + ["end_stage=1"])
    finally:
        sys.argv = saved
    assert json.loads((out / "run_state.json").read_text())["finished"]
    return out


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("case", ["malformed_jsonl", "missing_fields", "empty_after_filtering",
                                  "missing_checkpoint", "unknown_key", "missing_data_file", "bad_mcq_record",
                                  "missing_teacher_dir", "qlora_on_cpu"])
def test_bad_input_fails_clearly_and_keeps_outputs(case, finished_run, tmp_path, capsys):
    before = _snapshot(finished_run)
    base = tiny_overrides(finished_run, steps=1) + ["end_stage=1", "overwrite_output_dir=true"]
    if case == "malformed_jsonl":
        bad = _write(tmp_path / "general.jsonl", '{"instruction": "a", "input": "", "output": "b"}\n'
                                                 '{"instruction": "c", "output": "d"\n')
        argv, expected = base + ["--general_dataset", str(bad)], [f"{bad} line 2", "not valid JSON"]
    elif case == "missing_fields":
        bad = _write(tmp_path / "general.jsonl", '{"prompt_text": "a", "reply": "b"}\n')
        argv, expected = base + ["--general_dataset", str(bad)], ["prompt_text", "reply", "alpaca"]
    elif case == "empty_after_filtering":
        long_prompt = "word " * 400
        bad = _write(tmp_path / "general.jsonl",
                     json.dumps({"instruction": long_prompt, "input": "", "output": "short"}) + "\n")
        argv, expected = base + ["--general_dataset", str(bad)], ["no usable examples", "max_length=96"]
    elif case == "missing_checkpoint":
        argv = base + ["--start_stage", "1", "--checkpoint_path", str(tmp_path / "nowhere")]
        expected = ["checkpoint_path=", "nowhere", "no such directory"]
    elif case == "unknown_key":
        argv, expected = base + ["stage1.loss.weights.kdd=0.5"], ["kdd"]
    elif case == "missing_data_file":
        argv = base + ["--medical_dataset", str(tmp_path / "missing.jsonl")]
        expected = ["missing.jsonl", "not found"]
    elif case == "bad_mcq_record":  # eval.mcq is loaded with the data, before the old run is cleared
        bad = _write(tmp_path / "mcq.jsonl", '{"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", '
                                             '"answer": "F"}\n')
        argv, expected = base + [f"eval.mcq=['{bad}']"], [f"{bad} record 1", "'answer'", "['A', 'B', 'C', 'D']"]
    elif case == "missing_teacher_dir":  # not reported as the hub's "Repo id must be in the form ..."
        argv = base + ["--teacher_model", str(tmp_path / "no_such_teacher")]
        expected = [f"model.teacher.path={tmp_path / 'no_such_teacher'}: no such file or directory"]
    else:
        argv, expected = base + ["--use_qlora", "train.device=cpu"], ["--use_qlora", "CUDA GPU", "--use_lora"]
    code, output = _cli(argv, capsys)
    assert code != 0, output
    for text in expected:
        assert text in output, output
    assert "Traceback" not in output
    assert _snapshot(finished_run) == before


def test_multirun_sweep_gives_each_job_its_own_output_dir(tmp_path, capsys):
    out = tmp_path / "sweep"
    argv = tiny_overrides(out, steps=1) + ["end_stage=1", "-m", "stage1.loss.weights.kd=0.3,0.7"]
    code, output = _cli(argv, capsys)
    assert code == 0, output
    for job, weight in (("job0", 0.3), ("job1", 0.7)):
        assert (out / job / "stage1" / "final" / "config.json").exists()
        assert f"kd: {weight}" in (out / job / "config.yaml").read_text()


@pytest.mark.parametrize("override,expected", [
    ("stage1.lr=abc", ["stage1.lr=abc: Value 'abc' of type 'str' could not be converted to Float",
                       "give stage1.lr a value of its type"]),
    ("seed=[1,2]", ["seed=[1,2]:", "could not be converted to Integer", "give seed a value of its type"]),
    ("model=nope", ["model=nope:", "Could not find 'model/nope'", "Available options in 'model': demo_smollm2, ",
                    "tiny_qwen2", "e.g. model=demo_smollm2"]),
    ("stage1.lr", ["Error parsing override 'stage1.lr'", "write KEY=VALUE"]),
    ("+model=tiny_qwen2", ["+model=tiny_qwen2: Multiple values for model", "write model=tiny_qwen2"]),
    ("stage1.lr=1,2", ["Ambiguous value for argument 'stage1.lr=1,2'", "add --multirun"]),
    ("hydra.job.nope=1", ["Could not override 'hydra.job.nope'", "Key 'nope' not in 'JobConf'"]),
    ("~model", ["model: ", "missing mandatory value: model"]),
    ("stage1.lr=${nope}", ["stage1.lr: Interpolation key 'nope' not found"]),
])
def test_a_config_error_hydra_finds_exits_2_with_one_line(override, expected, tmp_path):
    """Hydra alone prints its own message and exits 1; a config error is the user's to fix like
    any other: exit status 2 and one `error:` line naming the override and the fix."""
    result = subprocess.run([sys.executable, str(REPO / "run_distillation.py"), f"output_dir={tmp_path / 'out'}",
                             override], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def test_a_sweep_value_of_the_wrong_type_exits_2(tmp_path, capsys):
    code, output = _cli([f"output_dir={tmp_path / 'out'}", "-m", "seed=abc,2"], capsys)
    assert code == 2 and "error: seed=abc,2: Value 'abc' of type 'str' could not be converted to Integer" in output


def test_a_bug_inside_a_run_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    """Only the user's errors become `error:` lines: an exception out of the run itself, even an
    OmegaConf one, is raised with its traceback (exit status 1)."""
    from omegaconf.errors import ConfigKeyError

    from qwen_distillation import app

    def broken(cfg):
        raise ConfigKeyError("a bug in the run")

    monkeypatch.setattr(app, "run", broken)
    before = os.environ.get("HYDRA_FULL_ERROR")
    with pytest.raises(ConfigKeyError, match="a bug in the run"):
        _cli([f"output_dir={tmp_path / 'out'}"], capsys)
    assert os.environ.get("HYDRA_FULL_ERROR") == before  # set only while Hydra runs
