"""Would one FP8 GEMM per group of sibling projections beat one per projection? A probe for the FP8
teacher (``model.teacher.fp8``): the Qwen2.5-7B decoder's q/k/v projections as three row-wise scaled
``torch._scaled_mm`` calls against one over their concatenated weight (per-output-row weight scales
concatenate exactly), and gate/up likewise; o and down for scale. 8192 tokens, random E4M3 codes,
CUDA events, median of 30 after 5 warm-up calls, with and without ``use_fast_accum``.

    python benchmarks/fp8_fused_gemms.py $OUT/fp8_fused_gemms.json     # GPU with FP8 tensor cores

Result on the H200 (2026-12-04, ``benchmarks/results/fp8_teacher_h200/2026-12-04_balanced_head/fp8_fused_gemms.json``):
q/k/v 0.239 -> 0.235 ms (exact accumulation), 0.274 -> 0.272 ms (fast); gate/up 1.693 -> 1.994 ms
(exact: slower), 1.576 -> 1.692 ms (fast: slower). At most about 0.1 ms of a 7B forward: not built.
"""

import argparse
import json

import torch

M, H, I, KV = 8192, 3584, 18944, 512  # tokens; Qwen2.5-7B hidden, intermediate, k/v width
F8 = torch.float8_e4m3fn


def operand(rows: int, cols: int, scale_shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Random E4M3 codes (rows, cols) and positive fp32 scales of ``scale_shape``."""
    return (torch.randn(rows, cols, device="cuda") * 0.5).to(F8), torch.rand(*scale_shape, device="cuda") + 0.5


def median_ms(fn, iters: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end, times = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(out: str) -> dict:
    x, sx = operand(M, H, (M, 1))
    xd, sxd = operand(M, I, (M, 1))
    results = {}
    for fast in (False, True):
        def mm(w, s, a=x, sa=sx):
            return torch._scaled_mm(a, w.t(), scale_a=sa, scale_b=s, out_dtype=torch.bfloat16, use_fast_accum=fast)

        (wq, sq), (wk, sk), (wv, sv) = operand(H, H, (1, H)), operand(KV, H, (1, KV)), operand(KV, H, (1, KV))
        wqkv, sqkv = torch.cat([wq, wk, wv]), torch.cat([sq, sk, sv], 1)
        (wg, sg), (wu, su) = operand(I, H, (1, I)), operand(I, H, (1, I))
        wgu, sgu = torch.cat([wg, wu]), torch.cat([sg, su], 1)
        (wd, sd), (wo, so) = operand(H, I, (1, H)), operand(H, H, (1, H))
        r = {"qkv_separate": median_ms(lambda: (mm(wq, sq), mm(wk, sk), mm(wv, sv))),
             "qkv_fused": median_ms(lambda: mm(wqkv, sqkv)),
             "q": median_ms(lambda: mm(wq, sq)), "k": median_ms(lambda: mm(wk, sk)),
             "gate_up_separate": median_ms(lambda: (mm(wg, sg), mm(wu, su))),
             "gate_up_fused": median_ms(lambda: mm(wgu, sgu)),
             "down": median_ms(lambda: mm(wd, sd, xd, sxd)), "o": median_ms(lambda: mm(wo, so))}
        flops = {"qkv_fused": 2 * M * H * (H + 2 * KV), "gate_up_fused": 2 * M * H * 2 * I,
                 "down": 2 * M * I * H, "o": 2 * M * H * H}
        r["tflops"] = {k: flops[k] / r[k] / 1e9 for k in flops}
        results[f"fast_accum={fast}"] = r
    print(json.dumps(results, indent=1))
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return results


def parse_args(argv=None) -> argparse.Namespace:
    """The output path; ``--help`` prints the docstring. Without CUDA it stops with a usage error, not
    with torch's traceback from the first ``device="cuda"`` tensor (and ``--help`` is no file name)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="JSON file for the timings")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("this benchmark needs a CUDA GPU with FP8 tensor cores (H100/H200); there is none here")
    return args


if __name__ == "__main__":
    main(parse_args().out)
