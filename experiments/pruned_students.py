"""Which slimmed student is worth distilling into? The same arm of the three-arm experiment
(conf/experiment/arms.yaml: equal optimizer steps, equal data, one learning rate and schedule), run
once per way of pruning the teacher into the student:

  even             15 of 30 layers, evenly spaced (the default)
  block_influence  15 of 30 layers with the highest Block Influence (ShortGPT)
  perplexity       15 of 30 layers whose removal hurts the calibration NLL most (one at a time)
  width            all 30 layers, MLP intermediate size 1536 -> 512 by activation importance
                   (Minitron), the same parameter count as the 15-layer students

    python experiments/pruned_students.py --steps 240 --device cuda --out /tmp/pruned   # GPU
    python experiments/pruned_students.py --reduced --steps 2 --mcq_items 4 --calibration_examples 16 \\
        --out /tmp/pruned_cpu   # CPU check

Reported per student: its parameters, the held-out general and medical NLL and the agreement with
the teacher before training and after the arm (the run's own evaluations), and the share of the
teacher's gap the arm closed, ``(NLL_before - NLL_after) / (NLL_before - NLL_teacher)``. Writes
results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from three_stage_vs_finetune import ARMS, arm_overrides, arm_row, compose_arm  # noqa: E402

from qwen_distillation.app import run  # noqa: E402
from qwen_distillation.errors import DistillationError  # noqa: E402

STUDENTS = {
    "even": ["model.student.keep_layers=15", "model.student.prune.method=even"],
    "block_influence": ["model.student.keep_layers=15", "model.student.prune.method=block_influence"],
    "perplexity": ["model.student.keep_layers=15", "model.student.prune.method=perplexity"],
    "width": ["model.student.keep_layers=null", "model.student.prune.width.intermediate_size=512"],
}
REPORTED = ("eval/general_nll", "eval/medical_nll", "eval/medical_top1_agreement", "eval/medical_kl_to_teacher")


def student_row(name: str, arm: str, run_dir: Path, seconds: float) -> dict:
    row = arm_row(arm, run_dir)
    record = json.loads((run_dir / "pruning.json").read_text())
    out = {"student": name, "arm": arm, "parameters": record["parameters"]["student"],
           "kept_layers": record["kept_layers"], "width": record.get("width"), "seconds": round(seconds, 1),
           "optimizer_steps": row["optimizer_steps"], "train_tokens": row["train_tokens"]}
    for metric in REPORTED:
        out[f"before/{metric}"] = row["student_before"][metric]
        out[f"after/{metric}"] = row[metric]
        out[f"teacher/{metric}"] = row["teacher"][metric]
    for domain in ("general", "medical"):
        before, after = out[f"before/eval/{domain}_nll"], out[f"after/eval/{domain}_nll"]
        out[f"gap_closed/{domain}"] = (before - after) / (before - out[f"teacher/eval/{domain}_nll"])
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [f"Arm: {meta['arm']}; steps: {meta['steps']}; device: {meta['device']}; reduced: {meta['reduced']}", "",
             "| student | parameters | general NLL before → after | medical NLL before → after | top-1 agreement "
             "before → after | KL to teacher before → after | gap closed (general / medical) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pair = [f"{r[f'before/{m}']:.3f} → {r[f'after/{m}']:.3f}" for m in REPORTED]
        lines.append(f"| {r['student']} | {r['parameters']:,} | " + " | ".join(pair)
                     + f" | {r['gap_closed/general']:.1%} / {r['gap_closed/medical']:.1%} |")
    t = rows[0]
    lines += ["", f"Teacher: general NLL {t['teacher/eval/general_nll']:.3f}, medical NLL "
                  f"{t['teacher/eval/medical_nll']:.3f}. Kept layers: "
              + "; ".join(f"{r['student']} {r['kept_layers']}" for r in rows if len(r["kept_layers"]) < 30)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of the arm")
    parser.add_argument("--arm", default="single_stage_kd", help="the arm of experiments/three_stage_vs_finetune.py")
    parser.add_argument("--students", default=",".join(STUDENTS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mcq_items", type=int, default=100)
    parser.add_argument("--teacher_path", default=None, help="the teacher GGUF/directory, if not the installed package")
    parser.add_argument("--reduced", action="store_true", help="fewer records and shorter examples (CPU)")
    parser.add_argument("--calibration_examples", type=int, default=None,
                        help="model.student.prune.calibration.num_examples (default: the config's, 256)")
    args = parser.parse_args()
    # Checked before any student runs: an unknown name failed with a KeyError (a ValueError for --arm) traceback,
    # after the students before it had run.
    if unknown := [name for name in args.students.split(",") if name not in STUDENTS]:
        parser.error(f"--students {args.students}: unknown student(s) {unknown}; choose from {','.join(STUDENTS)}")
    if args.calibration_examples is not None and args.calibration_examples < 1:  # 0 was taken as "not given"
        parser.error(f"--calibration_examples {args.calibration_examples}: must be at least 1 (leave it out for the "
                     f"config's 256)")
    if args.arm not in ARMS:
        parser.error(f"--arm {args.arm}: unknown arm; choose one of {', '.join(ARMS)}")
    out = Path(args.out)
    results = out / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []  # students of an earlier call stay
    for name in args.students.split(","):
        started = time.perf_counter()
        overrides = arm_overrides(args.arm, args.steps, out / name, args.device, args.mcq_items, args.teacher_path,
                                  args.reduced)
        calibration = ([f"model.student.prune.calibration.num_examples={args.calibration_examples}"]
                       if args.calibration_examples is not None else [])
        try:
            run(compose_arm(overrides + STUDENTS[name] + calibration))
        except DistillationError as err:  # as run_distillation.py reports it, not a traceback
            sys.exit(f"error: student {name}: {err}")
        rows = [r for r in rows if r["student"] != name]
        rows.append(student_row(name, args.arm, out / name / args.arm, time.perf_counter() - started))
        results.write_text(json.dumps(rows, indent=2))
    meta = {"arm": args.arm, "steps": args.steps, "device": args.device, "reduced": args.reduced}
    (out / "results.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
