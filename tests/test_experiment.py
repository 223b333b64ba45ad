"""The three-arm experiment reports what each arm's own run evaluated, under the metric names of
metrics.jsonl and the report (one evaluation path), here on the tiny pair for one step an arm."""

from __future__ import annotations

import importlib.util
import json

from conftest import REPO

spec = importlib.util.spec_from_file_location("arms", REPO / "experiments" / "three_stage_vs_finetune.py")
arms = importlib.util.module_from_spec(spec)
spec.loader.exec_module(arms)

TINY = ["model=tiny_qwen2", "data.max_length=96", "data.max_eval_examples=4", "stage3.sampling.max_scored=4",
        "logging.tensorboard=false"] + [f"stage{i}.batch_size=2" for i in (1, 2, 3)]


def test_each_arm_reports_its_runs_final_evaluation(tmp_path):
    rows = []
    for arm in arms.ARMS:
        overrides = arms.arm_overrides(arm, 3, tmp_path, "cpu", mcq_items=2, reduced=True) + TINY
        arms.run(arms.compose_arm(overrides))
        rows.append(arms.arm_row(arm, tmp_path / arm))
    assert [row["optimizer_steps"] for row in rows] == [3, 3, 3]
    for arm, row in zip(arms.ARMS, rows):
        summary = json.loads((tmp_path / arm / "summary.json").read_text())
        final = summary["student_after_stage"][str(max(summary["stages"]))]
        assert {metric: row[metric] for metric in arms.METRICS} == {metric: final[metric] for metric in arms.METRICS}
    assert json.loads((tmp_path / "three_stage" / "summary.json").read_text())["stages"] == [1, 2, 3]
    table = arms.markdown(rows, {"steps": 3, "device": "cpu", "mcq_items": 2}).splitlines()
    assert table[2] == "| " + " | ".join(["arm", "optimizer_steps", "train_tokens", *arms.METRICS]) + " |"
    assert [line.split(" | ")[0] for line in table[4:7]] == [f"| {arm}" for arm in arms.ARMS]


def test_an_unknown_arm_or_too_few_steps_are_refused_before_any_arm_runs(tmp_path, monkeypatch, capsys):
    """A misspelt arm (`--arms finetune_ce,single_stage`) ran the three-stage pipeline under that name, and
    `--steps 2` stopped the three-stage arm (stage1.max_steps: 0) only after the other arms had run."""
    import pytest

    monkeypatch.setattr(arms, "run", lambda cfg: (_ for _ in ()).throw(AssertionError("an arm ran")))
    with pytest.raises(ValueError, match="unknown arm 'single_stage'"):
        arms.arm_overrides("single_stage", 3, tmp_path, "cpu", mcq_items=2)
    for argv, message in ((["--arms", "finetune_ce,single_stage"], "--arms finetune_ce,single_stage: unknown arm(s) "
                                                                    "['single_stage']"),
                          (["--steps", "2"], "--steps 2: the three_stage arm gives a third of the steps")):
        monkeypatch.setattr("sys.argv", ["three_stage_vs_finetune.py", "--out", str(tmp_path / "out"), *argv])
        with pytest.raises(SystemExit) as exit_info:
            arms.main()
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_arm_refused_by_its_run_is_an_error_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    """Rerunning into an --out of another --steps: the run refuses the finished arm (ConfigError), which the
    script let through as a traceback."""
    import pytest

    from qwen_distillation.errors import ConfigError

    def refused(cfg):
        raise ConfigError("output_dir=X holds a finished run (stages [3]) of another configuration")

    monkeypatch.setattr(arms, "run", refused)
    monkeypatch.setattr("sys.argv", ["three_stage_vs_finetune.py", "--out", str(tmp_path / "out"), "--steps", "3"])
    with pytest.raises(SystemExit) as exit_info:
        arms.main()
    assert exit_info.value.code == "error: arm finetune_ce: output_dir=X holds a finished run (stages [3]) of " \
                                   "another configuration"
