"""From a stage's config to what it computes: the LossPlan (active terms, KD options with the
kernel resolved, layer maps), the weights the balancer applies and GradNorm's shared layer."""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

import torch

from qwen_distillation.errors import ConfigError
from qwen_distillation.kernels.fused_linear_kd import KDOptions
from qwen_distillation.losses.feature import proportional_layer_map, validate_layer_map
from qwen_distillation.losses.fused import kd_options
from qwen_distillation.modeling.capture import check_qkv_capture, find_decoder
from qwen_distillation.modeling.parts import base_model, decoder_and_head, head_dim, supports_hidden_path

log = logging.getLogger(__name__)

TEACHER_TERMS = ("kd", "feature", "attention", "contrastive")


@dataclass(frozen=True)
class LossPlan:
    """What one stage computes for every micro-batch, decided once at the stage's start.

    weights: the active terms (weight > 0) and their configured weights, from ``ce``, ``kd``,
        ``feature``, ``attention``, ``contrastive``.
    vocab_size: logit columns teacher and student share.
    kd: the fused CE + KD loss's options, kernel resolved, with ``ce_weight``/``kd_weight`` the
        stage's ``ce`` and ``kd`` weights and ``reduction="sum"``.
    separate_logit_terms: compute ``ce`` and ``kd`` as two terms (gradient balancing needs
        them apart) instead of one weighted ``logit`` term.
    hidden_path: both models' logits are a plain projection of their last hidden states, so the
        logit terms are computed from hidden states in chunks (else from full logits).
    feature_pairs, attention_pairs: ``(student_layer, teacher_layer)`` pairs matched.
    teacher_tail: with a cached teacher, the sparse KD's treatment of the mass outside its top k.
    """

    weights: dict[str, float]
    vocab_size: int
    kd: KDOptions = field(default_factory=KDOptions)
    separate_logit_terms: bool = False
    hidden_path: bool = True
    feature_pairs: tuple[tuple[int, int], ...] = ()
    feature_loss: str = "mse"
    feature_normalize: bool = True
    attention_pairs: tuple[tuple[int, int], ...] = ()
    attention_mode: str = "relations"
    relation_heads: int = 8
    attention_chunk: int = 256
    contrastive_temperature: float = 0.1
    domain_aware: bool = False
    teacher_tail: str = "bucket"

    def active(self, name: str) -> bool:
        return self.weights.get(name, 0.0) > 0

    @property
    def needs_teacher(self) -> bool:
        return any(self.active(name) for name in TEACHER_TERMS)

    def captured_layers(self, side: int) -> tuple[list[int], list[int]]:
        """(hidden-state layers, q/k/v layers) to capture on the student (``side=0``) or the
        teacher (``side=1``): the matched layers of the active feature and attention terms."""
        hidden = [pair[side] for pair in self.feature_pairs] if self.active("feature") else []
        qkv = [pair[side] for pair in self.attention_pairs] if self.active("attention") else []
        return hidden, qkv


def _layers(model) -> int:
    return len(find_decoder(model).layers)  # a ConfigError for a decoder without `layers`


def _attention_width(model) -> int:
    """num_attention_heads x head_dim: the width of a layer's concatenated queries (and of its keys
    and values, repeated to the query heads), which the attention term splits into relation heads."""
    config = base_model(model).config
    return config.num_attention_heads * head_dim(config)


def check_relation_heads(relation_heads: int, key: str, student, teacher) -> None:
    """``relation_heads`` must divide both models' attention widths (MiniLMv2 splits each into them)."""
    widths = {"student": _attention_width(student), "teacher": _attention_width(teacher)}
    if all(width % relation_heads == 0 for width in widths.values()):
        return
    both = math.gcd(*widths.values())
    fit = max(d for d in range(1, min(relation_heads, both) + 1) if both % d == 0)
    raise ConfigError(f"{key}={relation_heads}: must divide num_attention_heads x head_dim of both models "
                      f"(student {widths['student']}, teacher {widths['teacher']}); e.g. {key}={fit}")


def layer_pairs(sub_cfg, key: str, student, teacher) -> list[tuple[int, int]]:
    """The [student, teacher] layer pairs of a feature/attention config node."""
    num_s, num_t = _layers(student), _layers(teacher)
    if sub_cfg.layer_map is not None:
        return validate_layer_map([list(p) for p in sub_cfg.layer_map], num_s, num_t, f"{key}.layer_map")
    if sub_cfg.num_pairs and sub_cfg.num_pairs > num_s:  # a setting shared by students of several depths
        log.warning("%s.num_pairs=%d: the student has %d layers, so the term pairs all %d of them", key,
                    sub_cfg.num_pairs, num_s, num_s)
    pairs = min(sub_cfg.num_pairs, num_s) if sub_cfg.num_pairs else None
    return proportional_layer_map(num_s, num_t, pairs)


def stage_kd_options(stage, device: torch.device) -> KDOptions:
    """The stage's fused-loss options, its ``loss.kernel`` resolved for ``device``. Raises
    ValueError naming ``loss.kernel``/``loss.kd`` (the caller prefixes the stage's key)."""
    loss, weights = stage.loss, dataclasses.asdict(stage.loss.weights)
    return kd_options(kind=loss.kd, temperature=stage.temperature, ce_weight=weights["ce"], kd_weight=weights["kd"],
                      chunk_size=max(loss.chunk_size, 1), beta=loss.jsd_beta, alpha=loss.skew_alpha, reduction="sum",
                      kernel=loss.kernel, device=device)


def build_plan(stage, key: str, student, teacher, vocab_size: int, kd: KDOptions) -> LossPlan:
    """The LossPlan of stage ``key`` for this pair, with ``kd`` from :func:`stage_kd_options`."""
    loss = stage.loss
    weights = {name: w for name, w in dataclasses.asdict(loss.weights).items() if w > 0}
    needs_teacher = any(weights.get(name, 0.0) > 0 for name in TEACHER_TERMS)
    cached = stage.teacher.source == "cache"  # the teacher model takes no part in the loss
    hidden_path = loss.chunk_size > 0 and supports_hidden_path(student) and (
        not needs_teacher or cached or supports_hidden_path(teacher))
    feature = layer_pairs(loss.feature, f"{key}.loss.feature", student, teacher) if "feature" in weights else []
    attention = layer_pairs(loss.attention, f"{key}.loss.attention", student, teacher) if "attention" in weights else []
    if attention:
        check_relation_heads(loss.attention.relation_heads, f"{key}.loss.attention.relation_heads", student, teacher)
        for side, (role, model) in enumerate((("student", student), ("teacher", teacher))):
            try:
                check_qkv_capture(model, [pair[side] for pair in attention])
            except ConfigError as err:
                raise ConfigError(f"{key}.loss.weights.attention > 0 needs the {role}'s queries and keys: {err}. "
                                  f"Pair layers that have one ({key}.loss.attention.layer_map=[[student, teacher]]), "
                                  f"or set {key}.loss.weights.attention=0 for this pair") from None
    return LossPlan(weights=weights, vocab_size=vocab_size, kd=kd, separate_logit_terms=loss.balancing.method != "none",
                    hidden_path=hidden_path, feature_pairs=tuple(feature), feature_loss=loss.feature.loss,
                    feature_normalize=loss.feature.normalize, attention_pairs=tuple(attention),
                    attention_mode=loss.attention.mode, relation_heads=loss.attention.relation_heads,
                    attention_chunk=loss.attention.chunk_size, contrastive_temperature=loss.contrastive.temperature,
                    domain_aware=loss.contrastive.domain_aware, teacher_tail=stage.teacher.tail)


def loss_weights(plan: LossPlan) -> dict[str, float]:
    """The weights the balancer applies to the terms the module returns: ``logit`` comes
    already weighted (1.0) unless the logit terms are kept apart."""
    out = {}
    if plan.separate_logit_terms:
        out.update({k: plan.weights[k] for k in ("ce", "kd") if plan.active(k)})
    elif plan.active("ce") or plan.active("kd"):
        out["logit"] = 1.0
    out.update({k: plan.weights[k] for k in ("feature", "attention", "contrastive") if plan.active(k)})
    return out


def shared_parameter(student, plan: LossPlan) -> list[torch.Tensor]:
    """The layer every active term's gradient passes through (GradNorm measures gradient
    norms there): the input norm of the lowest matched student layer, else the final norm.

    Decoders named otherwise give the nearest equivalent: a layer without ``input_layernorm``
    (OLMo-2 normalises after each block) its first trainable parameter; a decoder without ``norm``
    (GPT-NeoX's ``final_layer_norm``) its last module with trainable parameters, which in
    transformers' decoders is the final norm."""
    layers = [s for s, _ in plan.feature_pairs + plan.attention_pairs]
    decoder = decoder_and_head(student)[0]

    def trainable(module):
        return [p for p in module.parameters() if p.requires_grad]

    if layers:
        layer = decoder.layers[min(layers)]
        norm = getattr(layer, "input_layernorm", None)
        chosen = trainable(norm) if norm is not None else trainable(layer)[:1]
    else:
        norm = getattr(decoder, "norm", None)
        last = [m for m in decoder.children() if trainable(m)][-1:]
        chosen = trainable(norm) if norm is not None else trainable(last[0]) if last else []
    return chosen or trainable(student)[-1:]
