"""A stage's optimizer and learning-rate schedule."""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch


def build_optimizer(params: Iterable[torch.Tensor], *, lr: float, weight_decay: float,
                    fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (``fused`` on a CUDA device)."""
    return torch.optim.AdamW(list(params), lr=lr, weight_decay=weight_decay, fused=fused)


def lr_lambda(total_steps: int, warmup_steps: int, scheduler: str, min_lr_ratio: float) -> Callable[[int], float]:
    """Multiplier of the base learning rate at each optimizer step: linear warmup, then
    cosine or linear decay to ``min_lr_ratio`` (or constant)."""

    def factor(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if scheduler == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        progress = min(max(progress, 0.0), 1.0)
        if scheduler == "linear":
            return min_lr_ratio + (1 - min_lr_ratio) * (1 - progress)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_ratio: float, scheduler: str,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Warmup over ``ceil(warmup_ratio * total_steps)`` steps, then ``scheduler`` decay
    (:func:`lr_lambda`)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(total_steps, warmup, scheduler, min_lr_ratio))
