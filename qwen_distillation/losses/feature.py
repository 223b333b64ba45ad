"""Hidden-state (feature) distillation: match student layer outputs to teacher layer outputs.

A *layer map* is a list of ``(s, t)`` pairs: the output of student decoder layer ``s`` is
matched to the output of teacher decoder layer ``t`` (both 0-based). With Hugging Face's
``output_hidden_states=True`` that is ``hidden_states[s + 1]`` and ``hidden_states[t + 1]``
(``hidden_states[0]`` is the embedding output). Note that for Qwen2 the last entry of
``hidden_states`` is taken *after* the final RMSNorm, so a pair on the last layer matches
normalised states on both sides.

When the widths differ (Qwen2.5-0.5B has 896, 7B has 3584), a trainable
:class:`FeatureProjector` maps student states into the teacher's width. The loss itself,
:func:`feature_loss`:

* takes states that are already projected and already restricted to valid tokens;
* upcasts to fp32 (fp64 inputs stay fp64, so ``gradcheck`` works);
* treats the teacher as a constant (teacher states are detached);
* averages over the pairs, then sums over tokens (``"sum"``) or averages per token (``"mean"``);
* returns ``0.0`` that is still part of the autograd graph when there are no tokens.

:func:`masked_feature_loss` does the token selection and projection for (B, L, H) states.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qwen_distillation.errors import ConfigError

FEATURE_LOSSES = ("mse", "cosine")
REDUCTIONS = ("mean", "sum")


def _round_half_up(numerator: int, denominator: int) -> int:
    # Integer arithmetic: Python's round() rounds half to even, and floats could tip x.5 either way.
    return (2 * numerator + denominator) // (2 * denominator)


def proportional_layer_map(
    num_student_layers: int, num_teacher_layers: int, num_pairs: int | None = None
) -> list[tuple[int, int]]:
    """Pair student layers with teacher layers at the same relative depth.

    Student layer ``s`` (0-based; its output is matched) goes with teacher layer
    ``t = round((s + 1) * T / S) - 1`` where S and T are the layer counts and ``round`` rounds
    halves up: the fraction of the stack below and including the layer is the same on both
    sides, and the last student layer always meets the last teacher layer. Examples:
    S=2, T=4 -> [(0, 1), (1, 3)]; S=24, T=28 -> (0, 0), (5, 6), ..., (23, 27).
    When the student is more than twice as deep as the teacher the formula can give -1 for
    the first layers; those are clamped to teacher layer 0.

    Args:
        num_student_layers (int): S >= 1, decoder layers of the student.
        num_teacher_layers (int): T >= 1, decoder layers of the teacher.
        num_pairs (int | None): match only this many student layers, evenly spaced and always
            including the last (student layer ``round((k + 1) * S / num_pairs) - 1`` for
            k = 0 .. num_pairs - 1); ``None`` matches every student layer. 1 <= num_pairs <= S.

    Returns:
        list[tuple[int, int]]: (student_layer, teacher_layer) pairs, sorted by student layer.
    """
    S, T = num_student_layers, num_teacher_layers
    if S < 1 or T < 1:
        raise ValueError(f"layer counts must be >= 1, got num_student_layers={S}, num_teacher_layers={T}")
    if num_pairs is None:
        students = list(range(S))
    else:
        if not 1 <= num_pairs <= S:
            raise ValueError(f"num_pairs must be in [1, {S}] (the student's layer count), got {num_pairs}")
        students = [_round_half_up((k + 1) * S, num_pairs) - 1 for k in range(num_pairs)]
    return [(s, max(_round_half_up((s + 1) * T, S) - 1, 0)) for s in students]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_layer_map(
    pairs: Any, num_student_layers: int, num_teacher_layers: int, key: str
) -> list[tuple[int, int]]:
    """Check a layer map from the config and return it as a list of ``(s, t)`` int tuples.

    Args:
        pairs: a non-empty sequence of ``[student_layer, teacher_layer]`` pairs (a YAML list
            of two-element lists), each 0-based with 0 <= s < S and 0 <= t < T; no pair twice.
        num_student_layers (int): S, decoder layers of the student.
        num_teacher_layers (int): T, decoder layers of the teacher.
        key (str): the config key the map came from, e.g. ``"stage2.loss.feature.layer_map"``;
            every error names it.

    Raises:
        ConfigError: the map is empty, malformed, out of range or repeats a pair.
    """
    S, T = num_student_layers, num_teacher_layers
    example = f"{key}=" + str([list(p) for p in proportional_layer_map(S, T, min(S, 2))]).replace(" ", "")

    def fail(why: str) -> None:
        raise ConfigError(f"{key}={pairs}: {why} (override it, e.g. `{example}`)")

    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
        fail("must be a non-empty list of [student_layer, teacher_layer] pairs")
    out: list[tuple[int, int]] = []
    for pair in pairs:
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            fail(f"entry {pair} is not a [student_layer, teacher_layer] pair")
        s, t = pair
        if not (_is_index(s) and _is_index(t)):
            fail(f"entry {list(pair)} must hold two integers")
        if not 0 <= s < S:
            fail(f"student layer {s} in {list(pair)} is out of range; the student has {S} layers (0..{S - 1})")
        if not 0 <= t < T:
            fail(f"teacher layer {t} in {list(pair)} is out of range; the teacher has {T} layers (0..{T - 1})")
        if (s, t) in out:
            fail(f"pair {list(pair)} appears more than once")
        out.append((s, t))
    return out


class FeatureProjector(nn.Module):
    """Trainable linear maps from the student's hidden width to the teacher's, one per pair.

    With different widths each pair ``(s, t)`` gets its own ``nn.Linear(student_hidden,
    teacher_hidden, bias=False)``, stored under the key ``"s{s}_t{t}"`` so the state_dict does
    not depend on the order of the pairs. Weights start (semi-)orthogonal
    (``nn.init.orthogonal_``): when teacher_hidden >= student_hidden the map is an isometry,
    so the projected states start with the student's own norms and the first loss values
    measure the real mismatch rather than a random rescaling. With equal widths the projector
    is the identity and has no parameters (a learned square map could absorb the mismatch
    instead of the student).

    Args:
        pairs: the ``(student_layer, teacher_layer)`` pairs, in the order of ``forward``'s list.
        student_hidden (int): H_s.
        teacher_hidden (int): H_t.
    """

    def __init__(self, pairs: Sequence[Sequence[int]], student_hidden: int, teacher_hidden: int):
        super().__init__()
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.student_hidden, self.teacher_hidden = student_hidden, teacher_hidden
        self.projections = nn.ModuleDict()
        if student_hidden != teacher_hidden:
            for s, t in self.pairs:
                linear = nn.Linear(student_hidden, teacher_hidden, bias=False)
                nn.init.orthogonal_(linear.weight)
                self.projections[f"s{s}_t{t}"] = linear

    def forward(self, student_states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Project each student state, (N, H_s) -> (N, H_t), in the order of ``pairs``.

        Inputs are cast to the projector's dtype (an fp32 projector on bf16 states computes in fp32).
        """
        if len(student_states) != len(self.pairs):
            raise ValueError(f"got {len(student_states)} student states for {len(self.pairs)} layer pairs")
        if not self.projections:
            return list(student_states)
        out = []
        for (s, t), state in zip(self.pairs, student_states):
            linear = self.projections[f"s{s}_t{t}"]
            out.append(linear(state.to(linear.weight.dtype)))
        return out


def _upcast(x: torch.Tensor) -> torch.Tensor:
    # fp16/bf16 -> fp32; fp32 and fp64 are kept (fp64 for gradcheck).
    return x.to(torch.promote_types(x.dtype, torch.float32))


def feature_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    *,
    loss: str = "mse",
    normalize: bool = False,
    reduction: str = "sum",
) -> torch.Tensor:
    """Distance between (projected) student and teacher hidden states, averaged over pairs.

    Per token and pair: ``"mse"`` is the mean over hidden dims of (s - t)**2; ``"cosine"`` is
    1 - cos(s, t) (``F.cosine_similarity``, whose eps only matters for an all-zero vector).
    ``normalize=True`` first standardises each token's vector on both sides to zero mean and
    unit variance over the hidden dims (``F.layer_norm`` without weight or bias). Teacher and
    student residual streams differ in scale by large factors (norms grow with depth and with
    model size, and a few outlier dimensions carry most of the magnitude), so without it MSE
    mostly asks the student to copy the teacher's scale and outliers; standardised, it matches
    the pattern across dimensions (MSE of standardised vectors is 2 * (1 - Pearson correlation)).

    Args:
        student_states (list[torch.Tensor]): one per layer pair, each shape (N, H_t), the
            student already projected to the teacher's width (gets the gradient).
        teacher_states (list[torch.Tensor]): one per layer pair, each shape (N, H_t), the
            teacher (treated as constant: detached here).
        loss (str): "mse" or "cosine".
        normalize (bool): standardise both sides per token before comparing.
        reduction (str): "sum" (over tokens) or "mean" (per token).

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs); 0.0 with graph when N = 0.
    """
    if loss not in FEATURE_LOSSES:
        raise ValueError(f"loss must be one of {FEATURE_LOSSES}, got {loss!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if len(student_states) == 0 or len(student_states) != len(teacher_states):
        raise ValueError(
            f"need one teacher state per student state and at least one pair, got "
            f"{len(student_states)} student and {len(teacher_states)} teacher states"
        )
    per_token = None
    for i, (student, teacher) in enumerate(zip(student_states, teacher_states)):
        if student.dim() != 2 or student.shape != teacher.shape:
            raise ValueError(
                f"pair {i}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be "
                "(num_tokens, teacher_hidden); project the student first (FeatureProjector)"
            )
        s = _upcast(student)
        t = teacher.detach().to(s.dtype)
        if normalize:
            s, t = F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])
        if loss == "mse":
            term = (s - t).pow(2).mean(dim=-1)
        else:
            term = 1.0 - F.cosine_similarity(s, t, dim=-1)
        per_token = term if per_token is None else per_token + term
    per_token = per_token / len(student_states)
    total = per_token.sum()  # an empty sum is 0.0 and keeps the graph
    if reduction == "sum":
        return total
    return total / max(per_token.shape[0], 1)


def masked_feature_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    mask: torch.Tensor,
    projector: FeatureProjector | None,
    *,
    positions: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Select the valid tokens, project the student and call :func:`feature_loss`.

    Tokens are selected before anything else, so states at masked positions (padding, even
    NaN) reach neither the value nor the gradient.

    Args:
        student_states (list[torch.Tensor]): one per layer pair, each shape (B, L, H_s), the student.
        teacher_states (list[torch.Tensor]): one per layer pair, each shape (B, L, H_t), the
            teacher (treated as constant).
        mask (torch.Tensor): shape (B, L), bool; True marks the tokens that count.
        projector (FeatureProjector | None): maps H_s -> H_t; ``None`` for equal widths.
        positions (torch.Tensor | None): shape (N,), int64, the flat indices into the B * L
            positions where ``mask`` is True, in order; given, the tokens are gathered by index
            (the same values and gradients), which does not wait for a GPU to count the mask.
        **kwargs: ``loss``, ``normalize``, ``reduction`` of :func:`feature_loss`.

    Returns:
        torch.Tensor: scalar, see :func:`feature_loss`.
    """
    mask = mask.to(torch.bool)
    for state in (*student_states, *teacher_states):
        if state.shape[:-1] != mask.shape:
            raise ValueError(f"state shape {tuple(state.shape)} does not match mask shape {tuple(mask.shape)} + (H,)")
    if positions is None:
        student = [state[mask] for state in student_states]
        teacher = [state.detach()[mask] for state in teacher_states]
    else:
        student = [state.flatten(0, 1).index_select(0, positions) for state in student_states]
        teacher = [state.detach().flatten(0, 1).index_select(0, positions) for state in teacher_states]
    if projector is not None:
        student = projector(student)
    return feature_loss(student, teacher, **kwargs)
