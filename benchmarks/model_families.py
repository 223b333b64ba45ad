"""Which transformers model families a run trains, on the CPU: for each family a tiny random teacher
and student of that family (the tiny_qwen2 shapes, the real Qwen tokenizer), three stages of one or two
steps, stage 2 with every term (KD, CE, feature, attention, contrastive) under GradNorm; then the same
family with packing, LoRA on every linear layer, the FP8 teacher (CPU emulation), a student slimmed from
the teacher by block influence, and a stage that reads a top-k teacher cache.

    python benchmarks/model_families.py --out benchmarks/results/model_families_cpu.json
    python benchmarks/model_families.py --families gpt_neox olmo2 --variants base packing
    python benchmarks/model_families.py --families qwen3_5_text qwen3_next \
        --out benchmarks/results/model_families_hybrids_cpu.json

Each row: the family, the variant, the exit status, the seconds and the last error line (a refusal
names what the family lacks). Runs write under a temporary folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen2", "qwen3", "llama", "mistral", "gemma2", "gemma3_text", "phi3", "gpt_neox", "olmo2", "granite",
            "stablelm", "qwen2_moe", "qwen3_5_text", "qwen3_next"]
# Linear-attention hybrids: every fourth layer has attention, the last of four among them, so the
# students get 4 layers for the attention term's default pair (the last layers) to have queries and keys.
HYBRIDS = ("qwen3_5_text", "qwen3_next")
VARIANTS = ["base", "packing", "lora", "fp8_teacher", "slimmed", "cache"]
BASE = ["model=tiny_qwen2", "data=demo", "data.max_length=96", "data.max_eval_examples=4", "logging.progress_bar=false",
        "logging.tensorboard=false", "eval.mcq=[]", "eval.samples=false",
        *[f"stage{i}.{key}" for i in (1, 2, 3) for key in ("max_steps=1", "batch_size=2")], "stage2.max_steps=2",
        "stage2.loss.balancing.method=gradnorm",
        *[f"stage2.loss.weights.{term}=0.1" for term in ("feature", "attention", "contrastive")]]


def family_overrides(family: str, roles=("teacher", "student")) -> list[str]:
    out = [f"model.{role}.random_init.model_type={family}" for role in roles]
    if family in HYBRIDS and "student" in roles:
        out += ["model.student.random_init.num_hidden_layers=4"]
    if family == "gpt_neox":  # no grouped-query attention
        out += [f"~model.{role}.random_init.num_key_value_heads" for role in roles]
    return out


def commands(family: str, variant: str, work: Path) -> list[list[str]]:
    run = [sys.executable, "run_distillation.py", *BASE, f"output_dir={work / 'run'}"]
    if variant == "base":
        return [run + family_overrides(family)]
    if variant == "packing":
        return [run + family_overrides(family) + ["train.packing=true"]]
    if variant == "lora":
        # peft adapts Qwen3-Next's experts as bare parameters, which take no dropout (the run says so otherwise)
        dropout = ["lora.dropout=0"] if family == "qwen3_next" else []
        return [run + family_overrides(family) + ["lora.enabled=true", "lora.target_modules=[all-linear]", *dropout]]
    if variant == "fp8_teacher":
        return [run + family_overrides(family) + ["model.teacher.fp8=true"]]
    if variant == "slimmed":
        return [run + family_overrides(family, ("teacher",)) + [
            "model.student.random_init=null", "model.student.tokenizer=null", "model.student.keep_layers=2",
            "model.student.prune.method=block_influence"]]
    if variant == "cache":
        cache = [sys.executable, "-m", "qwen_distillation.cache_teacher", *BASE, *family_overrides(family),
                 "--out", str(work / "cache"), "--k", "8"]
        return [cache, run + family_overrides(family) + ["stage3.teacher.source=cache",
                                                          f"stage3.teacher.cache={work / 'cache'}"]]
    raise ValueError(f"unknown variant {variant!r}: one of {VARIANTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=FAMILIES)
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    for family in args.families:
        for variant in args.variants:
            with tempfile.TemporaryDirectory() as tmp:
                started, rc, error = time.perf_counter(), 0, ""
                for command in commands(family, variant, Path(tmp)):
                    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
                    if done.returncode:
                        rc = done.returncode
                        lines = [line for line in done.stderr.splitlines() if line.strip()]
                        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
                        error = (errors or lines or [""])[-1][:300]
                        break
            rows.append({"family": family, "variant": variant, "rc": rc,
                         "seconds": round(time.perf_counter() - started, 1), "error": error})
            print(f"{family:12s} {variant:12s} rc={rc} {rows[-1]['seconds']:6.1f}s {error}", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
