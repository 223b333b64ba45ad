"""Opt-in speed levers for the GPU step, measured in docs/performance.md:

* ``train.liger_kernels``: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU patched into the
  teacher and the student (their instances; Liger also swaps the module-level RoPE function
  of the model family). On an H100 this took the 7B -> 1.5B KD step from 452.7 to 368.6 ms.
* ``train.compile``: ``torch.compile`` of both decoder stacks (Inductor fuses the norms, RoPE
  and SwiGLU itself). 1.5B -> 0.5B: 185.0 -> 139.6 ms; 7B -> 1.5B: 452.7 -> 397.6 ms. The
  first steps of each new sequence length compile (Inductor then switches to dynamic shapes).

Liger replaces the model family's RMSNorm, MLP and RoPE for the whole process: models built
later in the same process (another job of a ``-m`` sweep run in-process) get them too. Its RoPE is
called through :func:`rope_over_rows` (the batch folded into the sequence), so that its Triton
kernel, which takes the batch size as a compile-time constant, compiles once per head layout
instead of once per row count of a packed micro-batch.

Both at once was measured slower (Inductor cannot trace Liger's RMSNorm kernel and falls back),
so the two are refused together.
"""

from __future__ import annotations

import functools
import logging
import sys

import torch
from torch import nn

from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.fp8 import fused_mlps, fused_norms
from qwen_distillation.modeling.parts import base_model
from qwen_distillation.modeling.varlen import VARLEN, require_varlen

log = logging.getLogger(__name__)


def rope_over_rows(rope):
    """``rope`` (Liger's ``liger_rotary_pos_emb``, the contract of transformers' ``apply_rotary_pos_emb``)
    called with the batch folded into the sequence.

    ``folded(q, k, cos, sin, *args, **kwargs)``: q (bsz, n_q_heads, seq, head_dim)
    and k (bsz, n_kv_heads, seq, head_dim), the transposed views transformers' attention hands it;
    cos and sin (1 or bsz, seq, rotary width). ``rope`` gets q and k as (1, heads, bsz * seq, head_dim)
    views of the same storage and cos/sin as (1, bsz * seq, width), and its outputs are viewed back as
    (bsz, heads, seq, head_dim). Each position is rotated by its own row of cos/sin either way, so the
    values are the same to the bit, forward and backward. Liger's kernel takes the batch sizes of q and
    of cos as ``tl.constexpr``: unfolded, Triton compiles it again (forward and backward, per model's
    head layout) for every row count a packed micro-batch brings; folded, the batch is always 1. (On
    the H200 real run the rows layout took 0.5-1.7 s for each of nine steps that the one-row layout ran
    in about 0.2 s, which is what those compilations predict: docs/performance.md.) The other
    arguments (``unsqueeze_dim``, ``rotary_dim``) are passed on as given. A call of other shapes (one
    row, 4-D cos) or with a tensor among the other arguments (``position_ids``, which would need
    folding too) goes to ``rope`` unchanged."""

    @functools.wraps(rope)
    def folded(q, k, cos, sin, *args, **kwargs):
        bsz = q.shape[0] if q.ndim == 4 else 0
        if (bsz < 2 or k.ndim != 4 or k.shape[0] != bsz or k.shape[2] != q.shape[2] or cos.ndim != 3
                or sin.shape != cos.shape or cos.shape[0] not in (1, bsz) or cos.shape[1] != q.shape[2]
                or any(isinstance(a, torch.Tensor) for a in (*args, *kwargs.values()))):
            return rope(q, k, cos, sin, *args, **kwargs)
        seq = q.shape[2]

        def fold(x):  # (bsz, heads, seq, d) -> (1, heads, bsz * seq, d), a view where x's rows are contiguous
            return x.transpose(1, 2).reshape(1, bsz * seq, x.shape[1], x.shape[3]).transpose(1, 2)

        def unfold(x):
            return x.transpose(1, 2).reshape(bsz, seq, x.shape[1], x.shape[3]).transpose(1, 2)

        cos, sin = (t.expand(bsz, -1, -1).reshape(1, bsz * seq, t.shape[-1]) for t in (cos, sin))
        q_out, k_out = rope(fold(q), fold(k), cos, sin, *args, **kwargs)
        return unfold(q_out), unfold(k_out)

    return folded


def _fold_liger_rope(model: nn.Module) -> None:
    """Route the RoPE function Liger put into ``model``'s modeling module through :func:`rope_over_rows`."""
    try:
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except ImportError:  # a Liger without this module: its RoPE, if any, runs unfolded
        return
    module = sys.modules.get(type(model).__module__)
    if getattr(module, "apply_rotary_pos_emb", None) is liger_rotary_pos_emb:
        module.apply_rotary_pos_emb = rope_over_rows(liger_rotary_pos_emb)


def liger_final_norm(model: nn.Module) -> None:
    """Liger's RMSNorm on ``model``'s final norm alone (as its instance patch does for every norm)."""
    try:
        from liger_kernel.transformers.monkey_patch import _patch_rms_norm_module
    except ImportError:  # a Liger without it: the final norm stays transformers'
        return
    norm = getattr(base_model(model).get_decoder(), "norm", None)
    if norm is not None:
        _patch_rms_norm_module(norm)


def apply_speedups(models: list[nn.Module], *, device: torch.device, compile: bool = False,
                   liger_kernels: bool = False) -> list[str]:
    """Apply the levers the config asks for to each model in place; return what was applied."""
    if compile and liger_kernels:
        raise ConfigError("train.compile=true and train.liger_kernels=true together were measured slower than "
                          "either alone (Inductor cannot trace Liger's RMSNorm); choose one")
    if any(getattr(base_model(model).config, "_attn_implementation", None) == VARLEN for model in models):
        require_varlen(device)
    applied = []
    if liger_kernels:
        if device.type != "cuda":
            raise ConfigError(f"train.liger_kernels=true needs a CUDA GPU (Liger's kernels are Triton), running "
                              f"on {device}; set train.liger_kernels=false")
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError as err:
            raise ConfigError("train.liger_kernels=true needs Liger-Kernel: pip install liger-kernel") from err
        for model in models:
            # An FP8 teacher's MLPs compute SwiGLU inside their own quantiser (modeling.fp8.FP8SwiGLU), and its
            # layers' norms quantise their output for the FP8 layers (FP8QuantizingRMSNorm): Liger's patch
            # would bind its own forward over them; the final norm alone gets Liger's then.
            fused = fused_norms(model) > 0
            _apply_liger_kernel_to_instance(model=base_model(model), rope=True, rms_norm=not fused,
                                            swiglu=not fused_mlps(model), cross_entropy=False,
                                            fused_linear_cross_entropy=False)
            if fused:
                liger_final_norm(base_model(model))
            _fold_liger_rope(base_model(model))
        applied.append("liger_kernels")
    if compile:
        for model in models:
            base_model(model).get_decoder().compile()
        applied.append("compile")
    if applied:
        log.info("speed levers: %s", ", ".join(applied))
    return applied
