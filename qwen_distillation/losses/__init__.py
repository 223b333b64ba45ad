"""Distillation losses: pure-torch references on logits, a chunked loss on hidden states
(torch reference and Triton kernel behind one dispatcher, ``fused_linear_kd``), and the
hidden-state (feature), attention and contrastive families."""

from qwen_distillation.losses.attention import (
    attention_distillation_loss,
    attention_probs_reference,
    relation_kl,
)
from qwen_distillation.losses.chunked import chunked_kd_loss
from qwen_distillation.losses.contrastive import ContrastiveHead, info_nce, masked_mean_pool
from qwen_distillation.losses.fused import KERNELS, FusedLinearKDLoss, fused_linear_kd, resolve_kernel
from qwen_distillation.losses.feature import (
    FeatureProjector,
    feature_loss,
    masked_feature_loss,
    proportional_layer_map,
)
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
    "DIVERGENCES", "KERNELS", "ContrastiveHead", "FeatureProjector", "FusedLinearKDLoss", "fused_linear_kd",
    "resolve_kernel", "align_vocab", "attention_distillation_loss",
    "attention_probs_reference", "chunked_kd_loss", "cross_entropy", "divergence", "feature_loss", "forward_kl",
    "generalized_jsd", "info_nce", "masked_feature_loss", "masked_mean_pool", "proportional_layer_map",
    "relation_kl", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "total_variation",
]
