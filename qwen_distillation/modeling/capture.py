"""Capture layer outputs and post-RoPE queries/keys/values during a forward pass.

SDPA and flash attention return no attention maps, so attention distillation is computed from
the queries, keys and values of selected layers (see :mod:`qwen_distillation.losses.attention`).
:class:`Capture` records them, and the output hidden states of selected decoder layers, while
the model runs its normal attention implementation; layers that are not selected run untouched.

How the query/key/value capture works. In transformers 5 an attention module of the Llama
family computes q, k, v, applies the rotary embedding, and then calls::

    ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)(
        self, query_states, key_states, value_states, attention_mask, ...)

For each selected layer, ``self_attn.config`` is replaced, for the duration of the ``with`` block,
by a read-only view of the shared config whose ``_attn_implementation`` is
:data:`CAPTURE_ATTN_IMPLEMENTATION`, a function registered once with ``AttentionInterface``. That
function records (q, k, v), puts the real config back on the module while it calls the original
implementation (flash attention reads ``module.config._attn_implementation`` to pick its kernel),
and returns its result unchanged. The shared config, and so the attention-mask construction of
the decoder, never changes; other layers and other models are not affected.

Supported models: a decoder (``model``, its ``get_base_model()`` for peft, then ``get_decoder()``)
with a ``layers`` list whose layers have an attention module (``self_attn``, or GPT-NeoX's
``attention``; see :data:`ATTENTION_NAMES`) that dispatches through ``ALL_ATTENTION_FUNCTIONS`` as
above: Qwen2/Qwen2.5, Qwen3 and Llama are tested (eager, SDPA; flex attention checked by hand), and
Mistral and the other models generated from Llama in transformers 5 follow the same pattern. The
eager path uses the ``eager_attention_forward`` of the module's own modeling file.

Limits: do not call backward inside the block with gradient checkpointing on (the recomputation
runs the hooks again and overwrites the entries with recomputed, equal tensors); reentrant
checkpointing runs the forward under no_grad, so captured tensors would have no graph (transformers
5 uses non-reentrant checkpointing by default); ``torch.compile`` is not supported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.parts import base_model, decoder_and_head

CAPTURE_ATTN_IMPLEMENTATION = "qd_capture"


class _CaptureConfigView:
    """The config of one attention module with ``_attn_implementation`` reporting the capture.

    Every other attribute is read from the real config, so the module behaves as before.
    """

    def __init__(self, config, record: Callable, eager_fn: Callable, interface: AttentionInterface):
        self._attn_implementation = CAPTURE_ATTN_IMPLEMENTATION
        self.original = config
        self.record = record
        self.eager_fn = eager_fn
        self.interface = interface

    def __getattr__(self, name: str):
        # Called only for names not set in __init__.
        return getattr(self.__dict__["original"], name)


def _capture_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask, *args, **kwargs):
    """Attention implementation registered as ``"qd_capture"``: record, then delegate."""
    view = module.config
    if not isinstance(view, _CaptureConfigView):
        raise RuntimeError(
            f"attention implementation {CAPTURE_ATTN_IMPLEMENTATION!r} is only valid inside "
            "qwen_distillation.modeling.capture.Capture"
        )
    view.record(query, key, value)
    module.config = view.original
    try:
        attention = view.interface.get_interface(view.original._attn_implementation, view.eager_fn)
        return attention(module, query, key, value, attention_mask, *args, **kwargs)
    finally:
        module.config = view


def find_decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (the module with ``layers``) of a causal LM, also through peft."""
    base = base_model(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base
    if not isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        raise ConfigError(
            f"{type(base).__name__}: its decoder {type(decoder).__name__} has no `layers` list; "
            "layer capture supports decoders with `.layers` (Qwen2/Qwen3/Llama/Mistral family)"
        )
    return decoder


def _check_layers(kind: str, layers: Iterable[int], num_layers: int, model_name: str) -> list[int]:
    layers = list(layers)
    for index in layers:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < num_layers:
            raise ConfigError(
                f"{kind} index {index!r} is out of range for {model_name}, which has {num_layers} "
                f"decoder layers: use indices in [0, {num_layers - 1}]"
            )
    return sorted(set(layers))


ATTENTION_NAMES = ("self_attn", "attention")  # the Llama family's name, then GPT-NeoX's


def attention_module(decoder: nn.Module, index: int) -> nn.Module:
    """The attention module of decoder layer ``index``: the first of :data:`ATTENTION_NAMES` the
    layer holds that carries a config. Raises ConfigError for a layer with none."""
    attention = _attention_of(decoder.layers[index])
    if attention is not None:
        return attention
    with_one = [i for i, layer in enumerate(decoder.layers) if _attention_of(layer) is not None]
    hybrid = f"; the layers that have one: {with_one} (a hybrid such as Qwen3.5 interleaves them)" if with_one else ""
    raise ConfigError(
        f"decoder layer {index} ({type(decoder.layers[index]).__name__}) has no attention module with a config "
        f"(looked for {', '.join(ATTENTION_NAMES)}){hybrid}; query/key/value capture supports the Qwen2/Llama "
        "family and GPT-NeoX"
    )


def _attention_of(layer: nn.Module) -> nn.Module | None:
    for name in ATTENTION_NAMES:
        attention = getattr(layer, name, None)
        if isinstance(attention, nn.Module) and hasattr(attention, "config"):
            return attention
    return None


def check_qkv_capture(model: nn.Module, layers: Iterable[int]) -> None:
    """Raise ConfigError, before anything runs, if the q/k/v of ``layers`` cannot be captured."""
    decoder = find_decoder(model)
    for index in _check_layers("qkv_layers", layers, len(decoder.layers), type(base_model(model)).__name__):
        _eager_attention_of(attention_module(decoder, index))


def _eager_attention_of(attention: nn.Module) -> tuple[Callable, AttentionInterface]:
    """The eager fallback and the attention registry that ``attention``'s modeling file uses."""
    modeling_file = sys.modules[type(attention).__module__]
    eager_fn = getattr(modeling_file, "eager_attention_forward", None)
    if eager_fn is None:
        raise ConfigError(
            f"{type(attention).__name__} ({type(attention).__module__}) defines no eager_attention_forward; "
            "query/key/value capture supports attention modules of the Qwen2/Llama family"
        )
    # A modeling file may hold its own AttentionInterface with local overrides; use it if so.
    return eager_fn, getattr(modeling_file, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)


class Capture:
    """Context manager recording decoder-layer outputs and attention q/k/v of chosen layers.

    Example::

        with Capture(student, hidden_layers=[5], qkv_layers=[5, 11]) as capture:
            student.get_base_model().get_decoder()(input_ids=ids, attention_mask=mask)
        q, k, v = capture.qkv[11]

    After each forward pass inside the block:

    * ``hidden[i]`` (torch.Tensor): shape (B, L, H), the output of decoder layer ``i`` (for
      ``i < num_layers - 1`` this is ``output_hidden_states``' ``hidden_states[i + 1]``; for the
      last layer it is the output before the final norm).
    * ``qkv[i]`` (tuple): ``(q, k, v)`` of layer ``i``'s self-attention after the rotary
      embedding: q of shape (B, num_attention_heads, L, head_dim), k and v of shape
      (B, num_key_value_heads, L, head_dim) (GQA heads are not repeated).

    Tensors keep their autograd graph (a student's loss backpropagates through them; run the
    teacher under no_grad). A later forward inside the same block overwrites the entries.
    Leaving the block removes every hook and restores every attention module's config, also
    when the block raises; with both lists empty nothing is installed.

    Args:
        model (nn.Module): causal LM, its decoder, or a peft wrapper of either.
        hidden_layers (list[int]): decoder-layer indices in [0, num_layers) whose outputs to record.
        qkv_layers (list[int]): decoder-layer indices in [0, num_layers) whose q/k/v to record.

    Raises:
        ConfigError: an index is out of range, or the model is not of a supported family.
    """

    def __init__(self, model: nn.Module, hidden_layers: Iterable[int] = (), qkv_layers: Iterable[int] = ()):
        self.decoder = find_decoder(model)
        num_layers = len(self.decoder.layers)
        name = type(base_model(model)).__name__
        self.hidden_layers = _check_layers("hidden_layers", hidden_layers, num_layers, name)
        self.qkv_layers = _check_layers("qkv_layers", qkv_layers, num_layers, name)
        self.hidden: dict[int, torch.Tensor] = {}
        self.qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._swapped: list[tuple[nn.Module, object]] = []

    def __enter__(self) -> "Capture":
        if self._handles or self._swapped:
            raise RuntimeError("this Capture is already active; it cannot be entered twice")
        self.hidden.clear()
        self.qkv.clear()
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._remove()

    def _install(self) -> None:
        for index in self.hidden_layers:
            self._handles.append(self.decoder.layers[index].register_forward_hook(self._hidden_hook(index)))
        if self.qkv_layers:
            AttentionInterface.register(CAPTURE_ATTN_IMPLEMENTATION, _capture_attention)
        for index in self.qkv_layers:
            attention = attention_module(self.decoder, index)
            if isinstance(attention.config, _CaptureConfigView):
                raise RuntimeError(f"the q/k/v of layer {index} are already captured by another active Capture")
            eager_fn, interface = _eager_attention_of(attention)
            view = _CaptureConfigView(attention.config, self._qkv_recorder(index), eager_fn, interface)
            self._swapped.append((attention, attention.config))
            attention.config = view

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()
        while self._swapped:
            attention, config = self._swapped.pop()
            attention.config = config

    def _hidden_hook(self, index: int) -> Callable:
        def hook(module, args, output):
            # Decoder layers return a tensor in transformers 5 and a tuple in older versions.
            self.hidden[index] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _qkv_recorder(self, index: int) -> Callable:
        def record(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
            self.qkv[index] = (query, key, value)
        return record


@dataclass
class CapturedForward:
    """One forward pass of a causal LM as the distillation losses read it.

    last_hidden: (B, L, H) final hidden states (after the final norm); None on the full-logits
        path unless its hidden states were asked for.
    logits: (B, L, V') on the full-logits path, else None.
    head_weight: (V', H) the lm_head weight on the hidden-state path, else None.
    head_fp8: an FP8 copy of ``head_weight`` (``modeling.fp8.FP8Head``) that the fused KD loss forms
        the teacher's logits with (``model.teacher.fp8_head``), else None.
    hidden, qkv: the captured layers (see :class:`Capture`).
    """

    last_hidden: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    head_weight: torch.Tensor | None = None
    head_fp8: object | None = None
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    qkv: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def forward_captured(model: nn.Module, inputs: dict, *, hidden_path: bool, hidden_layers: Iterable[int] = (),
                     qkv_layers: Iterable[int] = (), output_hidden_states: bool = False) -> CapturedForward:
    """Run ``model`` on ``inputs`` (``modeling.parts.model_inputs``) recording the chosen layers.

    ``hidden_path`` runs only the decoder stack (the caller projects the hidden states through
    ``head_weight`` in chunks); otherwise the whole model runs and returns its logits, with its
    final hidden states when ``output_hidden_states``. Gradients follow the caller's grad mode.
    """
    with Capture(model, hidden_layers=hidden_layers, qkv_layers=qkv_layers) as capture:
        if hidden_path:
            decoder, head = decoder_and_head(model)
            return CapturedForward(last_hidden=decoder(**inputs).last_hidden_state, head_weight=head.weight,
                                   hidden=capture.hidden, qkv=capture.qkv)
        out = model(**inputs, output_hidden_states=output_hidden_states)
        last = out.hidden_states[-1] if output_hidden_states else None
        return CapturedForward(last_hidden=last, logits=out.logits, hidden=capture.hidden, qkv=capture.qkv)
