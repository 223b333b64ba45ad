"""What ``train.async_checkpoint`` saves a run: one stage with mid-stage checkpoints, saved in step
and in the background, in alternating order, each run a whole ``run_distillation.py`` process.

    python benchmarks/async_checkpoint.py --rounds 3 --out async_checkpoint.json [OVERRIDES...]

Each round runs both arms (in the order A B, then B A in the next round, and so on) and reads
each run's ``summary.json`` timings: ``checkpoints_s`` (what the step loop spent on the saves:
the whole save in step; the host copy, and any wait for the save before it, in the background),
``train_s`` (the steps, which share the machine with a background writer), ``total_s`` and
``fixed_s``. Reported per arm: every run's figures and their medians.

The default workload is CPU-sized: the tiny teacher of ``model=tiny_qwen2`` and a student of
hidden size 256 and 4 layers with the real 151,936-token vocabulary (about 42 M parameters: a
checkpoint of its fp32 weights and AdamW's two moments is about 0.5 GB), 12 steps of stage 1 with a
checkpoint every 3 (3 saves), no evaluation during the stage. Extra Hydra overrides go last on the
command line and are appended to every run.
"""

from __future__ import annotations

import argparse
import json
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKLOAD = [
    "model=tiny_qwen2", "data=demo", "end_stage=1", "stage1.max_steps=12", "stage1.save_every=3",
    "stage1.eval_every=0", "train.save_every_minutes=0", "train.keep_checkpoints=2", "data.max_length=128",
    "data.max_eval_examples=4", "eval.agreement=false", "eval.mcq=[]", "eval.samples=false",
    "logging.progress_bar=false", "logging.tensorboard=false", "overwrite_output_dir=true",
    "model.student.random_init.hidden_size=256", "model.student.random_init.intermediate_size=704",
    "model.student.random_init.num_hidden_layers=4", "model.student.random_init.num_attention_heads=4",
    "model.student.random_init.num_key_value_heads=2",
]
ARMS = {"in_step": ["train.async_checkpoint=false"], "background": ["train.async_checkpoint=true"]}


def run_arm(arm: str, output_dir: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "run_distillation.py", *WORKLOAD, f"output_dir={output_dir}", *ARMS[arm], *overrides]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{arm}: run_distillation.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    timings = json.loads((output_dir / "summary.json").read_text())["timings"]
    stage = timings["stages"]["stage1"]
    return {"wall_s": round(wall, 3), "total_s": timings["total_s"], "fixed_s": timings["fixed_s"],
            "train_s": stage["train_s"], "checkpoints_s": stage["checkpoints_s"],
            "command": " ".join(command[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides appended to every run")
    args = parser.parse_args()
    if args.rounds < 1:  # no run to take medians of: statistics.median([]) raised after the parse
        parser.error(f"--rounds {args.rounds}: must be at least 1 (each round runs both arms once)")
    runs = {arm: [] for arm in ARMS}
    # SIGTERM (`timeout`, a scheduler) exits as an exception does: the run in flight is killed and the scratch
    # folder removed (it had stayed behind, 182 MB of checkpoints).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="async_checkpoint_") as scratch:
        for round_ in range(args.rounds):
            order = list(ARMS) if round_ % 2 == 0 else list(reversed(ARMS))
            for arm in order:
                result = run_arm(arm, Path(scratch) / f"{arm}{round_}", args.overrides)
                result["round"], result["position"] = round_, order.index(arm)
                runs[arm].append(result)
                print(f"round {round_} {arm}: checkpoints {result['checkpoints_s']:.3f} s, train "
                      f"{result['train_s']:.3f} s, total {result['total_s']:.3f} s", flush=True)
    keys = ("checkpoints_s", "train_s", "total_s", "fixed_s", "wall_s")
    medians = {arm: {key: round(statistics.median(r[key] for r in results), 3) for key in keys}
               for arm, results in runs.items()}
    out = {"benchmark": "async_checkpoint", "workload": WORKLOAD, "overrides": args.overrides,
           "rounds": args.rounds, "machine": {"platform": platform.platform(), "python": platform.python_version()},
           "command": " ".join(["python", "benchmarks/async_checkpoint.py", *sys.argv[1:]]),
           "medians": medians, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(medians, indent=2))


if __name__ == "__main__":
    main()
