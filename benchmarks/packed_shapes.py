"""The shapes a packed stage hands the models, step by step, on the real-run data (CPU only, no model).

    python benchmarks/packed_shapes.py --data .realrun_data --out shapes.json

For each of ``--steps`` steps of ``batch_size x grad_accum`` examples (one seeded shuffle of
``DATA/train.jsonl`` per ``--seeds`` value, encoded as the run encodes them), the micro-batches
``train.packing=true train.pack_step=true`` builds (``data.manager.length_grouped_batches`` with
``pack_length=max_length`` and ``by_tokens``), and for each: its row count R, its row length L and
the padded positions. It reports the distinct row counts and the step each first appears at, and
the padding fraction of this layout. ``--layout padding_free`` lays each micro-batch out as one row,
the examples back to back (``train.pack_layout=padding_free``): row count 1, no padding, and
micro-batches cut by tokens alone.

Why the row count matters: Liger-Kernel's RoPE kernel (``liger_kernel/ops/rope.py``,
``_triton_rope``) takes the batch size as a ``tl.constexpr``, so Triton compiles it again (forward
and backward, for each model's head layout) for every row count it has not seen; its sequence
length is a plain integer, which Triton specialises only on divisibility by 16. The row counts
and when each first appears say how many such compilations a run of these steps meets, and when.
This script does not time anything: the compilations' cost on a GPU is not measured here.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def step_examples(examples: list[dict], *, steps: int, per_step: int, seed: int) -> list[list[dict]]:
    """The examples of each of the first ``steps`` full steps of ``per_step`` examples, from one
    shuffle of ``examples`` seeded by ``seed`` (fewer steps where the examples run out)."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    chosen = [[examples[i] for i in order[step * per_step:(step + 1) * per_step]] for step in range(steps)]
    return [step for step in chosen if len(step) == per_step]


def step_shapes(examples: list[dict], *, steps: int, batch_size: int, grad_accum: int, max_length: int,
                seed: int, layout: str = "rows") -> list[list[dict]]:
    """Per step, per micro-batch: ``{"rows", "length", "positions", "tokens"}`` under pack_step, with
    ``train.pack_layout=layout``."""
    from qwen_distillation.data.manager import length_grouped_batches

    out = []
    for chosen in step_examples(examples, steps=steps, per_step=batch_size * grad_accum, seed=seed):
        batches = length_grouped_batches(chosen, batch_size, 0, pack_length=max_length, by_tokens=True,
                                         layout=layout)
        shapes = []
        for batch in batches:
            rows, length = batch["input_ids"].shape
            tokens = int((batch["segments"] >= 0).sum())
            shapes.append({"rows": rows, "length": length, "positions": rows * length, "tokens": tokens})
        out.append(shapes)
    return out


def summarise(shapes: list[list[dict]]) -> dict:
    first_seen: dict[int, int] = {}
    for step, batches in enumerate(shapes, start=1):
        for batch in batches:
            first_seen.setdefault(batch["rows"], step)
    positions = sum(b["positions"] for batches in shapes for b in batches)
    tokens = sum(b["tokens"] for batches in shapes for b in batches)
    lengths_div16 = sum(b["length"] % 16 == 0 for batches in shapes for b in batches)
    micro = sum(len(batches) for batches in shapes)
    return {"steps": len(shapes), "micro_batches": micro,
            "row_counts_first_seen_at_step": {str(k): v for k, v in sorted(first_seen.items())},
            "distinct_row_counts": len(first_seen),
            "row_count_histogram": {str(r): sum(b["rows"] == r for batches in shapes for b in batches)
                                    for r in sorted(first_seen)},
            "row_lengths_divisible_by_16": lengths_div16,
            "padding_fraction_rows": round(1 - tokens / positions, 4), "tokens": tokens, "positions_rows": positions}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / ".realrun_data")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--max-length", dest="max_length", type=int, default=2048)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--layout", choices=["rows", "padding_free"], default="rows",
                        help="train.pack_layout: rows of max_length, or one row per micro-batch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer
    from real_run import encode_file

    examples = encode_file(args.data / "train.jsonl", build_qwen_tokenizer(), args.max_length)
    report = {"command": "python " + " ".join(sys.argv), "examples": len(examples), "batch_size": args.batch_size,
              "grad_accum": args.grad_accum, "max_length": args.max_length, "layout": args.layout, "by_seed": {}}
    for seed in args.seeds:
        shapes = step_shapes(examples, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                             max_length=args.max_length, seed=seed, layout=args.layout)
        report["by_seed"][str(seed)] = summarise(shapes)
    text = json.dumps(report, indent=2) + "\n"
    sys.stdout.write(text)
    if args.out is not None:  # the report as printed
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
