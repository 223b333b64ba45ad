"""Model-state memory per GPU of a teacher->student pair under each ``distributed.engine``.

    python benchmarks/distributed_memory.py                 # the Markdown table of docs/distributed.md
    python benchmarks/distributed_memory.py --json out.json # the same numbers as JSON

Pure arithmetic on the real Qwen2.5 shapes (no torch, no weights). Model state only: the
student's fp32 weights (4 B/param), fp32 gradients (4 B/param) and AdamW's two fp32 states
(8 B/param), and the frozen teacher's bf16 weights (2 B/param). Activations, autocast's bf16 weight
copies, DeepSpeed's own fp32 partition copy, prefetched layers, communication buckets, the CUDA context
and fragmentation are not counted (docs/distributed.md says how large some of them are).

Per GPU, with P_s / P_t the student / teacher parameter counts and N the number of GPUs:

    none           16 P_s + 2 P_t                              (N = 1 only)
    zero2          4 P_s + 12 P_s / N + 2 P_t
    zero3, fsdp2   (16 P_s + 2 P_t) / N + W
    zero3_offload  2 P_t / N + W            and in CPU RAM: 16 P_s / N a rank, 16 P_s a node

W, the gathered working set, is the largest single decoder layer of the student in fp32 plus
that of the teacher in bf16, plus the vocab x hidden output matrix (lm_head, or the tied
embedding) of the student in fp32 and of the teacher in bf16, both gathered for the fused loss.
GiB = 2**30 bytes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen_shapes import QWEN  # noqa: E402

PAIRS = {"7b->1.5b": ("7b", "1.5b"), "72b->7b": ("72b", "7b")}  # teacher -> student
ENGINES = ("none", "zero2", "zero3", "zero3_offload", "fsdp2")
GPU_COUNTS = (1, 2, 4, 8)
H200_USABLE_GIB = 139.0
GIB = 2**30

STUDENT_WEIGHT_B = 4  # fp32 master weights
STUDENT_GRAD_B = 4  # fp32 gradients
STUDENT_ADAM_B = 8  # AdamW exp_avg + exp_avg_sq, fp32
STUDENT_B = STUDENT_WEIGHT_B + STUDENT_GRAD_B + STUDENT_ADAM_B  # 16
TEACHER_B = 2  # bf16 weights, no gradients, no optimizer


def layer_params(shape: dict) -> int:
    """One decoder layer: q (H x H + H bias), k and v (H x KV + KV bias each, KV = kv_heads * H / heads),
    o (H x H, no bias), gate, up and down (3 H I), and two RMSNorm weights (2 H)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h


def vocab_matrix_params(shape: dict) -> int:
    """The vocab x hidden matrix (the embedding, or the untied lm_head): V H."""
    return shape["vocab_size"] * shape["hidden_size"]


def param_count(shape: dict) -> int:
    """All parameters: embedding V H, L layers, the final norm H, and an untied lm_head V H."""
    untied_head = 0 if shape["tie_word_embeddings"] else vocab_matrix_params(shape)
    return (vocab_matrix_params(shape) + shape["num_hidden_layers"] * layer_params(shape)
            + shape["hidden_size"] + untied_head)


def working_set_bytes(teacher: dict, student: dict) -> int:
    """W, the largest unit gathered at once under zero3/fsdp2: 4 B (layer_s + V H_s) + 2 B (layer_t + V H_t)."""
    return (STUDENT_WEIGHT_B * (layer_params(student) + vocab_matrix_params(student))
            + TEACHER_B * (layer_params(teacher) + vocab_matrix_params(teacher)))


def gpu_bytes(engine: str, p_t: int, p_s: int, gpus: int, working_set: int) -> int | None:
    """Model-state bytes on one GPU (the formulas of the module docstring); None where the engine does not apply."""
    if engine == "none":
        return STUDENT_B * p_s + TEACHER_B * p_t if gpus == 1 else None
    if engine == "zero2":
        return STUDENT_WEIGHT_B * p_s + (STUDENT_GRAD_B + STUDENT_ADAM_B) * p_s // gpus + TEACHER_B * p_t
    if engine in ("zero3", "fsdp2"):
        return (STUDENT_B * p_s + TEACHER_B * p_t) // gpus + working_set
    if engine == "zero3_offload":
        return TEACHER_B * p_t // gpus + working_set
    raise ValueError(f"unknown engine {engine!r}")


def cpu_node_bytes(engine: str, p_s: int) -> int | None:
    """CPU RAM of one node holding all N ranks under zero3_offload: N x 16 P_s / N = 16 P_s; None for the others."""
    return STUDENT_B * p_s if engine == "zero3_offload" else None


def gib(n_bytes: int | None) -> float | None:
    """Bytes to GiB (2**30), rounded to 0.1; None stays None."""
    return None if n_bytes is None else round(n_bytes / GIB, 1)


def cells(pairs: dict = PAIRS, engines: tuple = ENGINES, gpu_counts: tuple = GPU_COUNTS) -> list[dict]:
    """One dict per (pair, engine, GPU count): GPU GiB, CPU GiB per node, and whether it fits an H200."""
    rows = []
    for pair, (teacher, student) in pairs.items():
        p_t, p_s = param_count(QWEN[teacher]), param_count(QWEN[student])
        w = working_set_bytes(QWEN[teacher], QWEN[student])
        for engine in engines:
            for n in gpu_counts:
                gpu = gpu_bytes(engine, p_t, p_s, n, w)
                rows.append({"pair": pair, "engine": engine, "gpus": n, "gpu_gib": gib(gpu),
                             "cpu_gib_per_node": gib(cpu_node_bytes(engine, p_s)) if gpu is not None else None,
                             "fits_h200": None if gpu is None else gpu <= H200_USABLE_GIB * GIB})
    return rows


def cell_text(row: dict) -> str:
    """'-' where the engine does not apply, else the GPU GiB, with ' ✗' where it exceeds an H200."""
    if row["gpu_gib"] is None:
        return "-"
    return f"{row['gpu_gib']:.1f}" + ("" if row["fits_h200"] else " ✗")


def markdown(rows: list[dict], gpu_counts: tuple = GPU_COUNTS) -> str:
    """The table: one line per pair and engine (and a CPU RAM line under zero3_offload), one column per GPU count."""
    head = "| teacher -> student | engine | " + " | ".join(f"{n} GPU" + ("s" if n > 1 else "") for n in gpu_counts)
    lines = [head + " |", "|" + " --- |" * (2 + len(gpu_counts))]
    by_key = {(r["pair"], r["engine"], r["gpus"]): r for r in rows}
    for pair, engine in dict.fromkeys((r["pair"], r["engine"]) for r in rows):
        got = [by_key[pair, engine, n] for n in gpu_counts]
        lines.append(f"| {pair} | {engine} | " + " | ".join(cell_text(r) for r in got) + " |")
        if engine == "zero3_offload":
            lines.append(f"| {pair} | {engine}, CPU RAM per node | "
                         + " | ".join(f"{r['cpu_gib_per_node']:.1f}" for r in got) + " |")
    return "\n".join(lines)


def parameter_lines() -> str:
    """The parameter count of each shape, and per pair the working set W and the 2 P_s bytes of the student's
    bf16 autocast weight copies (not in the table), as text lines."""
    lines = [f"{name}: {param_count(shape):,} parameters" for name, shape in QWEN.items()]
    for pair, (t, s) in PAIRS.items():
        lines.append(f"{pair}: gathered working set W = {gib(working_set_bytes(QWEN[t], QWEN[s])):.1f} GiB; "
                     f"bf16 copy of the student 2 P_s = {gib(2 * param_count(QWEN[s])):.1f} GiB")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    rows = cells()
    print(parameter_lines(), end="\n\n")
    print(markdown(rows))
    print(f"\n✗: over the {H200_USABLE_GIB:.0f} GiB usable on one H200. GiB = 2**30 bytes; model state only.")
    if args.json:
        payload = {"h200_usable_gib": H200_USABLE_GIB,
                   "bytes_per_param": {"student_weights": STUDENT_WEIGHT_B, "student_grads": STUDENT_GRAD_B,
                                       "student_adamw": STUDENT_ADAM_B, "teacher_weights": TEACHER_B},
                   "params": {name: param_count(shape) for name, shape in QWEN.items()},
                   "working_set_gib": {pair: gib(working_set_bytes(QWEN[t], QWEN[s]))
                                       for pair, (t, s) in PAIRS.items()},
                   "cells": rows}
        args.json.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
