"""`python -m qwen_distillation.evaluate` compares saved checkpoints on NLL, teacher
agreement and multiple-choice sets and writes a Markdown and JSON table."""

from __future__ import annotations

import json

import pytest

from conftest import SHARED_DATA, compose_config, tiny_overrides
from qwen_distillation.app import run
from qwen_distillation.evaluate import main


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalrun") / "run"
    run(compose_config(tiny_overrides(out, steps=1) + ["end_stage=2"]))
    return out


def test_compares_checkpoints_and_writes_tables(tiny_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["--model", f"stage1={tiny_run / 'stage1' / 'final'}", "--model",
                 f"stage2={tiny_run / 'stage2' / 'final'}", "--teacher", "stage1",
                 "--nll", "medical=package:qwen_distillation/data/demo/medical.jsonl",
                 "--mcq", f"medmcqa={SHARED_DATA / 'medical_eval' / 'medmcqa_dev_eval_500.jsonl'}",
                 "--mcq", f"cmexam={SHARED_DATA / 'medical_eval' / 'cmexam_val_eval_zh_1000.jsonl'}",
                 "--max_examples", "4", "--max_length", "96", "--out", str(out), "--device", "cpu"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"stage1", "stage2"}
    # The metric names of evaluation during training (metrics.jsonl, the report).
    assert set(results["stage2"]) == {"eval/medical_nll", "eval/medical_ppl", "eval/medical_top1_agreement",
                                      "eval/medical_topk_overlap", "eval/medical_kl_to_teacher",
                                      "eval/mcq/medmcqa_accuracy", "eval/mcq/cmexam_accuracy"}
    assert set(results["stage1"]) == {"eval/medical_nll", "eval/medical_ppl", "eval/mcq/medmcqa_accuracy",
                                      "eval/mcq/cmexam_accuracy"}  # the teacher: no agreement with itself
    assert 0.0 <= results["stage2"]["eval/mcq/medmcqa_accuracy"] <= 1.0
    assert results["stage2"]["eval/medical_kl_to_teacher"] > 0  # stage 2 moved away from stage 1
    table = (out / "results.md").read_text()
    assert table.startswith("| model |") and "| stage2 |" in table


def test_unknown_teacher_name_is_a_clear_error(tiny_run, tmp_path, capsys):
    code = main(["--model", f"a={tiny_run / 'stage1' / 'final'}", "--teacher", "b", "--out", str(tmp_path)])
    assert code == 2 and "--teacher b: not among the --model names ['a']" in capsys.readouterr().err
