"""What the attention-distillation term (stage 2's MiniLMv2 relations) costs on packed micro-batches
of the real-run data, in the two layouts of ``train.pack_layout``, with and without the key windows
that ``sequence_starts`` gives it (``losses.attention.relation_kl``).

    python benchmarks/attention_term.py --data .realrun_data --out attention_term.json

For each micro-batch of the first ``--steps`` steps of a real run's ``train.pack_step`` (one seeded
shuffle of ``DATA/train.jsonl``, ``--batch_size`` x ``--grad_accum`` examples a step, cut by tokens
into micro-batches that fit ``--batch_size`` rows of ``--max-length``, as
``data.manager.length_grouped_batches`` cuts them), random post-RoPE q/k/v shaped like one layer
of the student and of the teacher
(``--student``/``--teacher`` Qwen2.5 shapes), and for each layout (``rows`` of at most
``--max-length``, ``padding_free``) with and without the windows:

* ``scores``: the relation scores the term computes, counted from the shapes (every chunk's
  queries x the keys it reads, x rows, for one relation head and one relation of the three):
  the work, whatever the machine;
* ``ms``: the median time of its forward and backward (the student's side gets the gradient),
  ``--repeats`` times after one warm-up (``fp8_teacher.time_call``: the wall clock on this
  machine's CPU, CUDA events on the GPU with ``--device cuda``);
* the largest relative difference of the loss with the windows from the loss without.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from qwen_shapes import QWEN  # noqa: E402


def score_count(rows: int, length: int, chunk: int, starts: list[int] | None) -> int:
    """Relation scores computed by ``relation_kl`` for one relation head: per chunk, rows x its
    queries x the keys it reads (from 0, or from the chunk's first key with ``starts``)."""
    from qwen_distillation.losses.attention import _first_key

    total = 0
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        first = 0 if starts is None else _first_key(starts, rows, length, start)
        total += rows * (end - start) * (end - first)
    return total


def layer_qkv(shape: dict, rows: int, length: int, dtype, device, generator, grad: bool):
    heads, kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
    dim = shape["hidden_size"] // heads
    return [torch.randn(rows, h, length, dim, generator=generator, dtype=dtype).to(device).requires_grad_(grad)
            for h in (heads, kv_heads, kv_heads)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / ".realrun_data")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--grad_accum", type=int, default=2)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--max-length", dest="max_length", type=int, default=2048)
    parser.add_argument("--student", default="0.5b", choices=sorted(QWEN))
    parser.add_argument("--teacher", default="1.5b", choices=sorted(QWEN))
    parser.add_argument("--relation-heads", dest="relation_heads", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=256, help="stageN.loss.attention.chunk_size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from fp8_teacher import time_call
    from packed_shapes import step_examples
    from real_run import encode_file

    from qwen_distillation.data.manager import collate_packed, token_micro_batches
    from qwen_distillation.losses.attention import attention_distillation_loss
    from qwen_distillation.modeling.parts import position_mask
    from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer

    device = torch.device(args.device)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    examples = encode_file(args.data / "train.jsonl", build_qwen_tokenizer(), args.max_length)
    report = {"command": "python " + " ".join(sys.argv), "device": str(device), "threads": torch.get_num_threads(),
              "student": args.student, "teacher": args.teacher, "relation_heads": args.relation_heads,
              "chunk": args.chunk, "batches": []}
    groups = []
    for chosen in step_examples(examples, steps=args.steps, per_step=args.batch_size * args.grad_accum,
                                seed=args.seed):
        chosen = sorted(chosen, key=lambda e: len(e["input_ids"]))
        groups += token_micro_batches(chosen, args.max_length * args.batch_size, args.max_length)
    for index, chosen in enumerate(groups):
        entry = {"lengths": [len(e["input_ids"]) for e in chosen]}
        for layout in ("rows", "padding_free"):
            batch = collate_packed(chosen, 0, args.max_length, layout)
            rows, length = batch["input_ids"].shape
            segments, starts = batch["segments"].to(device), batch["sequence_starts"].tolist()
            mask = position_mask(batch["labels"]).to(device)
            generator = torch.Generator().manual_seed(index)
            student = layer_qkv(QWEN[args.student], rows, length, dtype, device, generator, True)
            teacher = layer_qkv(QWEN[args.teacher], rows, length, dtype, device, generator, False)
            losses = {}
            for windows in (False, True):
                kwargs = dict(relation_heads=args.relation_heads, chunk_size=args.chunk, segments=segments,
                              sequence_starts=starts if windows else None)

                def step():
                    loss = attention_distillation_loss(student, teacher, mask, segments >= 0, **kwargs)
                    loss.backward()
                    losses[windows] = float(loss.detach())

                name = f"{layout}{'_windows' if windows else ''}"
                timing = time_call(step, warmup=1, iters=args.repeats, device=device)
                entry[name] = {"rows": rows, "length": length, "ms": round(timing["ms_median"], 1),
                               "scores": score_count(rows, length, args.chunk, starts if windows else None)}
            entry[f"{layout}_windows"]["loss_rel_diff"] = abs(losses[True] - losses[False]) / abs(losses[False])
        report["batches"].append(entry)
        print(json.dumps(entry), flush=True)
    text = json.dumps(report, indent=2) + "\n"
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
