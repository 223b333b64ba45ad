"""The run report: plots and report.md from a synthetic metrics.jsonl and summary.json."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from qwen_distillation.evaluation import report  # noqa: E402
from qwen_distillation.evaluation.report import stage_boundaries, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NAMES = {1: "general_kd", 2: "domain_kd", 3: "medical_ft"}
TERMS = ("ce", "kd", "feature", "attention", "contrastive")


def train_row(stage: int, step: int, global_step: int, *, skipped: bool = False, weights: bool = False) -> dict:
    nan = "nan"  # how MetricsLogger writes a non-finite float
    row = {"stage": stage, "stage_name": NAMES[stage], "step": step, "global_step": global_step,
           "loss": nan if skipped else 2.0 - 0.1 * global_step,
           "loss/ce": nan if skipped else 11.0 - 0.2 * global_step,
           "loss/kd": nan if skipped else 0.02 / global_step,
           "lr": 1e-3 * (1 - 0.2 * step), "medical_ratio": {1: 0.0, 2: 0.25 * step, 3: 1.0}[stage],
           "medical_ratio_target": {1: 0.0, 2: 0.2 * step + 0.1, 3: 1.0}[stage], "tokens": 400,
           "tokens_per_s": 100.0 * stage, "grad_norm": nan if skipped else 0.5, "skipped": skipped,
           "bad_steps": int(skipped)}
    if stage == 2:
        row.update({"loss/feature": nan if skipped else 2.0, "loss/attention": nan if skipped else 4e-4,
                    "loss/contrastive": nan if skipped else 1.4})
    if weights:
        row.update({f"weight/{t}": 0.2 + 0.01 * step * (i - 2) for i, t in enumerate(TERMS)})
    if stage == 3:
        row.update({"sampler/score_mean": 11.7 - 0.01 * step, "sampler/hard_share": 0.125 * (step % 2)})
    return row


def eval_row(stage: int, step: int, global_step: int, general: float, medical: float) -> dict:
    return {"stage": stage, "step": step, "global_step": global_step, "eval/general_nll": general,
            "eval/general_ppl": 2.718281828 ** general, "eval/medical_nll": medical,
            "eval/medical_ppl": 2.718281828 ** medical}


AFTER = {"1": {"eval/general_nll": 8.000854, "eval/medical_nll": 11.085084},
         "2": {"eval/general_nll": 7.201722, "eval/medical_nll": 9.837350},
         "3": {"eval/general_nll": 7.122422, "eval/medical_nll": 9.411571}}


def three_stage_rows() -> list[dict]:
    """Stage 1: global steps 1-3; stage 2: 4-7 (weight/* rows, step 5 skipped with NaN, an
    extra mid-stage evaluation); stage 3: 8-10 (hard-example sampler). Evaluations at stage
    ends; a score-histogram row logged with stage 3 but stage 2's last global_step."""
    rows = [train_row(1, s, s) for s in (1, 2, 3)]
    rows.append(eval_row(1, 3, 3, AFTER["1"]["eval/general_nll"], AFTER["1"]["eval/medical_nll"]))
    rows += [train_row(2, s, 3 + s, skipped=s == 2, weights=True) for s in (1, 2)]
    rows.append(eval_row(2, 2, 5, 7.6, 10.2))
    rows += [train_row(2, s, 3 + s, weights=True) for s in (3, 4)]
    rows.append(eval_row(2, 4, 7, AFTER["2"]["eval/general_nll"], AFTER["2"]["eval/medical_nll"]))
    rows.append({"stage": 3, "step": 1, "global_step": 7, "sampler/scored": 16,
                 "sampler/score_histogram": {"edges": [11.0, 12.0], "counts": [16]}})
    rows += [train_row(3, s, 7 + s) for s in (1, 2, 3)]
    rows.append(eval_row(3, 3, 10, AFTER["3"]["eval/general_nll"], AFTER["3"]["eval/medical_nll"]))
    return rows


def summary_for(output_dir: Path, stages: list[int]) -> dict:
    return {"output_dir": str(output_dir), "stages": stages, "device": "cpu", "precision": "fp32",
            "final_models": {str(s): str(output_dir / f"stage{s}" / "final") for s in stages},
            "metrics": str(output_dir / "metrics.jsonl"), "tensorboard": str(output_dir / "tensorboard"),
            "teacher": {"eval/general_nll": 2.139342, "eval/medical_nll": 2.84628, "eval/general_ppl": 8.49},
            "student_before": {"eval/general_nll": 12.261623, "eval/medical_nll": "nan"},
            "student_after_stage": {str(s): AFTER[str(s)] for s in stages}}


def write_run(output_dir: Path, rows: list[dict], summary: dict | None) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary is not None:
        (output_dir / "summary.json").write_text(json.dumps(summary))
    return output_dir


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 10_000, f"{path} is suspiciously small ({len(data)} bytes)"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert width >= 700 and height >= 350, (path, width, height)


def leftovers(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir() if p.name.startswith(".report"))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("run")
    write_run(output_dir, three_stage_rows(), summary_for(output_dir, [1, 2, 3]))
    (output_dir / "tensorboard").mkdir()  # logging.tensorboard=true
    assert write_report(output_dir) == output_dir / "report.md"
    return output_dir


def test_report_table_and_facts(full_run):
    text = (full_run / "report.md").read_text()
    assert "| metric | teacher | student before | after stage 1 | after stage 2 | after stage 3 |" in text
    assert "| `eval/general_nll` | 2.1393 | 12.2616 | 8.0009 | 7.2017 | 7.1224 |" in text
    assert "| `eval/medical_nll` | 2.8463 | nan | 11.0851 | 9.8374 | 9.4116 |" in text
    assert "ppl" not in text.split("## Before and after training")[1].split("## Plots")[0]
    assert "Device: cpu; precision: fp32" in text
    assert "1 (general_kd), 2 (domain_kd), 3 (medical_ft)" in text
    assert f"`{full_run / 'stage3' / 'final'}`" in text
    # Per stage: steps, global steps, mean tokens/s, skipped steps, first and last finite loss.
    assert "| 1 | general_kd | 3 | 1–3 | 100.0 | 0 | 1.9000 | 1.7000 |" in text
    assert "| 2 | domain_kd | 4 | 4–7 | 200.0 | 1 | 1.6000 | 1.3000 |" in text
    assert "| 3 | medical_ft | 3 | 8–10 | 300.0 | 0 | 1.2000 | 1.0000 |" in text
    assert "tensorboard --logdir" in text and "metrics.jsonl" in text


def test_report_images(full_run):
    text = (full_run / "report.md").read_text()
    expected = ["losses.png", "learning_rate.png", "medical_ratio.png", "eval.png", "balancing.png", "sampler.png"]
    assert sorted(p.name for p in (full_run / "report").iterdir()) == sorted(expected)
    for name in expected:
        assert_png(full_run / "report" / name)
        assert f"](report/{name})" in text  # relative link, valid from report.md's folder
    assert leftovers(full_run) == []


def test_stage_boundaries():
    # Halfway between stages; the histogram row (stage 3 at global_step 7) does not pull stage 3 back.
    assert stage_boundaries(three_stage_rows()) == [(1, 0.5), (2, 3.5), (3, 7.5)]
    # A gap in global steps (e.g. a stage resumed elsewhere) puts the line in its middle.
    rows = [train_row(1, 1, 1), train_row(1, 2, 2), train_row(2, 1, 5), eval_row(2, 1, 5, 1.0, 1.0)]
    assert stage_boundaries(rows) == [(1, 0.5), (2, 3.5)]
    # Only stage 2 (start_stage=2): global steps start at 1 again.
    assert stage_boundaries([train_row(2, s, s) for s in (1, 2)]) == [(2, 0.5)]
    assert stage_boundaries([]) == []


def test_only_stage_two(tmp_path):
    rows = [train_row(2, s, s) for s in (1, 2, 3)]  # start_stage=2, no balancing weights
    rows.append(eval_row(2, 3, 3, AFTER["2"]["eval/general_nll"], AFTER["2"]["eval/medical_nll"]))
    summary = summary_for(tmp_path, [2])
    write_run(tmp_path, rows, summary=None)
    path = write_report(tmp_path, summary)  # as Distiller.run passes it, without summary.json
    text = path.read_text()
    assert "| metric | teacher | student before | after stage 2 |" in text
    assert "| `eval/general_nll` | 2.1393 | 12.2616 | 7.2017 |" in text
    assert "after stage 1" not in text
    images = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert images == ["eval.png", "learning_rate.png", "losses.png", "medical_ratio.png"]
    assert "balancing.png" not in text and "sampler.png" not in text


def test_without_summary_or_metrics(tmp_path):
    # A run killed before summary.json: "after stage N" comes from each stage's last evaluation.
    rows = [eval_row(1, 2, 2, 9.5, 10.25), eval_row(2, 2, 4, 8.75, 9.0)]
    text = write_report(write_run(tmp_path / "killed", rows, summary=None)).read_text()
    assert "| `eval/general_nll` | — | — | 9.5000 | 8.7500 |" in text
    # Only a summary, no metrics.jsonl: the table, no plots.
    only_summary = tmp_path / "no_metrics"
    only_summary.mkdir()
    (only_summary / "summary.json").write_text(json.dumps(summary_for(only_summary, [1])))
    text = write_report(only_summary).read_text()
    assert "| `eval/general_nll` | 2.1393 | 12.2616 | 8.0009 |" in text and "![" not in text


def test_a_run_moved_without_its_metrics_reads_none_from_where_it_was_written(tmp_path, caplog):
    """A run directory copied elsewhere without metrics.jsonl: the report read the metrics file its summary.json
    names, at the run's old place, which by then may hold another run's rows, and named that file as the run's."""
    old, moved = tmp_path / "old", tmp_path / "moved"
    write_run(old, three_stage_rows()[:4], summary_for(old, [1]))
    shutil.copytree(old, moved)
    (moved / "metrics.jsonl").unlink()
    other = [{**train_row(1, s, s), "stage_name": "another_run", "loss": 99.0} for s in (1, 2)]
    write_run(old, other, summary=None)  # another run now at the old place
    with caplog.at_level(logging.WARNING):
        text = write_report(moved).read_text()
    expected = moved / "metrics.jsonl"
    assert "another_run" not in text and "99.0000" not in text and "![" not in text
    assert str(old / "metrics.jsonl") not in text.split("## Raw data")[-1]  # not named as this run's metrics
    assert f"- Metrics: missing: there is no {expected}, so no plots and no per-stage table" in text
    assert f"`{moved}` (written at `{old}`, moved or copied since)" in text
    assert f"- Model after stage 1: `{moved / 'stage1' / 'final'}`" in text
    assert f"there is no {expected}" in caplog.text and f"{old / 'metrics.jsonl'}, are not read" in caplog.text
    assert "| `eval/general_nll` | 2.1393 | 12.2616 | 8.0009 |" in text  # the summary's table stays
    assert sorted(p.name for p in moved.iterdir()) == ["report", "report.md", "summary.json"]
    assert list((moved / "report").iterdir()) == [] and leftovers(moved) == []


@pytest.mark.parametrize("stage", [None, "two", 1.5, True, [1]])
def test_a_metrics_row_whose_stage_is_not_an_integer_is_skipped_with_a_warning(tmp_path, caplog, stage):
    """`"stage": null` (or a string, a list...) in one row of metrics.jsonl stopped the report with a TypeError or
    ValueError traceback from int(); it is skipped, as a line that is not JSON is, naming the file, line and field."""
    rows = three_stage_rows()[:4]
    rows[1] = {**rows[1], "stage": stage}
    with caplog.at_level(logging.WARNING):
        text = write_report(write_run(tmp_path, rows, summary=None)).read_text()
    assert (f'{tmp_path / "metrics.jsonl"} line 2: field "stage" is {json.dumps(stage)}, not an integer stage number; '
            f"skipped in the report (repair or delete that line)") in caplog.text
    assert "| 1 | general_kd | 2 | 1–3 | 100.0 | 0 | 1.9000 | 1.7000 |" in text  # steps 1 and 3
    assert (tmp_path / "report" / "losses.png").exists() and leftovers(tmp_path) == []


def _drawn_steps(line) -> set[float]:
    """The x of the points a plotted line shows: those joined to a finite neighbour by the line, and
    those with a marker."""
    xs, ys = line.get_xdata(), line.get_ydata()
    finite = [math.isfinite(y) for y in ys]
    shown = {xs[i] for i in range(len(ys)) if finite[i] and line.get_linestyle() not in ("None", "")
             and ((i and finite[i - 1]) or (i + 1 < len(ys) and finite[i + 1]))}
    if line.get_marker() not in (None, "None", ""):
        every = line.get_markevery()
        shown |= {xs[i] for i in (range(len(ys)) if every is None else every) if finite[i]}
    return shown


def test_a_point_with_no_neighbour_on_a_long_line_is_drawn(tmp_path, monkeypatch):
    """Lines of more than 60 points are drawn without markers, so a point with no finite neighbour
    (a one-step stage after a long one, a step between two skipped ones) was not drawn at all; nor
    was a lone point of the medical_ratio target line, of any length (a one-step run)."""
    lines = {}
    finish = report._finish

    def recording(fig, ax, path, frame, **kwargs):
        lines.update({line.get_label(): line for line in ax.get_lines()})
        finish(fig, ax, path, frame, **kwargs)

    monkeypatch.setattr(report, "_finish", recording)
    rows = [train_row(1, s, s, skipped=s in (39, 41)) for s in range(1, 81)] + [train_row(2, 1, 81)]
    write_report(write_run(tmp_path, rows, summary=None))
    for label in ("loss/kd", "lr", "medical_ratio_target (schedule)"):
        assert {40.0, 81.0} <= _drawn_steps(lines[label]), label
    assert _drawn_steps(lines["loss/kd"]) == {float(s) for s in range(1, 82) if s not in (39, 41)}


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    write_run(tmp_path, three_stage_rows(), summary_for(tmp_path, [1, 2, 3]))
    monkeypatch.setattr(report, "plot_medical_ratio", _fail)  # third plot: two PNGs already drawn
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(tmp_path)
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report").exists()
    assert leftovers(tmp_path) == []


def test_failed_rewrite_keeps_previous_report(tmp_path, monkeypatch):
    write_run(tmp_path, three_stage_rows()[:4], summary_for(tmp_path, [1]))  # stage 1 only: fewer plots, faster
    write_report(tmp_path)
    before = {p.name: p.read_bytes() for p in [tmp_path / "report.md", *(tmp_path / "report").iterdir()]}
    # New metrics, then a failure after every plot is drawn, while report.md is written.
    write_run(tmp_path, three_stage_rows()[:6], summary=None)
    monkeypatch.setattr(report, "render_markdown", _fail)
    with pytest.raises(RuntimeError):
        write_report(tmp_path)
    after = {p.name: p.read_bytes() for p in [tmp_path / "report.md", *(tmp_path / "report").iterdir()]}
    assert after == before
    assert leftovers(tmp_path) == []
    monkeypatch.undo()
    # A swap killed between its renames (image folder moved aside) is repaired by the next write.
    os.replace(tmp_path / "report", tmp_path / ".report.old")
    write_report(tmp_path)
    assert (tmp_path / "report" / "losses.png").exists() and leftovers(tmp_path) == []


def _fail(*args, **kwargs):
    raise RuntimeError("disk full")


def test_rows_whose_text_holds_unicode_line_separators_are_read_whole(tmp_path):
    """samples.jsonl and metrics.jsonl are written with ensure_ascii=False, which keeps U+2028 and U+0085
    of a generated answer (or a stage name) as they are; the reader split lines at them, so such a
    row was dropped from the report as "not a JSON object" (and refused by a resume)."""
    rows = [{"prompt": "p1", "teacher": "a\u2028b", "student": "c\x85d"}, {"prompt": "p2", "teacher": "e",
                                                                         "student": "f\u2029g"}]
    (tmp_path / "stage1").mkdir()
    (tmp_path / "stage1" / "samples.jsonl").write_text(
        "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    assert report.read_samples(tmp_path) == {1: rows}
    metrics = [{**train_row(1, 1, 1), "stage_name": "kd\u2028one"}, train_row(1, 2, 2)]
    write_run(tmp_path, [], summary=None)
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in metrics),
                                            encoding="utf-8")
    assert report.read_metrics(tmp_path / "metrics.jsonl") == metrics


def test_agreement_mcq_rows_and_samples_section(tmp_path):
    summary = summary_for(tmp_path, [1])
    extra = {"eval/medical_top1_agreement": 0.25, "eval/medical_kl_to_teacher": 3.5,
             "eval/medical_topk_overlap": 0.4, "eval/mcq/demo_accuracy": 0.625, "eval/medical_ppl": 9.0}
    summary["student_before"] = {**summary["student_before"], **extra}
    summary["student_after_stage"]["1"] = {**summary["student_after_stage"]["1"], **extra,
                                           "eval/mcq/demo_accuracy": 0.75}
    summary["teacher"] = {**summary["teacher"], "eval/mcq/demo_accuracy": 0.875}
    rows = [{"lang": "en", "domain": "medical", "prompt": "What is a fever?", "teacher": "A high | temperature.",
             "student": "line one\nline two"}]
    (tmp_path / "stage1").mkdir(parents=True)
    (tmp_path / "stage1" / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = write_report(write_run(tmp_path, three_stage_rows()[:4], summary=None), summary).read_text()
    table = text.split("## Before and after training")[1].split("## Plots")[0]
    names = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    # NLL first, then agreement with the teacher, then multiple-choice accuracy; no perplexity.
    assert names == ["eval/general_nll", "eval/medical_nll", "eval/medical_kl_to_teacher",
                     "eval/medical_top1_agreement", "eval/medical_topk_overlap", "eval/mcq/demo_accuracy"]
    assert "| `eval/medical_top1_agreement` | — | 0.2500 | 0.2500 |" in table
    assert "| `eval/mcq/demo_accuracy` | 0.8750 | 0.6250 | 0.7500 |" in table
    assert "higher is better" in text
    samples = text.split("## Quality samples")[1].split("## Stages")[0]
    assert "### After stage 1" in samples and "[`stage1/samples.md`](stage1/samples.md)" in samples
    assert "| en | medical | What is a fever? | A high \\| temperature. | line one<br>line two |" in samples


def test_the_printout_and_the_report_name_only_the_logs_the_run_wrote(tmp_path):
    """logging.jsonl=false writes no metrics.jsonl, logging.tensorboard=false no tensorboard/: the end-of-run
    printout and report.md name neither then, and name each when it is there."""
    from qwen_distillation.evaluation.report import render_markdown, summary_text

    summary = summary_for(tmp_path, [1])
    metrics, tensorboard = tmp_path / "metrics.jsonl", tmp_path / "tensorboard"

    def outputs():
        """The printout's lines that name a path, and report.md's Raw data section ("" when it has none)."""
        text, markdown = summary_text(summary), render_markdown(tmp_path, summary, [], [])
        return ([line for line in text.splitlines() if str(tmp_path) in line],
                markdown.split("## Raw data")[1] if "## Raw data" in markdown else "")

    assert outputs() == ([f"Models:  {tmp_path / 'stage1' / 'final'}", f"Summary: {tmp_path / 'summary.json'}"], "")
    tensorboard.mkdir()  # logging.jsonl=false
    printed, raw = outputs()
    assert printed[1] == f"TensorBoard: {tensorboard}" and "metrics.jsonl" not in raw
    assert raw.strip() == f"- TensorBoard: `tensorboard --logdir {tensorboard}`"
    tensorboard.rmdir()
    metrics.write_text("")  # logging.tensorboard=false
    printed, raw = outputs()
    assert printed[1] == f"Metrics: {metrics}" and "tensorboard" not in raw.lower()
    assert raw.strip() == f"- Every logged row (one JSON object per step or evaluation): `{metrics}`"
    tensorboard.mkdir()
    assert outputs()[0][1] == f"Metrics: {metrics} (TensorBoard: {tensorboard})"


def test_stage_labels_of_short_stages_are_shortened_so_that_none_overlap(tmp_path, monkeypatch):
    """A stage of a few steps in a long run: the labels `stage 2: domain_kd` and `stage 3: medical_ft` were
    drawn over each other; a label that would reach the next one is shortened (`stage 2`, then `2`)."""
    drawn = []
    finish = report._finish

    def recording(fig, ax, path, frame, **kwargs):
        finish(fig, ax, path, frame, **kwargs)
        renderer = fig.canvas.get_renderer()
        labels = [t for t in ax.texts if t.get_position()[1] > 1.0]
        drawn.append([(t.get_text(), t.get_window_extent(renderer)) for t in labels])

    monkeypatch.setattr(report, "_finish", recording)
    rows = ([train_row(1, s, s) for s in range(1, 201)] + [train_row(2, 1, 201), train_row(2, 2, 202)]
            + [train_row(3, s, 202 + s) for s in range(1, 4)] + [train_row(3, 4, 300)])
    write_report(write_run(tmp_path, rows, summary=None))
    assert drawn
    for labels in drawn:
        texts = [text for text, _ in labels]
        assert texts[0] == "stage 1: general_kd" and texts[-1] == "stage 3: medical_ft", texts
        assert texts[1] in ("stage 2", "2"), texts  # its full name would run into stage 3's label
        boxes = [box for _, box in labels]
        assert all(a.x1 <= b.x0 for a, b in zip(boxes, boxes[1:])), texts


def test_a_run_in_progress_names_its_unfinished_stage_and_reads_the_run_state(tmp_path):
    """write_report on a run stopped during stage 2 (no summary.json yet) called stage 2's step-2
    evaluation "after stage 2" and left the teacher and student-before columns empty, though the run state
    held both."""
    rows = three_stage_rows()[:7]  # stage 1, then stage 2 up to its step-2 evaluation
    write_run(tmp_path, rows, summary=None)
    initial = {"teacher": {"eval/general_nll": 2.139342}, "student": {"eval/general_nll": 12.261623}}
    (tmp_path / "run_state.json").write_text(json.dumps({"completed_stages": [1], "initial_eval": initial,
                                                        "stage_eval": {"1": AFTER["1"]}}))
    text = write_report(tmp_path).read_text()
    header = next(line for line in text.splitlines() if line.startswith("| metric |"))
    assert header == "| metric | teacher | student before | after stage 1 | stage 2 at step 2, unfinished |"
    row = next(line for line in text.splitlines() if line.startswith("| `eval/general_nll` |"))
    assert row == "| `eval/general_nll` | 2.1393 | 12.2616 | 8.0009 | 7.6000 |"
    (tmp_path / "run_state.json").unlink()  # metrics alone (a moved run): each stage's last evaluation
    header = next(line for line in write_report(tmp_path).read_text().splitlines() if line.startswith("| metric |"))
    assert header == "| metric | teacher | student before | after stage 1 | after stage 2 |"


def test_an_eval_metric_with_no_finite_value_gets_no_line_and_alone_no_plot(tmp_path, monkeypatch):
    """A multiple-choice set whose every evaluation is NaN (and with no value before training or for the
    teacher) draws no mcq.png, not empty axes; in eval.png a metric that is NaN everywhere gets no line."""
    drawn = []
    real_plot = report.plot_eval

    def spy(evals, summary, path, frame, kind="eval.png"):
        from matplotlib.axes import Axes
        with monkeypatch.context() as m:
            original = Axes.plot
            m.setattr(Axes, "plot", lambda ax, *a, **k: drawn.append((kind, k.get("label"))) or original(ax, *a, **k))
            return real_plot(evals, summary, path, frame, kind)

    monkeypatch.setattr(report, "plot_eval", spy)
    rows = three_stage_rows()
    for row in rows:
        if "eval/general_nll" in row:
            row.update({"eval/mcq/demo_accuracy": "nan", "eval/extra_nll": "nan"})
    text = write_report(write_run(tmp_path, rows, summary_for(tmp_path, [1, 2, 3])), None).read_text()
    images = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert "mcq.png" not in images and "report/mcq.png" not in text
    assert "eval.png" in images
    labels = {label for kind, label in drawn if kind == "eval.png"}
    assert "student general" in labels and "student medical" in labels
    assert "student extra" not in labels
