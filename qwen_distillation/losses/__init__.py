"""Distillation losses: pure-torch references on logits and a chunked loss on hidden states."""

from qwen_distillation.losses.chunked import chunked_kd_loss
from qwen_distillation.losses.logit import (
    DIVERGENCES,
    align_vocab,
    cross_entropy,
    divergence,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)

__all__ = [
    "DIVERGENCES",
    "align_vocab",
    "chunked_kd_loss",
    "cross_entropy",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "total_variation",
]
