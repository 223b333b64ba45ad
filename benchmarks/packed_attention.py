"""Time one micro-batch of the real-run data through a Qwen2.5-shaped model three ways, in one process:
packed rows with SDPA (transformers builds a (R, 1, L, L) mask from the restarting position ids),
packed rows with ``attn_implementation="varlen"`` (PyTorch's flash varlen kernel, no mask), and
one example per padded row with SDPA (what a padded trainer runs). The student runs forward and
backward (fp32 weights under bf16 autocast, as in a stage); the teacher runs forward only (bf16,
no grad). Reports median milliseconds (CUDA events, after warm-up) and the largest difference of
the packed varlen final hidden states from the packed SDPA ones.

    python benchmarks/packed_attention.py --data .realrun_data --examples 8 --out $OUT/packed_attention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from kd_kernels import timed  # noqa: E402
from qwen_shapes import QWEN  # noqa: E402


def lengths_of(data: Path, examples: int, offset: int) -> list[int]:
    """Token lengths of ``examples`` training examples (the Qwen2.5 chat template), from ``offset``."""
    from real_run import encode_file

    from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer

    rows = encode_file(data / "train.jsonl", build_qwen_tokenizer(), 2048)
    return [len(r["input_ids"]) for r in rows[offset:offset + examples]]


def batches(lengths: list[int], max_length: int, vocab: int) -> dict[str, dict]:
    from qwen_distillation.data.manager import collate, collate_packed

    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": torch.randint(vocab, (n,), generator=generator).tolist(),
                 "labels": torch.randint(vocab, (n,), generator=generator).tolist()} for n in lengths]
    return {"packed": collate_packed(examples, 0, max_length), "padded": collate(examples, 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / ".realrun_data")
    parser.add_argument("--examples", type=int, default=8, help="examples in the micro-batch")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--student", default="0.5b", choices=sorted(QWEN))
    parser.add_argument("--teacher", default="1.5b", choices=sorted(QWEN))
    parser.add_argument("--max-length", dest="max_length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from qwen_distillation.modeling import varlen
    from qwen_distillation.modeling.parts import model_inputs

    varlen.register()
    lengths = lengths_of(args.data, args.examples, args.offset)
    report = {"command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "lengths": lengths, "tokens": sum(lengths), "results": {}}
    for role, shape in (("student", args.student), ("teacher", args.teacher)):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Qwen2ForCausalLM(Qwen2Config(**QWEN[shape], max_position_embeddings=4096,
                                                 attn_implementation="sdpa"))
        model = model.float() if role == "student" else model.to(torch.bfloat16).eval().requires_grad_(False)
        data = batches(lengths, args.max_length, QWEN[shape]["vocab_size"])
        runs = {"packed_sdpa": ("sdpa", data["packed"]), "packed_varlen": ("varlen", data["packed"]),
                "padded_sdpa": ("sdpa", data["padded"])}
        final_hidden = {}
        for name, (implementation, batch) in runs.items():
            model.config._attn_implementation = implementation
            batch = {k: v.cuda() for k, v in batch.items()}
            inputs = model_inputs(batch)

            def student_step(model=model, inputs=inputs):
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    hidden = model.model(**inputs).last_hidden_state
                hidden.float().pow(2).mean().backward()

            def teacher_step(model=model, inputs=inputs):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    model.model(**inputs)

            ms = round(timed(student_step if role == "student" else teacher_step, warmup=args.warmup,
                             iters=args.repeats)["ms"], 3)
            model.zero_grad(set_to_none=True)
            report["results"][f"{role}_{name}"] = {"ms": ms, "shape": list(batch["input_ids"].shape)}
            if name.startswith("packed"):
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    keep = batch["segments"] >= 0
                    final_hidden[name] = model.model(**inputs).last_hidden_state[keep].float()
            print(role, name, report["results"][f"{role}_{name}"], flush=True)
        report["results"][f"{role}_varlen_vs_sdpa_max_abs_hidden"] = round(
            (final_hidden["packed_varlen"] - final_hidden["packed_sdpa"]).abs().max().item(), 5)
        del model
        torch.cuda.empty_cache()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
