"""Does the three-stage pipeline beat plain fine-tuning, and forget less than jumping to
medical data? Three arms at equal optimizer steps, equal batch, one learning rate and
schedule, on the same data (conf/experiment/arms.yaml):

  (a) finetune_ce      the student fine-tuned with CE only on medical data
  (b) single_stage_kd  one stage of KD (T=2, KL 0.5 / CE 0.5) on medical data
  (c) three_stage      stage 1 general KD, stage 2 mixed KD, stage 3 medical fine-tune

    python experiments/three_stage_vs_finetune.py --reduced --steps 6 --mcq_items 20 --out /tmp/arms_cpu  # CPU
    python experiments/three_stage_vs_finetune.py --steps 300 --out $OUT/arms --device cuda  # full, GPU

Every arm starts from the same 15-of-30-layer copy of SmolLM2-135M-Instruct. Reported per
arm: held-out general and medical NLL, agreement with the teacher on held-out medical
answers (top-1 match, mean KL), multiple-choice accuracy on MedMCQA and CMExam items, the
optimizer steps and the training tokens. Writes results.json and results.md into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from qwen_distillation.app import CONF_DIR, run  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
ARMS = ("finetune_ce", "single_stage_kd", "three_stage")


# The reduced (CPU) version: the same arms and data files, fewer records and shorter examples.
REDUCED = ["data.max_length=256", "data.max_eval_examples=16",
           "data.general=[{path: ../shared/data/general/alpaca_en_demo.jsonl, max_records: 120},"
           "{path: ../shared/data/general/alpaca_zh_demo.jsonl, max_records: 120}]",
           "data.medical=[{path: ../shared/data/medical_sft/huatuogpt_o1_demo_en.jsonl, max_records: 60},"
           "{path: ../shared/data/medical_sft/medmcqa_dev_exp_en_1000.jsonl, max_records: 60},"
           "{path: ../shared/data/medical_sft/medicalgpt_medical_sft_zh_1k.jsonl, max_records: 60},"
           "{path: ../shared/data/medical_sft/cmexam_val_reasoning_zh_1000.jsonl, max_records: 60}]",
           "stage3.sampling.max_scored=16"]


def base_overrides(out_dir: Path, device: str, teacher_path: str | None, reduced: bool = False) -> list[str]:
    extra = [f"model.teacher.path={teacher_path}"] if teacher_path else []
    return ["experiment=arms", f"output_dir={out_dir}", f"train.device={device}", *extra,
            *(REDUCED if reduced else [])]


def arm_overrides(arm: str, steps: int, out: Path, device: str, teacher_path: str | None = None,
                  reduced: bool = False) -> list[str]:
    common = base_overrides(out / arm, device, teacher_path, reduced)
    if arm == "finetune_ce":
        return common + ["start_stage=3", "end_stage=3", f"stage3.max_steps={steps}", "stage3.loss.weights.kd=0",
                         "stage3.loss.weights.ce=1", "stage3.sampling.mode=uniform"]
    if arm == "single_stage_kd":
        return common + ["start_stage=3", "end_stage=3", f"stage3.max_steps={steps}", "stage3.temperature=2",
                         "stage3.loss.weights.kd=0.5", "stage3.loss.weights.ce=0.5", "stage3.sampling.mode=uniform"]
    third = steps // 3
    return common + [f"stage1.max_steps={third}", f"stage2.max_steps={third}", f"stage3.max_steps={steps - 2 * third}"]


def compose_arm(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def evaluate_arm(arm_dir: Path, mcq_items: int, device: torch.device, teacher_path: str | None = None,
                 reduced: bool = False) -> dict:
    """Agreement with the teacher and MCQ accuracy of an arm's final student."""
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.data.loading import load_records
    from qwen_distillation.data.manager import length_grouped_batches
    from qwen_distillation.data.sources import build_domain_data
    from qwen_distillation.evaluation.agreement import teacher_agreement
    from qwen_distillation.evaluation.mcq import mcq_accuracy, mcq_items as load_items
    from qwen_distillation.modeling.loading import load_student_checkpoint
    from qwen_distillation.modeling.pair import build_pair

    summary = json.loads((arm_dir / "summary.json").read_text())
    last = max(int(s) for s in summary["student_after_stage"])
    config = validate_config(compose_arm(base_overrides(arm_dir, device.type, teacher_path, reduced)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    pair = build_pair(config, device=device, teacher_dtype=dtype, output_dir=arm_dir)
    student = load_student_checkpoint(str(arm_dir / f"stage{last}" / "final"), dtype=torch.float32).to(device)
    data = build_domain_data(config.data, pair.tokenizer, seed=config.data.split_seed)
    batches = length_grouped_batches(data.eval_sets["medical"], 8, pair.pad_token_id, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:
        agreement = teacher_agreement(student, pair.teacher, batches, pair.vocab_size)
        mcq = {}
        for name, file, fmt in (("medmcqa", "medical_eval/medmcqa_dev_eval_500.jsonl", "medmcqa"),
                                ("cmexam", "medical_eval/cmexam_val_eval_zh_1000.jsonl", "cmexam")):
            items = load_items(load_records(str(SHARED / file), max_records=mcq_items), fmt, source=file)
            mcq[name] = mcq_accuracy(student, pair.tokenizer, items, vocab_size=pair.vocab_size)["accuracy"]
    return {"top1_agreement": agreement["top1_agreement"], "kl_to_teacher": agreement["kl_to_teacher"],
            "mcq_medmcqa": mcq["medmcqa"], "mcq_cmexam": mcq["cmexam"]}


def arm_row(arm: str, arm_dir: Path) -> dict:
    summary = json.loads((arm_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (arm_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    last = summary["student_after_stage"][str(max(int(s) for s in summary["student_after_stage"]))]
    return {"arm": arm, "optimizer_steps": len(train), "train_tokens": sum(r["tokens"] for r in train),
            "general_nll": last["eval/general_nll"], "medical_nll": last["eval/medical_nll"],
            "student_before_general_nll": summary["student_before"]["eval/general_nll"],
            "student_before_medical_nll": summary["student_before"]["eval/medical_nll"],
            "teacher_general_nll": summary["teacher"]["eval/general_nll"],
            "teacher_medical_nll": summary["teacher"]["eval/medical_nll"]}


def markdown(rows: list[dict], meta: dict) -> str:
    cols = ["arm", "optimizer_steps", "train_tokens", "general_nll", "medical_nll", "top1_agreement",
            "kl_to_teacher", "mcq_medmcqa", "mcq_cmexam"]
    out = [f"Steps per arm: {meta['steps']}; device: {meta['device']}; MCQ items per set: {meta['mcq_items']}", "",
           "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        out.append("| " + " | ".join(f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in cols)
                   + " |")
    first = rows[0]
    out += ["", f"Initial student: general NLL {first['student_before_general_nll']:.4f}, medical NLL "
                f"{first['student_before_medical_nll']:.4f}; teacher: {first['teacher_general_nll']:.4f} / "
                f"{first['teacher_medical_nll']:.4f}."]
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
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for arm in args.arms.split(","):
        run(compose_arm(arm_overrides(arm, args.steps, out, args.device, args.teacher_path, args.reduced)))
        row = arm_row(arm, out / arm)
        row.update(evaluate_arm(out / arm, args.mcq_items, torch.device(args.device), args.teacher_path,
                                args.reduced))
        rows.append(row)
        (out / "results.json").write_text(json.dumps(rows, indent=2))
    meta = {"steps": args.steps, "device": args.device, "mcq_items": args.mcq_items, "reduced": args.reduced}
    (out / "results.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
