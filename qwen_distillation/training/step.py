"""One micro-batch of distillation: forward passes and the loss sums of a stage.

Losses are returned as *sums* over valid tokens; the trainer divides by the valid tokens
of the whole optimizer step, so micro-batch 8 x accumulation 1 and 2 x 4 give the same
update.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qwen_distillation.data.manager import IGNORE_INDEX
from qwen_distillation.losses.chunked import chunked_kd_loss
from qwen_distillation.losses.logit import cross_entropy, divergence


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the lm_head of a causal LM,
    also through a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def supports_hidden_path(model: nn.Module) -> bool:
    """Whether logits are exactly ``hidden @ lm_head.weight.T`` (no bias, scaling or softcap),
    so the loss can be computed from hidden states in chunks."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    config = base.config
    return (isinstance(head, nn.Linear) and head.bias is None
            and getattr(config, "final_logit_softcapping", None) is None
            and getattr(config, "logit_scale", None) in (None, 1.0)
            and getattr(config, "logits_scaling", None) in (None, 1.0))


def valid_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift labels for next-token prediction.

    Returns (mask over positions 0..L-2 of the hidden states, shape (B, L-1), bool;
    targets at those positions, shape (N_valid,))."""
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    return mask, shifted[mask]


def micro_batch_loss(student: nn.Module, teacher: nn.Module | None, batch: dict[str, torch.Tensor], *,
                     kd_weight: float, ce_weight: float, kd: str, temperature: float, vocab_size: int,
                     chunk_size: int, jsd_beta: float, skew_alpha: float) -> tuple[torch.Tensor, dict[str, float]]:
    """``ce_weight * CE_sum + kd_weight * KD_sum`` over the valid tokens of one micro-batch.

    The teacher runs only when ``kd_weight > 0``, under no_grad, and only its decoder: its
    logits are formed chunk by chunk at valid positions, never for the whole batch.
    Returns the loss (a graph on the student) and the detached CE and KD sums.
    """
    mask, targets = valid_positions(batch["labels"])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    use_teacher = kd_weight > 0 and teacher is not None
    if chunk_size > 0 and supports_hidden_path(student) and (not use_teacher or supports_hidden_path(teacher)):
        s_decoder, s_head = decoder_and_head(student)
        s_hidden = s_decoder(**inputs).last_hidden_state[:, :-1][mask]
        if use_teacher:
            t_decoder, t_head = decoder_and_head(teacher)
            with torch.no_grad():
                t_hidden = t_decoder(**inputs).last_hidden_state[:, :-1][mask]
            loss, parts = chunked_kd_loss(
                s_hidden, s_head.weight, t_hidden, t_head.weight, targets, kind=kd, temperature=temperature,
                ce_weight=ce_weight, kd_weight=kd_weight, vocab_size=vocab_size, chunk_size=chunk_size,
                beta=jsd_beta, alpha=skew_alpha, reduction="sum")
            return loss, {"ce": float(parts["ce"]), "kd": float(parts["kd"])}
        loss = _chunked_ce(s_hidden, s_head.weight[:vocab_size], targets, chunk_size) * ce_weight
        return loss, {"ce": float(loss.detach()) / ce_weight if ce_weight else 0.0, "kd": 0.0}
    # Full-logits path: models whose logits are not a plain projection of the hidden states.
    s_logits = student(**inputs).logits[:, :-1][mask][:, :vocab_size]
    ce_sum = cross_entropy(s_logits, targets, reduction="sum")
    kd_sum = torch.zeros((), device=s_logits.device)
    if use_teacher:
        with torch.no_grad():
            t_logits = teacher(**inputs).logits[:, :-1][mask][:, :vocab_size]
        kd_sum = divergence(kd, s_logits, t_logits, targets, temperature=temperature, reduction="sum",
                            beta=jsd_beta, alpha=skew_alpha)
    loss = ce_weight * ce_sum + kd_weight * kd_sum
    return loss, {"ce": float(ce_sum.detach()), "kd": float(kd_sum.detach())}


def _chunked_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int) -> torch.Tensor:
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
def heldout_nll(model: nn.Module, batches: list[dict[str, torch.Tensor]], vocab_size: int,
                chunk_size: int = 1024) -> dict[str, float]:
    """Mean negative log-likelihood per response token over pre-collated batches."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        loss, _ = micro_batch_loss(model, None, batch, kd_weight=0.0, ce_weight=1.0, kd="forward_kl",
                                   temperature=1.0, vocab_size=vocab_size, chunk_size=chunk_size,
                                   jsd_beta=0.5, skew_alpha=0.1)
        total += float(loss)
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
