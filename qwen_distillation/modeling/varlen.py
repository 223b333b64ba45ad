"""``attn_implementation="varlen"``: attention of packed rows by PyTorch's variable-length flash
kernel (``torch.nn.attention.varlen.varlen_attn``, CUDA, bf16/fp16), with no mask at all.

A packed micro-batch (``data.manager.collate_packed``) holds several examples per row. With
``sdpa``, transformers builds a dense (R, 1, L, L) boolean mask from the restarting
``position_ids`` on every forward and SDPA cannot use its flash kernel with that mask. Here the
rows are flattened to one sequence of R * L positions and the flash kernel gets each example's
start (``cu_seq_lens``, built on the host by the collate); attention stays inside each example
exactly as with the mask (the padding at a row's end is a sequence of its own and holds no label).

Registered with transformers' ``AttentionInterface`` and ``AttentionMaskInterface`` under
``"varlen"``. A packed batch passes its ``cu_seq_lens`` (``parts.model_inputs`` hands them on as
transformers' ``cu_seq_lens_q``/``cu_seq_lens_k``) and no attention mask, so no mask is built. A
forward without them (an unpadded or padded batch, generation) runs SDPA with the mask
transformers builds for ``sdpa``, so evaluation and generation are unchanged.
"""

from __future__ import annotations

import functools
import inspect

import torch

from qwen_distillation.errors import ConfigError

VARLEN = "varlen"


def varlen_available() -> bool:
    """Whether this torch has ``torch.nn.attention.varlen`` and a CUDA device to run it."""
    try:
        import torch.nn.attention.varlen  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def require_varlen(device: torch.device | str) -> None:
    """Refuse ``attn_implementation=varlen`` where its kernel cannot run (checked at start-up by
    ``modeling.speed`` and again by the kernel), naming both options."""
    device = torch.device(device)
    if device.type != "cuda" or not varlen_available():
        raise ConfigError(f"attn_implementation=varlen runs PyTorch's flash varlen kernel, which needs torch >= 2.10 "
                          f"(torch.nn.attention.varlen) and a CUDA GPU; running on {device}: set "
                          f"model.teacher.attn_implementation and model.student.attn_implementation to sdpa (or null)")


@functools.cache
def _varlen_attn_parameters() -> frozenset[str] | None:
    """The parameter names of this torch's ``varlen_attn`` (read once: the kernel runs in every
    attention layer of every forward), or None where torch has no ``torch.nn.attention.varlen``."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_kernel(q, k, v, cu, max_len: int, scale: float | None):
    """Causal attention within each sequence of ``cu`` by ``varlen_attn``, across its signatures
    (torch 2.10: ``is_causal``; later: ``window_size``), with grouped key/value heads repeated where
    it has no ``enable_gqa``. q: (T, Hq, D); k, v: (T, Hkv, D); cu: (S + 1,) int32 -> (T, Hq, D)."""
    parameters = _varlen_attn_parameters()
    if parameters is None or not q.is_cuda:
        require_varlen(q.device)
    from torch.nn.attention.varlen import varlen_attn

    kwargs = {"scale": scale} if "scale" in parameters else {}
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in parameters:
            kwargs["enable_gqa"] = True
        else:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "window_size" in parameters:
        kwargs["window_size"] = (-1, 0)
    else:
        kwargs["is_causal"] = True
    return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kwargs)


def varlen_reference(q, k, v, cu, max_len: int, scale: float | None):
    """The pure-torch reference of :func:`varlen_kernel` (any device, any dtype): SDPA, causal, on
    each sequence of ``cu`` alone. Same arguments and result."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        # (n, H, D) -> (H, n, D) for SDPA; grouped key/value heads repeated to the query heads
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].repeat_interleave(groups, dim=1).transpose(0, 1)
        vs = v[start:end].repeat_interleave(groups, dim=1).transpose(0, 1)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale))
    return torch.cat(outs, dim=1).transpose(0, 1)


# What the registered attention calls: the flash kernel; tests on a CPU put the reference here.
kernel = varlen_kernel


def varlen_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature. query (B, Hq, L, D), key/value (B, Hkv, L, D) ->
    (B, L, Hq, D), like ``sdpa_attention_forward``. ``kwargs['cu_seq_lens_q']``: (S + 1,) int32 starts of
    the S sequences of the flattened B * L positions (a row's padding counts as one)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    if dropout:
        raise ValueError("attn_implementation='varlen' runs without attention dropout; set the model's "
                         "attention_dropout to 0")
    if torch.is_autocast_enabled(query.device.type):  # as autocast casts SDPA's inputs (fp32 after RoPE)
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * length, kv_heads, dim)
    max_len = kwargs.get("max_length_q") or length
    out = kernel(q, k, v, cu.to(torch.int32), int(max_len), scaling)
    return out.reshape(batch, length, heads, dim), None


def varlen_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs):
    """transformers' mask interface: no mask for a batch without padding (a packed batch's examples
    are kept apart by ``cu_seq_lens``; an unpadded one is plainly causal), else SDPA's mask."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> None:
    """Make ``attn_implementation="varlen"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_mask)

