"""Per-row FP8 (E4M3) quantisation: the pure-torch reference and its Triton kernel.

Used by the FP8 teacher (``model.teacher.fp8``) for every decoder linear layer's input, once per
forward. :func:`quantize_rowwise` is the definition; :func:`triton_quantize_rowwise` computes the
same codes and scales bit for bit (the same fp32 multiplications; the one division per row IEEE
round-to-nearest, ``tl.math.div_rn``, like torch's ``reciprocal``; the E4M3 cast rounds to nearest
even like torch's; the GPU tests compare them), reading each row once (up to :data:`ONE_BLOCK_MAX`
columns, kept in registers: one power-of-two block, or a block and a tail block) or twice (wider
rows, the second read from L2). Why a kernel: on the H200 (2026-12-03,
``benchmarks/fp8_teacher.py --gemms --profile``) Inductor's compile of the reference took 0.17 ms
for an 8192 x 3584 bf16 input, about ten times what its bytes need, and 30 ms of a 142 ms FP8
7B teacher forward.

:func:`silu_mul_quantize` is the SwiGLU activation of the FP8 teacher's MLPs, ``silu(gate) * up``
rounded as torch and Liger round it, quantised the same way for the down projection; its kernel,
:func:`triton_silu_mul_quantize`, computes it from the two GEMM outputs in one kernel, so the
activation itself is never written to memory.

:func:`rms_norm_quantize` is a decoder layer's RMSNorm (transformers' and Liger's "llama"
arithmetic: fp32 statistics, the normalised row rounded to the input's dtype, times the weight,
rounded) quantised the same way for the FP8 layers that read it (q/k/v, gate/up); its kernel,
:func:`triton_rms_norm_quantize`, forms the normalised row in registers, so it is never stored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen_distillation.kernels import interpreting

try:  # Triton is optional: CPUs use the torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# The scale is amax times this fp32 constant: a multiplication, which torch (CPU and CUDA) and
# Triton round the same way (torch on CUDA divides by a Python scalar as a multiplication by its
# reciprocal, so an "amax / 448" would differ between devices in the last bit).
INV_FP8_MAX = 1.0 / FP8_MAX
# An all-zero row gets this amax instead of 0 (its codes are then all 0, its scale tiny and finite).
MIN_AMAX = 1e-12
# The row kernels hold a row up to this many columns (a power of two) in registers and read it once;
# wider rows go in blocks of 4,096, read two or three times (see launch_quantize_rows).
ONE_BLOCK_MAX = 32768
# A row wider than this is held as a power-of-two block and a smaller power-of-two tail block, where
# that leaves fewer lanes idle than one block (``benchmarks/fp8_teacher.py --quantisers``, H100: it
# paid from 8,960 columns up, not at 4,864 or 1,536).
TAIL_FROM = 8192


def triton_available() -> bool:
    return triton is not None


def _runs_here(x: torch.Tensor) -> bool:
    """Whether the kernels can take ``x``: a CUDA tensor, or any tensor in Triton's interpreter
    (``TRITON_INTERPRET=1`` before Triton is imported: the CPU tests run the kernels' code so; the
    interpreter rounds fp32 to bf16 towards zero, so only fp32 inputs compare there)."""
    return triton is not None and (x.is_cuda or interpreting())


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row FP8 (E4M3) quantisation, plain torch: the reference.

    Args:
        x (torch.Tensor): shape (M, K), any floating dtype.

    Returns:
        (codes, scale): codes of shape (M, K) in ``float8_e4m3fn`` and scale of shape (M, 1) fp32,
        with ``x ~= codes.float() * scale``, ``scale = amax(|x[m]|) * fp32(1 / 448)`` and the codes
        ``x * (1 / scale)`` (one IEEE division per row, then multiplications): each row's largest
        magnitude maps to the largest finite E4M3 value. The clamp keeps a product that rounds just
        past 448 from becoming NaN (E4M3 has no infinity).
    """
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=MIN_AMAX) * INV_FP8_MAX
    codes = (x.float() * torch.reciprocal(scale)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return codes, scale


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation ``silu(gate) * up`` in the inputs' dtype, rounded as transformers'
    ``act_fn(gate) * up`` and Liger's SiLU-mul kernel round it (silu in fp32, rounded to the dtype,
    times ``up``, rounded)."""
    return F.silu(gate) * up


def silu_mul_quantize(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rowwise` of :func:`silu_mul`, plain torch: the reference.

    Args:
        gate, up (torch.Tensor): shape (M, K) each, the same floating dtype (the MLP's gate and up
            projections of M tokens).

    Returns:
        (codes, scale): (M, K) ``float8_e4m3fn`` and (M, 1) fp32, the input of the down projection.
    """
    return quantize_rowwise(silu_mul(gate, up))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers' Qwen2/Llama/Mistral ``RMSNorm`` computes it (and Liger's kernel in its
    "llama" casting mode): ``weight * (x * rsqrt(mean(x**2) + eps))``, the statistics and the
    product with ``rsqrt`` in fp32, that product rounded to x's dtype, then multiplied by the weight.

    Args:
        x (torch.Tensor): shape (..., K).
        weight (torch.Tensor): shape (K,).
        eps (float): the norm's epsilon.

    Returns:
        torch.Tensor: shape (..., K), in the dtype of ``weight * x`` (x's for a weight of x's dtype).
    """
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rowwise` of :func:`rms_norm`, plain torch: the reference.

    Args:
        x (torch.Tensor): shape (M, K), a decoder layer's residual stream of M tokens.
        weight (torch.Tensor): shape (K,), the norm's weight, x's dtype.
        eps (float): the norm's epsilon.

    Returns:
        (codes, scale): (M, K) ``float8_e4m3fn`` and (M, 1) fp32, the input of the FP8 layers that
        read the norm's output.
    """
    return quantize_rowwise(rms_norm(x, weight, eps))


if triton is not None:

    @triton.jit
    def _swiglu(g, u):
        """``silu(g) * u`` of two loaded blocks in their dtype's rounding (see :func:`silu_mul`),
        returned in fp32: silu in fp32 as torch writes it, ``x / (1 + exp(-x))``."""
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype, fp_downcast_rounding="rtne")
        return (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _row_values(x_rows, u_rows, cols, ok, SWIGLU: tl.constexpr):
        """A block of the rows to quantise, in fp32: ``x``, or ``silu(x) * u`` when ``SWIGLU``."""
        x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0)
        if SWIGLU:
            return _swiglu(x, tl.load(u_rows + cols[None, :], mask=ok, other=0.0))
        return x.to(tl.float32)

    @triton.jit
    def _row_inverse_scale(amax, scale_ptr, rows, row_ok, INV_FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr):
        """Store each row's scale ``max(amax, MIN_AMAX) * (1 / 448)``; return its inverse (one IEEE
        division per row, as torch's ``reciprocal``)."""
        scale = tl.maximum(amax, MIN_AMAX) * INV_FP8_MAX
        tl.store(scale_ptr + rows, scale, mask=row_ok)
        return tl.math.div_rn(tl.zeros_like(scale) + 1.0, scale)

    @triton.jit
    def _store_codes(c_rows, cols, ok, values, inv, FP8_MAX: tl.constexpr):
        """The E4M3 codes ``clamp(values * inv, +-448)`` of a block of rows, stored."""
        q = tl.minimum(tl.maximum(values * inv[:, None], -FP8_MAX), FP8_MAX)
        tl.store(c_rows + cols[None, :], q.to(tl.float8e4nv), mask=ok)

    @triton.jit
    def _quantize_rows(x_ptr, u_ptr, codes_ptr, scale_ptr, M, K, stride_x, stride_u, stride_c,
                       FP8_MAX: tl.constexpr, INV_FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                       BLOCK: tl.constexpr, TAIL: tl.constexpr, ROWS: tl.constexpr, ONE_BLOCK: tl.constexpr,
                       SWIGLU: tl.constexpr):
        """``ROWS`` rows per program of ``x`` (or, with ``SWIGLU``, of ``silu(x) * u``, formed from
        the gate rows ``x`` and up rows ``u`` as they are read): each row's absolute maximum, then
        the codes ``clamp(value * (1 / scale), +-448)`` cast to E4M3 (one division per row), fp32
        arithmetic throughout. ``ONE_BLOCK`` (K <= BLOCK + TAIL): the rows are read once and kept in
        registers, in a block of ``BLOCK`` columns and, if ``TAIL`` > 0, one of ``TAIL`` beside it (two
        powers of two closer to K than one); otherwise in blocks of ``BLOCK``, twice (the second read
        from L2; the activation recomputed)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        x_rows = x_ptr + rows[:, None] * stride_x
        u_rows = u_ptr + rows[:, None] * stride_u
        c_rows = codes_ptr + rows[:, None] * stride_c
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            ok = row_ok[:, None] & (cols[None, :] < K)
            x = _row_values(x_rows, u_rows, cols, ok, SWIGLU)
            amax = tl.max(tl.abs(x), axis=1)
            if TAIL > 0:  # the columns past BLOCK, in a second block held beside the first
                tail_cols = BLOCK + tl.arange(0, TAIL)
                tail_ok = row_ok[:, None] & (tail_cols[None, :] < K)
                tail = _row_values(x_rows, u_rows, tail_cols, tail_ok, SWIGLU)
                amax = tl.maximum(amax, tl.max(tl.abs(tail), axis=1))
            inv = _row_inverse_scale(amax, scale_ptr, rows, row_ok, INV_FP8_MAX, MIN_AMAX)
            _store_codes(c_rows, cols, ok, x, inv, FP8_MAX)
            if TAIL > 0:
                _store_codes(c_rows, tail_cols, tail_ok, tail, inv, FP8_MAX)
        else:
            amax = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
            for start in range(0, K, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = row_ok[:, None] & (cols[None, :] < K)
                amax = tl.maximum(amax, tl.abs(_row_values(x_rows, u_rows, cols, ok, SWIGLU)))
            inv = _row_inverse_scale(tl.max(amax, axis=1), scale_ptr, rows, row_ok, INV_FP8_MAX, MIN_AMAX)
            for start in range(0, K, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = row_ok[:, None] & (cols[None, :] < K)
                _store_codes(c_rows, cols, ok, _row_values(x_rows, u_rows, cols, ok, SWIGLU), inv, FP8_MAX)


def triton_quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rowwise` as one Triton kernel (CUDA tensors; bit-equal codes and scales).

    Args:
        x (torch.Tensor): shape (M, K) on a CUDA device, bf16 / fp16 / fp32, last dim contiguous.

    Returns:
        (codes, scale): (M, K) ``float8_e4m3fn`` and (M, 1) fp32, as :func:`quantize_rowwise`.
    """
    if not _runs_here(x):
        raise RuntimeError("triton_quantize_rowwise needs Triton and a CUDA tensor; use quantize_rowwise")
    if x.dim() != 2:
        raise ValueError(f"triton_quantize_rowwise takes a 2-D (rows, features) tensor, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    codes = torch.empty((m, k), device=x.device, dtype=FP8_DTYPE)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    launch_quantize_rows(x, codes, scale)
    return codes, scale


def _launch_config(k: int, rows: int | None, block: int | None, num_warps: int | None,
                   tail: int | None = None) -> dict:
    """Grid-independent launch parameters of the row kernels (see :func:`launch_quantize_rows`).

    A row up to :data:`ONE_BLOCK_MAX` wide is held in registers, in one power-of-two block or, for a
    row wider than :data:`TAIL_FROM`, in the largest power-of-two block within it and a tail block of
    the next power of two at or above the columns past it (18,944 columns: 16,384 + 4,096, instead of
    one block of 32,768 with 42 % of its lanes idle), unless the two are the same size. ``block``
    (and ``tail``, default 0 then) override it for benchmarks; ``tail=0`` alone keeps one block."""
    width = triton.next_power_of_2(max(k, 16))
    if block is None:
        one_block = width <= ONE_BLOCK_MAX
        block = width if one_block else 4096
        if one_block and tail is None and k != width and width // 2 >= TAIL_FROM:
            tail = triton.next_power_of_2(k - width // 2)
            block, tail = (width // 2, tail) if tail < width // 2 else (width, 0)
    tail = tail or 0
    one_block = k <= block + tail
    if rows is None:
        rows = max(1, min(8, 4096 // width)) if one_block else 2
    if num_warps is None:
        lanes = block + tail
        num_warps = (16 if tail and lanes > 16384 else 32 if lanes > 16384 else 8) if one_block else 16
    return dict(BLOCK=block, TAIL=tail if one_block else 0, ROWS=rows, ONE_BLOCK=one_block,
                num_warps=num_warps if rows * (block + tail) >= 2048 else min(num_warps, 4))


def launch_quantize_rows(x, codes, scale, *, rows: int | None = None, block: int | None = None,
                         num_warps: int | None = None, tail: int | None = None) -> None:
    """Launch :func:`_quantize_rows`. The defaults are :func:`triton_quantize_rowwise`'s and
    :func:`triton_silu_mul_quantize`'s. ``benchmarks/fp8_teacher.py --gemms`` on the H200 (2026-12-03,
    kernel time, 8192 rows of bf16): 3,584 columns in one block, one row per program, 8 warps, 22.6 us
    (the bytes need 18.4 us; the per-element division took 44.7). ``--quantisers`` on an H100
    (2026-12-06): a row up to :data:`ONE_BLOCK_MAX` wide is one block, read once (8 warps up to 16,384
    columns, 32 above); the SwiGLU quantiser at 8,960 / 18,944 / 29,568 columns took 134 / 330 / 411 us
    so, against 204 / 381 / 721 us two-pass in blocks of 4,096 (two rows a program, 16 warps). Later
    that day a row wider than :data:`TAIL_FROM` took a block and a tail block: 126 / 298 us at 8,960 /
    18,944 columns, against 134 / 332 us in one block of 16,384 / 32,768 (``--quantisers``, H100)."""
    m, k = x.shape
    config = _launch_config(k, rows, block, num_warps, tail)
    _quantize_rows[(triton.cdiv(m, config["ROWS"]),)](
        x, x, codes, scale, m, k, x.stride(0), x.stride(0), codes.stride(0), FP8_MAX=FP8_MAX,
        INV_FP8_MAX=INV_FP8_MAX, MIN_AMAX=MIN_AMAX, SWIGLU=False, **config)


def triton_silu_mul_quantize(gate: torch.Tensor, up: torch.Tensor, *, rows: int | None = None,
                             block: int | None = None, num_warps: int | None = None,
                             tail: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`silu_mul_quantize` as one Triton kernel (CUDA tensors): the activation is formed in
    registers and never stored. Codes and scales equal the reference's wherever the kernel's fp32
    ``exp`` and torch's round ``silu`` to the same bf16 value (the GPU tests count the rest).

    Args:
        gate, up (torch.Tensor): shape (M, K) each on a CUDA device, one dtype, last dim contiguous
            (rows may be strided, e.g. halves of one ``(M, 2K)`` GEMM output).
        rows, block, num_warps, tail: launch overrides for benchmarks (defaults as :func:`launch_quantize_rows`).

    Returns:
        (codes, scale): (M, K) ``float8_e4m3fn`` and (M, 1) fp32.
    """
    if not _runs_here(gate):
        raise RuntimeError("triton_silu_mul_quantize needs Triton and CUDA tensors; use silu_mul_quantize")
    if gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"triton_silu_mul_quantize takes two 2-D tensors of one shape and dtype, got "
                         f"{tuple(gate.shape)} {gate.dtype} and {tuple(up.shape)} {up.dtype}")
    gate = gate if gate.stride(-1) == 1 else gate.contiguous()
    up = up if up.stride(-1) == 1 else up.contiguous()
    m, k = gate.shape
    codes = torch.empty((m, k), device=gate.device, dtype=FP8_DTYPE)
    scale = torch.empty((m, 1), device=gate.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    config = _launch_config(k, rows, block, num_warps, tail)
    _quantize_rows[(triton.cdiv(m, config["ROWS"]),)](
        gate, up, codes, scale, m, k, gate.stride(0), up.stride(0), codes.stride(0), FP8_MAX=FP8_MAX,
        INV_FP8_MAX=INV_FP8_MAX, MIN_AMAX=MIN_AMAX, SWIGLU=True, **config)
    return codes, scale


if triton is not None:

    @triton.jit
    def _normed(x, x_dtype: tl.constexpr, rstd, w):
        """``(x * rstd)`` rounded to ``x_dtype``, times the weight ``w``, rounded (see :func:`rms_norm`),
        returned in fp32; ``x`` is the fp32 block, ``rstd`` its rows' ``rsqrt(mean(x**2) + eps)``."""
        y = (x * rstd[:, None]).to(x_dtype, fp_downcast_rounding="rtne").to(tl.float32)
        return (y * w.to(tl.float32)[None, :]).to(x_dtype, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _norm_quantize_rows(x_ptr, w_ptr, codes_ptr, scale_ptr, M, K, stride_x, stride_c, eps,
                            FP8_MAX: tl.constexpr, INV_FP8_MAX: tl.constexpr, MIN_AMAX: tl.constexpr,
                            BLOCK: tl.constexpr, TAIL: tl.constexpr, ROWS: tl.constexpr, ONE_BLOCK: tl.constexpr):
        """``ROWS`` rows per program of ``rms_norm(x, w, eps)`` quantised per row as
        :func:`_quantize_rows` quantises, the normalised rows formed as they are read. ``ONE_BLOCK``
        (K <= BLOCK + TAIL): each row read once and kept in registers (in one or two blocks, as there);
        otherwise in blocks, three times (the sum of squares, the absolute maximum, the codes; the later
        reads from L2)."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        row_ok = rows < M
        x_rows = x_ptr + rows[:, None] * stride_x
        c_rows = codes_ptr + rows[:, None] * stride_c
        x_dtype = x_ptr.dtype.element_ty
        if ONE_BLOCK:
            cols = tl.arange(0, BLOCK)
            ok = row_ok[:, None] & (cols[None, :] < K)
            x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            squares = tl.sum(x * x, axis=1)
            if TAIL > 0:  # the columns past BLOCK, in a second block held beside the first
                tail_cols = BLOCK + tl.arange(0, TAIL)
                tail_ok = row_ok[:, None] & (tail_cols[None, :] < K)
                tail = tl.load(x_rows + tail_cols[None, :], mask=tail_ok, other=0.0).to(tl.float32)
                squares += tl.sum(tail * tail, axis=1)
            rstd = tl.math.rsqrt(squares / K + eps)
            y = _normed(x, x_dtype, rstd, tl.load(w_ptr + cols, mask=cols < K, other=0.0))
            amax = tl.max(tl.abs(y), axis=1)
            if TAIL > 0:
                tail = _normed(tail, x_dtype, rstd, tl.load(w_ptr + tail_cols, mask=tail_cols < K, other=0.0))
                amax = tl.maximum(amax, tl.max(tl.abs(tail), axis=1))
            inv = _row_inverse_scale(amax, scale_ptr, rows, row_ok, INV_FP8_MAX, MIN_AMAX)
            _store_codes(c_rows, cols, ok, y, inv, FP8_MAX)
            if TAIL > 0:
                _store_codes(c_rows, tail_cols, tail_ok, tail, inv, FP8_MAX)
        else:
            squares = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
            for start in range(0, K, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
                squares += x.to(tl.float32) * x.to(tl.float32)
            rstd = tl.math.rsqrt(tl.sum(squares, axis=1) / K + eps)
            amax = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
            for start in range(0, K, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols[None, :] < K), other=0.0)
                w = tl.load(w_ptr + cols, mask=cols < K, other=0.0)
                amax = tl.maximum(amax, tl.abs(_normed(x.to(tl.float32), x_dtype, rstd, w)))
            inv = _row_inverse_scale(tl.max(amax, axis=1), scale_ptr, rows, row_ok, INV_FP8_MAX, MIN_AMAX)
            for start in range(0, K, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                ok = row_ok[:, None] & (cols[None, :] < K)
                x = tl.load(x_rows + cols[None, :], mask=ok, other=0.0)
                w = tl.load(w_ptr + cols, mask=cols < K, other=0.0)
                _store_codes(c_rows, cols, ok, _normed(x.to(tl.float32), x_dtype, rstd, w), inv, FP8_MAX)


def triton_rms_norm_quantize(x: torch.Tensor, weight: torch.Tensor, eps: float, *, rows: int | None = None,
                             block: int | None = None, num_warps: int | None = None,
                             tail: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_quantize` as one Triton kernel (CUDA tensors): the normalised rows are formed
    in registers and never stored. Codes and scales equal the reference's wherever the kernel's sum
    of squares (another order of additions) and torch's give the same ``rsqrt`` in the last bit (the
    GPU tests count the rest).

    Args:
        x (torch.Tensor): shape (M, K) on a CUDA device, bf16 / fp16 / fp32, last dim contiguous.
        weight (torch.Tensor): shape (K,), x's dtype.
        eps (float): the norm's epsilon.
        rows, block, num_warps, tail: launch overrides for benchmarks (defaults as :func:`launch_quantize_rows`).

    Returns:
        (codes, scale): (M, K) ``float8_e4m3fn`` and (M, 1) fp32.
    """
    if not _runs_here(x):
        raise RuntimeError("triton_rms_norm_quantize needs Triton and a CUDA tensor; use rms_norm_quantize")
    if x.dim() != 2 or weight.shape != (x.shape[1],) or weight.dtype != x.dtype:
        raise ValueError(f"triton_rms_norm_quantize takes x (M, K) and a weight (K,) of x's dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(weight.shape)} {weight.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    m, k = x.shape
    codes = torch.empty((m, k), device=x.device, dtype=FP8_DTYPE)
    scale = torch.empty((m, 1), device=x.device, dtype=torch.float32)
    if m == 0:
        return codes, scale
    config = _launch_config(k, rows, block, num_warps, tail)
    _norm_quantize_rows[(triton.cdiv(m, config["ROWS"]),)](
        x, weight, codes, scale, m, k, x.stride(0), codes.stride(0), float(eps), FP8_MAX=FP8_MAX,
        INV_FP8_MAX=INV_FP8_MAX, MIN_AMAX=MIN_AMAX, **config)
    return codes, scale
