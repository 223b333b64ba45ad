"""Time and memory per training step of each distillation loss family, switched on one at a
time over the logit terms (KL + CE), and with every term on under each balancing method.

    python benchmarks/loss_costs.py --pair tiny --steps 5 --out benchmarks/results/loss_costs_cpu.json
    python benchmarks/loss_costs.py --pair qwen2.5-0.5b --device cuda --out $OUT/loss_costs_gpu.json

``tiny`` is the smoke pair (tiny random Qwen2 models with the real Qwen vocabulary);
``qwen2.5-0.5b`` is a randomly initialised Qwen2.5-1.5B-shaped teacher and 0.5B-shaped student
(speed does not depend on the weights). Each configuration runs in the same process on the
same batch; the median step time is reported, and peak memory: on CUDA the peak allocated
bytes of the step, on the CPU the growth of the process's peak RSS (a lower bound, since the
first configuration raises the peak the others are measured against, so configurations are
also run in a fresh process each with ``--isolate``).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_distillation.losses.contrastive import ContrastiveHead  # noqa: E402
from qwen_distillation.losses.feature import FeatureProjector, proportional_layer_map  # noqa: E402
from qwen_distillation.losses.fused import kd_options  # noqa: E402
from qwen_distillation.training.balancing import Balancer  # noqa: E402
from qwen_distillation.training.module import DistillationModule, Heads, per_step_mean  # noqa: E402
from qwen_distillation.training.plan import LossPlan, loss_weights, shared_parameter  # noqa: E402
from qwen_distillation.training.teacher import TeacherRunner  # noqa: E402

PAIRS = {
    "tiny": (dict(vocab_size=152064, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2),
             dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)),
    "qwen2.5-0.5b": (dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
                     dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
}
BASE = {"kd": 0.5, "ce": 0.5}
CONFIGS = {
    "logit (KL+CE)": (BASE, "none"),
    "+ feature": ({**BASE, "feature": 0.1}, "none"),
    "+ attention": ({**BASE, "attention": 0.1}, "none"),
    "+ contrastive": ({**BASE, "contrastive": 0.05}, "none"),
    "all terms": ({**BASE, "feature": 0.1, "attention": 0.1, "contrastive": 0.05}, "none"),
    "all terms, gradnorm": ({**BASE, "feature": 0.1, "attention": 0.1, "contrastive": 0.05}, "gradnorm"),
    "all terms, pcgrad": ({**BASE, "feature": 0.1, "attention": 0.1, "contrastive": 0.05}, "pcgrad"),
}


def build(pair: str, device: torch.device, dtype: torch.dtype):
    teacher_cfg, student_cfg = PAIRS[pair]
    torch.manual_seed(0)
    with torch.device(device):
        teacher = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **teacher_cfg), dtype=dtype)
        student = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **student_cfg),
                                                   dtype=torch.float32)
    teacher.requires_grad_(False).eval()
    return teacher, student


def run_config(name: str, teacher, student, batch, args, device) -> dict:
    weights, method = CONFIGS[name]
    n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
    kd = kd_options(kind="forward_kl", temperature=2.0, ce_weight=weights["ce"], kd_weight=weights["kd"],
                    chunk_size=args.chunk_size, device=device)
    plan = LossPlan(weights=dict(weights), vocab_size=151665, kd=kd, separate_logit_terms=method != "none",
                    feature_pairs=tuple(proportional_layer_map(n_s, n_t, min(4, n_s)) if "feature" in weights else []),
                    attention_pairs=tuple(proportional_layer_map(n_s, n_t, 1) if "attention" in weights else []),
                    relation_heads=2 if args.pair == "tiny" else 8, domain_aware=True)
    heads = Heads(feature=FeatureProjector(plan.feature_pairs, student.config.hidden_size, teacher.config.hidden_size)
                  if plan.feature_pairs else None,
                  contrastive=ContrastiveHead(student.config.hidden_size, teacher.config.hidden_size, 256)
                  if "contrastive" in weights else None).to(device)
    module, teacher_runner = DistillationModule(student, heads), TeacherRunner(teacher)
    module.plan = plan
    params = module.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    term_weights = loss_weights(plan)
    balancer = Balancer(method, list(term_weights), term_weights)
    shared = shared_parameter(student, plan)
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        with autocast:
            terms, _ = module(batch, teacher_runner(batch, plan))
        terms = per_step_mean(terms, n_tokens, 1)
        balancer.backward(terms, params, shared=shared)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"config": name, "balancing": method, "ms_per_step": 1000 * statistics.median(times),
              "tokens": int(batch["attention_mask"].sum())}
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        result["peak_rss_growth_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=sorted(PAIRS), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--chunk_size", type=int, default=1024)
    parser.add_argument("--only", default=None, choices=list(CONFIGS), help="run one configuration (used by --isolate)")
    parser.add_argument("--isolate", action="store_true", help="each configuration in a fresh process")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:  # no timed step left statistics.median([]) to fail after the models built
        parser.error(f"--steps {args.steps} --warmup {args.warmup}: --steps must be at least 1 and --warmup at least 0")
    names = [args.only] if args.only else list(CONFIGS)
    if args.isolate and not args.only:
        results = []
        for name in names:
            cmd = [sys.executable, __file__, *sys.argv[1:], "--only", name]
            cmd = [c for c in cmd if c != "--isolate"]
            if "--out" in cmd:
                i = cmd.index("--out")
                del cmd[i:i + 2]
            results.append(json.loads(subprocess.check_output(cmd).decode().strip().splitlines()[-1])[0])
    else:
        device = torch.device(args.device)
        teacher, student = build(args.pair, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 150000, (args.batch, args.seq), generator=g)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100  # a prompt quarter, masked as in real data
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
                 "domain": torch.arange(args.batch) % 2}
        batch = {k: v.to(device) for k, v in batch.items()}
        results = [run_config(name, teacher, student, batch, args, device) for name in names]
    base = next((r["ms_per_step"] for r in results if r["config"] == "logit (KL+CE)"), None)
    for r in results:
        if base:
            r["ratio_to_logit"] = r["ms_per_step"] / base
    meta = {"pair": args.pair, "device": args.device, "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
