"""Reaching into a causal LM the same way everywhere: through a peft wrapper, to its decoder
stack and lm_head, and to the positions whose hidden state predicts a labelled token."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, NamedTuple

import torch
from torch import nn

from qwen_distillation.data.encode import IGNORE_INDEX


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The forward arguments of a collated batch for scoring (no generation): ``use_cache=False``,
    since transformers would otherwise copy every layer's keys and values into a cache
    (docs/performance.md). A packed batch (``data.manager.collate_packed``) passes its
    ``position_ids`` and no attention mask: transformers then keeps attention inside each
    example of a row. Its ``cu_seq_lens`` go along as transformers' varlen keywords
    (``cu_seq_lens_q/k``; the longest sequence as ``max_length_q/k``, read from the host copy
    ``sequence_starts`` where the batch has it, else the row length, an upper bound), which
    ``attn_implementation="varlen"`` (``modeling.varlen``) and flash attention read instead of a
    mask and SDPA, eager and flex attention ignore."""
    if "position_ids" in batch:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
        if "cu_seq_lens" in batch:
            starts = batch.get("sequence_starts")
            longest = batch["input_ids"].shape[1] if starts is None else int((starts[1:] - starts[:-1]).max())
            inputs.update(cu_seq_lens_q=batch["cu_seq_lens"], cu_seq_lens_k=batch["cu_seq_lens"],
                          max_length_q=longest, max_length_k=longest)
        return inputs
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}


def check_packed_attention(models: dict[str, nn.Module | None], layout: str = "rows",
                           autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
    """``train.packing`` needs each model's attention to keep a packed row's examples apart
    (``config.validate.PACKED_ATTENTION``), and ``train.pack_layout=padding_free`` one that reads
    their bounds (``PADDING_FREE_ATTENTION``); checked on the loaded models, whose implementation
    transformers may have chosen itself, and then by running each (:func:`packed_row_leak`, under
    ``autocast``, the run's precision: flash and varlen attention take only half precision).
    ``models``: side name (teacher, student) -> model."""
    from qwen_distillation.config.validate import PACKED_ATTENTION, PADDING_FREE_ATTENTION
    from qwen_distillation.errors import ConfigError

    if layout == "rows":
        allowed, setting, other = PACKED_ATTENTION, "train.packing=true", "train.packing=false"
        why = "would let a packed row's examples attend to each other"
    else:
        allowed, setting, other = PADDING_FREE_ATTENTION, f"train.pack_layout={layout}", "train.pack_layout=rows"
        why = "does not read the examples' bounds and would build a mask over the micro-batch's whole row"
    for side, model in models.items():
        if model is None:
            continue
        implementation = getattr(base_model(model).config, "_attn_implementation", None)
        if implementation not in allowed:
            raise ConfigError(f"{setting}: the {side} runs attention {implementation!r}, which {why}; set "
                              f"model.{side}.attn_implementation to one of {', '.join(allowed)}, or {other}")
        try:
            with autocast():
                leak = packed_row_leak(model, layout)
        except PackedForwardError as err:  # runs an example alone, not packed: every packed step would raise so
            raise ConfigError(
                f"{setting}: the {side} ({type(base_model(model)).__name__}) runs an example alone but not in a packed "
                f"row ({type(err.__cause__).__name__}: {err.__cause__}); set train.packing=false, or give the model "
                "what it names to read packed rows") from err.__cause__
        except Exception as err:  # noqa: BLE001 - an attention backend the probe cannot drive; training would tell
            logging.getLogger(__name__).warning("%s: could not probe whether the %s keeps a packed row's examples "
                                                "apart (%s: %s); its packed rows are not checked", setting, side,
                                                type(err).__name__, err)
            continue
        if leak is not None and leak.leaks():
            raise ConfigError(
                f"{setting}: the {side} ({type(base_model(model)).__name__}) lets a packed row's examples see each "
                f"other: {leak.describe()} (a model that takes positions or masks from the attention mask, as OPT "
                "and BLOOM do, or carries a recurrent state from token to token, as Mamba hybrids do); set "
                "train.packing=false")


class PackedForwardError(RuntimeError):
    """The probe's packed row raised in the model's forward, after the same example alone ran (the
    model's error is the ``__cause__``): e.g. transformers' linear-attention layers (Qwen3.5,
    Qwen3-Next) refuse packed rows without the flash-linear-attention kernels that keep them apart."""


# A packed example may differ from itself alone by rounding only; mixing moves it by about as much as
# running the two examples as one sequence (benchmarks/packing_families.py measures both on many families).
LEAK_TOLERANCE = 0.05
# Swapping the first example of a packed row for another of the same length moves the second's logits
# only by rounding where the two are kept apart, and by about as much as the same swap moves them in a
# batch of two separate rows: the two layouts hand every layer the same tokens in the same order, so the
# same shapes run the same kernels (a mixture of experts groups the same tokens), and what a mask hides
# adds exact zeros. For a dense model on one device both moves are 0. A leak moves the packed row under
# every swap: the least move over SWAP_TRIES swaps above SWAP_NOISE times the largest separate-rows move
# and above SWAP_TOLERANCE of what mixing moves, however small beside the rounding between other shapes
# that LEAK_TOLERANCE must allow (a random Falcon-H1 moves by 1.1-1.2 % of it; benchmarks/packing_families.py).
SWAP_TOLERANCE = 2e-3
SWAP_NOISE = 4.0
SWAP_TRIES = 3


class PackedLeak(NamedTuple):
    """What :func:`packed_row_leak` measured: largest absolute differences of an example's logits.

    packed: the second example in the packed row against alone. mixed: the two run as one sequence
    against alone. swapped: the least, over ``SWAP_TRIES`` swaps of a packed row's first example for
    another of the same length, of how far the second example's logits move. control: the largest move
    under the same swaps in a batch of two separate rows (rounding and the forward's own nondeterminism;
    0 for a dense model on one device)."""

    packed: float
    mixed: float
    swapped: float
    control: float

    def leaks(self) -> bool:
        return (self.packed > LEAK_TOLERANCE * self.mixed
                or self.swapped > max(SWAP_TOLERANCE * self.mixed, SWAP_NOISE * self.control))

    def describe(self) -> str:
        if self.packed > LEAK_TOLERANCE * self.mixed:
            return (f"an example's logits behind another in a packed row differ from its logits alone by "
                    f"{self.packed:.3g}, against {self.mixed:.3g} with the two as one sequence")
        return (f"an example's logits in a packed row move by at least {self.swapped:.3g} whenever the example "
                f"before it is swapped for another of the same length (by at most {self.control:.3g} when the two "
                f"are separate rows), against {self.mixed:.3g} with the two as one sequence")


@torch.no_grad()
def packed_row_leak(model: nn.Module, layout: str = "rows") -> PackedLeak | None:
    """How much the model lets a packed row's examples see each other, probed on the model itself
    (:class:`PackedLeak`): two short examples (6 and 5 tokens) packed as training packs them
    (``collate_packed``), the second's logits against its logits alone and against those of the two run
    as one sequence (what mixing them moves); then two of 6 tokens, the second's logits as the first is
    swapped for others, in a packed row and in a batch of two separate rows. None where the weights are
    not here to run (on the meta device, or partitioned by DeepSpeed ZeRO-3). Runs in eval mode (no
    dropout), restoring the model's mode. Raises :class:`PackedForwardError` where the example alone runs
    and the packed row raises."""
    from qwen_distillation.data.manager import collate, collate_packed, to_device

    params = list(model.parameters())
    if not params or any(p.is_meta or hasattr(p, "ds_id") for p in params):
        return None
    device = params[0].device
    vocab = base_model(model).config.get_text_config().vocab_size
    ids = torch.randint(1, min(vocab, 1000), (17 + 6 * SWAP_TRIES,),
                        generator=torch.Generator().manual_seed(0)).tolist()

    def example(start, end):
        return {"input_ids": ids[start:end], "labels": ids[start:end]}

    # The longer first: packing places examples longest first (data.manager.pack_rows).
    first, second, behind = example(0, 6), example(6, 11), example(11, 17)
    firsts = [first] + [example(17 + 6 * k, 23 + 6 * k) for k in range(SWAP_TRIES)]

    def packed_row(pair):
        joined = pair[0]["input_ids"] + pair[1]["input_ids"]
        row = collate_packed(pair, 0, len(joined), layout)
        if row["input_ids"][0].tolist() != joined:
            raise RuntimeError(f"packing placed the probe's examples otherwise: {row['input_ids'].tolist()}")
        return row

    def logits(batch, length):
        # As a training step hands a batch to the model: moved as the loop moves it, then its forward arguments.
        # The last row's last ``length`` positions: the example behind (packed), or the second row.
        return model(**model_inputs(to_device(batch, device))).logits[-1, -length:].float()

    def largest(a, b):
        return float((a - b).abs().max())

    was_training = model.training
    model.eval()
    try:
        alone = logits(collate([second], 0), 5)
        try:
            packed = logits(packed_row([first, second]), 5)
        except Exception as err:  # noqa: BLE001 - any error of the model's own forward
            raise PackedForwardError(f"the packed row raised: {err}") from err
        mixed = logits(collate([example(0, 11)], 0), 5)
        in_row = [logits(packed_row([one, behind]), 6) for one in firsts]
        apart = [logits(collate([one, behind], 0), 6) for one in firsts]
    finally:
        model.train(was_training)
    return PackedLeak(largest(packed, alone), largest(mixed, alone),
                      min(largest(other, in_row[0]) for other in in_row[1:]),
                      max(largest(other, apart[0]) for other in apart[1:]))


def base_model(model: nn.Module) -> nn.Module:
    """The model under a peft wrapper (the model itself when it has none)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_dim(config) -> int:
    """The attention head size of a model config: ``head_dim`` where the config sets it (Qwen3,
    width-pruned students), else ``hidden_size // num_attention_heads``."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the lm_head of a causal LM,
    also through a peft wrapper."""
    base = base_model(model)
    return base.get_decoder(), base.get_output_embeddings()


def weight_shape(weight: torch.Tensor) -> torch.Size:
    """A weight's whole shape, also when DeepSpeed ZeRO-3 has partitioned it (``ds_shape``)."""
    return getattr(weight, "ds_shape", weight.shape)


_HELD = -1  # the id under which whole_parameters marks a ZeRO-3 parameter in use


@contextlib.contextmanager
def whole_parameters(params: Iterable[torch.Tensor]):
    """Hold parameters whole for the block. DeepSpeed ZeRO-3 partitions every parameter (those
    with a ``ds_id``) and gathers it only while its own module runs; the code that reads an
    lm_head weight outside its module (the fused loss, held-out NLL, agreement) runs inside this.

    The parameters are gathered (a collective: every rank enters alike) and marked in use for the
    block, as a module running would mark them, so ZeRO-3 does not release a head tied to the
    input embedding when the embedding's forward ends; at the end each is partitioned again unless
    a module still uses it (then ZeRO-3 releases it when that module is done). Gradients computed
    inside reach ZeRO-3's reduction as usual. A no-op for parameters that are not partitioned."""
    sharded = list({id(p): p for p in params if p is not None and hasattr(p, "ds_id")}.values())
    if not sharded:
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    sharded[0].all_gather(param_list=sharded)  # gathers those not available
    for p in sharded:
        p.ds_active_sub_modules.add(_HELD)
    try:
        yield
    finally:
        for p in sharded:
            p.ds_active_sub_modules.discard(_HELD)
        free = [p for p in sharded if not p.ds_active_sub_modules and not p.ds_persist
                and p.ds_status == ZeroParamStatus.AVAILABLE]
        if free:
            free[0].partition(param_list=free, has_been_updated=False)


def head_weights(*models: nn.Module | None) -> list[torch.Tensor]:
    """The lm_head weights of ``models`` (None entries skipped)."""
    return [decoder_and_head(m)[1].weight for m in models if m is not None]


def supports_hidden_path(model: nn.Module) -> bool:
    """Whether logits are exactly ``hidden @ lm_head.weight.T`` (no bias, scaling or softcap),
    so a loss can be computed from hidden states in chunks."""
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


def response_targets(labels: torch.Tensor) -> torch.Tensor:
    """(N,) the labelled next tokens, in the order of ``hidden[position_mask(labels)]``."""
    return labels[:, 1:][labels[:, 1:] != IGNORE_INDEX]


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """(N,) int64: the flat indices into the (B * L) positions of :func:`position_mask`'s positions,
    in its order. Taken from the labels on the host, they let the device gather the positions
    (:func:`gather_positions`) without reading a mask back, which would wait for the device."""
    return position_mask(labels).flatten().nonzero().squeeze(1)


def gather_positions(states: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N, ...) the rows of ``states`` (B, L, ...) at the flat ``positions`` (N,) of
    :func:`response_positions`: ``states[position_mask(labels)]``, the same values and gradients,
    with no device sync (a boolean-mask index counts the mask on the host first)."""
    return states.flatten(0, 1).index_select(0, positions)


def gather_targets(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(N,) :func:`response_targets` from the flat ``positions``: each position's next token
    (never past its row's end: the last position of a row is not among them)."""
    return labels.flatten().index_select(0, positions + 1)
