"""Distillation losses: pure-torch references on logits, a chunked loss on hidden states
(the torch reference here, the Triton kernel in ``qwen_distillation.kernels``, one dispatcher
``fused_linear_kd``), sparse top-k versions of the KD divergences against a cached teacher
(``topk``), and the hidden-state (feature), attention and contrastive families."""

from qwen_distillation.losses.attention import (
    attention_distillation_loss,
    attention_probs_reference,
    relation_kl,
)
from qwen_distillation.losses.chunked import TorchFusedLinearKD, chunked_cross_entropy
from qwen_distillation.losses.contrastive import ContrastiveHead, info_nce, masked_mean_pool
from qwen_distillation.losses.fused import (
    KERNELS,
    FusedLinearKDLoss,
    apply_fused_kd,
    chunked_kd_loss,
    fused_linear_kd,
    kd_options,
    resolve_kernel,
)
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
from qwen_distillation.losses.topk import (
    TAILS,
    TOPK_DIVERGENCES,
    SparseLogProbs,
    TeacherTopK,
    sparse_logprobs,
    teacher_topk,
    topk_divergence,
    topk_divergence_from_logprobs,
    topk_forward_kl,
    topk_generalized_jsd,
    topk_reverse_kl,
)

__all__ = [
    "ContrastiveHead", "DIVERGENCES", "FeatureProjector", "FusedLinearKDLoss", "KERNELS", "SparseLogProbs", "TAILS",
    "TOPK_DIVERGENCES", "TeacherTopK", "TorchFusedLinearKD", "align_vocab", "apply_fused_kd",
    "attention_distillation_loss", "attention_probs_reference", "chunked_cross_entropy", "chunked_kd_loss",
    "cross_entropy", "divergence", "feature_loss", "forward_kl", "fused_linear_kd", "generalized_jsd", "info_nce",
    "kd_options", "masked_feature_loss", "masked_mean_pool", "proportional_layer_map", "relation_kl",
    "resolve_kernel", "reverse_kl", "skew_forward_kl", "skew_reverse_kl", "sparse_logprobs", "teacher_topk",
    "topk_divergence", "topk_divergence_from_logprobs", "topk_forward_kl", "topk_generalized_jsd", "topk_reverse_kl",
    "total_variation",
]
