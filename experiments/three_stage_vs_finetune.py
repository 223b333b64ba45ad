"""Does the three-stage pipeline beat plain fine-tuning, and forget less than jumping to
medical data? Three arms at equal optimizer steps, equal batch, one learning rate and
schedule, on the same data (conf/experiment/arms.yaml):

  (a) finetune_ce      the student fine-tuned with CE only on medical data
  (b) single_stage_kd  one stage of KD (T=2, KL 0.5 / CE 0.5) on medical data
  (c) three_stage      stage 1 general KD, stage 2 mixed KD, stage 3 medical fine-tune

    python experiments/three_stage_vs_finetune.py --reduced --steps 6 --mcq_items 20 --out /tmp/arms_cpu  # CPU
    python experiments/three_stage_vs_finetune.py --steps 300 --out $OUT/arms --device cuda  # full, GPU

Every arm starts from the same 15-of-30-layer copy of SmolLM2-135M-Instruct. Each arm's run
evaluates itself (the run's Evaluator, as in every run): reported per arm are its final
student's held-out general and medical NLL, agreement with the teacher on held-out medical
answers (top-1 match, mean KL), multiple-choice accuracy on MedMCQA and CMExam items, the
optimizer steps and the training tokens, under the metric names of metrics.jsonl. Writes
results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from qwen_distillation.app import CONF_DIR, run  # noqa: E402
from qwen_distillation.errors import DistillationError  # noqa: E402

ARMS = ("finetune_ce", "single_stage_kd", "three_stage")
# What each arm reports: its run's own evaluation of the final student (conf/experiment/arms.yaml).
METRICS = ("eval/general_nll", "eval/medical_nll", "eval/medical_top1_agreement", "eval/medical_kl_to_teacher",
           "eval/mcq/medmcqa_accuracy", "eval/mcq/cmexam_accuracy")


# The reduced (CPU) version: the same arms and data files, fewer records and shorter examples.
REDUCED = ["data.max_length=256", "data.max_eval_examples=16",
           "data.general=[{path: ../shared/data/general/alpaca_en_demo.jsonl, max_records: 120},"
           "{path: ../shared/data/general/alpaca_zh_demo.jsonl, max_records: 120}]",
           "data.medical=[{path: ../shared/data/medical_sft/huatuogpt_o1_demo_en.jsonl, max_records: 60},"
           "{path: ../shared/data/medical_sft/medmcqa_dev_exp_en_1000.jsonl, max_records: 60},"
           "{path: ../shared/data/medical_sft/medicalgpt_medical_sft_zh_1k.jsonl, max_records: 60},"
           "{path: ../shared/data/medical_sft/cmexam_val_reasoning_zh_1000.jsonl, max_records: 60}]",
           "stage3.sampling.max_scored=16"]


def base_overrides(out_dir: Path, device: str, teacher_path: str | None, mcq_items: int,
                   reduced: bool = False) -> list[str]:
    extra = [f"model.teacher.path={teacher_path}"] if teacher_path else []
    return ["experiment=arms", f"output_dir={out_dir}", f"train.device={device}", f"eval.mcq_max_items={mcq_items}",
            *extra, *(REDUCED if reduced else [])]


def arm_overrides(arm: str, steps: int, out: Path, device: str, mcq_items: int, teacher_path: str | None = None,
                  reduced: bool = False) -> list[str]:
    common = base_overrides(out / arm, device, teacher_path, mcq_items, reduced)
    if arm == "finetune_ce":
        return common + ["start_stage=3", "end_stage=3", f"stage3.max_steps={steps}", "stage3.loss.weights.kd=0",
                         "stage3.loss.weights.ce=1", "stage3.sampling.mode=uniform"]
    if arm == "single_stage_kd":
        return common + ["start_stage=3", "end_stage=3", f"stage3.max_steps={steps}", "stage3.temperature=2",
                         "stage3.loss.weights.kd=0.5", "stage3.loss.weights.ce=0.5", "stage3.sampling.mode=uniform"]
    if arm != "three_stage":
        raise ValueError(f"unknown arm {arm!r}: one of {', '.join(ARMS)}")
    third = steps // 3
    return common + [f"stage1.max_steps={third}", f"stage2.max_steps={third}", f"stage3.max_steps={steps - 2 * third}"]


def compose_arm(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def arm_row(arm: str, arm_dir: Path) -> dict:
    """An arm's steps and tokens, and the metrics of its run's last evaluation (the final
    student, evaluated by the run itself: the names of metrics.jsonl and the report)."""
    summary = json.loads((arm_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    last = summary["student_after_stage"][str(max(int(s) for s in summary["student_after_stage"]))]
    return {"arm": arm, "optimizer_steps": len(train), "train_tokens": sum(r["tokens"] for r in train),
            **{metric: last[metric] for metric in METRICS},
            "student_before": {metric: summary["student_before"][metric] for metric in METRICS},
            "teacher": {metric: summary["teacher"].get(metric) for metric in METRICS}}


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ["arm", "optimizer_steps", "train_tokens", *METRICS]
    out = [f"Steps per arm: {meta['steps']}; device: {meta['device']}; MCQ items per set: {meta['mcq_items']}", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        out.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols)
                   + " |")
    first = rows[0]
    out += ["", f"Initial student: general NLL {first['student_before']['eval/general_nll']:.4f}, medical NLL "
                f"{first['student_before']['eval/medical_nll']:.4f}; teacher: "
                f"{first['teacher']['eval/general_nll']:.4f} / {first['teacher']['eval/medical_nll']:.4f}."]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per arm (three_stage splits them)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mcq_items", type=int, default=100)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--teacher_path", default=None, help="the teacher GGUF/directory, if not the installed package")
    parser.add_argument("--reduced", action="store_true", help="fewer records and shorter examples (CPU)")
    parser.add_argument("--override", action="append", default=[],
                        help="a further Hydra override for every arm (repeatable), e.g. model.teacher.fp8=true")
    args = parser.parse_args()
    # Checked before any arm runs: an unknown name ran the three-stage pipeline under that name, and fewer than
    # 3 steps stopped the three-stage arm (stage1.max_steps=0) after the other arms had run.
    chosen = args.arms.split(",")
    if unknown := [arm for arm in chosen if arm not in ARMS]:
        parser.error(f"--arms {args.arms}: unknown arm(s) {unknown}; choose from {','.join(ARMS)}")
    if "three_stage" in chosen and args.steps < 3:
        parser.error(f"--steps {args.steps}: the three_stage arm gives a third of the steps to each of its stages, "
                     f"so it needs --steps 3 or more")
    out = Path(args.out)
    rows = []
    for arm in chosen:
        try:
            run(compose_arm(arm_overrides(arm, args.steps, out, args.device, args.mcq_items, args.teacher_path,
                                          args.reduced) + args.override))
        except DistillationError as err:  # as run_distillation.py reports it (an --out of another --steps: a traceback)
            sys.exit(f"error: arm {arm}: {err}")
        rows.append(arm_row(arm, out / arm))
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    meta = {"steps": args.steps, "device": args.device, "mcq_items": args.mcq_items, "reduced": args.reduced}
    (out / "results.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
