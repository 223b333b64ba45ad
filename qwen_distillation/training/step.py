"""One micro-batch of distillation: forward passes and the loss terms of a stage.

Token-level terms (``ce``, ``kd``, ``feature``, ``attention``) are returned as *sums* over
the valid (response) tokens; the trainer divides them by the valid tokens of the whole
optimizer step, so micro-batch 8 x accumulation 1 and 2 x 4 give the same update. The
``contrastive`` term is per sequence (a mean over the micro-batch's sequences).

A term whose weight is 0 is not computed, and the hooks it would need are not installed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from qwen_distillation.data.manager import IGNORE_INDEX
from qwen_distillation.losses.attention import attention_distillation_loss
from qwen_distillation.losses.contrastive import info_nce, masked_mean_pool
from qwen_distillation.losses.feature import masked_feature_loss
from qwen_distillation.losses.fused import fused_linear_kd
from qwen_distillation.losses.logit import cross_entropy, divergence
from qwen_distillation.modeling.capture import Capture, base_model

TOKEN_TERMS = ("ce", "kd", "feature", "attention")


@dataclass
class LossPlan:
    """What a stage computes: active terms (weight > 0) and their settings."""

    weights: dict[str, float]
    vocab_size: int
    kd: str = "forward_kl"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    skew_alpha: float = 0.1
    chunk_size: int = 1024
    kernel: str = "auto"
    separate_logit_terms: bool = False
    feature_pairs: list[tuple[int, int]] = field(default_factory=list)
    feature_loss: str = "mse"
    feature_normalize: bool = True
    attention_pairs: list[tuple[int, int]] = field(default_factory=list)
    attention_mode: str = "relations"
    relation_heads: int = 8
    attention_chunk: int = 256
    contrastive_temperature: float = 0.1
    domain_aware: bool = False
    teacher_stream: bool = False

    def active(self, name: str) -> bool:
        return self.weights.get(name, 0.0) > 0

    @property
    def needs_teacher(self) -> bool:
        return any(self.active(n) for n in ("kd", "feature", "attention", "contrastive"))


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the lm_head of a causal LM,
    also through a peft wrapper."""
    base = base_model(model)
    return base.get_decoder(), base.get_output_embeddings()


def supports_hidden_path(model: nn.Module) -> bool:
    """Whether logits are exactly ``hidden @ lm_head.weight.T`` (no bias, scaling or softcap),
    so the loss can be computed from hidden states in chunks."""
    base = base_model(model)
    head, config = base.get_output_embeddings(), base.config
    return (isinstance(head, nn.Linear) and head.bias is None
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) in (None, 1.0)
            and getattr(config, "logits_scaling", None) in (None, 1.0))


def position_mask(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions whose *next* token is a response token, i.e. the positions
    whose hidden state predicts a labelled token (the last position never does)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


class Heads(nn.Module):
    """Trainable distillation modules that are not part of the student: feature
    projections and contrastive projections. Saved and restored with the checkpoint."""

    def __init__(self, feature=None, contrastive=None):
        super().__init__()
        self.feature = feature
        self.contrastive = contrastive


def _forward(model, inputs, *, hidden_layers, qkv_layers, grad: bool):
    decoder, _ = decoder_and_head(model)
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()), \
            Capture(model, hidden_layers=hidden_layers, qkv_layers=qkv_layers) as capture:
        last = decoder(**inputs).last_hidden_state
    return last, capture


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def run_pair(student_pass, teacher_pass, *, concurrent: bool):
    """``(student_pass(), teacher_pass())`` (``(None, None)`` for a missing teacher pass).

    With ``concurrent`` (CUDA), the frozen teacher's forward is launched first on a side stream
    and the student's on the current stream, so the GPU fills the gaps while the host launches
    one model's kernels with the other's (7B -> 1.5B step 374.5 -> 358.9 ms on an H100,
    docs/performance.md); the current stream then waits for the side stream, so everything
    after this reads finished teacher outputs. The side stream first waits for the current one,
    so a block the teacher frees is reused by the next teacher pass only after every kernel
    queued before that pass (the ones that read the teacher's outputs included) has run. The
    arithmetic is unchanged.
    """
    if not concurrent or teacher_pass is None:
        student_out = student_pass()
        return student_out, (teacher_pass() if teacher_pass is not None else (None, None))
    main = torch.cuda.current_stream()
    side = _SIDE_STREAMS.get(main.device)
    if side is None:
        side = _SIDE_STREAMS[main.device] = torch.cuda.Stream(device=main.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        teacher_out = teacher_pass()
    student_out = student_pass()
    main.wait_stream(side)
    return student_out, teacher_out


def micro_batch_terms(student: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor],
                      plan: LossPlan, heads: Heads | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Loss terms of one micro-batch.

    Returns (terms, info): ``terms`` maps each active term to a tensor with a graph on the
    student (and heads): ``logit`` = ``w_ce * CE_sum + w_kd * KD_sum`` fused, unless
    ``plan.separate_logit_terms`` asks for ``ce`` and ``kd`` apart (gradient balancing);
    ``feature`` and ``attention`` sums over valid tokens; ``contrastive`` a mean over
    sequences. ``info`` holds detached values to log (``ce``, ``kd`` sums, ...).
    """
    labels = batch["labels"]
    mask = position_mask(labels)
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    # use_cache=False: nothing is generated here, and transformers would otherwise copy every
    # layer's keys and values into a cache (docs/performance.md).
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    concurrent = plan.teacher_stream and batch["input_ids"].is_cuda
    use_teacher = teacher is not None and plan.needs_teacher
    s_feat = [s for s, _ in plan.feature_pairs] if plan.active("feature") else []
    t_feat = [t for _, t in plan.feature_pairs] if plan.active("feature") else []
    s_attn = [s for s, _ in plan.attention_pairs] if plan.active("attention") else []
    t_attn = [t for _, t in plan.attention_pairs] if plan.active("attention") else []
    hidden_path = plan.chunk_size > 0 and supports_hidden_path(student) and (
        not use_teacher or supports_hidden_path(teacher))
    terms: dict[str, torch.Tensor] = {}
    info: dict[str, float] = {}
    w_ce, w_kd = plan.weights.get("ce", 0.0), plan.weights.get("kd", 0.0)

    if hidden_path:
        def teacher_pass():
            with torch.no_grad():
                return _forward(teacher, inputs, hidden_layers=t_feat, qkv_layers=t_attn, grad=False)

        (s_last, s_cap), (t_last, t_cap) = run_pair(
            lambda: _forward(student, inputs, hidden_layers=s_feat, qkv_layers=s_attn, grad=True),
            teacher_pass if use_teacher else None, concurrent=concurrent)
        s_head = decoder_and_head(student)[1].weight
        s_valid = s_last[mask]
        if w_kd > 0 and use_teacher:
            t_head = decoder_and_head(teacher)[1].weight
            t_valid = t_last[mask]
            kw = dict(kind=plan.kd, temperature=plan.temperature, vocab_size=plan.vocab_size,
                      chunk_size=plan.chunk_size, beta=plan.jsd_beta, alpha=plan.skew_alpha, reduction="sum",
                      kernel=plan.kernel)
            if plan.separate_logit_terms:
                ce, parts_ce = fused_linear_kd(s_valid, s_head, t_valid, t_head, targets, ce_weight=1.0,
                                               kd_weight=0.0, **kw)
                kd, parts_kd = fused_linear_kd(s_valid, s_head, t_valid, t_head, targets, ce_weight=0.0,
                                               kd_weight=1.0, **kw)
                terms.update({name: value for name, value in (("ce", ce), ("kd", kd)) if plan.active(name)})
                info.update({"ce": float(parts_ce["ce"]), "kd": float(parts_kd["kd"])})
            else:
                logit, parts = fused_linear_kd(s_valid, s_head, t_valid, t_head, targets, ce_weight=w_ce,
                                               kd_weight=w_kd, **kw)
                terms["logit"] = logit
                info.update({"ce": float(parts["ce"]), "kd": float(parts["kd"])})
        elif w_ce > 0:
            ce = chunked_ce(s_valid, s_head[: plan.vocab_size], targets, plan.chunk_size)
            terms["ce" if plan.separate_logit_terms else "logit"] = ce if plan.separate_logit_terms else w_ce * ce
            info.update({"ce": float(ce.detach()), "kd": 0.0})
    else:
        # Full-logits path: models whose logits are not a plain projection of the hidden states.
        def full_pass(model, hidden_layers, qkv_layers):
            with Capture(model, hidden_layers=hidden_layers, qkv_layers=qkv_layers) as cap:
                return model(**inputs, output_hidden_states=plan.active("contrastive")), cap

        def teacher_pass():
            with torch.no_grad():
                return full_pass(teacher, t_feat, t_attn)

        (out, s_cap), (t_out, t_cap) = run_pair(lambda: full_pass(student, s_feat, s_attn),
                                                teacher_pass if use_teacher else None, concurrent=concurrent)
        s_logits = out.logits[:, :-1][mask[:, :-1]][:, : plan.vocab_size]
        s_last = out.hidden_states[-1] if plan.active("contrastive") else None
        ce = cross_entropy(s_logits, targets, reduction="sum")
        kd = torch.zeros((), device=s_logits.device)
        t_last = None
        if use_teacher:
            t_last = t_out.hidden_states[-1] if plan.active("contrastive") else None
            if w_kd > 0:
                t_logits = t_out.logits[:, :-1][mask[:, :-1]][:, : plan.vocab_size]
                kd = divergence(plan.kd, s_logits, t_logits, targets, temperature=plan.temperature,
                                reduction="sum", beta=plan.jsd_beta, alpha=plan.skew_alpha)
        if plan.separate_logit_terms:
            terms.update({k: v for k, v in (("ce", ce), ("kd", kd)) if plan.weights.get(k, 0) > 0})
        elif w_ce > 0 or w_kd > 0:
            terms["logit"] = w_ce * ce + w_kd * kd
        info.update({"ce": float(ce.detach()), "kd": float(kd.detach())})

    if plan.active("feature") and use_teacher:
        states_s = [s_cap.hidden[s] for s in s_feat]
        states_t = [t_cap.hidden[t] for t in t_feat]
        terms["feature"] = masked_feature_loss(states_s, states_t, mask, heads.feature, loss=plan.feature_loss,
                                               normalize=plan.feature_normalize, reduction="sum")
    if plan.active("attention") and use_teacher:
        key_mask = batch["attention_mask"].bool()
        total = 0.0
        for s, t in plan.attention_pairs:
            total = total + attention_distillation_loss(
                s_cap.qkv[s], t_cap.qkv[t], mask, key_mask, mode=plan.attention_mode,
                relation_heads=plan.relation_heads, chunk_size=plan.attention_chunk, reduction="sum")
        terms["attention"] = total / len(plan.attention_pairs)
    if plan.active("contrastive") and use_teacher:
        z_s, z_t = heads.contrastive(masked_mean_pool(s_last, mask), masked_mean_pool(t_last.detach(), mask))
        valid = mask.any(dim=1)
        terms["contrastive"] = info_nce(z_s, z_t, temperature=plan.contrastive_temperature,
                                        domains=batch.get("domain") if plan.domain_aware else None, valid=valid)
    for name in ("feature", "attention", "contrastive"):
        if name in terms:
            info[name] = float(terms[name].detach())
    return terms, info


def chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Sum of token CE from hidden states (N, H) and lm_head weight (V, H), chunked over N."""
    from torch.utils.checkpoint import checkpoint

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        end = start + chunk_size
        total = total + checkpoint(
            lambda h, t: cross_entropy(h @ weight.T, t, reduction="sum"), hidden[start:end], targets[start:end],
            use_reentrant=False)
    return total


@torch.no_grad()
def per_example_nll(model: nn.Module, batch: dict[str, torch.Tensor], vocab_size: int,
                    chunk_size: int = 1024) -> torch.Tensor:
    """Mean NLL per response token of each sequence, shape (B,); NaN for a sequence with
    no response token. Used to score examples for hard-example sampling."""
    labels = batch["labels"]
    mask = position_mask(labels)
    decoder, head = decoder_and_head(model)
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     use_cache=False).last_hidden_state
    rows = mask.nonzero()[:, 0]
    targets = labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]
    valid = hidden[mask]
    sums = torch.zeros(labels.shape[0], device=hidden.device)
    weight = head.weight[:vocab_size]
    for start in range(0, valid.shape[0], chunk_size):
        logits = (valid[start:start + chunk_size] @ weight.T).float()
        nll = torch.nn.functional.cross_entropy(logits, targets[start:start + chunk_size], reduction="none")
        sums.index_add_(0, rows[start:start + chunk_size], nll)
    counts = mask.sum(dim=1)
    return torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))


@torch.no_grad()
def heldout_nll(model: nn.Module, batches: list[dict[str, torch.Tensor]], vocab_size: int,
                chunk_size: int = 1024) -> dict[str, float]:
    """Mean negative log-likelihood per response token over pre-collated batches."""
    model.eval()
    plan = LossPlan(weights={"ce": 1.0}, vocab_size=vocab_size, chunk_size=chunk_size)
    total, count = 0.0, 0
    for batch in batches:
        _, info = micro_batch_terms(model, None, batch, plan)
        total += info["ce"]
        count += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    nll = total / max(count, 1)
    return {"nll": nll, "ppl": math.exp(min(nll, 50.0)), "tokens": count}


def lr_lambda(total_steps: int, warmup_steps: int, scheduler: str, min_lr_ratio: float):
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
