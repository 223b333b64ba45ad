"""Contrastive distillation: InfoNCE between student and teacher sequence representations.

Each sequence is mean-pooled over its valid tokens on both sides (:func:`masked_mean_pool`),
projected into a shared space and L2-normalised (:class:`ContrastiveHead`), and the student's
representation of sequence i must pick the teacher's representation of sequence i out of the
batch (:func:`info_nce`). Unlike the token losses, this loss is per *sequence*: it returns the
mean over the valid sequences of a micro-batch, and the trainer weights it per micro-batch.

Gradient flow: the caller passes *detached* teacher hidden states (the teacher is never
trained); ``z_teacher`` still carries gradient, but only into the head's teacher projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 -> fp32; fp32 and fp64 are kept (fp64 for gradcheck).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def masked_mean_pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of each sequence's hidden states over its valid tokens, upcast to fp32.

    Masked positions are removed with ``torch.where`` (not a multiplication), so whatever
    they hold, NaN included, reaches neither the value nor the gradient. A row with no valid
    token gives a zero vector; mark it invalid for :func:`info_nce` (``valid=mask.any(-1)``).

    Args:
        states (torch.Tensor): shape (B, L, H).
        mask (torch.Tensor): shape (B, L), bool; True marks the tokens that count.

    Returns:
        torch.Tensor: shape (B, H), fp32 (fp64 for fp64 inputs).
    """
    if states.dim() != 3 or mask.shape != states.shape[:2]:
        raise ValueError(f"states {tuple(states.shape)} must be (B, L, H) and mask {tuple(mask.shape)} (B, L)")
    mask = mask.to(torch.bool)
    states = _upcast(states)
    total = torch.where(mask.unsqueeze(-1), states, 0.0).sum(dim=1)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1)  # an integer count: empty rows give 0 / 1
    return total / count.to(states.dtype)


def segment_mean_pool(states: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor,
                      num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each example's hidden states over its valid tokens, for packed rows: what
    :func:`masked_mean_pool` gives each example when it has a row of its own.

    Only the selected positions are read (indexing, not a multiplication), so masked positions,
    NaN included, reach neither the value nor the gradient.

    Args:
        states (torch.Tensor): shape (B, L, H).
        mask (torch.Tensor): shape (B, L), bool; True marks the tokens that count.
        segments (torch.Tensor): shape (B, L), int64: the example (0 .. num_segments - 1) each
            position belongs to, -1 on padding.
        num_segments (int): N, the examples of the batch.

    Returns:
        tuple[torch.Tensor, torch.Tensor]: pooled (N, H), fp32 (fp64 for fp64 inputs), zero for an
        example with no valid token; and valid (N,) bool, whether the example has one.
    """
    if states.dim() != 3 or mask.shape != states.shape[:2] or segments.shape != states.shape[:2]:
        raise ValueError(f"states {tuple(states.shape)} must be (B, L, H), mask {tuple(mask.shape)} and segments "
                         f"{tuple(segments.shape)} (B, L)")
    keep = mask.to(torch.bool) & (segments >= 0)
    rows, index = _upcast(states[keep]), segments[keep]
    total = rows.new_zeros((num_segments, states.shape[-1])).index_add(0, index, rows)
    count = torch.bincount(index, minlength=num_segments)
    return total / count.clamp(min=1).unsqueeze(-1).to(total.dtype), count > 0


class ContrastiveHead(nn.Module):
    """Two trainable projections into a shared ``dim``-dimensional space, then L2 normalisation.

    The projections have a bias: mean-pooled hidden states of different sequences share a
    large common component (anisotropy), and a bias lets the head subtract it, which a purely
    linear map cannot. Default ``nn.Linear`` initialisation.

    Args:
        student_hidden (int): H_s, width of the student's pooled states.
        teacher_hidden (int): H_t, width of the teacher's pooled states.
        dim (int): D, width of the shared space.
    """

    def __init__(self, student_hidden: int, teacher_hidden: int, dim: int):
        super().__init__()
        self.student_projection = nn.Linear(student_hidden, dim)
        self.teacher_projection = nn.Linear(teacher_hidden, dim)

    def forward(
        self, student_pooled: torch.Tensor, teacher_pooled: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Project and L2-normalise both sides.

        Args:
            student_pooled (torch.Tensor): shape (B, H_s), the student.
            teacher_pooled (torch.Tensor): shape (B, H_t), the teacher; detached here, so the
                gradient of ``z_t`` stops at the teacher projection.

        Returns:
            tuple[torch.Tensor, torch.Tensor]: (z_s, z_t), each shape (B, D) with unit rows
            (``F.normalize``; an all-zero row stays zero instead of becoming NaN).
        """
        s_proj, t_proj = self.student_projection, self.teacher_projection
        z_s = s_proj(student_pooled.to(s_proj.weight.dtype))
        z_t = t_proj(teacher_pooled.detach().to(t_proj.weight.dtype))
        return F.normalize(z_s, dim=-1), F.normalize(z_t, dim=-1)


def info_nce(
    z_student: torch.Tensor,
    z_teacher: torch.Tensor,
    *,
    temperature: float = 0.1,
    domains: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE with in-batch negatives, optionally domain-aware.

    ``logits[i, j] = z_student[i] . z_teacher[j] / temperature``. In the student -> teacher
    direction, anchor i (a student row) scores every valid teacher row; in the teacher ->
    student direction, anchor j (a teacher row) scores every valid student row (the columns
    of ``logits``). There are no student-student or teacher-teacher pairs, so the diagonal is
    the positive pair (student i, teacher i), never an anchor compared with itself. The loss
    is the average of the two directions, so both projections are pulled to the shared space.

    Positives P(i): without ``domains`` only i itself (plain InfoNCE, cross-entropy with
    target i). With ``domains``, every valid row of the same domain (supervised-contrastive
    style, Khosla et al. 2020, L_out): ``loss_i = -mean_{j in P(i)} log softmax_j(logits_i)``.
    Since i is always in P(i), P(i) is never empty. Same-domain rows are positives, not
    negatives, so two medical sequences are not pushed apart.

    Rows where ``valid`` is False are neither anchors nor candidates: their contents change
    nothing. With fewer than 2 valid rows there are no negatives; each valid anchor then has
    a single candidate and the loss is exactly 0.0, still in the graph, with zero gradients.

    Args:
        z_student (torch.Tensor): shape (B, D), student representations (normally unit rows).
        z_teacher (torch.Tensor): shape (B, D), teacher representations (normally unit rows);
            not detached here: its gradient goes into the head's teacher projection, while the
            caller passes detached teacher states so nothing reaches the teacher model.
        temperature (float): > 0; lower sharpens the softmax over candidates.
        domains (torch.Tensor | None): shape (B,), integer domain id per row.
        valid (torch.Tensor | None): shape (B,), bool; False for rows with no valid token.

    Returns:
        torch.Tensor: scalar, the mean over valid anchors (per sequence, not per token),
        fp32 (fp64 for fp64 inputs).
    """
    if z_student.dim() != 2 or z_student.shape != z_teacher.shape:
        raise ValueError(
            f"z_student {tuple(z_student.shape)} and z_teacher {tuple(z_teacher.shape)} must both be (B, D)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch = z_student.shape[0]
    device = z_student.device
    if valid is None:
        valid = torch.ones(batch, dtype=torch.bool, device=device)
    valid = valid.to(torch.bool)
    if valid.shape != (batch,):
        raise ValueError(f"valid must have shape ({batch},), got {tuple(valid.shape)}")
    if domains is not None and (domains.shape != (batch,) or domains.is_floating_point()):
        raise ValueError(f"domains must be an integer tensor of shape ({batch},), got {domains.dtype} "
                         f"{tuple(domains.shape)}")

    # Invalid rows are zeroed before the matmul so their contents (even NaN) cannot leak in.
    z_s = torch.where(valid.unsqueeze(-1), _upcast(z_student), 0.0)
    z_t = torch.where(valid.unsqueeze(-1), _upcast(z_teacher), 0.0).to(z_s.dtype)
    logits = z_s @ z_t.T / temperature

    eye = torch.eye(batch, dtype=torch.bool, device=device)
    # The diagonal stays a candidate even for invalid rows so that no softmax row is all -inf
    # (that would be NaN, and NaN * 0 in backward is still NaN); those rows are dropped below.
    candidates = (valid.unsqueeze(1) & valid.unsqueeze(0)) | eye
    positives = eye if domains is None else candidates & (domains.unsqueeze(1) == domains.unsqueeze(0))
    masked = logits.masked_fill(~candidates, float("-inf"))

    def direction_loss(scores: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        log_prob = F.log_softmax(scores, dim=-1)
        # torch.where, not log_prob * pos: the -inf of non-candidates times 0 would be NaN.
        return -torch.where(pos, log_prob, 0.0).sum(dim=-1) / pos.sum(dim=-1).to(log_prob.dtype)

    per_row = 0.5 * (direction_loss(masked, positives) + direction_loss(masked.T, positives.T))
    total = torch.where(valid, per_row, 0.0).sum()
    return total / valid.sum().clamp(min=1).to(total.dtype)
