"""The trainable unit: one ``nn.Module`` holding what is trained, whose forward turns a
micro-batch and the teacher's outputs into the stage's loss terms.

Token-level terms (``ce``, ``kd``, ``feature``, ``attention``, or the fused ``logit``) are
returned as *sums* over the valid (response) tokens; :func:`per_step_mean` divides them by the
valid tokens of the whole optimizer step, so micro-batch 8 x accumulation 1 and 2 x 4 give the
same update. The ``contrastive`` term is per sequence (a mean over the micro-batch's
sequences), averaged over the step's micro-batches.

A packed micro-batch (``train.packing``, ``data.manager.collate_packed``) holds the same
examples as the unpacked one, several to a row: the token-level terms read the same positions
(no target crosses an example), and the attention and contrastive terms are taken per example
(``segments``), so every term equals the unpacked batch's, up to float rounding.

A term whose weight is 0 is not computed, and the hooks it would need are not installed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qwen_distillation.losses.attention import attention_distillation_loss
from qwen_distillation.losses.cached import CompletedTopK, cached_teacher_kd
from qwen_distillation.losses.chunked import chunked_cross_entropy
from qwen_distillation.losses.contrastive import ContrastiveHead, info_nce, masked_mean_pool, segment_mean_pool
from qwen_distillation.losses.feature import FeatureProjector, masked_feature_loss
from qwen_distillation.losses.fused import apply_fused_kd
from qwen_distillation.losses.logit import cross_entropy, divergence
from qwen_distillation.losses.topk import topk_divergence
from qwen_distillation.modeling.capture import CapturedForward, forward_captured
from qwen_distillation.modeling.parts import (decoder_and_head, gather_positions, gather_targets, model_inputs,
                                              position_mask, response_positions, weight_shape)
from qwen_distillation.training.plan import LossPlan
from qwen_distillation.training.teacher import Launched
from qwen_distillation.training.teacher_cache import CachedTopK


# Logged by a stage that reads a teacher cache with tail=bucket: the student's mean T = 1 mass outside the
# cached top k (CompletedTopK.student_tail_mass), not a loss term.
STUDENT_TAIL = "cache/student_mass_outside_topk"


class Heads(nn.Module):
    """Trainable distillation modules that are not part of the student: feature
    projections and contrastive projections. Saved and restored with the checkpoint."""

    def __init__(self, feature: FeatureProjector | None = None, contrastive: ContrastiveHead | None = None):
        super().__init__()
        self.feature = feature
        self.contrastive = contrastive


def build_heads(stages: list, plans: list[LossPlan], student: nn.Module, teacher: nn.Module | None) -> Heads:
    """One set of heads for the whole run: the feature projections of every layer pair any
    stage matches, and one contrastive head (sized by the first stage that uses it)."""
    student_width = weight_shape(decoder_and_head(student)[1].weight)[1]
    if teacher is None:  # every stage reads the teacher's cache: no term compares hidden states
        return Heads()
    teacher_width = weight_shape(decoder_and_head(teacher)[1].weight)[1]
    pairs = sorted({p for plan in plans for p in plan.feature_pairs})
    feature = FeatureProjector(pairs, student_width, teacher_width) if pairs else None
    contrastive = None
    for stage, plan in zip(stages, plans):
        if plan.active("contrastive"):
            contrastive = ContrastiveHead(student_width, teacher_width, stage.loss.contrastive.projection_dim)
            break
    return Heads(feature=feature, contrastive=contrastive)


class DistillationModule(nn.Module):
    """The student (or its peft wrapper) and the distillation heads: every trained parameter.

    ``plan`` is the current stage's :class:`LossPlan` (set at the start of each stage).
    ``forward(batch, teacher)`` runs the student and returns ``(terms, info)``: ``terms`` maps
    each active term to a scalar tensor with a graph on the student and heads (``logit`` =
    ``w_ce * CE_sum + w_kd * KD_sum`` fused, unless the plan keeps ``ce`` and ``kd`` apart;
    ``feature`` and ``attention`` sums over valid tokens; ``contrastive`` a mean over
    sequences); ``info`` holds the unweighted values to log (``ce``, ``kd``, ...), as detached 0-d
    tensors (0.0 for a term not computed): the caller sums them on the device and reads them once a
    step, since reading each as a float would wait for the device at every micro-batch.
    """

    def __init__(self, student: nn.Module, heads: Heads):
        super().__init__()
        self.student = student
        self.heads = heads
        self.plan: LossPlan | None = None

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer updates: the student's trainable parameters (all, or LoRA's), then
        the heads'."""
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, batch: dict[str, torch.Tensor],
                teacher: Launched[CapturedForward] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        plan = self.plan
        hidden_layers, qkv_layers = plan.captured_layers(side=0)
        student = forward_captured(self.student, model_inputs(batch), hidden_path=plan.hidden_path,
                                   hidden_layers=hidden_layers, qkv_layers=qkv_layers,
                                   output_hidden_states=plan.active("contrastive"))
        return loss_terms(plan, batch, student, teacher.result() if teacher is not None else None, self.heads)


def _fused_logit_terms(plan: LossPlan, **fused) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """CE + KD through the fused-linear kernel (``apply_fused_kd`` with ``fused`` as its tensors): one
    ``logit`` term, or ``ce`` and ``kd`` apart when the stage balances them (GradNorm/PCGrad)."""
    if not plan.separate_logit_terms:
        logit, parts = apply_fused_kd(plan.kd, **fused)
        return {"logit": logit}, parts
    kd, parts_kd = apply_fused_kd(dataclasses.replace(plan.kd, ce_weight=0.0, kd_weight=1.0), **fused)
    if not plan.active("ce"):  # weights.ce=0: no CE pass (the KD pass gives the CE value to log)
        return {"kd": kd}, parts_kd
    ce, parts_ce = apply_fused_kd(dataclasses.replace(plan.kd, ce_weight=1.0, kd_weight=0.0), **fused)
    return {"ce": ce, "kd": kd}, {"ce": parts_ce["ce"], "kd": parts_kd["kd"]}


def _logit_terms(plan: LossPlan, student: CapturedForward, teacher: CapturedForward | CachedTopK | None,
                 positions: torch.Tensor,
                 targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(terms, unweighted ce/kd sums) of the CE and KD terms, from hidden states in chunks
    (the fused kernel) or from full logits; ``positions`` (N,) are the labelled positions
    (``modeling.parts.response_positions``), ``targets`` (N,) their next tokens."""
    w_ce, w_kd = plan.weights.get("ce", 0.0), plan.weights.get("kd", 0.0)
    if isinstance(teacher, CachedTopK):
        return _cached_logit_terms(plan, student, teacher, positions, targets)
    if plan.hidden_path:
        s_valid, s_head = gather_positions(student.last_hidden, positions), student.head_weight
        if w_kd > 0 and teacher is not None:
            t_valid = gather_positions(teacher.last_hidden, positions)
            if teacher.head_fp8 is not None:  # model.teacher.fp8_head: the teacher's logits by FP8 GEMMs
                return _fused_logit_terms(plan, student_hidden=s_valid, student_weight=s_head, teacher_hidden=None,
                                          teacher_weight=None, labels=targets, vocab_size=plan.vocab_size,
                                          teacher_logits=teacher.head_fp8.rows(t_valid, plan.vocab_size))
            return _fused_logit_terms(plan, student_hidden=s_valid, student_weight=s_head, teacher_hidden=t_valid,
                                      teacher_weight=teacher.head_weight, labels=targets, vocab_size=plan.vocab_size)
        if w_ce <= 0:
            return {}, {}
        ce = chunked_cross_entropy(s_valid, s_head[: plan.vocab_size], targets, plan.kd.chunk_size)
        terms = {"ce": ce} if plan.separate_logit_terms else {"logit": w_ce * ce}
        return terms, {"ce": ce.detach()}  # no "kd": a divergence not computed is logged NaN, not 0
    # Full-logits path: models whose logits are not a plain projection of the hidden states.
    s_logits = gather_positions(student.logits, positions)[:, : plan.vocab_size]
    ce = cross_entropy(s_logits, targets, reduction="sum")
    kd = torch.zeros((), device=s_logits.device)
    if teacher is not None and w_kd > 0:
        t_logits = gather_positions(teacher.logits, positions)[:, : plan.vocab_size]
        kd = divergence(plan.kd.kind, s_logits, t_logits, targets, temperature=plan.kd.temperature,
                        reduction="sum", beta=plan.kd.beta, alpha=plan.kd.alpha)
    if plan.separate_logit_terms:
        terms = {name: value for name, value in (("ce", ce), ("kd", kd)) if plan.active(name)}
    else:
        terms = {"logit": w_ce * ce + w_kd * kd} if w_ce > 0 or w_kd > 0 else {}
    return terms, _logit_parts(ce, kd if teacher is not None and w_kd > 0 else None)


def _logit_parts(ce: torch.Tensor, kd: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The unweighted ``ce``/``kd`` sums to log; ``kd`` only when it was computed (a stage with
    ``loss.weights.kd=0`` logs ``loss/kd`` as NaN, not as a divergence of 0)."""
    return {"ce": ce.detach()} if kd is None else {"ce": ce.detach(), "kd": kd.detach()}


def _cached_logit_terms(plan: LossPlan, student: CapturedForward, teacher: CachedTopK, positions: torch.Tensor,
                        targets: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The CE and sparse top-k KD terms against a cached teacher (``stageN.teacher.source=cache``):
    ``bucket`` through the fused-linear kernel of the online teacher with the completed cached
    teacher as its logits (:class:`~qwen_distillation.losses.cached.CompletedTopK`), else checkpointed
    chunks of student logits (:func:`~qwen_distillation.losses.cached.cached_teacher_kd`)."""
    w_ce, w_kd = plan.weights.get("ce", 0.0), plan.weights.get("kd", 0.0)
    options = dict(kind=plan.kd.kind, temperature=plan.kd.temperature, tail=plan.teacher_tail, beta=plan.kd.beta)
    if plan.hidden_path and w_kd > 0 and plan.teacher_tail == "bucket" and plan.kd.kernel != "liger":
        completed = CompletedTopK(teacher.ids, teacher.logprobs, teacher.tail_logmass)
        terms, parts = _fused_logit_terms(plan, student_hidden=gather_positions(student.last_hidden, positions),
                                          student_weight=student.head_weight, teacher_hidden=None,
                                          teacher_weight=None, labels=targets, vocab_size=plan.vocab_size,
                                          teacher_logits=completed)
        if completed.student_tail_mass is not None:  # a sum over the tokens, logged as a per-token mean
            parts[STUDENT_TAIL] = completed.student_tail_mass
        return terms, parts
    if plan.hidden_path:
        ce, kd = cached_teacher_kd(gather_positions(student.last_hidden, positions),
                                   student.head_weight[: plan.vocab_size], targets,
                                   teacher.ids, teacher.logprobs, teacher.tail_logmass, ce=w_ce > 0, kd=w_kd > 0,
                                   chunk_size=plan.kd.chunk_size, **options)
    else:
        s_logits = gather_positions(student.logits, positions)[:, : plan.vocab_size]
        ce = cross_entropy(s_logits, targets, reduction="sum")
        kd = topk_divergence(options.pop("kind"), s_logits, teacher.ids, teacher.logprobs, targets,
                             teacher_tail_logmass=teacher.tail_logmass, reduction="sum", **options)
    if plan.separate_logit_terms:
        terms = {name: value for name, value in (("ce", ce), ("kd", kd)) if plan.active(name)}
    else:
        terms = {"logit": w_ce * ce + w_kd * kd} if w_ce > 0 or w_kd > 0 else {}
    return terms, _logit_parts(ce, kd if w_kd > 0 else None)


def loss_terms(plan: LossPlan, batch: dict[str, torch.Tensor], student: CapturedForward,
               teacher: CapturedForward | CachedTopK | None, heads: Heads) -> tuple[dict[str, torch.Tensor], dict]:
    """The loss terms of one micro-batch from both models' forward passes (see
    :class:`DistillationModule`); ``teacher`` is None when no active term reads it."""
    labels = batch["labels"]
    # The labelled positions as flat indices, from the host when the batch brings them (a training
    # step does, ``response_positions``): gathering them waits for nothing, a boolean mask would.
    positions = batch.get("response_positions")
    if positions is None:
        positions = response_positions(labels)
    mask, targets = position_mask(labels), gather_targets(labels, positions)
    terms, parts = _logit_terms(plan, student, teacher, positions, targets)
    info = {name: value.detach() if isinstance(value, torch.Tensor) else value for name, value in parts.items()}
    if teacher is not None and plan.active("feature"):
        states_s = [student.hidden[s] for s, _ in plan.feature_pairs]
        states_t = [teacher.hidden[t] for _, t in plan.feature_pairs]
        terms["feature"] = masked_feature_loss(states_s, states_t, mask, heads.feature, positions=positions,
                                               loss=plan.feature_loss, normalize=plan.feature_normalize,
                                               reduction="sum")
    # A packed batch (train.packing) marks each position's example; the row-wide terms are taken
    # per example, as each would be alone in its row.
    segments = batch.get("segments")
    if teacher is not None and plan.active("attention"):
        key_mask = batch["attention_mask"].bool() if segments is None else segments >= 0
        # Host ints: each chunk of queries reads only the keys of its own examples (no device wait).
        starts = batch["sequence_starts"].tolist() if "sequence_starts" in batch else None
        total = 0.0
        for s, t in plan.attention_pairs:
            total = total + attention_distillation_loss(
                student.qkv[s], teacher.qkv[t], mask, key_mask, mode=plan.attention_mode,
                relation_heads=plan.relation_heads, chunk_size=plan.attention_chunk, reduction="sum",
                segments=segments, sequence_starts=starts)
        terms["attention"] = total / len(plan.attention_pairs)
    if teacher is not None and plan.active("contrastive"):
        if segments is None:
            pooled_s, pooled_t = masked_mean_pool(student.last_hidden, mask), masked_mean_pool(
                teacher.last_hidden.detach(), mask)
            valid = mask.any(dim=1)
        else:
            # The examples' count from a shape where it can (segments.max() would wait for the device).
            count = batch["domain"].numel() if "domain" in batch else int(segments.max()) + 1
            pooled_s, valid = segment_mean_pool(student.last_hidden, mask, segments, count)
            pooled_t, _ = segment_mean_pool(teacher.last_hidden.detach(), mask, segments, count)
        z_s, z_t = heads.contrastive(pooled_s, pooled_t)
        terms["contrastive"] = info_nce(z_s, z_t, temperature=plan.contrastive_temperature,
                                        domains=batch.get("domain") if plan.domain_aware else None, valid=valid)
    for name in ("feature", "attention", "contrastive"):
        if name in terms:
            info[name] = terms[name].detach()
    return terms, info


def per_step_mean(values: dict, tokens: int, micro_batches: int) -> dict:
    """Token-level sums divided by the step's valid tokens, the per-sequence ``contrastive``
    term by ``micro_batches``, the step's micro-batches that hold a pair (:func:`pair_batches`): the
    step's per-token mean of every term."""
    return {name: value / (max(micro_batches, 1) if name == "contrastive" else max(tokens, 1))
            for name, value in values.items()}


def pair_batches(batches: list[dict]) -> int:
    """How many of a step's micro-batches hold two examples or more, the ones whose contrastive term has
    negatives: one of a single example (the remainder of a token budget, ``stageN.tokens_per_step``, or of
    ``train.pack_step``) adds exactly 0, and counting it halved the term and its gradient. Counted on the
    host from ``domain`` (one entry per example, packed or not)."""
    return sum(1 for batch in batches if holds_pair(batch))


def holds_pair(batch: dict) -> bool:
    """Whether a micro-batch holds two examples or more (its contrastive term has negatives)."""
    return (batch["domain"].numel() if "domain" in batch else batch["input_ids"].shape[0]) > 1
