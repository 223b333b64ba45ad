"""The device a user names (``train.device=cuda:1``, ``--device cpu``), checked before any model
loads: one function for the training run and the evaluate/generate commands."""

from __future__ import annotations

import torch

from qwen_distillation.errors import ConfigError


def parse_device(value: str, option: str, use_cpu: str) -> torch.device:
    """``value`` (cpu, cuda, cuda:N or, where available, mps) as a torch device, refused with a
    ConfigError that starts with ``option`` (the setting as the user wrote it: ``--device cuda:3``,
    ``train.device=cuda``) when torch does not know it or it is not there; ``use_cpu`` is the
    setting that runs on the CPU instead (``--device cpu``)."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{option}: not a device torch knows; use cpu or cuda (cuda:N for one GPU)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{option}: no CUDA GPU is visible; use {use_cpu}")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(f"{option}: only {count} CUDA GPU(s) visible (cuda:0 to cuda:{count - 1})")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"{option}: MPS is not available here; use {use_cpu}")
    elif device.type != "cpu":
        raise ConfigError(f"{option}: not a device this project runs on; use cpu or cuda (cuda:N for one GPU)")
    return device
