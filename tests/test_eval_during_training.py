"""Evaluation during training: agreement with the teacher and MCQ accuracy at every
evaluation, quality samples at each stage end (files, wandb table, report), best_mode, and
the `eval` node's validation. Tiny random Qwen2 models with the real Qwen tokenizer."""

from __future__ import annotations

import json
import math

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from conftest import compose_config, read_metrics, tiny_overrides, train_rows
from qwen_distillation.app import run
from qwen_distillation.config.schema import WandbConfig
from qwen_distillation.config.validate import validate_config
from qwen_distillation.errors import ConfigError, DataError
from qwen_distillation.evaluation.direction import best_direction, higher_is_better, improves
from qwen_distillation.evaluation.evaluator import Evaluator
from qwen_distillation.evaluation.mcq import MCQSource, load_mcq_sets, normalise_mcq_sources
from qwen_distillation.evaluation.report import summary_text
from qwen_distillation.training import checkpoint as ckpt
from qwen_distillation.training.distiller import Distiller
from qwen_distillation.training.metrics import MetricsLogger

MCQ = "package:qwen_distillation/data/demo/medical_mcq.jsonl"


# --- the eval node -------------------------------------------------------------------------


@pytest.mark.parametrize("override,named", [
    ("eval.agreement_top_k=0", r"eval\.agreement_top_k=0"),
    ("eval.mcq_max_items=0", r"eval\.mcq_max_items=0"),
    ("eval.samples_max_prompts=0", r"eval\.samples_max_prompts=0"),
    ("eval.max_new_tokens=0", r"eval\.max_new_tokens=0"),
    ("eval.mcq=[{path: a.jsonl, fmt: cmexam}]", r"eval\.mcq\[0\]=.*unknown key\(s\) \['fmt'\]"),
    ("eval.mcq=[{path: a.jsonl, format: alpaca}]", r"eval\.mcq\[0\]\.format=alpaca: must be one of auto, cmexam"),
    ("eval.mcq=[a.jsonl,{name: x}]", r"eval\.mcq\[1\]=.*needs a non-empty `path`"),
    ("eval.mcq=[a/x.jsonl,b/x.jsonl]", r"eval\.mcq\[1\]\.name=x: two MCQ sets share this name"),
    ('eval.mcq=[{name: "my set", path: a.jsonl}]', r"eval\.mcq\[0\]\.name=my set"),
    ("eval.mcq=[3]", r"eval\.mcq\[0\]=3: an MCQ set is PATH"),
    ("stage2.best_mode=highest", r"stage2\.best_mode=highest: must be one of auto, min, max"),
])
def test_eval_values_are_checked_naming_the_override(override, named):
    with pytest.raises(ConfigError, match=named):
        Distiller(validate_config(compose_config([override])))  # checked before anything is read


@pytest.mark.parametrize("override", ["eval.agreemnt=true", "eval.samples.prompts=x", "eval.mcq_items=4"])
def test_unknown_eval_keys_fail_at_composition(override):
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        validate_config(compose_config([override]))


def test_mcq_entries_accept_path_name_and_mapping():
    sources = normalise_mcq_sources("eval.mcq", [
        MCQ, "cm=../shared/data/medical_eval/cmexam_val_eval_zh_1000.jsonl",
        {"path": "openlifescienceai/medmcqa", "format": "medmcqa", "split": "validation"}])
    assert sources == [
        MCQSource(name="medical_mcq", path=MCQ),
        MCQSource(name="cm", path="../shared/data/medical_eval/cmexam_val_eval_zh_1000.jsonl"),
        MCQSource(name="medmcqa", path="openlifescienceai/medmcqa", format="medmcqa", split="validation")]


@pytest.mark.parametrize("text,named", [
    ("", r"mine\.jsonl: no records found"),
    (json.dumps({"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "F"}) + "\n",
     r"mine\.jsonl line 1: mmlu field 'answer' names letter\(s\) \['F'\]"),
])
def test_an_empty_or_bad_mcq_file_names_its_eval_mcq_entry(tmp_path, text, named):
    """An empty MCQ file was named by its path alone: which entry of eval.mcq to fix was left to guess."""
    bad = tmp_path / "mine.jsonl"
    bad.write_text(text)
    sources = normalise_mcq_sources("eval.mcq", [MCQ, {"name": "mine", "path": str(bad)}])
    with pytest.raises(DataError, match=r"^eval\.mcq\[1\]: .*" + named + r".*point eval\.mcq\[1\] at another one, "
                                        r"or remove that entry"):
        load_mcq_sets(sources, 4)
    with pytest.raises(DataError, match=r"eval\.mcq\[1\]=.*missing\.jsonl: file not found"):
        normalise_mcq_sources("eval.mcq", [MCQ, str(tmp_path / "missing.jsonl")])


def test_an_mcq_set_the_cap_cuts_is_logged_and_one_it_does_not_is_not(caplog):
    """A set of 8 items scored on the first 3 under eval.mcq_max_items=3 said nothing of the cut."""
    sources = normalise_mcq_sources("eval.mcq", [MCQ])  # the demo set: 8 items
    with caplog.at_level("INFO", logger="qwen_distillation.evaluation.mcq"):
        assert len(load_mcq_sets(sources, 3)["medical_mcq"]) == 3
        assert "eval.mcq[0]: scored on the first 3 items" in caplog.text
        caplog.clear()
        assert len(load_mcq_sets(sources, 8)["medical_mcq"]) == len(load_mcq_sets(sources, None)["medical_mcq"]) == 8
    assert "scored on the first" not in caplog.text


def test_demo_preset_turns_evaluation_on_and_the_default_leaves_it_off():
    demo = validate_config(compose_config([])).eval
    assert demo.agreement and demo.samples and demo.mcq == [MCQ] and demo.text_metrics
    assert demo.samples_max_prompts == 4 and demo.max_new_tokens == 32
    plain = validate_config(compose_config(["experiment=none"])).eval
    assert not plain.agreement and not plain.samples and plain.mcq == [] and not plain.text_metrics


# --- best_mode -------------------------------------------------------------------------------


def test_best_direction_follows_the_metric_name_unless_set():
    for metric in ("eval/mcq/medical_mcq_accuracy", "eval/medical_top1_agreement", "eval/general_topk_overlap"):
        assert higher_is_better(metric) and best_direction(metric) == "max"
        assert best_direction(metric, "min") == "min"
    for metric in ("eval/mcq/consent_agreement_accuracy", "eval/rouge_set_bleu4", "eval/x_nll_top1_agreement"):
        assert best_direction(metric) == "max"
    # A held-out set named after a word of the rule (a data.eval file consent_agreement.jsonl) was maximised:
    # stageN/best kept the checkpoint of the highest NLL.
    for metric in ("eval/medical_nll", "eval/general_ppl", "eval/medical_kl_to_teacher", "eval/consent_agreement_nll",
                   "eval/overlap_cases_ppl", "eval/rouge_kl_to_teacher", "eval/mcq_accuracy_nll"):
        assert not higher_is_better(metric) and best_direction(metric, "auto") == "min"
        assert best_direction(metric, "max") == "max"
    with pytest.raises(ValueError, match="auto, min or max"):
        best_direction("eval/medical_nll", "largest")


def _selected(values: list[float], direction: str) -> list[int]:
    """Indices at which the running best is replaced (where stageN/best is exported)."""
    best, chosen = None, []
    for i, value in enumerate(values):
        if improves(value, best, direction):
            best = value
            chosen.append(i)
    return chosen


def test_best_selection_rule():
    values = [0.25, 0.5, 0.375, 0.5, 0.75, 0.125]
    assert _selected(values, "max") == [0, 1, 4]  # ties keep the earlier best
    assert _selected(values, "min") == [0, 5]
    # NaN never replaces a finite best; any finite value replaces a NaN first result.
    assert _selected([math.nan, 3.0, math.nan, 2.0], "min") == [0, 1, 3]
    assert _selected([1.0, math.nan, math.inf, 0.5], "min") == [0, 3]


# --- the wandb table -------------------------------------------------------------------------


def test_log_table_is_a_no_op_without_wandb(tmp_path):
    logger = MetricsLogger(tmp_path, jsonl=True, tensorboard=False, wandb_cfg=WandbConfig(), run_config={})
    logger.log_table("samples/stage1", ["prompt", "teacher"], [["p", "a"]], step=1)
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


class _FakeWandbRun:
    def __init__(self):
        self.logged: list[tuple[dict, int]] = []

    def log(self, data, step=None):
        self.logged.append((data, step))

    def finish(self):
        pass


# --- a tiny run with everything on -------------------------------------------------------------


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """Stages 1-2 with agreement, the demo MCQ set (4 items), BLEU/ROUGE on the held-out sets
    (the demo's first 4 examples of each) and 2 prompts, every answer 4 new tokens;
    stage 2 evaluates every step and keeps the step with the *highest* KL to the teacher
    (best_mode=max), so the export record shows which rule chose `best`."""
    out = tmp_path_factory.mktemp("evalrun") / "run"
    fake = _FakeWandbRun()
    calls = {"teacher_samples": 0, "best_exports": []}
    patch = pytest.MonkeyPatch()
    patch.setattr(MetricsLogger, "_start_wandb", staticmethod(lambda cfg, output_dir, run_config: fake))
    original_teacher_samples, original_export = Evaluator.teacher_samples, ckpt.export_model

    def counting_teacher_samples(self):
        calls["teacher_samples"] += 1
        return original_teacher_samples(self)

    def recording_export(model, tokenizer, target, **kwargs):
        if target.name == "best":
            calls["best_exports"].append(target.parent.name)
        return original_export(model, tokenizer, target, **kwargs)

    patch.setattr(Evaluator, "teacher_samples", counting_teacher_samples)
    patch.setattr(ckpt, "export_model", recording_export)
    overrides = tiny_overrides(out, steps=1, evaluation=True) + [
        "end_stage=2", "eval.mcq_max_items=4", "eval.samples_max_prompts=2", "eval.max_new_tokens=4",
        "logging.wandb.enabled=true", "stage2.max_steps=3", "stage2.eval_every=1",
        "stage2.best_metric=eval/medical_kl_to_teacher", "stage2.best_mode=max"]
    try:
        summary = run(compose_config(overrides))
    finally:
        patch.undo()
    return out, summary, fake, calls


def test_agreement_mcq_and_text_metrics_are_logged_at_every_evaluation(eval_run):
    out, summary, _, _ = eval_run
    evals = [r for r in read_metrics(out) if "eval/medical_nll" in r]
    assert [(r["stage"], r["step"]) for r in evals] == [(1, 1), (2, 1), (2, 2), (2, 3)]
    text_metrics = [f"eval/{prefix}{name}_{metric}" for prefix in ("", "llamafactory/")
                    for name in ("general", "medical") for metric in ("bleu4", "rouge1", "rouge2", "rougeL")]
    for row in [*evals, summary["teacher"], summary["student_before"]]:
        for key in text_metrics:  # the demo preset's eval.text_metrics, on with its samples
            assert 0 <= row[key] <= 100, (key, row)
    for row in evals:
        for key in ("eval/general_top1_agreement", "eval/medical_top1_agreement", "eval/medical_topk_overlap",
                    "eval/medical_kl_to_teacher", "eval/mcq/medical_mcq_accuracy"):
            assert 0 <= row[key] <= (1 if "kl" not in key else math.inf), (key, row)
        assert row["eval/medical_kl_to_teacher"] > 0  # two different random models
        assert row["eval/mcq/medical_mcq_accuracy"] * 4 == int(row["eval/mcq/medical_mcq_accuracy"] * 4)
    # Before training: the teacher gets NLL and MCQ accuracy but no agreement with itself.
    assert "eval/mcq/medical_mcq_accuracy" in summary["teacher"]
    assert not any("agreement" in k or "kl_to_teacher" in k for k in summary["teacher"])
    assert "eval/medical_top1_agreement" in summary["student_before"]
    assert summary["student_after_stage"]["2"] == {k: v for k, v in evals[-1].items() if k.startswith("eval/")}


def test_best_mode_max_exports_at_each_new_maximum(eval_run):
    out, _, _, calls = eval_run
    kl = [r["eval/medical_kl_to_teacher"] for r in read_metrics(out) if r.get("stage") == 2 and "eval/medical_nll" in r]
    expected = sum(1 for i in range(len(kl)) if i == 0 or kl[i] > max(kl[:i]))
    assert calls["best_exports"] == ["stage1"] + ["stage2"] * expected
    assert [r["step"] for r in train_rows(out) if r["stage"] == 2] == [1, 2, 3]


def test_final_shares_the_weight_files_of_a_best_exported_at_the_last_step(eval_run):
    """Stage 1 (one step) exports best at its last step, so final links best's weights instead of
    writing them again; stage 2 does the same only when its last evaluation was its best."""
    import os

    out, _, _, calls = eval_run
    kl = [r["eval/medical_kl_to_teacher"] for r in read_metrics(out) if r.get("stage") == 2 and "eval/medical_nll" in r]
    for stage, best_at_last in ((1, True), (2, kl[-1] > max(kl[:-1]))):
        best, final = out / f"stage{stage}" / "best", out / f"stage{stage}" / "final"
        weights = sorted(p.name for p in final.glob("*.safetensors"))
        assert weights == sorted(p.name for p in best.glob("*.safetensors")) != []
        for name in weights:
            assert os.path.samefile(final / name, best / name) == best_at_last, (stage, name)
        assert not os.path.samefile(final / "config.json", best / "config.json")


def test_samples_are_written_per_stage_with_teacher_and_student(eval_run):
    out, summary, _, calls = eval_run
    assert calls["teacher_samples"] == 1  # generated once for the run, reused by stage 2
    state = json.loads((out / "run_state.json").read_text())
    assert [row["prompt"] for row in state["teacher_samples"]] == [
        "请简单解释一下彩虹是怎么形成的。", "Explain in two sentences why leaves change colour in autumn."]
    for stage in (1, 2):
        rows = [json.loads(line) for line in (out / f"stage{stage}" / "samples.jsonl").read_text().splitlines()]
        # The demo prompts carry reference answers: each row has it and both answers' scores.
        assert [list(row) for row in rows] == [["lang", "domain", "prompt", "reference", "teacher", "student",
                                                "scores"]] * 2
        assert [row["teacher"] for row in rows] == [row["teacher"] for row in state["teacher_samples"]]
        for row in rows:
            assert set(row["scores"]) == {"teacher", "student"}
            assert all(0 <= v <= 100 for scores in row["scores"].values() for v in scores.values()), row
        text = (out / f"stage{stage}" / "samples.md").read_text()
        assert f"# Quality samples after stage {stage}" in text and "beside the prompts' reference answers" in text
        assert "| lang | domain | prompt | reference | teacher | student |" in text
        assert "| prompt | model | bleu4 | rouge1 | rouge2 | rougeL |" in text and "| mean of 2 | student |" in text
        assert summary["samples"][stage] == str(out / f"stage{stage}" / "samples.md")
    assert not list(out.glob("stage*/.samples*.tmp"))


def test_samples_go_to_wandb_as_tables(eval_run):
    import wandb

    _, _, fake, _ = eval_run
    tables = [(data, step) for data, step in fake.logged if any(k.startswith("samples/") for k in data)]
    assert [list(data) for data, _ in tables] == [["samples/stage1"], ["samples/stage2"]]
    table = tables[0][0]["samples/stage1"]
    assert isinstance(table, wandb.Table)
    assert table.columns == ["lang", "domain", "prompt", "reference", "teacher", "student"] and len(table.data) == 2
    assert tables[0][1] == 1 and tables[1][1] == 4  # global step at the end of each stage


def test_report_and_printout_show_agreement_mcq_and_samples(eval_run, capsys):
    out, summary, _, _ = eval_run
    report = (out / "report.md").read_text()
    for image in ("eval.png", "agreement.png", "mcq.png"):
        assert f"report/{image}" in report and (out / "report" / image).stat().st_size > 1000
    assert "## Quality samples" in report and "[`stage2/samples.md`](stage2/samples.md)" in report
    assert "| lang | domain | prompt | reference | teacher | student |" in report
    assert "| `eval/mcq/medical_mcq_accuracy` |" in report
    assert "| `eval/medical_rougeL` |" in report  # held-out text metrics in the before/after table
    assert "| score | teacher | after stage 1 | after stage 2 |" in report  # the sample prompts' scores
    row = next(line for line in report.splitlines() if line.startswith("| `eval/medical_top1_agreement` |"))
    assert row.split(" | ")[1] == "—"  # the teacher column: not measured against itself
    text = summary_text(summary)
    assert "higher is better" in text and "| `eval/medical_kl_to_teacher` | — |" in text
    assert "Samples: " in text and str(out / "stage2" / "samples.md") in text


def test_best_metric_without_its_evaluation_fails_before_training(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"stage1\.best_metric=eval/medical_top1_agreement.*eval\.agreement=true"):
        run(compose_config(tiny_overrides(out, steps=1) + ["end_stage=1",
                                                           "stage1.best_metric=eval/medical_top1_agreement"]))
    assert not (out / "metrics.jsonl").exists() or not train_rows(out)
