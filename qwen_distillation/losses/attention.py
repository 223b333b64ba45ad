"""Attention distillation from captured queries, keys and values (MiniLM / MiniLMv2).

SDPA and flash attention return no attention maps, so the maps are rebuilt from the post-RoPE
q/k/v of a layer (see :class:`qwen_distillation.modeling.capture.Capture`), a chunk of query
positions at a time.

Relations (MiniLMv2, Wang et al. 2021). For a model's (B, n_heads, L, d) tensors ``a`` and ``b``,
the heads are concatenated to (B, L, n_heads * d) and split again into R *relation heads* of
width d_r = n_heads * d / R (:func:`split_relation_heads`). Relation head r of query position i
is the distribution over key positions j:

    rel_r(i, j) = softmax_j(a_r[i] . b_r[j] / sqrt(d_r)),  over keys j <= i with key_mask[j].

Since teacher and student both have R relation heads over the same positions, head counts and
head dims may differ between them. With a = q, b = k and R = n_heads this is the per-head
attention map (MiniLM's attention transfer); with a = b = q (or k, or v) it is MiniLMv2's
self-relation. Keys and values of grouped-query attention are first repeated to the query head
count (:func:`expand_kv`), exactly as the attention itself uses them.

Loss: ``KL(rel_teacher || rel_student)`` (forward KL, teacher first, as in both papers) summed
over keys, averaged over the R relation heads, then summed (``"sum"``) or averaged (``"mean"``)
over the valid query positions. Like the logit losses: fp32 inside (fp64 stays fp64, for
gradcheck), the teacher is detached, nothing is clamped, and an all-masked input gives 0 that is
still part of the autograd graph.
"""

from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qwen_distillation.losses.logit import REDUCTIONS

ATTENTION_MODES = ("attention", "relations")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # fp16/bf16 -> fp32; fp32 and fp64 are kept (fp64 for gradcheck).
    return torch.promote_types(x.dtype, torch.float32)


def expand_kv(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat grouped-query key/value heads to the query head count.

    Query head h uses key/value head ``h // (n_heads // n_kv_heads)``, as transformers'
    ``repeat_kv``; this is ``repeat_interleave`` along the head dimension.

    Args:
        kv (torch.Tensor): shape (B, n_kv_heads, L, d).
        n_heads (int): number of query heads, a multiple of n_kv_heads.

    Returns:
        torch.Tensor: shape (B, n_heads, L, d) (``kv`` itself when n_kv_heads == n_heads).
    """
    n_kv_heads = kv.shape[1]
    if n_heads % n_kv_heads != 0:
        raise ValueError(f"n_heads={n_heads} is not a multiple of the {n_kv_heads} key/value heads")
    if n_heads == n_kv_heads:
        return kv
    return kv.repeat_interleave(n_heads // n_kv_heads, dim=1)


def split_relation_heads(x: torch.Tensor, relation_heads: int) -> torch.Tensor:
    """Concatenate the attention heads and split the result into ``relation_heads`` heads.

    Args:
        x (torch.Tensor): shape (B, n_heads, L, d).
        relation_heads (int): R, which must divide n_heads * d.

    Returns:
        torch.Tensor: shape (B, R, L, n_heads * d / R); with R == n_heads it equals ``x``.
    """
    batch, n_heads, length, head_dim = x.shape
    width = n_heads * head_dim
    if relation_heads < 1 or width % relation_heads != 0:
        raise ValueError(
            f"relation_heads={relation_heads} must divide n_heads * head_dim = {n_heads} * {head_dim} = {width}"
        )
    concatenated = x.transpose(1, 2).reshape(batch, length, width)
    return concatenated.view(batch, length, relation_heads, width // relation_heads).transpose(1, 2)


def _allowed_keys(key_mask: torch.Tensor, start: int, end: int, segments: torch.Tensor | None = None,
                  first_key: int = 0) -> torch.Tensor:
    """(B, 1, end - start, end - first_key) bool: key j in [first_key, end) is visible to query i in
    [start, end) iff j <= i and key_mask[j] (and, with ``segments``, j lies in i's segment)."""
    queries = torch.arange(start, end, device=key_mask.device)
    keys = torch.arange(first_key, end, device=key_mask.device)
    causal = keys[None, :] <= queries[:, None]
    allowed = causal[None] & key_mask[:, None, first_key:end]
    if segments is not None:
        allowed = allowed & (segments[:, start:end, None] == segments[:, None, first_key:end])
    return allowed[:, None]


def _first_key(sequence_starts: Sequence[int], rows: int, length: int, start: int) -> int:
    """The first key any query at or after position ``start`` of its row can see: the start of the
    sequence holding ``start``, the earliest over the rows. ``sequence_starts``: where each sequence
    of the ``rows`` rows of ``length`` flattened one after the other starts (a packed batch's
    cu_seq_lens), each row starting one."""
    first = start
    for row in range(rows):
        position = row * length + start
        first = min(first, sequence_starts[bisect.bisect_right(sequence_starts, position) - 1] - row * length)
    return first


def _relation_log_probs(a: torch.Tensor, b: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log softmax_j(a_i . b_j / sqrt(d_r)) over allowed keys; (B, R, C, K) from a (B, R, C, d_r), b (B, R, K, d_r).

    Disallowed entries are 0 (not -inf) so that ``p * (log p - log q)`` is exactly 0 there.
    Rows with no allowed key are uniform over all K (finite); the caller masks them out.
    """
    dtype = _compute_dtype(a)
    scores = a.to(dtype) @ b.to(dtype).transpose(-1, -2) / math.sqrt(a.shape[-1])
    any_key = allowed.any(dim=-1, keepdim=True)
    scores = torch.where(allowed, scores, float("-inf"))
    scores = torch.where(any_key, scores, 0.0)
    return torch.where(allowed, F.log_softmax(scores, dim=-1), 0.0)


def _chunk_relation_kl(student_a, student_b, teacher_a, teacher_b, allowed, valid_queries):
    """Sum over valid queries of the relation-head mean of KL(teacher || student); a scalar."""
    log_q = _relation_log_probs(student_a, student_b, allowed)  # student
    log_p = _relation_log_probs(teacher_a, teacher_b, allowed)  # teacher
    log_p = log_p.to(log_q.dtype)
    per_query = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean(dim=1)  # (B, C)
    # torch.where, not multiplication by the mask, so that no masked value can reach the sum.
    return torch.where(valid_queries, per_query, per_query.new_zeros(())).sum()


def relation_kl(
    student_a: torch.Tensor,
    student_b: torch.Tensor,
    teacher_a: torch.Tensor,
    teacher_b: torch.Tensor,
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    relation_heads: int,
    chunk_size: int = 256,
    reduction: str = "sum",
    segments: torch.Tensor | None = None,
    sequence_starts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Forward KL(teacher relation || student relation) of causal relation distributions.

    For relation head r, query position i and key position j <= i with ``key_mask[j]``:
    ``rel(i, j) = softmax_j(a_r[i] . b_r[j] / sqrt(d_r))`` (see the module docstring). The loss of
    query i is ``mean_r sum_j rel_teacher log(rel_teacher / rel_student)``; it is summed (or
    averaged) over the queries with ``query_mask`` true.

    Assumption: ``key_mask`` is true at every valid query (padding is masked in both), so every
    valid query sees at least itself. A query that sees no key (only possible when that is
    violated) contributes nothing and is not counted by ``"mean"``.

    Memory: queries are processed ``chunk_size`` at a time against the keys up to the chunk's
    end, and each chunk runs under ``torch.utils.checkpoint`` (recomputed in backward), so
    forward and backward hold O(B * R * chunk_size * L) relation scores, not O(B * R * L * L).

    Args:
        student_a (torch.Tensor): shape (B, n_s, L, d_s), the student's "query side" (gets the gradient).
        student_b (torch.Tensor): shape (B, n_s', L, d_s') with n_s' * d_s' == n_s * d_s, its "key side".
        teacher_a (torch.Tensor): shape (B, n_t, L, d_t), the teacher's (treated as constant).
        teacher_b (torch.Tensor): shape (B, n_t', L, d_t') with n_t' * d_t' == n_t * d_t.
        query_mask (torch.Tensor): shape (B, L), bool, the query positions that count.
        key_mask (torch.Tensor): shape (B, L), bool, the positions that may be attended to.
        relation_heads (int): R, dividing both n_s * d_s and n_t * d_t.
        chunk_size (int): query positions per chunk, >= 1.
        reduction (str): "sum" (over valid queries) or "mean" (per valid query).
        segments (torch.Tensor | None): shape (B, L), integer: a packed row's example of each
            position (``train.packing``); a query sees only the keys of its own example, so each
            example's relations are those it has alone. None: one sequence per row.
        sequence_starts (Sequence[int] | None): with ``segments``, where each sequence of the B rows
            flattened one after the other starts (the packed batch's cu_seq_lens, read on the host).
            A chunk's keys then begin at the earliest sequence start of its queries, not at 0: a
            one-row (``padding_free``) batch costs O(L * longest example), not O(L * L). The result
            is the same: the keys left out are those no query of the chunk can see.

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    batch, _, length, _ = student_a.shape
    names = ("student_a", "student_b", "teacher_a", "teacher_b")
    for name, x in zip(names, (student_a, student_b, teacher_a, teacher_b)):
        if x.dim() != 4 or x.shape[0] != batch or x.shape[2] != length:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (B={batch}, heads, L={length}, head_dim)")
    for name, mask in (("query_mask", query_mask), ("key_mask", key_mask)):
        if mask.shape != (batch, length) or mask.dtype != torch.bool:
            raise ValueError(f"{name} must be a bool tensor of shape ({batch}, {length}), "
                             f"got {mask.dtype} {tuple(mask.shape)}")

    s_a, s_b = split_relation_heads(student_a, relation_heads), split_relation_heads(student_b, relation_heads)
    t_a = split_relation_heads(teacher_a.detach(), relation_heads)
    t_b = split_relation_heads(teacher_b.detach(), relation_heads)
    if s_a.shape[-1] != s_b.shape[-1] or t_a.shape[-1] != t_b.shape[-1]:
        raise ValueError(
            f"the two sides of a relation must have equal width: student {s_a.shape[-1]} vs {s_b.shape[-1]}, "
            f"teacher {t_a.shape[-1]} vs {t_b.shape[-1]} per relation head"
        )

    # A valid query that sees no key would be a uniform-vs-uniform row; keep it out of sum and count.
    seen_any = torch.cumsum(key_mask.to(torch.int32), dim=1) > 0
    valid = query_mask & seen_any
    total = s_a.new_zeros((), dtype=_compute_dtype(s_a))
    needs_grad = torch.is_grad_enabled() and (s_a.requires_grad or s_b.requires_grad)
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        first = 0 if segments is None or sequence_starts is None else _first_key(sequence_starts, batch, length, start)
        args = (s_a[:, :, start:end], s_b[:, :, first:end], t_a[:, :, start:end], t_b[:, :, first:end],
                _allowed_keys(key_mask, start, end, segments, first), valid[:, start:end])
        if needs_grad:
            chunk = checkpoint(_chunk_relation_kl, *args, use_reentrant=False)
        else:
            chunk = _chunk_relation_kl(*args)
        total = total + chunk
    if reduction == "sum":
        return total
    # The clamp is on an integer count only, so an all-masked batch returns 0 / 1 = 0.
    return total / valid.sum().clamp(min=1)


def attention_distillation_loss(
    student_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    teacher_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    query_mask: torch.Tensor,
    key_mask: torch.Tensor,
    *,
    mode: str = "relations",
    relation_heads: int = 8,
    chunk_size: int = 256,
    reduction: str = "sum",
    segments: torch.Tensor | None = None,
    sequence_starts: Sequence[int] | None = None,
) -> torch.Tensor:
    """Attention distillation of one layer pair: forward KL(teacher || student) of relation maps.

    * ``"attention"`` (MiniLM): the relations of student queries to student keys against those
      of the teacher, ``relation_kl(q_s, k_s, q_t, k_t)``. When R equals both models' head count
      and their head dims match, this is exactly the per-head KL of the causal attention
      probabilities ``softmax(q k^T / sqrt(d))``.
    * ``"relations"`` (MiniLMv2): the mean of the Q-Q, K-K and V-V self-relation KLs.

    Keys and values are repeated to the query head count first (:func:`expand_kv`).

    Args:
        student_qkv (tuple): (q, k, v) of the student layer (gets the gradient): q of shape
            (B, n_heads, L, d), k and v of shape (B, n_kv_heads, L, d), post-RoPE.
        teacher_qkv (tuple): (q, k, v) of the teacher layer (treated as constant), same layout
            with its own head counts and head dim.
        query_mask (torch.Tensor): shape (B, L), bool, query positions that count.
        key_mask (torch.Tensor): shape (B, L), bool, positions that may be attended to (the
            attention mask); must be true at every valid query.
        mode (str): "attention" or "relations".
        relation_heads (int): R, dividing n_heads * d of both models.
        chunk_size (int): query positions per chunk.
        reduction (str): "sum" (over valid queries) or "mean" (per valid query).
        segments (torch.Tensor | None): shape (B, L), integer example of each position of a
            packed row (see :func:`relation_kl`); None: one sequence per row.
        sequence_starts (Sequence[int] | None): with ``segments``, the packed batch's sequence starts
            (see :func:`relation_kl`): each chunk reads only the keys its queries can see.

    Returns:
        torch.Tensor: scalar, fp32 (fp64 for fp64 inputs).
    """
    if mode not in ATTENTION_MODES:
        raise ValueError(f"mode must be one of {ATTENTION_MODES}, got {mode!r}")
    q_s, k_s, v_s = student_qkv
    q_t, k_t, v_t = teacher_qkv
    k_s, v_s = expand_kv(k_s, q_s.shape[1]), expand_kv(v_s, q_s.shape[1])
    k_t, v_t = expand_kv(k_t, q_t.shape[1]), expand_kv(v_t, q_t.shape[1])
    kwargs = dict(relation_heads=relation_heads, chunk_size=chunk_size, reduction=reduction, segments=segments,
                  sequence_starts=sequence_starts)
    if mode == "attention":
        return relation_kl(q_s, k_s, q_t, k_t, query_mask, key_mask, **kwargs)
    pairs = ((q_s, q_t), (k_s, k_t), (v_s, v_t))
    return sum(relation_kl(s, s, t, t, query_mask, key_mask, **kwargs) for s, t in pairs) / 3


def attention_probs_reference(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Causal, masked attention probabilities ``softmax(q k^T / sqrt(d))``, all at once (for tests).

    Args:
        q (torch.Tensor): shape (B, H, L, d), post-RoPE queries.
        k (torch.Tensor): shape (B, H_kv, L, d), post-RoPE keys; H a multiple of H_kv.
        key_mask (torch.Tensor): shape (B, L), bool, positions that may be attended to.

    Returns:
        torch.Tensor: shape (B, H, L, L), fp32 (fp64 for fp64 inputs); row i is over keys j <= i
        with key_mask[j]; rows that see no key are all zero.
    """
    dtype = _compute_dtype(q)
    k = expand_kv(k, q.shape[1])
    scores = q.to(dtype) @ k.to(dtype).transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = _allowed_keys(key_mask, 0, q.shape[2])
    probs = torch.softmax(torch.where(allowed, scores, float("-inf")), dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), probs, 0.0)
