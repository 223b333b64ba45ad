"""The offline teacher cache with the real demo teacher: what writing it costs, and what training
from it changes against the online teacher, at equal steps on the same data.

    # 1. cache throughput and size for k = 8, 32, 128 (conf/experiment/arms.yaml's data)
    python benchmarks/teacher_cache.py write --out /root/tc --ks 8,32,128 --device cuda \
        --teacher_path /root/smol/smol.gguf
    # 2. stage 1 (general KD, T=4), 3 epochs of the general data, online and from the k=32 cache
    python benchmarks/teacher_cache.py train --out /root/tc --k 32 --epochs 3 --device cuda \
        --teacher_path /root/smol/smol.gguf --arms online,cache

``write`` appends one JSON row per k to OUT/write.json: examples and response tokens cached,
seconds, tokens/s, bytes on disk and bytes per token. ``train`` runs stage 1 of the arms set-up
(one learning rate, micro-batch 8) per arm and appends to OUT/train.json: wall time of the run,
training tokens/s (median of the logged steps), the held-out NLL and agreement with the teacher
before and after, from the run's own evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from qwen_distillation.app import CONF_DIR, run  # noqa: E402
from qwen_distillation.cache_teacher import cache_teacher  # noqa: E402
from qwen_distillation.config.validate import validate_config  # noqa: E402

METRICS = ("eval/general_nll", "eval/medical_nll", "eval/general_top1_agreement", "eval/general_kl_to_teacher")


def overrides(args, output_dir: Path) -> list[str]:
    teacher = [f"model.teacher.path={args.teacher_path}"] if args.teacher_path else []
    return ["experiment=arms", f"output_dir={output_dir}", f"train.device={args.device}", "eval.mcq=[]",
            "start_stage=1", "end_stage=1", "stage1.max_steps=null", f"stage1.epochs={args.epochs}",
            "stage1.eval_every=0", *teacher, *args.override]


def compose_run(items: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=items)


def append(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    path.write_text(json.dumps(rows, indent=2))
    print(json.dumps(row))


def write(args) -> None:
    out = Path(args.out)
    for k in map(int, args.ks.split(",")):
        cfg = validate_config(compose_run(overrides(args, out / "unused")))
        stats = cache_teacher(cfg, out / f"cache_k{k}", k=k, batch_size=args.batch_size)
        disk = sum(p.stat().st_size for p in (out / f"cache_k{k}").glob("shard-*.safetensors"))
        append(out / "write.json", {**stats, "disk_bytes": disk, "bytes_per_token": disk / stats["tokens_total"]})


def train(args) -> None:
    out = Path(args.out)
    for arm in args.arms.split(","):
        extra = ([] if arm == "online" else
                 ["stage1.teacher.source=cache", f"stage1.teacher.cache={out / f'cache_k{args.k}'}"])
        run_dir = out / ((f"run_{arm}" if arm == "online" else f"run_{arm}_k{args.k}") + args.tag)
        started = time.perf_counter()
        summary = run(compose_run(overrides(args, run_dir) + extra))
        seconds = time.perf_counter() - started
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in rows if "loss" in r]
        after = summary["student_after_stage"]["1"]
        append(out / "train.json", {
            "arm": arm, "k": None if arm == "online" else args.k, "overrides": args.override, "steps": len(steps),
            "train_tokens": sum(r["tokens"] for r in steps), "run_seconds": round(seconds, 1),
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps[5:] or steps),
            **{f"before/{m}": summary["student_before"].get(m) for m in METRICS},
            **{f"after/{m}": after.get(m) for m in METRICS},
            "teacher": {m: summary["teacher"].get(m) for m in METRICS}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("write", "train"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--teacher_path", default=None)
    parser.add_argument("--ks", default="8,32,128")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--epochs", type=float, default=3.0, help="stage 1's epochs over the general data")
    parser.add_argument("--override", action="append", default=[], help="a further Hydra override (repeatable)")
    parser.add_argument("--arms", default="online,cache")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--tag", default="", help="appended to the runs' directory names")
    args = parser.parse_args()
    write(args) if args.what == "write" else train(args)


if __name__ == "__main__":
    main()
