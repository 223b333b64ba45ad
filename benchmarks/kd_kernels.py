"""Fused distillation loss and full KD step: naive torch, Liger-Kernel and this project's
kernels, in the same process on the same GPU.

    # loss alone: lm_head matmuls + CE + forward KL (T=2), forward and backward, 8192 tokens
    python benchmarks/kd_kernels.py loss --out $OUT/kd_loss.json
    # full KD step (teacher forward, student forward + backward, fused AdamW), batch 4 x 2048
    python benchmarks/kd_kernels.py step --pair 1.5b-0.5b --out $OUT/kd_step_1.5b-0.5b.json
    python benchmarks/kd_kernels.py step --pair 7b-1.5b --out $OUT/kd_step_7b-1.5b.json

Inputs are random (speed does not depend on the weights); models are Qwen2.5-shaped,
randomly initialised, bf16, SDPA attention. Each arm is warmed up, then timed with CUDA
events; the median is reported with the peak allocated memory (``loss``: above the inputs;
``step``: the whole step, weights and optimizer state included). Model-FLOP utilisation is
the arm's useful FLOPs (below) over the time, divided by the card's dense bf16 peak
(``--peak-tflops``, 989 for an H100 SXM).

Loss FLOPs: ``2 N V (3 H_s + H_t)`` (student logits, teacher logits, the two gradient
matmuls). Step FLOPs: ``6 P_s T + 2 P_t T`` plus causal attention ``(3 + 1) * 2 b s^2 h L``
per model (fwd+bwd for the student, fwd for the teacher), where P counts every matmul
weight including the lm_head.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_distillation.losses.fused import fused_linear_kd  # noqa: E402
from qwen_distillation.losses.logit import forward_kl  # noqa: E402

QWEN = {
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "7b": dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
               num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
}
PAIRS = {"1.5b-0.5b": ("1.5b", "0.5b"), "7b-1.5b": ("7b", "1.5b")}
SHARED_VOCAB = 151936


def timed(fn, *, warmup: int, iters: int, reset=None) -> dict:
    """Median ms of ``fn()`` over ``iters`` runs after ``warmup``, and its peak allocated GiB
    (above what was allocated before the first timed run)."""
    for _ in range(warmup):
        if reset:
            reset()
        fn()
    torch.cuda.synchronize()
    if reset:
        reset()
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        if reset:
            reset()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    peak = torch.cuda.max_memory_allocated()
    return {"ms": statistics.median(times), "ms_all": times, "peak_gib": peak / 2**30,
            "extra_gib": (peak - base) / 2**30}


def run_arm(name, fn, results, **kw):
    try:
        out = timed(fn, **kw)
    except torch.OutOfMemoryError as err:
        out = {"error": f"out of memory: {str(err).splitlines()[0]}"}
    gc.collect()
    torch.cuda.empty_cache()
    results[name] = out
    shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items() if k != "ms_all"}
    print(f"{name:40s} {shown}", flush=True)
    return out


# --------------------------------------------------------------------------- loss alone
def bench_loss(args) -> dict:
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    n, v, hs_dim, ht_dim = args.tokens, args.vocab, args.student_hidden, args.teacher_hidden
    dtype = torch.bfloat16
    hs = (torch.randn(n, hs_dim, device=device, generator=g)).to(dtype).requires_grad_()
    ws = (torch.randn(v, hs_dim, device=device, generator=g) * hs_dim**-0.5).to(dtype).requires_grad_()
    ht = torch.randn(n, ht_dim, device=device, generator=g).to(dtype)
    wt = (torch.randn(v, ht_dim, device=device, generator=g) * ht_dim**-0.5).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    T, w = args.temperature, 0.5

    def reset():
        hs.grad = ws.grad = None

    def naive():
        s = (hs @ ws.T).float()
        with torch.no_grad():
            t = (ht @ wt.T).float()
        loss = w * F.cross_entropy(s, labels, reduction="sum") + w * forward_kl(s, t, labels, temperature=T,
                                                                             reduction="sum")
        loss.backward()

    def ours(kernel, chunk):
        def fn():
            loss, _ = fused_linear_kd(hs, ws, ht, wt, labels, kind="forward_kl", temperature=T, ce_weight=w,
                                      kd_weight=w, chunk_size=chunk, kernel=kernel, reduction="sum")
            loss.backward()
        return fn

    def gemms_only(chunk):
        # The floor: the same four matmuls per chunk (two projections, two gradient matmuls),
        # no loss kernel.
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=device)
        grad_h = torch.empty_like(hs)

        def fn():
            with torch.no_grad():
                for start in range(0, n, chunk):
                    logits = hs[start:start + chunk] @ ws.T
                    ht[start:start + chunk] @ wt.T
                    torch.mm(logits, ws, out=grad_h[start:start + chunk])
                    torch.addmm(grad_w, logits.T, hs[start:start + chunk], out_dtype=torch.float32, out=grad_w)
        return fn

    def rows_only(chunk, block=None, num_warps=None):
        from qwen_distillation.losses.triton_kd import kd_rows

        s_logits = (hs[:chunk] @ ws.T).detach()
        t_logits = ht[:chunk] @ wt.T

        def fn():
            for _ in range(0, n, chunk):
                kd_rows(s_logits, t_logits, labels[:chunk], kind="forward_kl", temperature=T, ce_scale=w,
                        kd_scale=w, block=block, num_warps=num_warps)
        return fn

    def liger(chunk):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        # Liger's own loss as a user would call it: mean over tokens, divergence not times T**2.
        module = LigerFusedLinearJSDLoss(weight_hard_loss=w, weight_soft_loss=w, beta=0.0, temperature=T,
                                         chunk_size=chunk)

        def fn():
            module(hs, ws, ht, wt, labels).backward()
        return fn

    flops = 2 * n * v * (3 * hs_dim + ht_dim)
    results = {}
    kw = dict(warmup=args.warmup, iters=args.iters, reset=reset)
    run_arm("naive torch (full fp32 logits)", naive, results, **kw)
    run_arm("torch chunked (this project, 1024)", ours("torch", 1024), results, **kw)
    for chunk in args.liger_chunks:
        run_arm(f"liger chunked_loss JSD beta=0 ({chunk})", liger(chunk), results, **kw)
    for chunk in args.chunks:
        run_arm(f"triton (this project, {chunk})", ours("triton", chunk), results, **kw)
    for chunk in args.chunks:
        run_arm(f"floor: the 4 GEMMs alone ({chunk})", gemms_only(chunk), results, **kw)
        run_arm(f"the row kernel alone, all tokens ({chunk})", rows_only(chunk), results, **kw)
    for block, warps in args.row_configs:
        run_arm(f"the row kernel alone, block {block}, {warps} warps", rows_only(args.chunks[0], block, warps),
                results, **kw)
    for name, arm in results.items():
        if "ms" in arm and not name.startswith("the row kernel"):
            arm["tflops"] = flops / arm["ms"] / 1e9
            arm["mfu"] = arm["tflops"] / args.peak_tflops
    return {"shape": {"tokens": n, "vocab": v, "student_hidden": hs_dim, "teacher_hidden": ht_dim,
                      "dtype": "bf16", "temperature": T, "weights": {"ce": w, "kd": w}},
            "flops": flops, "arms": results}


# --------------------------------------------------------------------------- full step
def build_model(size: str, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**QWEN[size], rope_theta=1e6, max_position_embeddings=32768,
                         attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def matmul_params(model) -> int:
    total = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    if model.config.tie_word_embeddings:
        total += model.lm_head.weight.numel()
    return total


def bench_step(args) -> dict:
    device = torch.device("cuda")
    teacher_size, student_size = PAIRS[args.pair]
    teacher = build_model(teacher_size, device).eval().requires_grad_(False)
    student = build_model(student_size, device).train()
    b, s = args.batch, args.seq
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, SHARED_VOCAB, (b, s), device=device, generator=g)
    labels = torch.randint(0, SHARED_VOCAB, (b, s), device=device, generator=g)
    flat_labels = labels.reshape(-1)
    T, w = args.temperature, 0.5
    state = {}

    def new_optimizer():
        state.pop("opt", None)
        student.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        state["opt"] = torch.optim.AdamW(student.parameters(), lr=1e-5, fused=True)

    def finish(loss):
        loss.backward()
        state["opt"].step()
        state["opt"].zero_grad(set_to_none=True)

    def ce_only():
        out = student(input_ids=input_ids, labels=labels)
        finish(out.loss)

    def naive():
        s_logits = student(input_ids=input_ids).logits[..., :SHARED_VOCAB].reshape(-1, SHARED_VOCAB).float()
        with torch.no_grad():
            t_logits = teacher(input_ids=input_ids).logits[..., :SHARED_VOCAB].reshape(-1, SHARED_VOCAB).float()
        loss = w * F.cross_entropy(s_logits, flat_labels) + w * forward_kl(s_logits, t_logits, flat_labels,
                                                                           temperature=T)
        finish(loss)

    bodies = {"student": student.model, "teacher": teacher.model}

    def hidden_states():
        hs = bodies["student"](input_ids=input_ids).last_hidden_state.reshape(-1, student.config.hidden_size)
        with torch.no_grad():
            ht = bodies["teacher"](input_ids=input_ids).last_hidden_state.reshape(-1, teacher.config.hidden_size)
        return hs, ht

    def liger_step(chunk):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=w, weight_soft_loss=w, beta=0.0, temperature=T,
                                         chunk_size=chunk)

        def fn():
            hs, ht = hidden_states()
            finish(module(hs, student.lm_head.weight, ht, teacher.lm_head.weight[:SHARED_VOCAB], flat_labels))
        return fn

    def ours_step(chunk):
        def fn():
            hs, ht = hidden_states()
            loss, _ = fused_linear_kd(hs, student.lm_head.weight, ht, teacher.lm_head.weight, flat_labels,
                                      kind="forward_kl", temperature=T, ce_weight=w, kd_weight=w,
                                      vocab_size=SHARED_VOCAB, chunk_size=chunk, kernel="triton",
                                      reduction="mean")
            finish(loss)
        return fn

    results = {}
    kw = dict(warmup=args.warmup, iters=args.iters)

    def arm(name, fn):
        new_optimizer()
        out = run_arm(name, fn, results, **kw)
        if "ms" in out:
            out["tokens_per_s"] = b * s / out["ms"] * 1e3
        return out

    arm("student fine-tune alone (CE, HF)", ce_only)
    if not args.skip_naive:
        arm("naive KD (full fp32 logits)", naive)
    arm(f"liger KD (chunked_loss JSD beta=0, {args.liger_chunk})", liger_step(args.liger_chunk))
    for chunk in args.chunks:
        arm(f"ours KD (triton loss, {chunk})", ours_step(chunk))
    if args.compile:
        # torch.compile of both decoders (Inductor fuses the norms, RoPE and SwiGLU itself);
        # wrappers, so the later arms run the plain modules again.
        bodies.update(student=torch.compile(student.model), teacher=torch.compile(teacher.model))
        t0 = time.perf_counter()
        new_optimizer()
        ours_step(args.chunks[0])()
        print(f"compile: {time.perf_counter() - t0:.1f} s", flush=True)
        arm(f"ours KD + torch.compile ({args.chunks[0]})", ours_step(args.chunks[0]))
        arm(f"liger KD + torch.compile ({args.liger_chunk})", liger_step(args.liger_chunk))
        if args.mixed:
            # The frozen teacher compiled (inference: Inductor fuses it well), the trained
            # student with Liger's RMSNorm and SwiGLU patched into its modules (instance-level;
            # RoPE left alone, since Liger patches it module-wide, into the teacher too).
            from liger_kernel.transformers import apply_liger_kernel_to_qwen2

            bodies.update(student=student.model)
            arm(f"ours KD + compiled teacher ({args.chunks[0]})", ours_step(args.chunks[0]))
            apply_liger_kernel_to_qwen2(rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=student)
            arm(f"ours KD + compiled teacher + liger-patched student ({args.chunks[0]})", ours_step(args.chunks[0]))
            arm(f"liger KD + compiled teacher + liger-patched student ({args.liger_chunk})",
                liger_step(args.liger_chunk))
        bodies.update(student=student.model, teacher=teacher.model)
    if args.patch:
        # Liger's fused RMSNorm / SwiGLU / RoPE, patched into both models in place (RoPE is
        # patched module-wide, so every arm after this point uses it).
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        for model in (student, teacher):
            apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False, model=model)
        arm(f"liger KD + liger model patches ({args.liger_chunk})", liger_step(args.liger_chunk))
        for chunk in args.chunks:
            arm(f"ours KD + liger model patches ({chunk})", ours_step(chunk))
    p_s, p_t = matmul_params(student), matmul_params(teacher)

    def attn(model):
        c = model.config
        return 2 * b * s * s * c.hidden_size * c.num_hidden_layers  # causal: half of 4 b s^2 h L

    step_flops = 6 * p_s * b * s + 2 * p_t * b * s + 3 * attn(student) + attn(teacher)
    for name, out in results.items():
        if "ms" in out:
            flops = 6 * p_s * b * s + 3 * attn(student) if name.startswith("student") else step_flops
            out["mfu"] = flops / (out["ms"] / 1e3) / (args.peak_tflops * 1e12)
    return {"pair": args.pair, "batch": b, "seq": s, "dtype": "bf16", "temperature": T,
            "student_matmul_params": p_s, "teacher_matmul_params": p_t, "step_flops": step_flops, "arms": results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    loss = sub.add_parser("loss")
    loss.add_argument("--tokens", type=int, default=8192)
    loss.add_argument("--vocab", type=int, default=151936)
    loss.add_argument("--student-hidden", type=int, default=1536)
    loss.add_argument("--teacher-hidden", type=int, default=3584)
    loss.add_argument("--chunks", type=int, nargs="+", default=[1024, 2048])
    loss.add_argument("--liger-chunks", type=int, nargs="+", default=[1024])
    loss.add_argument("--row-configs", type=lambda x: tuple(map(int, x.split("x"))), nargs="*", default=[],
                      help="row-kernel launch configs to time, BLOCKxWARPS, e.g. 8192x16")
    step = sub.add_parser("step")
    step.add_argument("--pair", choices=sorted(PAIRS), default="1.5b-0.5b")
    step.add_argument("--batch", type=int, default=4)
    step.add_argument("--seq", type=int, default=2048)
    step.add_argument("--chunks", type=int, nargs="+", default=[1024])
    step.add_argument("--liger-chunk", type=int, default=1024)
    step.add_argument("--skip-naive", action="store_true")
    step.add_argument("--patch", action="store_true", help="also measure with Liger's model patches")
    step.add_argument("--compile", action="store_true", help="also measure torch.compile of both decoders")
    step.add_argument("--mixed", action="store_true",
                      help="with --compile: compiled teacher, Liger-patched student")
    for p in (loss, step):
        p.add_argument("--temperature", type=float, default=2.0)
        p.add_argument("--warmup", type=int, default=3)
        p.add_argument("--iters", type=int, default=10)
        p.add_argument("--peak-tflops", type=float, default=989.0)
        p.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = True
    result = bench_loss(args) if args.what == "loss" else bench_step(args)
    result.update(device=torch.cuda.get_device_name(), torch=torch.__version__,
                  command="python " + " ".join([sys.argv[0], *sys.argv[1:]]))
    from importlib.metadata import PackageNotFoundError, version

    for package in ("triton", "liger-kernel", "transformers"):
        try:
            result[package] = version(package)
        except PackageNotFoundError:
            result[package] = None
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
