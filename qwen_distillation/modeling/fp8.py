"""An FP8 frozen teacher (``model.teacher.fp8``): an approximation, opt-in.

The teacher's decoder ``nn.Linear`` layers (attention q/k/v/o, MLP gate/up/down) become
:class:`FP8Linear`: the weight is quantised once, per output row, to ``float8_e4m3fn`` with an
fp32 scale ``amax(row) * fp32(1 / 448)``; each forward quantises its input the same way per token
(row) and multiplies with ``torch._scaled_mm`` (FP8 tensor cores on Ada/Hopper GPUs), rescaling the
fp32 accumulator by ``scale_x[m] * scale_w[n]``. On a GPU the input is quantised by a Triton kernel
(:mod:`qwen_distillation.kernels.fp8_quant`, bit-equal to the reference), once for the siblings
that read the same input (q/k/v, gate/up: :class:`SharedInput`), and a bias is added in the GEMM.
A SwiGLU MLP becomes :class:`FP8SwiGLU`: the same arithmetic, its activation quantised as it is
formed (one Triton kernel). A decoder layer's two RMSNorms become :class:`FP8QuantizingRMSNorm`: the
norm and the quantisation of its output for the layers that read it are one kernel, the normalised
activation is never stored, and the layers get its codes through a :class:`Handoff`. The embeddings,
the final norm and the ``lm_head`` stay in the teacher's dtype: the fused KD kernel reads the
``lm_head`` weight directly, and the teacher's logits come from it, unless
``model.teacher.fp8_head`` gives the loss an FP8 copy of it (:class:`FP8Head`, a further
approximation). ``model.teacher.fp8_fast_accum`` runs every FP8 GEMM
with ``use_fast_accum``. The teacher's next-token distribution is therefore not the bf16
teacher's: KL(p_bf16 || p_fp8) and top-1 agreement, for each option, are measured by
``benchmarks/fp8_teacher.py``.

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
                                                 rms_norm, rms_norm_quantize, silu_mul_quantize, triton_available,
                                                 triton_quantize_rowwise, triton_rms_norm_quantize,
                                                 triton_silu_mul_quantize)
from qwen_distillation.modeling.parts import base_model

log = logging.getLogger(__name__)

ALIGNMENT = 16  # torch._scaled_mm on CUDA: K and N multiples of 16
KEY = "model.teacher.fp8"
QUANTIZERS = ("triton", "compiled", "eager")
# Sibling layers that read the same input in the decoder layers of HF models (Qwen2, Llama, Mistral):
# their input is quantised once per forward, by the first of them to run.
SHARED_INPUT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# MLP classes whose forward is ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``: with a SiLU ``act_fn``
# they become :class:`FP8SwiGLU` (the same arithmetic, the activation quantised as it is formed).
SWIGLU_MLPS = ("Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP", "LigerSwiGLUMLP")
# Decoder layers whose forward reads ``input_layernorm``'s output only through the attention's q/k/v
# projections, and ``post_attention_layernorm``'s only through the MLP (transformers 5): their norms
# may hand the FP8 codes of their output to those layers instead of the output itself.
HANDOFF_LAYERS = ("Qwen2DecoderLayer", "Qwen3DecoderLayer", "LlamaDecoderLayer", "MistralDecoderLayer")
# RMSNorm classes with transformers' "llama" arithmetic (see kernels.fp8_quant.rms_norm); Liger's
# patch keeps it (casting mode "llama", offset 0) and is checked by its attributes.
RMS_NORMS = ("Qwen2RMSNorm", "Qwen3RMSNorm", "LlamaRMSNorm", "MistralRMSNorm", "LigerRMSNorm")

_compiled = {}


def _compiled_or_eager(name: str, fn, *args):
    """``fn(*args)`` through ``torch.compile`` (cached per name); eagerly, once and for all
    (``FP8Linear.quantizer = "eager"``), if compiling fails here."""
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[name](*args)
    except Exception as err:  # no working Inductor/Triton here: the same arithmetic, eagerly
        log.warning("%s: compiling %s failed (%s: %s); it runs eagerly (slower)", KEY, name, type(err).__name__,
                    str(err).splitlines()[0][:200] if str(err) else "")
        FP8Linear.quantizer = "eager"
        return fn(*args)


def _quantize(name: str, reference, kernel, x: torch.Tensor, *rest) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference(x, *rest)`` or the same codes from its Triton ``kernel``. On a CUDA device, by
    ``FP8Linear.quantizer``: ``"triton"`` (default; one kernel, :mod:`qwen_distillation.kernels.fp8_quant`),
    ``"compiled"`` (Inductor's compile of the reference) or ``"eager"`` (the reference, which reads
    its input several times); the CPU always runs the reference, and so does a forward under
    ``torch.compile`` (``train.compile``: Inductor gets the plain arithmetic to fuse as it sees fit)."""
    if not x.is_cuda or FP8Linear.quantizer == "eager" or torch.compiler.is_compiling():
        return reference(x, *rest)
    if FP8Linear.quantizer == "triton" and triton_available():
        return kernel(x, *rest)
    return _compiled_or_eager(name, reference, x, *rest)


def _quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rowwise` of a layer input (:func:`_quantize` chooses how; the kernel is bit-equal)."""
    return _quantize("the activation quantiser", quantize_rowwise, triton_quantize_rowwise, x)


def _quantize_swiglu(gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`silu_mul_quantize` of an MLP's gate and up outputs (:func:`_quantize` chooses how; the
    kernel never stores the activation)."""
    return _quantize("the SwiGLU quantiser", silu_mul_quantize, triton_silu_mul_quantize, gate, up)


def _quantize_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`rms_norm_quantize` of a decoder layer's residual stream (:func:`_quantize` chooses how;
    the kernel never stores the normalised rows)."""
    return _quantize("the RMSNorm quantiser", rms_norm_quantize, triton_rms_norm_quantize, x, weight, eps)


class Handoff:
    """The FP8 codes of a norm's output, handed by :class:`FP8QuantizingRMSNorm` to the ``readers``
    FP8 layers that read that output. The norm returns a stand-in of the output's shape (one NaN
    element, expanded: nothing is stored) and :meth:`give` s it with the codes; a reader called with
    that very stand-in :meth:`take` s the codes, and once every reader has, the entry is dropped.
    A reader called with any other tensor gets ``None`` and quantises its input itself; anything else
    that read the stand-in's values would read NaN, not a silently wrong number."""

    def __init__(self, readers: int):
        self.readers = readers
        self._standin: torch.Tensor | None = None
        self._codes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._reads = 0

    def give(self, standin: torch.Tensor, codes: tuple[torch.Tensor, torch.Tensor]) -> None:
        self._standin, self._codes, self._reads = standin, codes, 0

    def take(self, x: torch.Tensor, reads: int = 1) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The codes if ``x`` is the current stand-in, counted as ``reads`` readers, else ``None``."""
        if x is not self._standin or self._codes is None:
            return None
        codes = self._codes
        self._reads += reads
        if self._reads >= self.readers:
            self._standin, self._codes = None, None
        return codes


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


def _refuse_grad(x: torch.Tensor, name: str) -> None:
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError(f"{name} is inference-only (the FP8 teacher is frozen): call it under torch.no_grad()")


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
    ``use_fast_accum`` on CUDA (``model.teacher.fp8_fast_accum``; the CPU has no such mode).
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
        self.handoff: Handoff | None = None

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
        _refuse_grad(x, type(self).__name__)
        handed = self.handoff.take(x) if self.handoff is not None else None
        if handed is not None:  # the codes of the norm that formed x (x itself is a stand-in)
            return self.matmul(*handed, x.dtype).reshape(*x.shape[:-1], self.out_features)
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        rows = rows.contiguous()
        # Under torch.compile (train.compile) no sharing: a tensor's version counter breaks the graph.
        if self.shared is not None and not torch.compiler.is_compiling():
            codes, scale = self.shared.quantize(x, rows)
        else:
            codes, scale = _quantize_activations(rows)
        return self.matmul(codes, scale, x.dtype).reshape(*x.shape[:-1], self.out_features)

    def matmul(self, codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The layer's output from its quantised input: ``torch._scaled_mm`` of the codes (M, in_features)
        and their scale (M, 1) with the weight, plus the bias (in the GEMM's epilogue where cuBLAS takes
        it), in ``dtype`` (M, out_features). On CUDA the GEMM writes bf16 (row-wise scaled FP8 GEMMs
        write nothing else), cast to ``dtype`` after."""
        cuda = codes.is_cuda
        out_dtype = torch.bfloat16 if cuda else dtype
        scale_b = self.weight_scale.view(1, -1)
        fast_accum = self.fast_accum and cuda
        if self.bias is not None and cuda and FP8Linear.bias_in_gemm and not torch.compiler.is_compiling():
            try:
                return torch._scaled_mm(codes, self.weight.t(), scale_a=scale, scale_b=scale_b,
                                        bias=self.bias.to(out_dtype), out_dtype=out_dtype,
                                        use_fast_accum=fast_accum).to(dtype)
            except RuntimeError as err:  # this torch/cuBLAS takes no bias with row-wise scales
                log.info("%s: torch._scaled_mm takes no bias here (%s); biases are added after the GEMM", KEY,
                         str(err).splitlines()[0][:200] if str(err) else type(err).__name__)
                FP8Linear.bias_in_gemm = False
        out = torch._scaled_mm(codes, self.weight.t(), scale_a=scale, scale_b=scale_b, out_dtype=out_dtype,
                               use_fast_accum=fast_accum)
        return (out if self.bias is None else out + self.bias.to(out.dtype)).to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={FP8_DTYPE}, per-row scales")


class FP8SwiGLU(nn.Module):
    """A SwiGLU MLP of :class:`FP8Linear` projections, ``down_proj(silu(gate_proj(x)) * up_proj(x))``
    (Qwen2, Qwen3, Llama, Mistral: :data:`SWIGLU_MLPS`), computed as the three converted layers and
    transformers' MLP compute it (one quantisation of ``x`` for gate and up; the activation in x's
    dtype, rounded as ``act_fn(gate) * up`` rounds it; its row-wise quantisation for the down
    projection), except that on a GPU the activation is formed and quantised in one Triton kernel
    (:func:`~qwen_distillation.kernels.fp8_quant.triton_silu_mul_quantize`) and never stored. The
    children keep their names, so the state dict's keys are the MLP's, and a forward bound over this
    one (Liger's SwiGLU patch applied after the conversion) still computes the same MLP, unfused.

    ``forward(x)``: x (..., hidden) -> (..., hidden) in x's dtype.
    """

    def __init__(self, gate_proj: FP8Linear, up_proj: FP8Linear, down_proj: FP8Linear):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.handoff: Handoff | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_grad(x, type(self).__name__)
        # The codes of the norm that formed x (x itself is a stand-in), read for gate and up.
        handed = self.handoff.take(x, reads=2) if self.handoff is not None else None
        if handed is not None:
            codes, scale = handed
        else:
            rows = x.reshape(-1, self.gate_proj.in_features)
            if rows.shape[0] == 0:
                return x.new_zeros(*x.shape[:-1], self.down_proj.out_features)
            codes, scale = _quantize_activations(rows.contiguous())
        gate = self.gate_proj.matmul(codes, scale, x.dtype)
        up = self.up_proj.matmul(codes, scale, x.dtype)
        codes, scale = _quantize_swiglu(gate, up)
        del gate, up
        return self.down_proj.matmul(codes, scale, x.dtype).reshape(*x.shape[:-1], self.down_proj.out_features)


def _swiglu_mlp(module: nn.Module) -> bool:
    """Whether ``module`` is one of :data:`SWIGLU_MLPS` with a SiLU activation and three FP8 projections."""
    name = type(module).__name__  # Liger's MLP (the class a model gets once Liger patched its family) is SiLU
    act = getattr(module, "act_fn", None)
    return (name in SWIGLU_MLPS and (name == "LigerSwiGLUMLP" or type(act).__name__ in ("SiLU", "SiLUActivation"))
            and all(isinstance(getattr(module, part, None), FP8Linear) for part in ("gate_proj", "up_proj",
                                                                                  "down_proj")))


def fused_mlps(model: nn.Module) -> int:
    """How many :class:`FP8SwiGLU` MLPs ``model`` holds (``modeling.speed`` leaves them unpatched)."""
    return sum(isinstance(module, FP8SwiGLU) for module in model.modules())


class FP8QuantizingRMSNorm(nn.Module):
    """A decoder layer's RMSNorm whose output only FP8 layers read (q/k/v after ``input_layernorm``,
    the MLP after ``post_attention_layernorm``): it computes :func:`rms_norm_quantize` of its input
    (on a GPU one Triton kernel, :func:`~qwen_distillation.kernels.fp8_quant.triton_rms_norm_quantize`,
    that never stores the normalised activation), gives the codes to its readers through ``handoff``
    and returns a stand-in of the output's shape and dtype (see :class:`Handoff`). The readers'
    arithmetic is the unfused layers' (the norm rounded to x's dtype, then quantised per token) up to
    the kernel's order of additions in the sum of squares (the GPU tests count the codes it moves).
    Under ``torch.compile`` or with no rows it returns the norm's output itself (:func:`rms_norm`).
    ``weight`` is the norm's own parameter: the state dict's keys and values do not change.

    ``forward(x)``: x (..., hidden) -> (..., hidden) in the dtype of ``rms_norm(x, weight, eps)``.
    """

    def __init__(self, weight: nn.Parameter, eps: float, handoff: Handoff):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.handoff = handoff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _refuse_grad(x, type(self).__name__)
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] == 0 or torch.compiler.is_compiling() or self.weight.dtype != x.dtype:
            return rms_norm(x, self.weight, self.variance_epsilon)
        standin = x.new_full((1,) * x.dim(), float("nan")).expand(x.shape)
        self.handoff.give(standin, _quantize_norm(rows.contiguous(), self.weight, self.variance_epsilon))
        return standin

    def extra_repr(self) -> str:
        return (f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, its output handed to "
                f"{self.handoff.readers} FP8 reads as codes")


def _llama_rms_norm(module: nn.Module | None) -> float | None:
    """The epsilon of ``module`` if it is one of :data:`RMS_NORMS` with transformers' "llama"
    arithmetic (for Liger's patch: casting mode "llama", offset 0) and a 1-D weight, else ``None``."""
    if module is None or module._get_name() not in RMS_NORMS and type(module).__name__ not in RMS_NORMS:
        return None
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    if getattr(module, "offset", 0.0) != 0.0 or getattr(module, "casting_mode", "llama") != "llama":
        return None
    eps = getattr(module, "variance_epsilon", None)
    return getattr(module, "eps", None) if eps is None else eps


def _fuse_norms(layer: nn.Module) -> list[str]:
    """Make ``layer``'s two norms :class:`FP8QuantizingRMSNorm` where every reader of their output is
    FP8 (q/k/v; :class:`FP8SwiGLU` or gate/up); return the names of those made."""
    if type(layer).__name__ not in HANDOFF_LAYERS:
        return []
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    # The MLP's codes are read twice (gate, up), by an FP8SwiGLU at once or, with a forward bound over
    # it (Liger's SwiGLU patch), by its two layers.
    readers = {"input_layernorm": [getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj")],
               "post_attention_layernorm": [getattr(mlp, name, None) for name in ("gate_proj", "up_proj")]}
    fused = []
    for name, members in readers.items():
        eps = _llama_rms_norm(getattr(layer, name, None))
        if eps is None or not all(isinstance(m, FP8Linear) for m in members):
            continue
        if name == "post_attention_layernorm" and type(mlp).__name__ not in (*SWIGLU_MLPS, "FP8SwiGLU"):
            continue  # an MLP whose forward might read its input otherwise
        handoff = Handoff(len(members))
        for member in members + ([mlp] if isinstance(mlp, FP8SwiGLU) else []):
            member.handoff = handoff
        setattr(layer, name, FP8QuantizingRMSNorm(getattr(layer, name).weight, eps, handoff))
        fused.append(name)
    return fused


def fused_norms(model: nn.Module) -> int:
    """How many :class:`FP8QuantizingRMSNorm` ``model`` holds (``modeling.speed`` leaves them unpatched)."""
    return sum(isinstance(module, FP8QuantizingRMSNorm) for module in model.modules())


def head_balance(weight: torch.Tensor) -> torch.Tensor:
    """The column balance of an FP8 head: ``c[j] = sqrt(max_i |weight[i, j]|)`` in fp32, shape (H,).

    The logits ``h @ W.T`` equal ``(h * c) @ (W / c).T``; quantised per row, ``W / c`` loses less than
    ``W`` wherever a few hidden dimensions carry much larger weights than the rest (each vocabulary
    row's scale is set by its largest entry, and E4M3 keeps 3 mantissa bits below it). The square root
    splits the columns' range between the two operands, as SmoothQuant's ``alpha = 0.5`` does with
    activation statistics; here from the weight alone, so the head is the same for every batch."""
    amax = weight.detach().abs().amax(dim=0).float()
    return amax.clamp(min=MIN_AMAX).sqrt()


class FP8Head:
    """An FP8 copy of the teacher's ``lm_head`` weight for the fused KD loss (``model.teacher.fp8_head``,
    a further approximation): the weight divided by its column balance (:func:`head_balance`, unless
    ``balance=False``), quantised per vocabulary row like :class:`FP8Linear`'s, its rows padded with
    zeros to a multiple of 16 (``torch._scaled_mm``). The teacher's own ``lm_head`` is untouched
    (evaluation and the cache writer read it); the copy costs half its bytes and is made again only
    when the weight object or its version changes (:meth:`of`).

    :meth:`rows` gives the loss a *row source* (``kernels.fused_linear_kd.teacher_rows``): the teacher's
    logits for a chunk of tokens, formed from its final hidden states (times the balance, quantised
    per token) by one FP8 GEMM.
    """

    ROWS_PER_PASS = 8192  # rows of the weight balanced and quantised at a time (bounds the fp32 copy)

    def __init__(self, weight: torch.Tensor, fast_accum: bool = False, balance: bool = True):
        values = weight.detach()
        self.balance = head_balance(values) if balance else None
        inverse = None if self.balance is None else torch.reciprocal(self.balance)
        parts = []
        for start in range(0, values.shape[0], self.ROWS_PER_PASS):
            rows = values[start:start + self.ROWS_PER_PASS]
            # The Triton quantiser on a GPU; fp32 only a pass at a time (a 7B's whole weight: 2.2 GB).
            parts.append(_quantize_activations(rows.contiguous() if inverse is None else rows.float() * inverse))
        codes, scale = torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts])
        pad = -codes.shape[0] % ALIGNMENT
        if pad:
            codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
            scale = torch.cat([scale, scale.new_ones(pad, 1)])
        self.codes, self.scale, self.fast_accum = codes, scale.view(1, -1), fast_accum
        self.source, self.version = weight, weight._version

    @classmethod
    def of(cls, weight: torch.Tensor, cached: "FP8Head | None", fast_accum: bool = False) -> "FP8Head":
        """``cached`` if it was made from this very weight, unmodified since; else a new copy."""
        if cached is not None and cached.source is weight and cached.version == weight._version:
            return cached
        return cls(weight, fast_accum)

    def rows(self, hidden: torch.Tensor, vocab_size: int) -> "FP8HeadRows":
        """The row source of the logits ``hidden @ weight[:vocab_size].T`` for hidden (N, H)."""
        if hidden.shape[-1] != self.codes.shape[1]:
            raise ValueError(f"teacher hidden size {hidden.shape[-1]} does not match its lm_head "
                             f"({self.codes.shape[1]} columns)")
        return FP8HeadRows(self, hidden.reshape(-1, hidden.shape[-1]), vocab_size)


class FP8HeadRows:
    """The teacher's logits (N, vocab_size) from an :class:`FP8Head`, a chunk of rows at a time:
    the hidden states (N, H), times the head's balance, are quantised per token once, and
    ``rows(start, end, student_logits)`` runs ``torch._scaled_mm`` for rows ``start:end`` (bf16 on
    CUDA, else the student logits' dtype), returning a (c, vocab_size) view whose last dimension is
    contiguous."""

    def __init__(self, head: FP8Head, hidden: torch.Tensor, vocab_size: int):
        if not 0 < vocab_size <= head.codes.shape[0]:
            raise ValueError(f"vocab_size {vocab_size} is not within the teacher lm_head's {head.codes.shape[0]} rows")
        self.head, self.vocab_size, self.num_rows = head, vocab_size, hidden.shape[0]
        rows = hidden.detach()
        rows = rows.contiguous() if head.balance is None else rows.float() * head.balance
        self.codes, self.scale = _quantize_activations(rows)

    def __len__(self) -> int:
        return self.num_rows

    def rows(self, start: int, end: int, student_logits: torch.Tensor) -> torch.Tensor:
        cuda = self.codes.is_cuda
        out = torch._scaled_mm(self.codes[start:end], self.head.codes.t(), scale_a=self.scale[start:end],
                               scale_b=self.head.scale, out_dtype=torch.bfloat16 if cuda else student_logits.dtype,
                               use_fast_accum=self.head.fast_accum and cuda)
        return out[:, :self.vocab_size]


def fp8_head_reference(hidden: torch.Tensor, weight: torch.Tensor, vocab_size: int,
                       balance: bool = True) -> torch.Tensor:
    """What :class:`FP8HeadRows` gives for all rows, in plain fp32 torch: (N, vocab_size)."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    if not balance:
        return fp8_linear_reference(rows, weight[:vocab_size])
    c = head_balance(weight)  # from the whole weight, as the head is made
    return fp8_linear_reference(rows.float() * c, weight[:vocab_size].float() * torch.reciprocal(c))


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
    original dtype (shapes ``torch._scaled_mm`` does not take), the MLPs that became
    :class:`FP8SwiGLU`, and the weight bytes before/after."""

    converted: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    fused: list[str] = field(default_factory=list)
    fused_norms: list[str] = field(default_factory=list)
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


def convert_to_fp8(model: nn.Module, fast_accum: bool = False, fuse_mlp: bool = True,
                   fuse_norm: bool = True) -> FP8Conversion:
    """Replace, in place, every ``nn.Linear`` inside the decoder layers of ``model`` by an
    :class:`FP8Linear` (quantised on the layer's own device), each SwiGLU MLP whose three
    projections converted by an :class:`FP8SwiGLU` of them (``fuse_mlp``; the same arithmetic, one
    kernel less per layer on a GPU), and each norm of :data:`HANDOFF_LAYERS` whose output only FP8
    layers read by an :class:`FP8QuantizingRMSNorm` (``fuse_norm``; the same arithmetic, the
    normalised activation never stored). Embeddings, the final norm and the ``lm_head`` are outside the
    decoder layers and stay as they are. Layers whose shapes ``torch._scaled_mm`` does not take are
    kept, and a log line names them."""
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
        for name, module in list(layer.named_modules()) if fuse_mlp else ():
            for child_name, child in list(module.named_children()):
                if _swiglu_mlp(child):
                    setattr(module, child_name, FP8SwiGLU(child.gate_proj, child.up_proj, child.down_proj))
                    report.fused.append(f"layers.{index}.{name + '.' if name else ''}{child_name}")
        if fuse_norm:
            report.fused_norms += [f"layers.{index}.{name}" for name in _fuse_norms(layer)]
    if not report.converted:
        raise ConfigError(f"{KEY}=true: no decoder linear layer of the teacher has in/out features that are "
                          f"multiples of {ALIGNMENT}, so nothing would run in FP8; set {KEY}=false")
    log.info("%s: %d decoder linear layers in FP8 (E4M3, per-row scales; an approximation), weights %.1f -> "
             "%.1f MiB; embeddings and lm_head unchanged; %d SwiGLU MLPs and %d norms fused with their quantisers", KEY,
             len(report.converted), report.bytes_before / 2**20, report.bytes_after / 2**20, len(report.fused),
             len(report.fused_norms))
    if report.kept:
        log.info("%s: %d linear layers stay in %s: in/out features not multiples of %d (torch._scaled_mm): %s",
                 KEY, len(report.kept), next(model.parameters()).dtype, ALIGNMENT, ", ".join(report.kept))
    return report
