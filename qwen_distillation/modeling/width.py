"""Activation-based width pruning (Minitron) of Llama and Qwen2 causal LMs.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
Distillation"; Sreenivas et al. 2024, "LLM Pruning and Distillation in Practice") ranks the
channels of each width axis by the activations they produce on a small calibration set, with
forward passes only, keeps the most important ones, and then distils the smaller model from the
original one. :func:`width_importance` computes the scores (:class:`WidthScores`, saveable as
JSON); :func:`prune_width` builds the smaller model from them:

- MLP neurons: ``intermediate_size`` per layer (gate/up rows, down_proj columns);
- attention: ``num_key_value_heads`` whole KV groups per layer, each with all its query heads
  (so grouped-query attention keeps its group size and ``num_attention_heads`` shrinks with it);
- embedding channels: ``hidden_size`` for the whole model (every weight that reads or writes the
  residual stream, the norms, the embedding and the lm_head).

Every layer gets the same target (a Hugging Face config has one ``intermediate_size``, one
``num_key_value_heads``), but each layer keeps its own top channels. Kept channels stay in their
original order, so a target equal to the model's size reproduces the model exactly. The result is
a standard model of the same class (``save_pretrained`` / ``from_pretrained`` need nothing
special). Supported: the Llama and Qwen2 layout (``model.embed_tokens``, ``model.layers[i]`` with
``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``; ``model.norm``; ``lm_head``), with or without biases, tied
embeddings, grouped-query attention and an explicit ``head_dim``; a model with any other
parameter is refused rather than pruned half-way.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from typing import Iterable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from qwen_distillation.errors import ConfigError, DataError, DistillationError, first_line, require
from qwen_distillation.modeling.parts import head_dim, model_inputs

WIDTH_OPTION = "model.student.prune.width"

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass
class WidthScores:
    """Minitron activation importance of a model's width channels (higher: more important).

    Attributes:
        mlp: (num_layers, intermediate_size): per MLP neuron, from the activation entering
            down_proj, ``act(gate_proj(x)) * up_proj(x)``.
        heads: (num_layers, num_attention_heads): per query head, from the L2 norm of the head's
            output entering o_proj (attention output before the output projection).
        kv_groups: (num_layers, num_key_value_heads): the sum of ``heads`` over the query heads
            that share each key/value head.
        hidden: (hidden_size,): per embedding channel, from the outputs of every RMSNorm (both
            norms of every layer and the final norm), summed over the norms.
        num_sequences: calibration sequences with at least one token.
        num_tokens: calibration tokens (attention_mask == 1).
    """

    mlp: torch.Tensor
    heads: torch.Tensor
    kv_groups: torch.Tensor
    hidden: torch.Tensor
    num_sequences: int = 0
    num_tokens: int = 0

    def to_dict(self) -> dict:
        """Plain lists and ints, for ``json.dump``; :meth:`from_dict` reads it back."""
        return {"mlp": self.mlp.tolist(), "heads": self.heads.tolist(), "kv_groups": self.kv_groups.tolist(),
                "hidden": self.hidden.tolist(), "num_sequences": self.num_sequences,
                "num_tokens": self.num_tokens}

    @classmethod
    def from_dict(cls, data: dict) -> WidthScores:
        tensors = {name: torch.tensor(data[name], dtype=torch.float32)
                   for name in ("mlp", "heads", "kv_groups", "hidden")}
        return cls(**tensors, num_sequences=int(data.get("num_sequences", 0)),
                   num_tokens=int(data.get("num_tokens", 0)))


@dataclass
class _Layout:
    """The modules and sizes of a Llama/Qwen2-like causal LM that width pruning reads."""

    decoder: nn.Module
    embed: nn.Module
    layers: list[nn.Module]
    norm: nn.Module
    lm_head: nn.Module
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _layout(model: nn.Module) -> _Layout:
    """Find the modules of a Llama/Qwen2-like model; ConfigError naming the first one missing."""
    name = type(model).__name__

    def refuse(what: str) -> ConfigError:
        return ConfigError(f"{WIDTH_OPTION}: cannot width-prune {name}: {what}; width pruning supports "
                           f"causal LMs of the Llama/Qwen2 layout (model.embed_tokens, model.layers.N.self_attn.q_proj/"
                           f"k_proj/v_proj/o_proj, model.layers.N.mlp.gate_proj/up_proj/down_proj, "
                           f"input_layernorm, post_attention_layernorm, model.norm, lm_head)")

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if decoder is None or decoder is model:
        raise refuse("it has no decoder stack (get_decoder)")
    if not isinstance(lm_head, nn.Linear):
        raise refuse("missing module lm_head (an nn.Linear output embedding)")
    for attr in ("embed_tokens", "layers", "norm"):
        if not isinstance(getattr(decoder, attr, None), nn.Module):
            raise refuse(f"missing module model.{attr}")
    for i, layer in enumerate(decoder.layers):
        for path in _PROJECTIONS + _LAYER_NORMS:
            try:
                module = layer.get_submodule(path)
            except AttributeError:
                raise refuse(f"missing module model.layers.{i}.{path}") from None
            if path in _PROJECTIONS and not isinstance(module, nn.Linear):
                raise refuse(f"model.layers.{i}.{path} is a {type(module).__name__}, not an nn.Linear")
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_size = head_dim(config)
    attn = decoder.layers[0].self_attn
    if (attn.q_proj.out_features != num_heads * head_size or attn.k_proj.out_features != num_kv_heads * head_size
            or num_heads % num_kv_heads):
        raise refuse(f"its attention shapes (q_proj {attn.q_proj.out_features}, k_proj "
                     f"{attn.k_proj.out_features}) do not match num_attention_heads={num_heads}, "
                     f"num_key_value_heads={num_kv_heads}, head_dim={head_size}")
    return _Layout(decoder=decoder, embed=decoder.embed_tokens, layers=list(decoder.layers), norm=decoder.norm,
                   lm_head=lm_head, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_size)


# ---------------------------------------------------------------- importance


class _Activations:
    """Forward hooks' accumulators: per channel, the sum over sequences of the squared
    per-sequence mean activation magnitude (its square root is Minitron's batch=L2, seq=mean)."""

    def __init__(self, layout: _Layout, device: torch.device):
        zeros = partial(torch.zeros, dtype=torch.float32, device=device)
        num_layers = len(layout.layers)
        self.head_dim = layout.head_dim
        self.mlp = zeros(num_layers, layout.intermediate_size)
        self.heads = zeros(num_layers, layout.num_heads)
        self.norms = zeros(2 * num_layers + 1, layout.hidden_size)
        self.mask: torch.Tensor | None = None  # (batch, seq) bool, this batch's attention_mask == 1

    def _sum_of_squared_means(self, magnitude: torch.Tensor) -> torch.Tensor:
        """magnitude (batch, seq, channels) -> (channels,): each sequence's mean over its tokens,
        squared and summed over the sequences; padding (mask 0) does not count."""
        mask = self.mask
        # masked_fill, not a product: a padded query row that attends to no key can be NaN.
        sums = magnitude.masked_fill(~mask[..., None], 0).sum(1)
        means = sums / mask.sum(1, keepdim=True).clamp(min=1)
        return means.square().sum(0)

    def record_mlp(self, layer: int, module: nn.Module, args: tuple) -> None:
        self.mlp[layer] += self._sum_of_squared_means(args[0].detach().float().abs())

    def record_heads(self, layer: int, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().float()  # (batch, seq, num_heads * head_dim), heads contiguous
        per_head = torch.linalg.vector_norm(x.unflatten(-1, (-1, self.head_dim)), dim=-1)
        self.heads[layer] += self._sum_of_squared_means(per_head)

    def record_norm(self, index: int, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.norms[index] += self._sum_of_squared_means(output.detach().float().abs())


def width_importance(model: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]]) -> WidthScores:
    """Minitron's activation-based importance of every MLP neuron, attention head and embedding
    channel, from forward passes (eval mode, no gradients) over calibration ``batches``.

    Args:
        model: a Llama/Qwen2-like causal LM (without LoRA adapters).
        batches: dicts with ``input_ids`` (batch, seq) and ``attention_mask`` (batch, seq), left or
            right padded; other keys (``labels``) are ignored.

    Each channel's activation magnitude is aggregated as in Minitron's best setting, "batch=L2,
    seq=mean" (a best practice of Muralidharan et al. 2024, used again by Sreenivas et al. 2024:
    "l2-norm and mean ... across the batch and sequence dimensions, respectively"; NVIDIA's Model
    Optimizer does the same): the mean over each sequence's tokens, then the L2 norm over all
    calibration sequences, not the other way round. Padding tokens (attention_mask == 0) count for
    nothing, so the scores do not depend on how the sequences are padded or grouped into batches.

    - MLP neurons: |act(gate_proj(x)) * up_proj(x)|, the activation entering down_proj.
    - heads: the L2 norm of each query head's output (head_dim values) entering o_proj;
      ``kv_groups`` sums the heads that share a key/value head.
    - embedding channels: |RMSNorm output| of every norm (input_layernorm and
      post_attention_layernorm of each layer, the final norm), aggregated per norm then summed.

    Returns:
        WidthScores on the CPU, float32.

    Raises:
        ConfigError: the model is not Llama/Qwen2-like (names the missing module).
        DataError: the batches hold no token.
    """
    layout = _layout(model)
    device = layout.embed.weight.device
    acts = _Activations(layout, device)
    handles = []
    for i, layer in enumerate(layout.layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(partial(acts.record_mlp, i)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(partial(acts.record_heads, i)))
        handles.append(layer.input_layernorm.register_forward_hook(partial(acts.record_norm, 2 * i)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(partial(acts.record_norm, 2 * i + 1)))
    handles.append(layout.norm.register_forward_hook(partial(acts.record_norm, 2 * len(layout.layers))))
    was_training = model.training
    model.eval()
    num_sequences = num_tokens = 0
    try:
        with torch.no_grad():
            for batch in batches:
                input_ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
                acts.mask = mask == 1
                num_sequences += int(acts.mask.any(1).sum())
                num_tokens += int(acts.mask.sum())
                # The decoder alone: the importance needs no logits (seq x vocab per sequence).
                layout.decoder(**model_inputs({"input_ids": input_ids, "attention_mask": mask}))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if num_tokens == 0:
        raise DataError(f"{WIDTH_OPTION}: the calibration batches hold no tokens (every attention_mask "
                        f"is 0, or there are no batches); give the importance pass some data")
    heads = acts.heads.sqrt().cpu()
    return WidthScores(mlp=acts.mlp.sqrt().cpu(), heads=heads,
                       kv_groups=heads.unflatten(1, (layout.num_kv_heads, layout.group_size)).sum(-1),
                       hidden=acts.norms.sqrt().sum(0).cpu(), num_sequences=num_sequences, num_tokens=num_tokens)


# ---------------------------------------------------------------- pruning


def _top_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` (ties: the lower index), in ascending order."""
    return torch.sort(scores, descending=True, stable=True).indices[:k].sort().values


def _target(value, size: int, name: str) -> int | None:
    key = f"{WIDTH_OPTION}.{name}"
    if value is None:
        return None
    require(isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= size, key, value,
            f"must be an integer from 1 to the model's {name} ({size}), or null to keep it",
            f"{key}={max(1, size // 2)}")
    return value


def check_width_targets(config, targets: dict[str, int]) -> None:
    """Each width target within the model's size, from its config alone: a run checks them before
    the teacher's weights load (minutes for a large one) and its calibration runs."""
    sizes = {"intermediate_size": config.intermediate_size, "hidden_size": config.hidden_size,
             "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    for name, value in targets.items():
        _target(value, sizes[name], name)
    num_heads = config.num_attention_heads
    if num_heads % sizes["num_key_value_heads"] == 0:  # else _layout refuses the model, naming its shapes
        # The combination too (a Llama hidden_size not a multiple of its heads), not only after calibration.
        head_size = head_dim(config)
        pruned = _pruned_config(config, head_size, num_heads // sizes["num_key_value_heads"],
                                targets.get("intermediate_size"), targets.get("num_key_value_heads"),
                                targets.get("hidden_size"))
        if pruned.hidden_size != pruned.num_attention_heads * head_size:  # a family may size heads by the ratio
            from transformers import AutoModelForCausalLM

            with no_init_weights(), torch.device("meta"):
                model = AutoModelForCausalLM.from_config(pruned)
            _check_heads_fit(model, pruned, head_size, _target_keys(
                targets.get("intermediate_size"), targets.get("num_key_value_heads"), targets.get("hidden_size")))


def _check_scores(layout: _Layout, scores: WidthScores) -> None:
    num_layers = len(layout.layers)
    expected = {"mlp": (num_layers, layout.intermediate_size), "heads": (num_layers, layout.num_heads),
                "kv_groups": (num_layers, layout.num_kv_heads), "hidden": (layout.hidden_size,)}
    wrong = {name: tuple(getattr(scores, name).shape) for name, shape in expected.items()
             if tuple(getattr(scores, name).shape) != shape}
    if wrong:
        raise DistillationError(f"{WIDTH_OPTION}: the width scores do not belong to this model: shapes {wrong}, "
                                f"the model needs {expected}; compute them on this model with width_importance")


def _invalid(config) -> str | None:
    """Why the config class refuses ``config`` (Llama: hidden_size not a multiple of
    num_attention_heads), or None. save_pretrained and from_pretrained run the same check."""
    try:
        if hasattr(config, "validate"):
            config.validate()
    except Exception as err:  # huggingface_hub's strict-dataclass error wraps the reason
        return first_line(err.__cause__ or err)
    return None


def _target_keys(intermediate_size, num_kv_heads, hidden_size) -> list[str]:
    """The width options given (not None), as a user writes them."""
    return [f"{WIDTH_OPTION}.{name}={value}" for name, value in (
        ("intermediate_size", intermediate_size), ("num_key_value_heads", num_kv_heads),
        ("hidden_size", hidden_size)) if value is not None]


def _check_heads_fit(model: nn.Module, config, head_size: int, keys: list[str]) -> None:
    """``model`` (built from the pruned ``config``) holds heads of ``head_size``, the size the pruning keeps.
    A family whose attention sizes its heads as ``hidden_size // num_attention_heads`` whatever
    ``config.head_dim`` says (StableLM) builds others when the targets change that ratio: ConfigError naming
    the targets and the hidden_size that fits, not a size mismatch as the weights load."""
    built = model.get_decoder().layers[0].self_attn.q_proj.out_features
    if built == config.num_attention_heads * head_size:
        return
    fits = config.num_attention_heads * head_size
    raise ConfigError(f"{', '.join(keys)}: {type(model).__name__} sizes its attention heads as hidden_size // "
                      f"num_attention_heads ({config.hidden_size} // {config.num_attention_heads}), not the teacher's "
                      f"head_dim {head_size} that pruning keeps; with these targets set {WIDTH_OPTION}.hidden_size="
                      f"{fits} (num_attention_heads x head_dim), or keep hidden_size and the heads at the teacher's")


def _pruned_config(model_config, head_size: int, group_size: int, intermediate_size, num_kv_heads, hidden_size):
    """The config of ``model_config``'s model pruned to these targets (None: kept); ConfigError naming the
    targets when the config class refuses it."""
    config = copy.deepcopy(model_config)
    if hasattr(config, "quantization_config"):  # a GGUF teacher is dequantized: the copy is plain
        del config.quantization_config
    # Explicit, or Qwen2 and the rotary embedding would recompute it as hidden_size // num_attention_heads.
    config.head_dim = head_size
    if intermediate_size is not None:
        config.intermediate_size = intermediate_size
    if num_kv_heads is not None:
        config.num_key_value_heads = num_kv_heads
        config.num_attention_heads = num_kv_heads * group_size
    if hidden_size is not None:
        config.hidden_size = hidden_size
    reason = _invalid(config)
    if reason is None:
        return config
    keys = _target_keys(intermediate_size, num_kv_heads, hidden_size)
    fix = "choose other targets"
    if hidden_size is not None:  # suggest the nearest smaller hidden_size the config class accepts
        probe = copy.deepcopy(config)
        for candidate in range(hidden_size - 1, 0, -1):
            probe.hidden_size = candidate
            if _invalid(probe) is None:
                fix = f"e.g. {WIDTH_OPTION}.hidden_size={candidate} is accepted"
                break
    raise ConfigError(f"{', '.join(keys)}: the pruned model's {type(config).__name__} is invalid ({reason}); {fix}")


def _slicing_plan(model: PreTrainedModel, layout: _Layout, mlp_keep, group_keep, hidden_keep) -> dict:
    """State-dict key -> (rows, columns) to keep, each an index tensor or None (keep all)."""
    names = {module: name for name, module in model.named_modules()}
    plan: dict[str, tuple] = {}

    def linear(module: nn.Linear, rows, columns) -> None:
        plan[f"{names[module]}.weight"] = (rows, columns)
        if module.bias is not None:
            plan[f"{names[module]}.bias"] = (rows, None)

    def norm(module: nn.Module) -> None:
        for param_name, _ in module.named_parameters(recurse=False):
            plan[f"{names[module]}.{param_name}"] = (hidden_keep, None)

    plan[f"{names[layout.embed]}.weight"] = (None, hidden_keep)  # padded vocabulary rows stay
    linear(layout.lm_head, None, hidden_keep)
    norm(layout.norm)
    d = layout.head_dim
    for i, layer in enumerate(layout.layers):
        q_rows = kv_rows = None
        if group_keep is not None:
            kv_heads = group_keep[i]
            q_heads = (kv_heads[:, None] * layout.group_size + torch.arange(layout.group_size)).flatten()
            q_rows = (q_heads[:, None] * d + torch.arange(d)).flatten()
            kv_rows = (kv_heads[:, None] * d + torch.arange(d)).flatten()
        neurons = None if mlp_keep is None else mlp_keep[i]
        attn, mlp = layer.self_attn, layer.mlp
        linear(attn.q_proj, q_rows, hidden_keep)
        linear(attn.k_proj, kv_rows, hidden_keep)
        linear(attn.v_proj, kv_rows, hidden_keep)
        linear(attn.o_proj, hidden_keep, q_rows)
        linear(mlp.gate_proj, neurons, hidden_keep)
        linear(mlp.up_proj, neurons, hidden_keep)
        linear(mlp.down_proj, hidden_keep, neurons)
        norm(layer.input_layernorm)
        norm(layer.post_attention_layernorm)
    return plan


def _slice(tensor: torch.Tensor, rows, columns) -> torch.Tensor:
    tensor = tensor.detach()
    if rows is None and columns is None:
        return tensor.clone()
    if rows is not None:
        tensor = tensor.index_select(0, rows.to(tensor.device))
    if columns is not None:
        tensor = tensor.index_select(1, columns.to(tensor.device))
    return tensor


def prune_width(model: PreTrainedModel, scores: WidthScores, *, intermediate_size: int | None = None,
                num_key_value_heads: int | None = None, hidden_size: int | None = None) -> PreTrainedModel:
    """A new, narrower model of the same class, keeping the highest-scoring channels of ``model``.

    Args:
        model: a Llama/Qwen2-like causal LM (not a peft wrapper); it is not modified.
        scores: :func:`width_importance` of ``model``.
        intermediate_size: MLP neurons kept in every layer (each layer its own top ones by
            ``scores.mlp``); None keeps all.
        num_key_value_heads: KV groups kept in every layer (top by ``scores.kv_groups``), each
            with all of its query heads; ``num_attention_heads`` becomes this times the group
            size, ``head_dim`` is kept and written to the config. None keeps all.
        hidden_size: embedding channels kept (top by ``scores.hidden``, one set for the whole
            model); tied embeddings stay tied; vocabulary rows are untouched. None keeps all.

    Kept channels keep their original order, so targets equal to the model's sizes (or all None)
    give a model whose logits equal ``model``'s exactly. The result has ``model``'s dtype, device
    and train/eval mode.

    Raises:
        ConfigError: a target below 1 or above the model's size, or one the model's config class
            refuses (e.g. a Llama hidden_size that is not a multiple of num_attention_heads), named
            by its ``model.student.prune.width.*`` option; or a model that is not Llama/Qwen2-like
            (names the missing module or unknown parameter).
        DistillationError: ``scores`` were computed on a model of other sizes.
    """
    if hasattr(model, "get_base_model"):
        raise ConfigError(f"{WIDTH_OPTION}: prune the base model before adding LoRA adapters "
                          f"(got a {type(model).__name__})")
    layout = _layout(model)
    intermediate_size = _target(intermediate_size, layout.intermediate_size, "intermediate_size")
    num_key_value_heads = _target(num_key_value_heads, layout.num_kv_heads, "num_key_value_heads")
    hidden_size = _target(hidden_size, layout.hidden_size, "hidden_size")
    _check_scores(layout, scores)
    config = _pruned_config(model.config, layout.head_dim, layout.group_size, intermediate_size,
                            num_key_value_heads, hidden_size)

    num_layers = len(layout.layers)
    mlp_keep = None if intermediate_size is None else [
        _top_sorted(scores.mlp[i], intermediate_size) for i in range(num_layers)]
    group_keep = None if num_key_value_heads is None else [
        _top_sorted(scores.kv_groups[i], num_key_value_heads) for i in range(num_layers)]
    hidden_keep = None if hidden_size is None else _top_sorted(scores.hidden, hidden_size)
    plan = _slicing_plan(model, layout, mlp_keep, group_keep, hidden_keep)

    state = model.state_dict()
    unknown = [key for key in state if key not in plan]
    if unknown:
        raise ConfigError(f"{WIDTH_OPTION}: cannot width-prune {type(model).__name__}: it has parameters a "
                          f"Llama/Qwen2 model does not have, e.g. {unknown[:5]}")
    pruned_state = {key: _slice(value, *plan[key]) for key, value in state.items()}

    weight = layout.embed.weight
    # No random initialisation: every parameter is overwritten from the pruned state right after.
    with no_init_weights(), torch.device(weight.device):
        pruned = type(model)._from_config(config, dtype=weight.dtype)
    _check_heads_fit(pruned, config, layout.head_dim,
                     _target_keys(intermediate_size, num_key_value_heads, hidden_size))
    missing, unexpected = pruned.load_state_dict(pruned_state, strict=False)
    if getattr(config, "tie_word_embeddings", False):  # the head is the embedding; tie_weights below
        missing = [key for key in missing if not key.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"{WIDTH_OPTION}: cannot width-prune {type(model).__name__}: the pruned model "
                          f"misses {missing[:5]} and does not expect {unexpected[:5]}")
    pruned.tie_weights()
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.train(model.training)
