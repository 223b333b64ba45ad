"""From a stage's config to what it computes: the LossPlan (active terms, layer maps) and
the trainable distillation heads (feature and contrastive projections) a run needs."""

from __future__ import annotations

import dataclasses

from qwen_distillation.losses.contrastive import ContrastiveHead
from qwen_distillation.losses.feature import FeatureProjector, proportional_layer_map, validate_layer_map
from qwen_distillation.training.step import Heads, LossPlan, decoder_and_head

WEIGHT_NAMES = {"kl": "kd", "ce": "ce", "feature": "feature", "attention": "attention", "contrastive": "contrastive"}


def _layers(model) -> int:
    return len(decoder_and_head(model)[0].layers)


def _hidden(model) -> int:
    return decoder_and_head(model)[1].weight.shape[1]


def layer_pairs(sub_cfg, key: str, student, teacher) -> list[tuple[int, int]]:
    """The [student, teacher] layer pairs of a feature/attention config node."""
    num_s, num_t = _layers(student), _layers(teacher)
    if sub_cfg.layer_map is not None:
        return validate_layer_map([list(p) for p in sub_cfg.layer_map], num_s, num_t, f"{key}.layer_map")
    pairs = min(sub_cfg.num_pairs, num_s) if sub_cfg.num_pairs else None
    return proportional_layer_map(num_s, num_t, pairs)


def build_plan(stage, key: str, student, teacher, vocab_size: int) -> LossPlan:
    loss = stage.loss
    weights = {WEIGHT_NAMES[name]: w for name, w in dataclasses.asdict(loss.weights).items() if w > 0}
    plan = LossPlan(weights=weights, vocab_size=vocab_size, kd=loss.kd, temperature=stage.temperature,
                    jsd_beta=loss.jsd_beta, skew_alpha=loss.skew_alpha, chunk_size=loss.chunk_size,
                    kernel=loss.kernel,
                    separate_logit_terms=loss.balancing.method != "none",
                    feature_loss=loss.feature.loss, feature_normalize=loss.feature.normalize,
                    attention_mode=loss.attention.mode, relation_heads=loss.attention.relation_heads,
                    attention_chunk=loss.attention.chunk_size,
                    contrastive_temperature=loss.contrastive.temperature,
                    domain_aware=loss.contrastive.domain_aware)
    if plan.active("feature"):
        plan.feature_pairs = layer_pairs(loss.feature, f"{key}.loss.feature", student, teacher)
    if plan.active("attention"):
        plan.attention_pairs = layer_pairs(loss.attention, f"{key}.loss.attention", student, teacher)
    return plan


def build_heads(stages: list, plans: list[LossPlan], student, teacher) -> Heads:
    """One set of heads for the whole run: the feature projections of every layer pair any
    stage matches, and one contrastive head (sized by the first stage that uses it)."""
    pairs = sorted({p for plan in plans for p in plan.feature_pairs})
    feature = FeatureProjector(pairs, _hidden(student), _hidden(teacher)) if pairs else None
    contrastive = None
    for stage, plan in zip(stages, plans):
        if plan.active("contrastive"):
            contrastive = ContrastiveHead(_hidden(student), _hidden(teacher), stage.loss.contrastive.projection_dim)
            break
    return Heads(feature=feature, contrastive=contrastive)


def loss_weights(plan: LossPlan) -> dict[str, float]:
    """The weights the balancer applies to the terms micro_batch_terms returns: ``logit``
    comes already weighted (1.0) unless the logit terms are kept apart."""
    out = {}
    if plan.separate_logit_terms:
        out.update({k: plan.weights[k] for k in ("ce", "kd") if plan.active(k)})
    elif plan.active("ce") or plan.active("kd"):
        out["logit"] = 1.0
    out.update({k: plan.weights[k] for k in ("feature", "attention", "contrastive") if plan.active(k)})
    return out


def shared_parameter(student, plan: LossPlan):
    """The layer every active term's gradient passes through (GradNorm measures gradient
    norms there): the input norm of the lowest matched student layer, else the final norm."""
    layers = [s for s, _ in plan.feature_pairs + plan.attention_pairs]
    decoder = decoder_and_head(student)[0]
    if layers:
        module = decoder.layers[min(layers)].input_layernorm
    else:
        module = decoder.norm
    return [p for p in module.parameters() if p.requires_grad] or [
        p for p in student.parameters() if p.requires_grad][-1:]
