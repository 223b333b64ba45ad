"""Run report: PNG plots from ``metrics.jsonl`` and a Markdown page from ``summary.json``.

``write_report(output_dir)`` writes ``output_dir/report/*.png`` and ``output_dir/report.md``.
Everything is drawn into ``output_dir/.report.tmp`` first and swapped in by renames, so a
report killed or failing half-way leaves the previous report (or none) in place, never a
half-written one.

Plots are drawn on ``matplotlib.figure.Figure`` with the Agg canvas, not ``pyplot``: no
global backend is switched and no figure is left open in the caller's process.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path
from typing import Iterator, NamedTuple

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
METRICS_FILE = "metrics.jsonl"  # a run's metrics, beside its summary (training.metrics writes it)


def json_safe(value):
    """``value``, or a non-finite float as a string ("nan", "inf"): bare NaN is not JSON, and the rows of
    metrics.jsonl and evaluate's results.json write it so."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value
REPORT_DIR = "report"
# Names a report owns in an output directory (for clearing on overwrite_output_dir).
REPORT_NAMES = (REPORT_MD, REPORT_DIR, ".report.tmp", ".report.old")
LOSS_TERMS = ("ce", "kd", "feature", "attention", "contrastive")
DPI = 110


# ------------------------------------------------------------------ reading
class MetricsLine(NamedTuple):
    """One non-blank line of a ``metrics.jsonl``: its 1-based ``number`` and ``text``; ``row``, or
    None with ``problem`` saying why when the line is not a JSON object or ``field`` names a field of
    it that cannot be read (a ``stage`` that is not an integer); ``cut``: it is the last line and has
    no newline (a row whose write was killed)."""

    number: int
    text: str
    row: dict | None
    problem: str
    cut: bool
    field: str = ""


def bad_stage(row: dict) -> str:
    """Why ``row["stage"]`` is no stage number (rows are grouped and compared by it), "" when it is
    one or the row has none (a quality sample)."""
    stage = row.get("stage")
    if "stage" in row and (isinstance(stage, bool) or not isinstance(stage, int)):
        return f'field "stage" is {json.dumps(stage)}, not an integer stage number'
    return ""


def metrics_lines(path: Path) -> Iterator[MetricsLine]:
    """The non-blank lines of an existing ``metrics.jsonl``, parsed. Bytes that are not UTF-8
    spoil their own line, not the whole file. The report skips bad lines, a resume refuses them.
    Lines end at "\\n" only: JSON written with ``ensure_ascii=False`` keeps U+2028 or U+0085 of a
    string (a generated answer) as is, which ``str.splitlines`` would take for line ends."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        field = ""
        try:
            row = json.loads(line)
            problem = "" if isinstance(row, dict) else f"a JSON {type(row).__name__}, not an object"
            if not problem and (problem := bad_stage(row)):
                field = "stage"
        except ValueError as err:
            row, problem = None, str(err)
        yield MetricsLine(number, line, row if not problem else None, problem,
                          number == len(lines) and not text.endswith("\n"), field)


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl``; a line that is not a JSON object (a write killed mid-line, a
    damaged file), or whose ``stage`` is not an integer, is skipped with a warning naming the file,
    the line (and the field): a finished run must not fail on its report."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in metrics_lines(path):
        if line.row is not None:
            rows.append(line.row)
        elif line.field:
            log.warning("%s line %d: %s; skipped in the report (repair or delete that line)", path, line.number,
                        line.problem)
        else:
            log.warning("%s line %d is not a JSON object; skipped in the report", path, line.number)
    return rows


def number(value) -> float:
    """A logged value as a float: non-finite values arrive as the strings "nan"/"inf";
    missing or non-numeric values become NaN."""
    if isinstance(value, bool) or value is None:
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def is_train_row(row: dict) -> bool:
    """A training step's row: it has a loss, or is a skipped step (which has none)."""
    return "loss" in row or "skipped" in row


def train_rows(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if is_train_row(r)), key=lambda r: number(r.get("global_step")))


def eval_rows(rows: list[dict]) -> list[dict]:
    return sorted((r for r in rows if not is_train_row(r) and any(k.startswith("eval/") for k in r)),
                  key=lambda r: number(r.get("global_step")))


def stage_names(rows: list[dict]) -> dict[int, str]:
    return {int(r["stage"]): str(r["stage_name"]) for r in rows if "stage" in r and r.get("stage_name")}


def stage_boundaries(rows: list[dict]) -> list[tuple[int, float]]:
    """``(stage, x)`` for each stage in the rows, in stage order: where the stage starts on a
    global_step axis, halfway between the previous stage's last step and its own first.

    Training rows decide (a hard-example scoring row is logged with the stage it prepares
    but the previous stage's global_step); a stage with no training rows falls back to its
    other rows. A stage starting at global_step 1 starts at 0.5.
    """
    steps: dict[bool, dict[int, list[float]]] = {True: {}, False: {}}
    for row in rows:
        stage, step = row.get("stage"), number(row.get("global_step"))
        if stage is not None and math.isfinite(step):
            steps[is_train_row(row)].setdefault(int(stage), []).append(step)
    spans = {s: steps[True].get(s) or steps[False][s] for s in steps[True].keys() | steps[False].keys()}
    out, previous_last = [], None
    for stage in sorted(spans):
        first, last = min(spans[stage]), max(spans[stage])
        x = first - 0.5 if previous_last is None or previous_last >= first else (previous_last + first) / 2
        out.append((stage, float(x)))
        previous_last = last
    return out


def series(rows: list[dict], key: str, *, break_stages: bool = True) -> tuple[list[float], list[float]]:
    """(global_step, value) of the rows that carry ``key``. NaN values are kept, and with
    ``break_stages`` a NaN is put between stages, so a line shows a gap rather than a slope
    across a skipped step or from one stage's objective to the next."""
    xs: list[float] = []
    ys: list[float] = []
    previous = None
    for row in rows:
        x = number(row.get("global_step"))
        if key not in row or not math.isfinite(x):
            continue
        if break_stages and previous is not None and row.get("stage") != previous[0]:
            xs.append((previous[1] + x) / 2)
            ys.append(math.nan)
        xs.append(x)
        ys.append(number(row[key]))
        previous = (row.get("stage"), x)
    return xs, ys


def _has_finite(values) -> bool:
    return any(math.isfinite(v) for v in values)


def _markevery(values: list[float], limit: int = 60) -> list[int] | None:
    """The points of a line that get a marker: every point of a line of up to ``limit``; of a longer
    one, those the line alone does not draw: finite values with no finite neighbour (a one-step
    stage, a step between skipped ones)."""
    if len(values) <= limit:
        return None
    finite = [math.isfinite(v) for v in values]
    return [i for i, ok in enumerate(finite)
            if ok and not (i and finite[i - 1]) and not (i + 1 < len(finite) and finite[i + 1])]


# ----------------------------------------------------------------- plotting
class Frame(NamedTuple):
    """What every plot shares: stage starts and names, and one x range for all plots."""

    boundaries: list[tuple[int, float]]
    names: dict[int, str]
    xlim: tuple[float, float] | None


def make_frame(rows: list[dict]) -> Frame:
    boundaries = stage_boundaries(rows)
    steps = [number(r.get("global_step")) for r in rows]
    steps = [x for x in steps if math.isfinite(x)]
    # The left edge leaves room for the "student before training" point one step before stage one.
    xlim = (boundaries[0][1] - 1.0, max(steps) + 0.5) if boundaries and steps else None
    return Frame(boundaries, stage_names(rows), xlim)


def _term_color(key: str) -> str | None:
    """The same colour for a term in the loss and the balancing plots (``loss/kd``, ``weight/kd``)."""
    term = key.split("/", 1)[-1]
    return f"C{LOSS_TERMS.index(term)}" if term in LOSS_TERMS else None


def _term_order(key: str):
    term = key.split("/", 1)[-1]
    return (LOSS_TERMS.index(term) if term in LOSS_TERMS else len(LOSS_TERMS), key)


def _axes(title: str, ylabel: str, right: float = 0.75):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 4.5), dpi=DPI)
    FigureCanvasAgg(fig)
    # Fixed margins (legend to the right) rather than bbox_inches="tight", which draws twice.
    fig.subplots_adjust(left=0.08, right=right, top=0.86, bottom=0.12)
    ax = fig.add_subplot()
    ax.set_title(title, pad=16)  # room for the stage labels above the axes
    ax.set_xlabel("global step (optimizer steps, all stages)")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    return fig, ax


def _stage_labels(fig, ax, frame: Frame) -> None:
    """A dashed line at each stage's start and its label above the axes, right of the line: ``stage N: name``,
    shortened to ``stage N`` and then ``N`` where it would reach the next stage's line (a stage of a few steps
    in a long run), and ``N`` left of its line where even that does not fit; no two labels overlap unless
    the lines themselves are closer than a digit's width on both sides."""
    transform = ax.get_xaxis_transform()  # x in data, y in axes fraction
    renderer = fig.canvas.get_renderer()
    lines = [transform.transform((x, 1.0))[0] for _, x in frame.boundaries]  # pixels (a log y axis has no y=0)
    pad, previous_end = 3.0, -math.inf
    for i, (stage, x) in enumerate(frame.boundaries):
        ax.axvline(x, color="0.35", linestyle="--", linewidth=1)
        name = frame.names.get(stage)
        limit = lines[i + 1] - pad if i + 1 < len(lines) else fig.bbox.x1
        text = ax.text(x, 1.005, "", transform=transform, va="bottom", fontsize=8, color="0.2")
        candidates = [(label, "left") for label in ((f"stage {stage}: {name}" if name else None), f"stage {stage}")
                      if label] + [(str(stage), "left"), (str(stage), "right")]
        for label, side in candidates:
            text.set_text(label)
            text.set_horizontalalignment(side)
            box = text.get_window_extent(renderer)
            if box.x0 >= previous_end + pad and (side == "right" or box.x1 <= limit):
                break
        else:  # no room anywhere: the number right of its line
            text.set_horizontalalignment("left")
            box = text.get_window_extent(renderer)
        previous_end = box.x1


def _finish(fig, ax, path: Path, frame: Frame, legend_axes=None, legend_x: float = 1.01) -> None:
    if frame.xlim:
        ax.set_xlim(*frame.xlim)
    _stage_labels(fig, ax, frame)
    handles, labels = [], []
    for a in legend_axes or [ax]:
        h, lab = a.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(legend_x, 1.0), fontsize=8, frameon=False)
    fig.savefig(path, dpi=DPI)


def plot_losses(train: list[dict], path: Path, frame: Frame) -> bool:
    keys = sorted({k for r in train for k in r if k.startswith("loss/")}, key=_term_order)
    lines = [(k, *series(train, k)) for k in ["loss", *keys]]
    lines = [line for line in lines if _has_finite(line[2])]
    if not lines:
        return False
    fig, ax = _axes("Training losses", "loss (nats per token)")
    for key, xs, ys in lines:
        total = key == "loss"
        ax.plot(xs, ys, color="black" if total else _term_color(key), linewidth=2.2 if total else 1.3,
                marker=".", markevery=_markevery(ys), label="total (weighted)" if total else key,
                zorder=1.9 if total else 2)  # a term equal to the total stays visible on it
    positive = [v for _, _, ys in lines for v in ys if math.isfinite(v) and v > 0]
    if positive and max(positive) / min(positive) > 100:
        ax.set_yscale("log", nonpositive="mask")
        ax.set_ylabel(ax.get_ylabel() + ", log scale")
    skipped = [number(r.get("global_step")) for r in train if r.get("skipped") in (True, "true", "True")]
    if skipped:
        ax.plot(skipped, [0.03] * len(skipped), "x", color="red", markersize=8, mew=2,
                transform=ax.get_xaxis_transform(), label="skipped step (non-finite)", zorder=4)
    _finish(fig, ax, path, frame)
    return True


def plot_lines(train: list[dict], keys: list[str], path: Path, frame: Frame, title: str, ylabel: str) -> bool:
    """One line per key; False (no file) when none has a finite value."""
    lines = [(key, *series(train, key)) for key in keys]
    lines = [line for line in lines if _has_finite(line[2])]
    if not lines:
        return False
    fig, ax = _axes(title, ylabel)
    for key, xs, ys in lines:
        ax.plot(xs, ys, linewidth=1.5, marker=".", markevery=_markevery(ys), color=_term_color(key), label=key)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
    _finish(fig, ax, path, frame)
    return True


def plot_medical_ratio(train: list[dict], path: Path, frame: Frame) -> bool:
    xs, served = series(train, "medical_ratio")
    tx, target = series(train, "medical_ratio_target")
    if not (_has_finite(served) or _has_finite(target)):
        return False
    fig, ax = _axes("Medical share of each step's examples", "medical_ratio (fraction of examples)")
    if _has_finite(target):
        ax.plot(tx, target, linewidth=2.5, alpha=0.6, color="tab:orange", marker="o", markevery=_markevery(target, 0),
                label="medical_ratio_target (schedule)")
    if _has_finite(served):
        ax.plot(xs, served, drawstyle="steps-mid", marker="o", markersize=3.5, linewidth=1.2, color="tab:blue",
                label="medical_ratio (served)")
    ax.set_ylim(-0.04, 1.04)
    _finish(fig, ax, path, frame)
    return True


EVAL_PLOTS = {
    # file: (key prefix, key suffix, title, y label)
    "eval.png": ("eval/", "_nll", "Held-out loss (lower is better)", "NLL (nats per response token)"),
    "agreement.png": ("eval/", "_top1_agreement", "Top-1 agreement with the teacher (higher is better)",
                      "top-1 agreement (fraction of tokens)"),
    "mcq.png": ("eval/mcq/", "_accuracy", "Multiple-choice accuracy (higher is better)",
                "accuracy (fraction of items)"),
}


def plot_eval(evals: list[dict], summary: dict, path: Path, frame: Frame, kind: str = "eval.png") -> bool:
    """One student trajectory per eval metric of ``EVAL_PLOTS[kind]`` across stages, its value
    before training (open marker) and the teacher's value (dotted) where the teacher has one."""
    prefix, suffix, title, ylabel = EVAL_PLOTS[kind]
    before, teacher = summary.get("student_before") or {}, summary.get("teacher") or {}
    keys = sorted({k for r in evals for k in r if k.startswith(prefix) and k.endswith(suffix)})
    # A metric with no finite value anywhere (every evaluation NaN) would be an empty line or axes.
    keys = [k for k in keys if _has_finite([*series(evals, k, break_stages=False)[1],
                                            number(before.get(k)), number(teacher.get(k))])]
    if not keys:
        return False
    fig, ax = _axes(title, ylabel)
    start_x = frame.xlim[0] + 0.5 if frame.xlim else 0.0
    for i, key in enumerate(keys):
        color, name = f"C{i % 10}", key[len(prefix):-len(suffix)]
        # One trajectory across stages: the same student on the same held-out sets.
        xs, ys = series(evals, key, break_stages=False)
        markers = list(range(len(xs)))
        start = number(before.get(key))
        if math.isfinite(start):
            xs, ys, markers = [start_x, *xs], [start, *ys], [m + 1 for m in markers]
            ax.plot([start_x], [start], "o", markerfacecolor="white", color=color, markersize=7, zorder=4)
        ax.plot(xs, ys, marker="o", markevery=markers, color=color, linewidth=1.6, label=f"student {name}")
        reference = number(teacher.get(key))
        if math.isfinite(reference):
            ax.axhline(reference, color=color, linestyle=":", linewidth=1.4, label=f"teacher {name}")
    if any(math.isfinite(number(before.get(k))) for k in keys):
        ax.plot([], [], "o", markerfacecolor="white", color="0.3", label="student before training")
    _finish(fig, ax, path, frame)
    return True


def plot_sampler(train: list[dict], path: Path, frame: Frame) -> bool:
    xs, mean = series(train, "sampler/score_mean")
    hx, hard = series(train, "sampler/hard_share")
    if not (_has_finite(mean) or _has_finite(hard)):
        return False
    fig, ax = _axes("Hard-example sampler", "mean score (student NLL, nats/token)", right=0.68)
    ax.plot(xs, mean, color="tab:purple", marker=".", label="sampler/score_mean (left axis)")
    right = ax.twinx()
    right.plot(hx, hard, color="tab:green", marker="s", markersize=3, linewidth=1, alpha=0.8,
               label="sampler/hard_share (right axis)")
    right.set_ylabel("hard share (fraction above median)")
    right.set_ylim(-0.04, 1.04)
    _finish(fig, ax, path, frame, legend_axes=[ax, right], legend_x=1.12)
    return True


# ----------------------------------------------------------------- markdown
def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    v = number(value)
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def _stage_key(stage) -> int:
    try:
        return int(stage)
    except (TypeError, ValueError):
        return 10**6


# Rows of the before/after table, in this order: held-out NLL, then agreement with the
# teacher, then BLEU/ROUGE of greedy answers, then multiple-choice accuracy (perplexity is left
# out: it is exp(NLL); so are LLaMA-Factory's BLEU/ROUGE, eval/llamafactory/*, kept in the logs).
TEXT_SUFFIXES = ("_bleu4", "_rouge1", "_rouge2", "_rougeL")
TABLE_SUFFIXES = ("_nll", "_kl_to_teacher", "_top1_agreement", "_topk_overlap", *TEXT_SUFFIXES, "_accuracy")
TABLE_NOTE = ("NLL and KL to the teacher in nats per response token, lower is better; agreement, "
              "overlap and accuracy are fractions, higher is better; BLEU-4 and ROUGE of greedy answers "
              "against the held-out references are 0-100, higher is better; — = not measured, e.g. the "
              "teacher's agreement with itself")


def _table_order(name: str) -> tuple[int, str]:
    return next(i for i, suffix in enumerate(TABLE_SUFFIXES) if name.endswith(suffix)), name


def _in_table(name: str) -> bool:
    return name.endswith(TABLE_SUFFIXES) and not name.startswith("eval/llamafactory/")


def results_table(summary: dict) -> list[str]:
    """The before/after table: one row per ``eval/<set>_nll``, agreement metric
    (``_kl_to_teacher``, ``_top1_agreement``, ``_topk_overlap``), BLEU/ROUGE metric (``_bleu4``,
    ``_rouge1``, ``_rouge2``, ``_rougeL``) and ``eval/mcq/<set>_accuracy`` (which direction is
    better: ``TABLE_NOTE``); columns = teacher, student before, after each stage."""
    after = summary.get("student_after_stage") or {}
    columns = [("teacher", summary.get("teacher") or {}), ("student before", summary.get("student_before") or {})]
    unfinished = summary.get("unfinished_stages") or {}
    columns += [(f"stage {s} at step {unfinished[s]}, unfinished" if s in unfinished else f"after stage {s}",
                 after[s] or {}) for s in sorted(after, key=_stage_key)]
    names = sorted({k for _, metrics in columns for k in metrics if _in_table(k)}, key=_table_order)
    if not names:
        return ["No held-out evaluation was recorded."]
    lines = ["| metric | " + " | ".join(c for c, _ in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for name in names:
        digits = 2 if name.endswith(TEXT_SUFFIXES) else 4  # 0-100 scores
        lines.append(f"| `{name}` | " + " | ".join(_fmt(m.get(name), digits) for _, m in columns) + " |")
    return lines


def read_samples(output_dir: Path) -> dict[int, list[dict]]:
    """Stage -> the rows of ``output_dir/stage<N>/samples.jsonl`` (quality samples), by stage."""
    out = {}
    for path in output_dir.glob("stage*/samples.jsonl"):
        stage = _stage_key(path.parent.name[len("stage"):])
        rows = [r for r in read_metrics(path) if "prompt" in r]  # same JSONL reader, same tolerance
        if rows and stage < 10**6:
            out[stage] = rows
    return dict(sorted(out.items()))


def sample_scores_table(samples: dict[int, list[dict]]) -> list[str]:
    """Markdown lines: the mean BLEU-4 and ROUGE-1/2/L of the answers to the quality-sample
    prompts that have a reference, one row per score; columns = the teacher (its answers of the
    last stage's file: generated once per run) and the student after each stage. Empty when no
    stage scored an answer."""
    from qwen_distillation.evaluation.answers import TEXT_METRICS
    from qwen_distillation.evaluation.samples import mean_sample_scores

    scored = [stage for stage, rows in samples.items() if mean_sample_scores(rows, "student")["n"]]
    if not scored:
        return []
    columns = [("teacher", mean_sample_scores(samples[scored[-1]], "teacher"))]
    columns += [(f"after stage {stage}", mean_sample_scores(samples[stage], "student")) for stage in scored]
    lines = [f"Mean BLEU-4 and ROUGE-1/2/L F1 (0-100, word level, `<think>` stripped, higher is better) of the "
             f"greedy answers to the prompts that have a reference answer ({columns[-1][1]['n']} of them): sentence "
             f"scores of a few short answers, so a coarse signal (the project's docs/evaluation.md says how to read "
             f"them).",
             "", "| score | " + " | ".join(c for c, _ in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    lines += [f"| `{metric}` | " + " | ".join(_fmt(m[metric], 2) for _, m in columns) + " |" for metric in TEXT_METRICS]
    return lines + [""]


def samples_section(output_dir: Path) -> list[str]:
    """Markdown: the BLEU/ROUGE of the answers against the prompts' references
    (:func:`sample_scores_table`), then each stage's quality samples (teacher and student side by
    side), with a link to the stage's own ``samples.md``; empty when no stage wrote samples."""
    from qwen_distillation.evaluation.samples import samples_markdown

    samples = read_samples(output_dir)
    if not samples:
        return []
    out = ["## Quality samples", "",
           "Greedy answers of the teacher and of the student at the end of each stage to the same fixed prompts.", "",
           *sample_scores_table(samples)]
    for stage, rows in samples.items():
        out += [f"### After stage {stage}", "", f"File: [`stage{stage}/samples.md`](stage{stage}/samples.md)", "",
                samples_markdown(rows).rstrip("\n"), ""]
    return out


def stage_table(train: list[dict], names: dict[int, str]) -> list[str]:
    stages = sorted({int(r["stage"]) for r in train if "stage" in r})
    if not stages:
        return ["No training steps were logged."]
    lines = ["| stage | name | steps | global steps | mean tokens/s | skipped steps | first loss | last loss |",
             "|---:|---|---:|---|---:|---:|---:|---:|"]
    for stage in stages:
        rows = [r for r in train if r.get("stage") == stage]
        steps = [number(r.get("global_step")) for r in rows]
        speed = [v for v in (number(r.get("tokens_per_s")) for r in rows) if math.isfinite(v)]
        losses = [v for v in (number(r.get("loss")) for r in rows) if math.isfinite(v)]
        skipped = sum(r.get("skipped") in (True, "true", "True") for r in rows)
        span = f"{int(min(steps))}–{int(max(steps))}" if _has_finite(steps) else "—"
        lines.append(f"| {stage} | {names.get(stage, '')} | {len(rows)} | {span} | "
                     f"{_fmt(sum(speed) / len(speed), 1) if speed else '—'} | {skipped} | "
                     f"{_fmt(losses[0]) if losses else '—'} | {_fmt(losses[-1]) if losses else '—'} |")
    return lines


CAPTIONS = {
    "losses.png": ("Training losses", "each `loss/*` term (unweighted; nats per token, contrastive per "
                   "sequence) and the weighted total; gaps and red crosses are skipped (non-finite) steps."),
    "learning_rate.png": ("Learning rate", "per optimizer step; each stage has its own schedule."),
    "medical_ratio.png": ("Medical ratio", "share of medical examples served each step against the "
                          "scheduled target."),
    "eval.png": ("Held-out NLL", "student evaluations (hollow marker: before training), teacher as dotted lines."),
    "agreement.png": ("Agreement with the teacher", "top-1 match rate of the student's predictions with "
                      "the teacher's on each held-out set (hollow marker: before training)."),
    "mcq.png": ("Multiple-choice accuracy", "option log-likelihood accuracy per MCQ set (hollow marker: "
                "before training), teacher as dotted lines."),
    "balancing.png": ("Loss balancing", "the `weight/*` multipliers chosen by the balancer."),
    "sampler.png": ("Hard-example sampler", "mean score of the pool and the share of hard examples served."),
}


def render_markdown(output_dir: Path, summary: dict, rows: list[dict], images: list[str]) -> str:
    train = train_rows(rows)
    names = stage_names(rows)
    # A summary lists completed stages; without one (a run in progress) the logged ones.
    stages, verb = (summary["stages"], "completed") if summary.get("stages") else (sorted(names), "logged")
    stage_text = ", ".join(f"{s} ({names[_stage_key(s)]})" if _stage_key(s) in names else str(s) for s in stages)
    models = summary.get("final_models") or {}
    moved = f" (written at `{summary['output_dir']}`, moved or copied since)" if _moved(output_dir, summary) else ""
    out = [f"# Distillation run report: `{output_dir.name}`", "",
           f"- Output directory: `{output_dir}`{moved}",
           f"- Device: {summary.get('device', 'unknown')}; precision: {summary.get('precision', 'unknown')}",
           f"- Stages {verb}: {stage_text or 'none'}"]
    out += [f"- Model after stage {s}: `{_here(models[s], output_dir, summary)}`"
            for s in sorted(models, key=_stage_key)]
    if not (output_dir / METRICS_FILE).exists():
        out.append(f"- Metrics: {missing_metrics_note(output_dir, summary)}")
    out += ["", "## Before and after training", "", f"{TABLE_NOTE[0].upper()}{TABLE_NOTE[1:]}.", "",
            *results_table(summary), ""]
    if images:
        out += ["## Plots", "", "Dashed vertical lines mark where each stage starts.", ""]
        for image in images:
            title, caption = CAPTIONS[image]
            out += [f"![{title}]({REPORT_DIR}/{image})", "", f"*{title}: {caption}*", ""]
    out += samples_section(output_dir)
    out += ["## Stages", "", *stage_table(train, names), "",
            "First and last loss are the weighted total of the first and last step with a finite loss.", ""]
    # Only the outputs the run wrote: logging.jsonl=false, logging.tensorboard=false write none. Those beside
    # the run, not where its summary says it was written (a run moved or copied since).
    metrics = _written(output_dir / METRICS_FILE)
    tensorboard = _written(output_dir / "tensorboard")
    raw = [f"- Every logged row (one JSON object per step or evaluation): `{metrics}`"] if metrics else []
    raw += [f"- TensorBoard: `tensorboard --logdir {tensorboard}`"] if tensorboard else []
    raw += [f"- Summary: `{output_dir / 'summary.json'}`"] if (output_dir / "summary.json").exists() else []
    if raw:
        out += ["## Raw data", "", *raw]
    out.append("")
    return "\n".join(out)


def _written(path) -> str | None:
    """``path`` (of an output a run may write) when it exists, else None."""
    return str(path) if path and Path(path).exists() else None


def _elsewhere(recorded, path: Path) -> bool:
    """Whether ``recorded`` (a path a summary names) is known to be another place than ``path``: a relative
    one is relative to the working directory of the run, which is not known here."""
    return bool(recorded) and Path(recorded).is_absolute() and os.path.abspath(recorded) != os.path.abspath(path)


def _moved(output_dir: Path, summary: dict) -> bool:
    """Whether the summary was written for a run at another place than ``output_dir``."""
    return _elsewhere(summary.get("output_dir"), output_dir)


def _here(path: str, output_dir: Path, summary: dict) -> str:
    """``path`` (a summary's path of an output of the run) in ``output_dir`` when the run was moved there."""
    if not _moved(output_dir, summary):
        return str(path)
    try:
        return str(output_dir / Path(path).relative_to(summary["output_dir"]))
    except ValueError:  # not inside the run
        return str(path)


def missing_metrics_note(output_dir: Path, summary: dict) -> str:
    """What the report says when ``output_dir`` has no ``metrics.jsonl``: the path it expected, what is
    missing for it, how to get it back, and, for a run moved since, that the path its summary names is
    not read."""
    expected = output_dir / METRICS_FILE
    note = (f"missing: there is no {expected}, so no plots and no per-stage table (logging.jsonl=false writes "
            f"none; for a run directory moved or copied without it, copy its {METRICS_FILE} to {expected} and write "
            f"the report again)")
    recorded = summary.get("metrics")
    if _elsewhere(recorded, expected):
        note += (f"; the metrics its summary.json names, {recorded}, are not read: they are of the run's old place, "
                 f"which may hold another run's now")
    return note


# -------------------------------------------------------------------- write
def _draw(train, evals, summary, rows, image_dir: Path) -> list[str]:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        log.warning("matplotlib is not installed; the report has no plots (pip install matplotlib)")
        return []
    frame = make_frame(rows)
    weights = sorted({k for r in train for k in r if k.startswith("weight/")}, key=_term_order)
    plots = {
        "losses.png": lambda p: plot_losses(train, p, frame),
        "learning_rate.png": lambda p: plot_lines(train, ["lr"], p, frame, "Learning rate",
                                                  "learning rate (per optimizer step)"),
        "medical_ratio.png": lambda p: plot_medical_ratio(train, p, frame),
        "eval.png": lambda p: plot_eval(evals, summary, p, frame),
        "agreement.png": lambda p: plot_eval(evals, summary, p, frame, "agreement.png"),
        "mcq.png": lambda p: plot_eval(evals, summary, p, frame, "mcq.png"),
        "balancing.png": lambda p: plot_lines(train, weights, p, frame, "Loss balancing weights",
                                              "weight (multiplier of the loss term)"),
        "sampler.png": lambda p: plot_sampler(train, p, frame),
    }
    return [name for name, plot in plots.items() if plot(image_dir / name)]


RUN_STATE = "run_state.json"  # training.checkpoint.RUN_STATE: what a run has done so far


def _summary_in_progress(output_dir: Path, summary: dict, evals: list[dict]) -> dict:
    """The table's columns of a run with no summary yet (in progress, interrupted, stopped by an error):
    the teacher and the student before training from the run state's initial evaluation, each completed
    stage's evaluation from it as "after stage N", and for a stage not completed its last logged
    evaluation, labelled with its step as unfinished (it was called "after stage N"; without a run state,
    a moved run's metrics alone, the last evaluation of each stage stands for "after stage N")."""
    try:
        state = json.loads((output_dir / RUN_STATE).read_text(encoding="utf-8"))
        state = state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        state = {}
    completed = {str(s) for s in state.get("completed_stages") or []}
    recorded = {str(k): v for k, v in (state.get("stage_eval") or {}).items()}
    after, unfinished = dict(recorded), {}
    for row in evals:
        stage = str(row.get("stage"))
        if stage in recorded:
            continue  # its evaluation at the stage's end
        after[stage] = {k: v for k, v in row.items() if k.startswith("eval/")}
        if "completed_stages" in state and stage not in completed:  # without a run state: not known
            unfinished[stage] = row.get("step")
    initial = state.get("initial_eval") or {}
    return {**summary, "student_after_stage": after, "unfinished_stages": unfinished,
            "teacher": summary.get("teacher") or initial.get("teacher"),
            "student_before": summary.get("student_before") or initial.get("student")}


def write_report(output_dir: str | Path, summary: dict | None = None) -> Path:
    """Write ``output_dir/report.md`` and its plots in ``output_dir/report/``; return the
    report's path. ``summary`` defaults to ``output_dir/summary.json`` (an empty one if absent,
    e.g. for a run still in progress: the table then shows only what it has). The metrics are
    ``output_dir/metrics.jsonl`` alone: without it the report says so, naming that path, and has no
    plots; the paths the summary names are those of where the run was written, which a moved run left."""
    output_dir = Path(output_dir)
    standalone = summary is None
    if summary is None:
        path = output_dir / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
    # Only the metrics beside the run: a summary's "metrics" names where the run was written, which,
    # for a run directory moved or copied since, may be gone or hold another run's metrics.
    # Said in report.md; in the log too, unless the run itself writes its report (logging.jsonl=false).
    metrics_path = output_dir / METRICS_FILE
    if not metrics_path.exists() and (standalone or _moved(output_dir, summary)):
        log.warning("%s: %s", output_dir, missing_metrics_note(output_dir, summary))
    rows = read_metrics(metrics_path)
    train, evals = train_rows(rows), eval_rows(rows)
    if not summary.get("student_after_stage"):
        summary = _summary_in_progress(output_dir, summary, evals)

    target, image_dir = output_dir / REPORT_MD, output_dir / REPORT_DIR
    staging, old = output_dir / ".report.tmp", output_dir / ".report.old"
    if not image_dir.exists() and old.exists():  # a swap killed between its renames
        os.replace(old, image_dir)
    shutil.rmtree(staging, ignore_errors=True)
    (staging / REPORT_DIR).mkdir(parents=True)
    try:
        images = _draw(train, evals, summary, rows, staging / REPORT_DIR)
        (staging / REPORT_MD).write_text(render_markdown(output_dir, summary, rows, images))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    # Commit: swap the image folder, then report.md (the page readers open) last.
    shutil.rmtree(old, ignore_errors=True)
    if image_dir.exists():
        os.replace(image_dir, old)
    os.replace(staging / REPORT_DIR, image_dir)
    os.replace(staging / REPORT_MD, target)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(staging, ignore_errors=True)
    return target


def summary_text(summary: dict) -> str:
    """The printout at the end of a run: the before/after table and where everything is."""
    lines = ["", f"Before and after training ({TABLE_NOTE}):", *results_table(summary)]
    lines += ["", f"Models:  {', '.join(summary['final_models'].values())}"]
    # Only the logs the run wrote: logging.jsonl=false, logging.tensorboard=false write none.
    metrics, tensorboard = _written(summary.get("metrics")), _written(summary.get("tensorboard"))
    if metrics:
        lines.append(f"Metrics: {metrics}" + (f" (TensorBoard: {tensorboard})" if tensorboard else ""))
    elif tensorboard:
        lines.append(f"TensorBoard: {tensorboard}")
    lines.append(f"Summary: {Path(summary['output_dir']) / 'summary.json'}")
    if summary.get("samples"):
        lines.append(f"Samples: {', '.join(summary['samples'].values())}")
    if summary.get("report"):
        lines.append(f"Report:  {summary['report']}")
    return "\n".join(lines)
