"""An FP8 frozen teacher (``model.teacher.fp8``): an approximation, opt-in.

The teacher's decoder ``nn.Linear`` layers (attention q/k/v/o, MLP gate/up/down) become
:class:`FP8Linear`: the weight is quantised once, per output row, to ``float8_e4m3fn`` with an
fp32 scale ``amax(row) * fp32(1 / 448)``; each forward quantises its input the same way per token
(row) and multiplies with ``torch._scaled_mm`` (FP8 tensor cores on Ada/Hopper GPUs), rescaling the
fp32 accumulator by ``scale_x[m] * scale_w[n]``. On a GPU the input is quantised by a Triton kernel
(:mod:`qwen_distillation.kernels.fp8_quant`, bit-equal to the reference), once for the siblings
that read the same input (q/k/v, gate/up: :class:`SharedInput`), and a bias is added in the GEMM.
The embeddings, the final norm and the ``lm_head`` stay in the teacher's dtype: the fused KD kernel
reads the ``lm_head`` weight directly, and the teacher's logits come from it. The teacher's
next-token distribution is therefore not the bf16 teacher's:
KL(p_bf16 || p_fp8) and top-1 agreement are measured by ``benchmarks/fp8_teacher.py``.

:func:`fp8_linear_reference` is the same arithmetic in plain fp32 torch (quantise, dequantise,
matmul): the module equals it up to the accumulation order and the output rounding.

``torch._scaled_mm`` wants both inner and output sizes multiples of 16 on the GPU; a layer whose
``in_features`` or ``out_features`` is not stays in the teacher's dtype (the same rule on every
device, so a CPU run converts the layers a GPU run does), and :func:`convert_to_fp8` logs it.
Inference only: the teacher is frozen and runs under ``torch.no_grad``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from qwen_distillation.errors import ConfigError
from qwen_distillation.kernels.fp8_quant import (FP8_DTYPE, FP8_MAX, MIN_AMAX, quantize_rowwise,  # noqa: F401
                                                 triton_available, triton_quantize_rowwise)
from qwen_distillation.modeling.parts import base_model

log = logging.getLogger(__name__)

ALIGNMENT = 16  # torch._scaled_mm on CUDA: K and N multiples of 16
KEY = "model.teacher.fp8"
QUANTIZERS = ("triton", "compiled", "eager")
# Sibling layers that read the same input in the decoder layers of HF models (Qwen2, Llama, Mistral):
# their input is quantised once per forward, by the first of them to run.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

_compiled_quantize = None


def _quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rowwise` of a layer input. On a CUDA device, by ``FP8Linear.quantizer``:
    ``"triton"`` (default; one kernel, bit-equal, :mod:`qwen_distillation.kernels.fp8_quant`),
    ``"compiled"`` (Inductor's compile of the reference) or ``"eager"`` (the reference, which reads
    the activations several times); the CPU always runs the reference."""
    global _compiled_quantize
    if not x.is_cuda or FP8Linear.quantizer == "eager":
        return quantize_rowwise(x)
    if FP8Linear.quantizer == "triton" and triton_available():
        return triton_quantize_rowwise(x)
    if _compiled_quantize is None:
        _compiled_quantize = torch.compile(quantize_rowwise, dynamic=True)
    try:
        return _compiled_quantize(x)
    except Exception as err:  # no working Inductor/Triton here: the same arithmetic, eagerly
        log.warning("%s: compiling the activation quantiser failed (%s: %s); it runs eagerly (slower)", KEY,
                    type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        FP8Linear.quantizer = "eager"
        return quantize_rowwise(x)


class SharedInput:
    """The quantised input of a group of sibling :class:`FP8Linear` layers that read the same tensor
    (q/k/v, gate/up): the first member to run quantises it, the others reuse the codes while the
    input is the same tensor object, unmodified; once every member has read it the entry is
    dropped (nothing is kept between forwards). A member called with another input quantises its
    own, so any call order stays correct."""

    def __init__(self, size: int):
        self.size = size
        self._source: torch.Tensor | None = None
        self._version = -1
        self._codes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reads = 0

    def quantize(self, x: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            version = x._version
        except RuntimeError:  # an inference-mode tensor has no version counter: no sharing
            return _quantize_activations(rows)
        if self._source is not x or self._version != version or self._codes is None:
            self._source, self._version, self._codes, self._reads = x, version, _quantize_activations(rows), 0
        codes = self._codes
        self._reads += 1
        if self._reads >= self.size:
            self._source, self._codes = None, None
        return codes


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :class:`FP8Linear` computes, in plain fp32 torch: both operands quantised per row
    (:func:`quantize_rowwise`), dequantised, multiplied in fp32, plus the bias.

    Args:
        x (torch.Tensor): shape (..., K).
        weight (torch.Tensor): shape (N, K), the layer's full-precision weight.
        bias (torch.Tensor | None): shape (N,).

    Returns:
        torch.Tensor: shape (..., N), fp32.
    """
    rows = x.reshape(-1, x.shape[-1])
    x_codes, x_scale = quantize_rowwise(rows)
    w_codes, w_scale = quantize_rowwise(weight)
    out = (x_codes.float() * x_scale) @ (w_codes.float() * w_scale).T
    if bias is not None:
        out = out + bias.float()
    return out.reshape(*x.shape[:-1], weight.shape[0])


def fp8_eligible(linear: nn.Linear) -> bool:
    """Whether ``torch._scaled_mm`` takes the layer's shapes (in and out features multiples of 16)."""
    return linear.in_features % ALIGNMENT == 0 and linear.out_features % ALIGNMENT == 0


class FP8Linear(nn.Module):
    """A frozen ``nn.Linear`` with an FP8 (E4M3) weight quantised per output row.

    Buffers (in the state dict): ``weight`` (out_features, in_features) ``float8_e4m3fn``,
    ``weight_scale`` (out_features, 1) fp32; ``bias`` (out_features,) in the original dtype, if any.
    The FP8 weight replaces the original one: a bf16 layer's weight memory halves.

    ``forward(x)``: x of shape (..., in_features) -> (..., out_features) in x's dtype. On CUDA,
    ``torch._scaled_mm`` with row-wise scales writes bf16 (the bias added in the GEMM's epilogue
    where cuBLAS takes it), cast to x's dtype after. ``shared``: the :class:`SharedInput` of the
    layer's sibling group, set by :func:`convert_to_fp8`, or ``None``. ``fast_accum``: the GEMM with
    ``use_fast_accum`` on CUDA, a benchmark probe only (``benchmarks/kd_kernels.py step
    --fp8-fast-accum``): what it changes in the teacher's distribution is not measured, so no
    config key turns it on.
    """

    quantizer = "triton"  # see _quantize_activations; one of QUANTIZERS
    bias_in_gemm = True  # cleared the first time torch._scaled_mm refuses a bias (then added after)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fast_accum: bool = False):
        super().__init__()
        self.fast_accum = fast_accum
        self.out_features, self.in_features = weight.shape
        codes, scale = quantize_rowwise(weight.detach())
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.shared: SharedInput | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fast_accum: bool = False) -> "FP8Linear":
        return cls(linear.weight, linear.bias, fast_accum)

    def _apply(self, fn, recurse=True):
        # ``model.to(dtype)`` casts every floating tensor, and FP8 counts as one: the codes would be
        # cast without their scales. Weight and scale follow device moves only.
        codes, scale = self.weight, self.weight_scale
        super()._apply(fn, recurse)
        if self.weight.dtype != FP8_DTYPE:
            self.weight = codes.to(self.weight.device)
        if self.weight_scale.dtype != torch.float32:
            self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise RuntimeError("FP8Linear is inference-only (the FP8 teacher is frozen): call it under "
                               "torch.no_grad()")
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        rows = rows.contiguous()
        # Under torch.compile (train.compile) Inductor gets the plain arithmetic to fuse as it sees fit:
        # no sharing (a tensor's version counter breaks the graph), no custom kernel, no probing try.
        compiling = torch.compiler.is_compiling()
        if compiling:
            codes, scale = quantize_rowwise(rows)
        elif self.shared is not None:
            codes, scale = self.shared.quantize(x, rows)
        else:
            codes, scale = _quantize_activations(rows)
        # Row-wise scaled FP8 GEMMs on CUDA write bf16 only.
        out_dtype = torch.bfloat16 if x.is_cuda else x.dtype
        scale_b = self.weight_scale.view(1, -1)
        fast_accum = self.fast_accum and x.is_cuda
        out = None
        if self.bias is not None and x.is_cuda and FP8Linear.bias_in_gemm and not compiling:
            try:
                out = torch._scaled_mm(codes, self.weight.t(), scale_a=scale, scale_b=scale_b,
                                       bias=self.bias.to(out_dtype), out_dtype=out_dtype, use_fast_accum=fast_accum)
            except RuntimeError as err:  # this torch/cuBLAS takes no bias with row-wise scales
                log.info("%s: torch._scaled_mm takes no bias here (%s); biases are added after the GEMM", KEY,
                         str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
                FP8Linear.bias_in_gemm = False
        if out is None:
            out = torch._scaled_mm(codes, self.weight.t(), scale_a=scale, scale_b=scale_b, out_dtype=out_dtype,
                                   use_fast_accum=fast_accum)
            if self.bias is not None:
                out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={FP8_DTYPE}, per-row scales")


def check_fp8_device(device: torch.device) -> None:
    """Refuse a GPU without FP8 tensor cores (``torch._scaled_mm`` needs compute capability 8.9:
    Ada, Hopper and later). The CPU runs it (slowly: a way to test the approximation, not a speed-up)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) < (8, 9):
            raise ConfigError(f"{KEY}=true needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, "
                              f"Hopper or later); {torch.cuda.get_device_name(device)} has {major}.{minor}; set "
                              f"{KEY}=false")
    elif device.type != "cpu":
        raise ConfigError(f"{KEY}=true runs on a CUDA GPU (or the CPU, for tests), not on {device}; set {KEY}=false")


@dataclass
class FP8Conversion:
    """What :func:`convert_to_fp8` did: the converted layers' names and the ones left in the
    original dtype (shapes ``torch._scaled_mm`` does not take), and the weight bytes before/after."""

    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    bytes_before: int = 0
    bytes_after: int = 0


def _share_inputs(module: nn.Module) -> None:
    """Give each group of ``module``'s FP8 children named in :data:`SHARED_INPUT_GROUPS` (at least
    two of them converted) one :class:`SharedInput`: their common input is quantised once."""
    for names in SHARED_INPUT_GROUPS:
        members = [getattr(module, name, None) for name in names]
        members = [m for m in members if isinstance(m, FP8Linear)]
        if len(members) > 1:
            shared = SharedInput(len(members))
            for member in members:
                member.shared = shared


def convert_to_fp8(model: nn.Module, fast_accum: bool = False) -> FP8Conversion:
    """Replace, in place, every ``nn.Linear`` inside the decoder layers of ``model`` by an
    :class:`FP8Linear` (quantised on the layer's own device). Embeddings, the final norm and the
    ``lm_head`` are outside the decoder layers and stay as they are. Layers whose shapes
    ``torch._scaled_mm`` does not take are kept, and a log line names them."""
    decoder = base_model(model).get_decoder()
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{KEY}=true: {type(base_model(model)).__name__} has no decoder `layers` list; the FP8 "
                          f"teacher supports decoder-only models such as Qwen2, Llama, Mistral; set {KEY}=false")
    report = FP8Conversion()
    for index, layer in enumerate(layers):
        for name, module in list(layer.named_modules()):
            for child_name, child in list(module.named_children()):
                if type(child) is not nn.Linear:
                    continue
                full = f"layers.{index}.{name + '.' if name else ''}{child_name}"
                if not fp8_eligible(child):
                    report.kept.append(full)
                    continue
                fp8 = FP8Linear.from_linear(child, fast_accum)
                report.bytes_before += child.weight.numel() * child.weight.element_size()
                report.bytes_after += fp8.weight.numel() + fp8.weight_scale.numel() * 4
                setattr(module, child_name, fp8)
                report.converted.append(full)
            _share_inputs(module)
    if not report.converted:
        raise ConfigError(f"{KEY}=true: no decoder linear layer of the teacher has in/out features that are "
                          f"multiples of {ALIGNMENT}, so nothing would run in FP8; set {KEY}=false")
    log.info("%s: %d decoder linear layers in FP8 (E4M3, per-row scales; an approximation), weights %.1f -> "
             "%.1f MiB; embeddings and lm_head unchanged", KEY, len(report.converted), report.bytes_before / 2**20,
             report.bytes_after / 2**20)
    if report.kept:
        log.info("%s: %d linear layers stay in %s: in/out features not multiples of %d (torch._scaled_mm): %s",
                 KEY, len(report.kept), next(model.parameters()).dtype, ALIGNMENT, ", ".join(report.kept))
    return report
