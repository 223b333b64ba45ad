"""Opt-in speed levers for the GPU step, measured in docs/performance.md:

* ``train.liger_kernels``: Liger-Kernel's fused RMSNorm, RoPE and SwiGLU patched into the
  teacher and the student (their instances; Liger also swaps the module-level RoPE function
  of the model family). On an H100 this took the 7B -> 1.5B KD step from 452.7 to 368.6 ms.
* ``train.compile``: ``torch.compile`` of both decoder stacks (Inductor fuses the norms, RoPE
  and SwiGLU itself). 1.5B -> 0.5B: 185.0 -> 139.6 ms; 7B -> 1.5B: 452.7 -> 397.6 ms. The
  first steps of each new sequence length compile (Inductor then switches to dynamic shapes).

Liger replaces the model family's RMSNorm, MLP and RoPE for the whole process: models built
later in the same process (another job of a ``-m`` sweep run in-process) get them too.

Both at once was measured slower (Inductor cannot trace Liger's RMSNorm kernel and falls back),
so the two are refused together.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.fp8 import fused_mlps
from qwen_distillation.modeling.parts import base_model
from qwen_distillation.modeling.varlen import VARLEN, require_varlen

log = logging.getLogger(__name__)


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
            # An FP8 teacher's MLPs compute SwiGLU inside their own quantiser (modeling.fp8.FP8SwiGLU).
            _apply_liger_kernel_to_instance(model=base_model(model), rope=True, rms_norm=True,
                                            swiglu=not fused_mlps(model), cross_entropy=False,
                                            fused_linear_cross_entropy=False)
        applied.append("liger_kernels")
    if compile:
        for model in models:
            base_model(model).get_decoder().compile()
        applied.append("compile")
    if applied:
        log.info("speed levers: %s", ", ".join(applied))
    return applied
