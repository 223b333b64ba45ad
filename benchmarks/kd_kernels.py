"""Fused distillation loss and full KD step: naive torch, Liger-Kernel and this project's
kernels, in the same process on the same GPU.

    # loss alone: lm_head matmuls + CE + forward KL (T=2), forward and backward, 8192 tokens
    python benchmarks/kd_kernels.py loss --out $OUT/kd_loss.json
    # full KD step (teacher forward, student forward + backward, fused AdamW), batch 4 x 2048
    python benchmarks/kd_kernels.py step --pair 1.5b-0.5b --out $OUT/kd_step_1.5b-0.5b.json
    python benchmarks/kd_kernels.py step --pair 7b-1.5b --out $OUT/kd_step_7b-1.5b.json
    # the same step with the FP8 teacher (model.teacher.fp8)
    python benchmarks/kd_kernels.py step --pair 7b-1.5b --fp8-teacher --out $OUT/kd_step_7b-1.5b_fp8.json

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
from qwen_distillation.modeling.fp8 import FP8Head, fused_mlps, fused_norms  # noqa: E402
from qwen_distillation.modeling.speed import liger_final_norm  # noqa: E402
from qwen_distillation.training.teacher import launch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen_shapes import PAIRS, QWEN  # noqa: E402

def run_pair(student_pass, teacher_pass, *, concurrent: bool):
    """``(student_pass(), teacher_pass())`` in the pipeline's order and streams
    (qwen_distillation/training/teacher.py, ``train.teacher_stream``): the teacher launched
    first, on the side stream with ``concurrent``, then the student, then the wait."""
    pending = launch(teacher_pass, concurrent=concurrent)
    return student_pass(), pending.result()



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

    def gemms(chunk, passes=0):
        # passes=0, the floor: the same four matmuls per chunk (two projections, two gradient matmuls), no
        # loss kernel. passes=1/2, the floor of any loss that writes the logits: between the matmuls the bytes
        # a row kernel must move, moved by PyTorch's own elementwise kernels instead of a loss: one pass reads
        # the student's and the teacher's logits and writes the gradient (3 [c, V] tensors); two passes first
        # read both again for the statistics (5 tensors, as the row kernel does). Nothing a loss needs is
        # computed; only the memory traffic is there.
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=device)
        grad_h = torch.empty_like(hs)
        stats = torch.empty(chunk, dtype=dtype, device=device)

        def fn():
            with torch.no_grad():
                for start in range(0, n, chunk):
                    logits = hs[start:start + chunk] @ ws.T
                    t_logits = ht[start:start + chunk] @ wt.T
                    if passes == 2:
                        torch.amax(logits, dim=1, out=stats[:len(logits)])
                        torch.amax(t_logits, dim=1, out=stats[:len(logits)])
                    if passes:
                        torch.add(logits, t_logits, out=logits)
                    del t_logits
                    torch.mm(logits, ws, out=grad_h[start:start + chunk])
                    torch.addmm(grad_w, logits.T, hs[start:start + chunk], out_dtype=torch.float32, out=grad_w)
        return fn

    def overlapped(chunk, carveout, rows=True):
        # A probe of the loss's floor target: its own kernels, the row kernel of chunk i on a side stream beside
        # chunk i+1's two projections and chunk i-1's two gradient matmuls (one more pair of [c, V] buffers alive),
        # with cuBLAS held to all SMs but ``carveout`` (torch._C._set_sm_carveout_experimental) so that the row
        # kernel has SMs of its own while the GEMMs run; rows=False times those GEMMs alone on the fewer SMs.
        # Every buffer is allocated and freed on the current stream after it has waited for the side stream.
        from qwen_distillation.kernels.fused_linear_kd import kd_rows

        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=device)
        grad_h = torch.empty_like(hs)
        ce, kd = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(2))
        side = torch.cuda.Stream(device)
        bounds = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]

        def launch(index):
            start, end = bounds[index]
            logits = hs[start:end] @ ws.T
            t_logits = ht[start:end] @ wt.T
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                if rows:
                    kd_rows(logits, t_logits, labels[start:end], kind="forward_kl", temperature=T, ce_scale=w,
                            kd_scale=w, write_grad=True, out=(ce[start:end], kd[start:end]))
                done = side.record_event()
            return logits, t_logits, done

        def fn():
            before = torch._C._get_sm_carveout_experimental()
            torch._C._set_sm_carveout_experimental(carveout or None)
            try:
                with torch.no_grad():
                    ahead = launch(0)
                    for index, (start, end) in enumerate(bounds):
                        logits, t_logits, done = ahead
                        ahead = launch(index + 1) if index + 1 < len(bounds) else None
                        torch.cuda.current_stream().wait_event(done)
                        del t_logits
                        torch.mm(logits, ws, out=grad_h[start:end])
                        torch.addmm(grad_w, logits.T, hs[start:end], out_dtype=torch.float32, out=grad_w)
                        del logits
            finally:
                torch._C._set_sm_carveout_experimental(before)
        return fn

    def rows_only(chunk, **launch):
        from qwen_distillation.kernels.fused_linear_kd import kd_rows

        s_logits = (hs[:chunk] @ ws.T).detach()
        t_logits = ht[:chunk] @ wt.T

        def fn():
            for _ in range(0, n, chunk):
                kd_rows(s_logits, t_logits, labels[:chunk], kind="forward_kl", temperature=T, ce_scale=w,
                        kd_scale=w, **launch)
        return fn

    def matmul_ceiling():
        # The card's bf16 matmul rate on a large square product: the rate no loss made of these
        # four GEMMs can beat.
        a = torch.randn(8192, 8192, device=device, dtype=dtype)
        b_ = torch.randn(8192, 8192, device=device, dtype=dtype)
        return lambda: a @ b_

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
        run_arm(f"floor: the 4 GEMMs alone ({chunk})", gemms(chunk), results, **kw)
        run_arm(f"the row kernel alone, all tokens ({chunk})", rows_only(chunk), results, **kw)
        if args.bytes_bound:
            for passes in (1, 2):
                run_arm(f"bound: the 4 GEMMs and a {passes}-pass row's bytes at PyTorch's copy speed ({chunk})",
                        gemms(chunk, passes), results, **kw)
    for chunk in args.chunks if args.carveouts else ():
        for carveout in args.carveouts:
            run_arm(f"probe: row kernel overlapped, cuBLAS on all SMs but {carveout} ({chunk})",
                    overlapped(chunk, carveout), results, **kw)
            run_arm(f"probe: the 4 GEMMs alone, cuBLAS on all SMs but {carveout} ({chunk})",
                    overlapped(chunk, carveout, rows=False), results, **kw)
    for block, warps in args.row_configs:
        run_arm(f"the row kernel alone, block {block}, {warps} warps",
                rows_only(args.chunks[0], block=block, num_warps=warps), results, **kw)
    ceiling = run_arm("matmul ceiling: 8192^3 bf16", matmul_ceiling(), results, **kw)
    if "ms" in ceiling:
        ceiling["tflops"] = 2 * 8192**3 / ceiling["ms"] / 1e9
    for name, arm in results.items():
        if "ms" in arm and not name.startswith(("the row kernel", "matmul ceiling")):
            arm["tflops"] = flops / arm["ms"] / 1e9
            arm["mfu"] = arm["tflops"] / args.peak_tflops
    liger_ms = results[f"liger chunked_loss JSD beta=0 ({args.liger_chunks[0]})"].get("ms")
    if liger_ms:
        # The rate the four GEMMs alone would need to finish in 0.6x Liger's time.
        results["target 0.6x liger"] = {"ms": 0.6 * liger_ms, "tflops_needed": flops / (0.6 * liger_ms) / 1e9,
                                        "matmul_ceiling_tflops": ceiling.get("tflops")}
        print("target 0.6x liger", results["target 0.6x liger"], flush=True)
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
    p_t = matmul_params(teacher)  # before an FP8 conversion turns the weights into buffers
    if args.fp8_teacher:
        # model.teacher.fp8: the teacher's decoder linears in FP8 (row-wise scaled E4M3) in every arm;
        # the FLOPs (and so the MFU) are counted as for the bf16 teacher.
        from qwen_distillation.modeling.fp8 import convert_to_fp8

        convert_to_fp8(teacher, fast_accum=args.fp8_fast_accum, fuse_mlp=not args.fp8_layered_mlp,
                       fuse_norm=not args.fp8_written_norms)
        if args.fp8_no_tail:
            from qwen_distillation.kernels import fp8_quant

            launch_config = fp8_quant._launch_config
            fp8_quant._launch_config = lambda k, rows, block, num_warps, tail=None: launch_config(
                k, rows, block, num_warps, 0 if tail is None and block is None else tail)
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

    def hidden_states(levers=None):
        """The decoders' final hidden states. ``levers``: ``use_cache=False`` (no KV cache:
        transformers otherwise copies every layer's keys and values into one and keeps them) and
        ``side_stream`` (the frozen teacher's forward on a second stream, concurrently with the
        student's)."""
        levers = levers or {"use_cache": None, "side_stream": False}
        kw = {} if levers["use_cache"] is None else {"use_cache": levers["use_cache"]}

        def teacher_pass():
            with torch.no_grad():
                return bodies["teacher"](input_ids=input_ids, **kw).last_hidden_state

        # The pipeline's own stream hand-off (qwen_distillation/training/teacher.py, train.teacher_stream).
        hs, ht = run_pair(lambda: bodies["student"](input_ids=input_ids, **kw).last_hidden_state, teacher_pass,
                          concurrent=levers["side_stream"])
        return hs.reshape(-1, student.config.hidden_size), ht.reshape(-1, teacher.config.hidden_size)

    def liger_step(chunk, levers=None):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        module = LigerFusedLinearJSDLoss(weight_hard_loss=w, weight_soft_loss=w, beta=0.0, temperature=T,
                                         chunk_size=chunk)

        def fn():
            hs, ht = hidden_states(levers)
            finish(module(hs, student.lm_head.weight, ht, teacher.lm_head.weight[:SHARED_VOCAB], flat_labels))
        return fn

    def ours_finish(hs, ht, chunk):
        ht = ht.reshape(-1, teacher.config.hidden_size)
        teacher_kw = dict(teacher_hidden=ht, teacher_weight=teacher.lm_head.weight)
        if args.fp8_head:  # model.teacher.fp8_head: the teacher's logits from an FP8 copy of its lm_head
            state["head"] = FP8Head.of(teacher.lm_head.weight, state.get("head"), args.fp8_fast_accum)
            teacher_kw = dict(teacher_hidden=None, teacher_weight=None,
                              teacher_logits=state["head"].rows(ht, SHARED_VOCAB))
        loss, _ = fused_linear_kd(hs.reshape(-1, student.config.hidden_size), student.lm_head.weight,
                                  labels=flat_labels, kind="forward_kl", temperature=T, ce_weight=w, kd_weight=w,
                                  vocab_size=SHARED_VOCAB, chunk_size=chunk, kernel="triton", reduction="mean",
                                  **teacher_kw)
        finish(loss)

    def ours_step(chunk, levers=None):
        def fn():
            ours_finish(*hidden_states(levers), chunk)
        return fn

    def ahead_step(chunk):
        # The teacher one batch ahead: its forward for the next batch runs on a side stream while
        # the student's forward, backward and optimizer step of this batch run (the teacher is
        # frozen, so its outputs do not depend on the step). Same batch each time here.
        def fn():
            main = torch.cuda.current_stream()
            side = state.setdefault("side", torch.cuda.Stream())

            def teacher_ahead():
                side.wait_stream(main)
                with torch.cuda.stream(side), torch.no_grad():
                    state["ahead"] = bodies["teacher"](input_ids=input_ids, use_cache=False).last_hidden_state

            if "ahead" not in state:
                teacher_ahead()
            main.wait_stream(side)
            ht = state.pop("ahead")
            ht.record_stream(main)
            teacher_ahead()
            ours_finish(bodies["student"](input_ids=input_ids, use_cache=False).last_hidden_state, ht, chunk)
        return fn

    def graph_arms(chunk):
        """Probes, not pipeline levers: how much of the step is the host's. A forward with
        a prepared mask (``{"full_attention": None}``: causal, what these unpadded batches get
        anyway) skips transformers' host-synchronising packed-sequence check; the frozen teacher's
        forward captured once in a CUDA graph and replayed on the side stream; and the student's
        forward and backward graphed too (``torch.cuda.make_graphed_callables``)."""
        no_sync = {"attention_mask": {"full_attention": None}, "use_cache": False}
        main = torch.cuda.current_stream()
        side = torch.cuda.Stream()

        def student_pass():
            return bodies["student"](input_ids=input_ids, **no_sync).last_hidden_state

        def teacher_pass():
            with torch.no_grad():
                return bodies["teacher"](input_ids=input_ids, **no_sync).last_hidden_state

        def no_sync_step():
            ours_finish(*run_pair(student_pass, teacher_pass, concurrent=True), chunk)

        arm(f"ours KD + patches + no cache + side stream + sync-free mask ({chunk})", no_sync_step)
        graph = torch.cuda.CUDAGraph()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            for _ in range(2):
                teacher_pass()
        main.wait_stream(side)
        with torch.cuda.graph(graph, stream=side):
            static_ht = teacher_pass()

        def replay():
            graph.replay()
            return static_ht

        def teacher_graph_step(student_fn):
            # The pipeline's run_pair: the replay on its side stream, the student on this one.
            return lambda: ours_finish(*run_pair(student_fn, replay, concurrent=True), chunk)

        arm(f"ours KD + patches + sync-free mask + teacher CUDA graph on a side stream ({chunk})",
            teacher_graph_step(student_pass))

        class StudentBody(torch.nn.Module):
            def __init__(self, body):
                super().__init__()
                self.body = body

            def forward(self, ids):
                return self.body(input_ids=ids, **no_sync).last_hidden_state

        graphed = torch.cuda.make_graphed_callables(StudentBody(bodies["student"]), (input_ids,))
        arm(f"ours KD + patches + sync-free mask + teacher and student CUDA graphs ({chunk})",
            teacher_graph_step(lambda: graphed(input_ids)))

    results = {}
    kw = dict(warmup=args.warmup, iters=args.iters)
    # --repeats: Liger's arm and ours with every lever, several times in the process (the spread).
    runs = [""] if args.repeats == 1 else [f" run {i + 1}" for i in range(args.repeats)]

    def arm(name, fn):
        new_optimizer()
        out = run_arm(name, fn, results, **kw)
        if "ms" in out:
            out["tokens_per_s"] = b * s / out["ms"] * 1e3
        return out

    arm("student fine-tune alone (CE, HF)", ce_only)
    if not args.skip_naive:
        arm("naive KD (full fp32 logits)", naive)
    for run in runs:
        arm(f"liger KD (chunked_loss JSD beta=0, {args.liger_chunk}){run}", liger_step(args.liger_chunk))
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
        if args.levers:
            both = {"use_cache": False, "side_stream": True}
            arm(f"ours KD + torch.compile + use_cache=False + teacher on a side stream ({args.chunks[0]})",
                ours_step(args.chunks[0], both))
            arm(f"liger KD + torch.compile + use_cache=False + teacher on a side stream ({args.liger_chunk})",
                liger_step(args.liger_chunk, both))
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
    if args.compiled_student:
        # The trained student compiled (Inductor fuses its norms, RoPE and SwiGLU, forward and
        # backward), the frozen teacher with Liger's RMSNorm and SwiGLU patched into its modules
        # (instance-level; HF RoPE, since Liger patches RoPE module-wide, into the student too).
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model=teacher, rope=False, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)
        bodies.update(student=torch.compile(student.model))
        t0 = time.perf_counter()
        new_optimizer()
        ours_step(args.chunks[0], {"use_cache": False, "side_stream": False})()
        print(f"compile: {time.perf_counter() - t0:.1f} s", flush=True)
        for side in (False, True):
            levers = {"use_cache": False, "side_stream": side}
            label = "liger-patched teacher + compiled student + use_cache=False" + (
                " + teacher on a side stream" if side else "")
            arm(f"liger KD + {label} ({args.liger_chunk})", liger_step(args.liger_chunk, levers))
            for chunk in args.chunks:
                arm(f"ours KD + {label} ({chunk})", ours_step(chunk, levers))
        bodies.update(student=student.model)
    if args.patch:
        # Liger's fused RMSNorm / SwiGLU / RoPE, patched into both models in place (RoPE is
        # patched module-wide, so every arm after this point uses it).
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        for model in (student, teacher):
            # An FP8 teacher's MLPs keep their fused SwiGLU quantiser and its layer norms their FP8 codes
            # handed to q/k/v and the MLP, as train.liger_kernels leaves them (its final norm gets Liger's).
            handed = fused_norms(model) > 0
            apply_liger_kernel_to_qwen2(rope=True, rms_norm=not handed, swiglu=not fused_mlps(model),
                                        cross_entropy=False, fused_linear_cross_entropy=False, model=model)
            if handed:
                liger_final_norm(model)
        if not args.best_only:
            arm(f"liger KD + liger model patches ({args.liger_chunk})", liger_step(args.liger_chunk))
            for chunk in args.chunks:
                arm(f"ours KD + liger model patches ({chunk})", ours_step(chunk))
        if args.levers:
            for side in (False, True) if not args.best_only else (True,):
                levers = {"use_cache": False, "side_stream": side}
                label = "liger model patches + use_cache=False" + (" + teacher on a side stream" if side else "")
                arm(f"liger KD + {label} ({args.liger_chunk})", liger_step(args.liger_chunk, levers))
                for chunk in args.chunks:
                    for run in runs if side else ("",):
                        arm(f"ours KD + {label} ({chunk}){run}", ours_step(chunk, levers))
            if args.graphs:
                try:
                    graph_arms(args.chunks[0])
                except Exception as err:  # a probe: record why it could not run, keep the rest
                    results["graph probes"] = {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
                    print(results["graph probes"], flush=True)
            if not args.best_only:
                arm(f"ours KD + liger model patches + use_cache=False + teacher one batch ahead ({args.chunks[0]})",
                    ahead_step(args.chunks[0]))
                state.pop("ahead", None)
    if args.profile:
        levers = {"use_cache": False, "side_stream": args.profile_side_stream} if args.levers else None
        results["profile"] = profile_step(ours_step(args.chunks[0], levers), new_optimizer, {
            "teacher forward": lambda: bodies["teacher"](input_ids=input_ids),
        })
        results["profile"]["levers"] = levers
    p_s = matmul_params(student)

    def attn(model):
        c = model.config
        return 2 * b * s * s * c.hidden_size * c.num_hidden_layers  # causal: half of 4 b s^2 h L

    step_flops = 6 * p_s * b * s + 2 * p_t * b * s + 3 * attn(student) + attn(teacher)
    for name, out in results.items():
        if name != "profile" and "ms" in out:
            flops = 6 * p_s * b * s + 3 * attn(student) if name.startswith("student") else step_flops
            out["mfu"] = flops / (out["ms"] / 1e3) / (args.peak_tflops * 1e12)
    fp8 = {"fp8_head": args.fp8_head, "fp8_fast_accum": args.fp8_fast_accum,
           "fp8_fused_mlp": not args.fp8_layered_mlp, "fp8_fused_norm": not args.fp8_written_norms,
           "fp8_row_tail": not args.fp8_no_tail} \
        if args.fp8_teacher else {}
    return {"pair": args.pair, "batch": b, "seq": s, "dtype": "bf16", "temperature": T, "fp8_teacher": args.fp8_teacher,
            **fp8, "student_matmul_params": p_s, "teacher_matmul_params": p_t, "step_flops": step_flops,
            "arms": results}


KERNEL_CLASSES = (  # first match wins; names as cuBLAS / cuDNN / Triton / ATen print them
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn", "dot_do_o", "dq_to_16")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "sm90_", "sm80_")),
    ("triton: kd loss rows", ("_kd_rows",)),
    ("triton: liger", ("liger", "_rms_norm", "_swiglu", "_triton_rope", "rope")),
    ("optimizer", ("adam", "multi_tensor")),
    ("embedding", ("embedding", "index", "scatter", "sort", "radix")),
    ("reduce", ("reduce",)),
    ("elementwise / copy", ("elementwise", "vectorized", "copy", "fill", "cat", "memcpy", "memset")),
)


def kernel_class(name: str) -> str:
    lower = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(key in lower for key in keys):
            return label
    return "other"


def profile_step(step, reset, parts, iters: int = 3) -> dict:
    """Where a step's GPU time goes: kernel time per class (and the top kernels) over ``iters``
    steps, per step, against the step's wall time; plus the wall time of ``parts`` alone."""
    from torch.profiler import ProfilerActivity, profile

    reset()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize()
    wall = start.elapsed_time(end) / iters
    import traceback
    import warnings

    syncs: dict[str, int] = {}

    def record(message, *_args, **_kw):  # where each host synchronisation comes from
        frames = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
                  if "torch/" not in f.filename and "warnings" not in f.filename][-3:]
        key = " <- ".join(reversed(frames))
        syncs[key] = syncs.get(key, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    classes: dict[str, float] = {}
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        ms = event.self_device_time_total / 1e3 / iters
        if ms <= 0 or event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        label = kernel_class(event.key)
        classes[label] = classes.get(label, 0.0) + ms
        kernels[event.key[:160]] = kernels.get(event.key[:160], 0.0) + ms
    busy = sum(classes.values())
    # GPU idle time between kernels (all streams merged), and the largest gaps with the kernels
    # on either side: where the GPU waits for the host.
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > e.time_range.start)
    gaps, reach, last_name = [], None, ""
    for begin, finish, name in spans:
        if reach is not None and begin > reach:
            gaps.append((begin - reach, last_name[:60], name[:60]))
        if reach is None or finish > reach:
            reach, last_name = finish, name
    gap_ms = sum(g for g, _, _ in gaps) / 1e3 / iters
    small = sum(g for g, _, _ in gaps if g < 20) / 1e3 / iters
    top_gaps = [{"us": round(g, 1), "after": a, "before": b} for g, a, b in sorted(gaps, reverse=True)[:25]]
    out = {"step_ms": wall, "host_syncs": syncs, "kernel_ms": busy, "idle_or_overlap_ms": wall - busy,
           "gpu_idle_ms": gap_ms, "gpu_idle_in_gaps_under_20us_ms": small, "largest_gaps": top_gaps,
           "classes_ms": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
           "top_kernels_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:40])}
    for name, fn in parts.items():
        with torch.no_grad():
            out[f"{name} alone ms"] = timed(fn, warmup=2, iters=5)["ms"]
    print(json.dumps({k: v for k, v in out.items() if k not in ("top_kernels_ms", "largest_gaps")}, indent=1),
          flush=True)
    for gap in top_gaps[:12]:
        print(gap, flush=True)
    return out


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
    loss.add_argument("--bytes-bound", action="store_true",
                      help="also time the 4 GEMMs with a one- and a two-pass row's memory traffic between them "
                           "(PyTorch's elementwise kernels): the floor of any loss that writes the logits")
    loss.add_argument("--carveouts", type=int, nargs="*", default=[],
                      help="probe: the row kernel overlapped with the GEMMs on a side stream, cuBLAS kept off this "
                           "many SMs (0: all SMs), and the GEMMs alone on as many")
    step = sub.add_parser("step")
    step.add_argument("--pair", choices=sorted(PAIRS), default="1.5b-0.5b")
    step.add_argument("--batch", type=int, default=4)
    step.add_argument("--seq", type=int, default=2048)
    step.add_argument("--chunks", type=int, nargs="+", default=[1024])
    step.add_argument("--liger-chunk", type=int, default=1024)
    step.add_argument("--skip-naive", action="store_true")
    step.add_argument("--patch", action="store_true", help="also measure with Liger's model patches")
    step.add_argument("--compile", action="store_true", help="also measure torch.compile of both decoders")
    step.add_argument("--levers", action="store_true",
                      help="with --patch / --compile: also use_cache=False, and the teacher on a side stream")
    step.add_argument("--compiled-student", action="store_true",
                      help="also measure a compiled student beside a Liger-patched teacher")
    step.add_argument("--profile", action="store_true",
                      help="profile the last 'ours' arm: GPU time per kernel class, top kernels")
    step.add_argument("--profile-side-stream", action="store_true",
                      help="with --profile --levers: profile with the teacher on the side stream too")
    step.add_argument("--mixed", action="store_true",
                      help="with --compile: compiled teacher, Liger-patched student")
    step.add_argument("--repeats", type=int, default=1,
                      help="time Liger's arm and ours with every lever this many times each")
    step.add_argument("--graphs", action="store_true",
                      help="with --patch --levers: probe a sync-free mask and CUDA graphs of the teacher / student")
    step.add_argument("--best-only", action="store_true",
                      help="with --patch --levers: only the side-stream arms (no patches-alone, no batch ahead)")
    step.add_argument("--fp8-teacher", action="store_true",
                      help="the teacher's decoder linear layers in FP8 in every arm (model.teacher.fp8, an "
                           "approximation)")
    step.add_argument("--fp8-fast-accum", action="store_true",
                      help="with --fp8-teacher: the FP8 GEMMs with use_fast_accum (model.teacher.fp8_fast_accum)")
    step.add_argument("--fp8-head", action="store_true",
                      help="with --fp8-teacher: ours reads the teacher's logits from an FP8 copy of its lm_head "
                           "(model.teacher.fp8_head); Liger's arm keeps the bf16 lm_head (its loss takes a weight)")
    step.add_argument("--fp8-layered-mlp", action="store_true",
                      help="with --fp8-teacher: each MLP as its three converted layers, not the fused SwiGLU "
                           "quantiser (convert_to_fp8(fuse_mlp=False): the FP8 teacher before 2026-12-03's fusion)")
    step.add_argument("--fp8-written-norms", action="store_true",
                      help="with --fp8-teacher: each layer norm writes its output and the FP8 layers quantise it "
                           "(convert_to_fp8(fuse_norm=False): the FP8 teacher before 2026-12-06's norm quantiser)")
    step.add_argument("--fp8-no-tail", action="store_true",
                      help="with --fp8-teacher: the row kernels hold a row in one power-of-two block, not a block and "
                           "a tail block (the FP8 teacher before the tail, 2026-12-06)")
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
