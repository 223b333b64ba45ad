"""Tests for Minitron width pruning (qwen_distillation.modeling.width) on tiny random Llama and
Qwen2 models: the importance scores against a plain-torch forward pass, and pruned models
against models sliced by hand."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from transformers import GraniteConfig, GraniteForCausalLM, StableLmConfig, StableLmForCausalLM

from qwen_distillation.errors import ConfigError, DistillationError
from qwen_distillation.modeling.width import WidthScores, check_width_targets, prune_width, width_importance

# Tiny tensors: one intra-op thread avoids contention (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 101, 64, 96, 4, 2, 16, 2
FAMILIES = {
    # Llama with every optional bias, so bias slicing is exercised; Qwen2 has q/k/v biases.
    "llama": (LlamaForCausalLM, LlamaConfig, dict(attention_bias=True, mlp_bias=True)),
    "qwen2": (Qwen2ForCausalLM, Qwen2Config, {}),
    "qwen2-tied": (Qwen2ForCausalLM, Qwen2Config, dict(tie_word_embeddings=True)),
    # The same module layout under other names (docs/pruning.md): LayerNorm with biases, Granite's multipliers.
    "stablelm": (StableLmForCausalLM, StableLmConfig, {}),
    "granite": (GraniteForCausalLM, GraniteConfig, dict(embedding_multiplier=2.0, residual_multiplier=0.5,
                                                        logits_scaling=4.0)),
}


def tiny(family: str, seed: int = 0, **overrides):
    """A random fp32 model in eval mode; every weight and bias random (biases are 0 and norms 1
    after the default init, which would hide a wrongly sliced bias or norm)."""
    model_cls, config_cls, extra = FAMILIES[family]
    config = config_cls(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                        max_position_embeddings=64, **{**extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0, 0.15)
    return model.eval()


def batch(seed: int, lengths: list[int]) -> dict:
    """Rows of random tokens with ``lengths`` real tokens each, right-padded with random (non-zero)
    ids; the labels are there to be ignored."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, VOCAB, (len(lengths), max(lengths)), generator=generator)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def logits(model, data: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits


# ---------------------------------------------------------------- importance


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, positions, theta):
    """x (batch, heads, seq, head_dim), rotate-half RoPE at ``positions`` (seq,)."""
    d = x.shape[-1]
    freqs = positions[:, None].double() / theta ** (torch.arange(0, d, 2).double() / d)
    angles = torch.cat((freqs, freqs), -1)
    cos, sin = angles.cos().float(), angles.sin().float()
    rotated = torch.cat((-x[..., d // 2:], x[..., : d // 2]), -1)
    return x * cos + rotated * sin


def hand_forward(model, data: dict) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Plain-torch forward of a Llama/Qwen2 model (right padding only: positions 0..seq-1).

    Returns the logits and, per layer or norm, the activations the scores read: ``mlp`` (batch,
    seq, intermediate), ``heads`` (batch, seq, heads) per-token head-output L2 norms, ``norms``
    (batch, seq, hidden) for input norm, post-attention norm of each layer, then the final norm."""
    config = model.config
    eps, theta = config.rms_norm_eps, config.rope_parameters["rope_theta"]
    ids, mask = data["input_ids"], data["attention_mask"].bool()
    b, t = ids.shape
    rep = HEADS // KV_HEADS
    allowed = torch.ones(t, t).tril().bool()[None, None] & mask[:, None, None, :]
    found = {"mlp": [], "heads": [], "norms": []}
    with torch.no_grad():
        h = model.model.embed_tokens.weight[ids]
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            x = _rms(h, layer.input_layernorm.weight, eps)
            found["norms"].append(x)
            q = F.linear(x, attn.q_proj.weight, attn.q_proj.bias).view(b, t, HEADS, HEAD_DIM).transpose(1, 2)
            k = F.linear(x, attn.k_proj.weight, attn.k_proj.bias).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
            v = F.linear(x, attn.v_proj.weight, attn.v_proj.bias).view(b, t, KV_HEADS, HEAD_DIM).transpose(1, 2)
            positions = torch.arange(t)
            q, k = _rope(q, positions, theta), _rope(k, positions, theta)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            weights = (q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)).masked_fill(~allowed, float("-inf"))
            heads_out = (weights.softmax(-1) @ v).transpose(1, 2)  # (b, t, heads, head_dim)
            found["heads"].append(heads_out.norm(dim=-1))
            h = h + F.linear(heads_out.flatten(2), attn.o_proj.weight, attn.o_proj.bias)
            x = _rms(h, layer.post_attention_layernorm.weight, eps)
            found["norms"].append(x)
            inner = F.silu(F.linear(x, mlp.gate_proj.weight, mlp.gate_proj.bias)) * F.linear(
                x, mlp.up_proj.weight, mlp.up_proj.bias)
            found["mlp"].append(inner)
            h = h + F.linear(inner, mlp.down_proj.weight, mlp.down_proj.bias)
        final = _rms(h, model.model.norm.weight, eps)
        found["norms"].append(final)
        return final @ model.lm_head.weight.T, found


def hand_scores(model, batches: list[dict]) -> WidthScores:
    """Minitron batch=L2, seq=mean, one sequence at a time: the mean of |activation| over the
    sequence's real tokens, then the L2 norm over every sequence of every batch."""
    sums = {"mlp": 0.0, "heads": 0.0, "norms": 0.0}
    for data in batches:
        _, found = hand_forward(model, data)
        for name, per_module in found.items():
            stacked = torch.stack(per_module)  # (modules, batch, seq, channels)
            for row, mask in enumerate(data["attention_mask"].bool()):
                sums[name] = sums[name] + stacked[:, row, mask].abs().mean(1).square()
    heads = sums["heads"].sqrt()
    return WidthScores(mlp=sums["mlp"].sqrt(), heads=heads, kv_groups=heads.view(LAYERS, KV_HEADS, -1).sum(-1),
                       hidden=sums["norms"].sqrt().sum(0))


def test_pruning_md_states_the_aggregation_the_scores_use():
    """docs/pruning.md said "L2 over the sequence, mean over the batch", the reverse of what width_importance
    computes (hand_scores above: the mean over each sequence's tokens, then L2 over the sequences)."""
    from pathlib import Path

    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "pruning.md").read_text().split())
    assert "mean over each sequence's tokens, then L2 over the sequences" in text
    assert "L2 over the sequence, mean over the batch" not in text


def assert_scores_close(actual: WidthScores, expected: WidthScores, rtol=1e-5):
    for name in ("mlp", "heads", "kv_groups", "hidden"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=rtol, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_scores_equal_a_plain_torch_computation(family):
    model = tiny(family)
    batches = [batch(1, [9, 6, 3]), batch(2, [7, 7])]
    hand_logits, _ = hand_forward(model, batches[0])
    real = batches[0]["attention_mask"].bool()
    # The hand forward is the model (at the real tokens), so its activations are the model's.
    torch.testing.assert_close(hand_logits[real], logits(model, batches[0])[real], rtol=1e-4, atol=1e-4)

    scores = width_importance(model, batches)

    assert scores.mlp.shape == (LAYERS, INTERMEDIATE) and scores.heads.shape == (LAYERS, HEADS)
    assert scores.kv_groups.shape == (LAYERS, KV_HEADS) and scores.hidden.shape == (HIDDEN,)
    assert (scores.num_sequences, scores.num_tokens) == (5, 32)
    assert_scores_close(scores, hand_scores(model, batches))
    # Query heads 2g and 2g+1 share key/value head g.
    torch.testing.assert_close(scores.kv_groups, scores.heads[:, 0::2] + scores.heads[:, 1::2], rtol=0, atol=0)
    # Random weights give distinct scores, so the rankings below are not decided by ties.
    assert scores.mlp[0].unique().numel() == INTERMEDIATE and scores.hidden.unique().numel() == HIDDEN


def test_padding_and_batching_do_not_change_scores():
    model = tiny("llama")
    lengths = [9, 6, 3]
    reference = width_importance(model, [batch(1, lengths)])
    unpadded = batch(1, lengths)
    one_by_one = [{k: v[row: row + 1, :length] for k, v in unpadded.items()} for row, length in enumerate(lengths)]
    wider = batch(1, lengths)
    extra = torch.randint(1, VOCAB, (3, 5), generator=torch.Generator().manual_seed(9))
    wider = {"input_ids": torch.cat((wider["input_ids"], extra), 1),
             "attention_mask": torch.cat((wider["attention_mask"], torch.zeros(3, 5, dtype=torch.long)), 1)}
    left = {"input_ids": torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(8)),
            "attention_mask": torch.zeros(3, 12, dtype=torch.long)}
    for row, length in enumerate(lengths):
        left["input_ids"][row, 12 - length:] = unpadded["input_ids"][row, :length]
        left["attention_mask"][row, 12 - length:] = 1
    # Left padding shifts absolute positions; RoPE attention depends only on relative ones.
    for other in ([wider], one_by_one, [left]):
        scores = width_importance(model, other)
        assert (scores.num_sequences, scores.num_tokens) == (3, 18)
        assert_scores_close(scores, reference, rtol=1e-4)
    # The padding tokens do have activations: counted as tokens, they would move every score.
    all_tokens = width_importance(model, [{"input_ids": wider["input_ids"]}])
    assert all_tokens.num_tokens == 3 * 14
    assert not torch.allclose(all_tokens.mlp, reference.mlp, rtol=1e-2)


def test_importance_restores_the_model_and_scores_round_trip_through_json():
    model = tiny("qwen2").train()
    scores = width_importance(model, [batch(1, [5, 4])])
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    again = WidthScores.from_dict(json.loads(json.dumps(scores.to_dict())))
    for name in ("mlp", "heads", "kv_groups", "hidden"):
        assert torch.equal(getattr(again, name), getattr(scores, name))
    assert (again.num_sequences, again.num_tokens) == (2, 9)


# ---------------------------------------------------------------- pruning


def scores_of(model) -> WidthScores:
    return width_importance(model, [batch(1, [9, 6, 3]), batch(2, [8, 8])])


def top_sorted(values: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest values, in ascending order (by hand)."""
    return sorted(sorted(range(len(values)), key=lambda i: -float(values[i]))[:k])


def reference_model(model, **config_changes):
    """An empty model of ``model``'s class with ``config_changes``, to load hand-sliced weights into."""
    config = copy.deepcopy(model.config)
    for key, value in config_changes.items():
        setattr(config, key, value)
    return type(model)(config).eval()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen2-tied"])
def test_pruning_nothing_reproduces_the_model_exactly(family):
    model = tiny(family)
    scores = scores_of(model)
    data = batch(3, [9, 4])
    expected = logits(model, data)
    full = prune_width(model, scores, intermediate_size=INTERMEDIATE, num_key_value_heads=KV_HEADS,
                       hidden_size=HIDDEN)
    untouched = prune_width(model, scores)
    for pruned in (full, untouched):
        assert type(pruned) is type(model) and pruned is not model and not pruned.training
        assert torch.equal(logits(pruned, data), expected)
        assert (pruned.config.hidden_size, pruned.config.intermediate_size, pruned.config.num_attention_heads,
                pruned.config.num_key_value_heads, pruned.config.head_dim) == (HIDDEN, INTERMEDIATE, HEADS,
                                                                             KV_HEADS, HEAD_DIM)
        # A copy: changing it leaves the original alone.
        assert pruned.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("family", ["llama", "qwen2-tied"])
def test_pruned_model_round_trips_through_save_pretrained(family, tmp_path):
    model = tiny(family)
    pruned = prune_width(model, scores_of(model), intermediate_size=40, num_key_value_heads=1, hidden_size=48)
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    data = batch(3, [9, 4])
    assert torch.equal(logits(loaded.eval(), data), logits(pruned, data))
    config = loaded.config
    # head_dim stays 16 although hidden_size // num_attention_heads is now 24.
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, config.vocab_size) == (48, 40, 2, 1, 16, VOCAB)
    assert json.loads((tmp_path / "config.json").read_text())["head_dim"] == 16
    attn = loaded.model.layers[1].self_attn
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape, attn.o_proj.weight.shape) == (
        (32, 48), (16, 48), (48, 32))
    assert loaded.model.layers[0].mlp.down_proj.weight.shape == (48, 40)
    tied = family == "qwen2-tied"
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    # Every parameter is in the smaller model: 101*48 (embedding) + head + 2 layers + final norm.
    layer_params = (48 * 32 + 48 * 16 * 2 + 32 * 48) + 3 * 48 * 40 + 2 * 48
    layer_params += (32 + 16 + 16 + 48 + 40 * 2 + 48) if family == "llama" else (32 + 16 + 16)
    expected = VOCAB * 48 * (1 if tied else 2) + LAYERS * layer_params + 48
    assert sum(p.numel() for p in loaded.parameters()) == expected


@pytest.mark.parametrize("family", ["stablelm", "granite"])
def test_other_families_of_the_layout_prune_and_round_trip(family, tmp_path):
    """docs/pruning.md names the families width pruning takes by their layout: StableLM (LayerNorm, whose
    biases are sliced with the weights) and Granite (scalar multipliers, untouched) prune exactly at full
    size and load back from save_pretrained with every parameter, at smaller sizes."""
    model = tiny(family)
    scores, data = scores_of(model), batch(3, [9, 4])
    full = prune_width(model, scores, intermediate_size=INTERMEDIATE, num_key_value_heads=KV_HEADS,
                       hidden_size=HIDDEN)
    assert torch.equal(logits(full, data), logits(model, data))
    hidden = 32 if family == "stablelm" else 48  # StableLM: num_attention_heads x head_dim (below)
    pruned = prune_width(model, scores, intermediate_size=40, num_key_value_heads=1, hidden_size=hidden)
    pruned.save_pretrained(tmp_path)
    loaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert type(loaded) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert torch.equal(logits(loaded.eval(), data), logits(pruned, data))
    assert (loaded.config.hidden_size, loaded.config.intermediate_size, loaded.config.num_key_value_heads) == (
        hidden, 40, 1)


def test_a_family_that_sizes_heads_by_the_ratio_names_the_hidden_size_that_fits():
    """StableLM sizes its heads as hidden_size // num_attention_heads whatever config.head_dim says, so halving
    the KV groups while keeping 48 of 64 channels built heads of 24 for weights sliced into heads of 16: a
    RuntimeError (size mismatch) as they loaded, after the calibration. Now a ConfigError from the config
    alone (before the teacher's weights load) and from prune_width, naming the hidden_size that fits."""
    model = tiny("stablelm")
    targets = {"intermediate_size": 40, "num_key_value_heads": 1, "hidden_size": 48}
    expected = (r"hidden_size=48: StableLmForCausalLM sizes its attention heads as hidden_size // num_attention_heads "
                r"\(48 // 2\), not the teacher's head_dim 16 .*set model.student.prune.width.hidden_size=32")
    with pytest.raises(ConfigError, match=expected):
        check_width_targets(model.config, targets)
    with pytest.raises(ConfigError, match=expected):
        prune_width(model, scores_of(model), **targets)
    check_width_targets(model.config, {**targets, "hidden_size": 32})


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_mlp_pruning_equals_a_hand_sliced_model(family):
    model = tiny(family)
    scores = scores_of(model)
    pruned = prune_width(model, scores, intermediate_size=40)

    reference = reference_model(model, intermediate_size=40)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    kept = [top_sorted(scores.mlp[i], 40) for i in range(LAYERS)]
    assert kept[0] != kept[1]  # each layer keeps its own neurons
    for i, neurons in enumerate(kept):
        prefix = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[prefix + name + ".weight"] = state[prefix + name + ".weight"][neurons]
            if family == "llama":
                state[prefix + name + ".bias"] = state[prefix + name + ".bias"][neurons]
        state[prefix + "down_proj.weight"] = state[prefix + "down_proj.weight"][:, neurons]
    reference.load_state_dict(state, strict=True)

    data = batch(3, [9, 4])
    assert torch.equal(logits(pruned, data), logits(reference, data))
    assert not torch.allclose(logits(pruned, data), logits(model, data), atol=1e-3)
    assert (pruned.config.intermediate_size, pruned.config.hidden_size, pruned.config.num_key_value_heads) == (
        40, HIDDEN, KV_HEADS)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_head_pruning_keeps_whole_kv_groups(family):
    model = tiny(family)
    scores = scores_of(model)
    # Layer 0 keeps group 1 (query heads 2 and 3), layer 1 keeps group 0 (query heads 0 and 1):
    # the query heads' own scores point the other way, and must not matter.
    scores.kv_groups = torch.tensor([[1.0, 5.0], [5.0, 1.0]])
    scores.heads = torch.tensor([[9.0, 9.0, 1.0, 1.0], [1.0, 1.0, 9.0, 9.0]])
    pruned = prune_width(model, scores, num_key_value_heads=1)
    assert (pruned.config.num_attention_heads, pruned.config.num_key_value_heads, pruned.config.head_dim) == (
        2, 1, HEAD_DIM)

    reference = reference_model(model, num_attention_heads=2, num_key_value_heads=1, head_dim=HEAD_DIM)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for i, group in enumerate([1, 0]):
        q_rows = list(range(2 * group * HEAD_DIM, (2 * group + 2) * HEAD_DIM))  # query heads 2g, 2g+1
        kv_rows = list(range(group * HEAD_DIM, (group + 1) * HEAD_DIM))
        prefix = f"model.layers.{i}.self_attn."
        for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                state[prefix + name + "." + kind] = state[prefix + name + "." + kind][rows]
        state[prefix + "o_proj.weight"] = state[prefix + "o_proj.weight"][:, q_rows]
        attn = pruned.model.layers[i].self_attn
        assert torch.equal(attn.q_proj.weight, model.model.layers[i].self_attn.q_proj.weight[q_rows])
        assert torch.equal(attn.v_proj.bias, model.model.layers[i].self_attn.v_proj.bias[kv_rows])
    reference.load_state_dict(state, strict=True)

    data = batch(3, [9, 4])
    assert torch.equal(logits(pruned, data), logits(reference, data))


def test_hidden_pruning_keeps_the_top_channels_and_tied_embeddings():
    model = tiny("qwen2-tied")
    scores = scores_of(model)
    pruned = prune_width(model, scores, hidden_size=48)
    kept = top_sorted(scores.hidden, 48)
    dropped = sorted(set(range(HIDDEN)) - set(kept))
    assert scores.hidden[kept].min() > scores.hidden[dropped].max()

    embed = pruned.model.embed_tokens.weight
    assert pruned.config.tie_word_embeddings and pruned.lm_head.weight is embed
    assert torch.equal(embed, model.model.embed_tokens.weight[:, kept]) and embed.shape == (VOCAB, 48)
    assert torch.equal(pruned.model.norm.weight, model.model.norm.weight[kept])

    reference = reference_model(model, hidden_size=48, head_dim=HEAD_DIM)
    state = {}
    for key, value in model.state_dict().items():
        if key.endswith(("norm.weight",)):
            value = value[kept]
        elif key.endswith(("o_proj.weight", "down_proj.weight")):
            value = value[kept]  # they write the residual stream: output rows
        elif key.endswith(("embed_tokens.weight", "lm_head.weight", "_proj.weight")):
            value = value[:, kept]  # they read it: input columns
        state[key] = value.clone()
    reference.load_state_dict(state, strict=True)
    data = batch(3, [9, 4])
    assert torch.equal(logits(pruned, data), logits(reference, data))


def test_all_axes_at_once_equal_pruning_one_axis_after_another():
    model = tiny("llama")
    scores = scores_of(model)
    together = prune_width(model, scores, intermediate_size=40, num_key_value_heads=1, hidden_size=48)
    step = prune_width(model, scores, intermediate_size=40)
    step_scores = copy.deepcopy(scores)
    step_scores.mlp = torch.stack([scores.mlp[i][top_sorted(scores.mlp[i], 40)] for i in range(LAYERS)])
    step = prune_width(step, step_scores, num_key_value_heads=1)
    group = scores.kv_groups.argmax(1)
    step_scores.heads = torch.stack([scores.heads[i].view(KV_HEADS, -1)[group[i]] for i in range(LAYERS)])
    step_scores.kv_groups = scores.kv_groups.max(1, keepdim=True).values
    step = prune_width(step, step_scores, hidden_size=48)
    data = batch(3, [9, 4])
    assert torch.equal(logits(together, data), logits(step, data))


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("targets, option", [
    (dict(intermediate_size=97), "intermediate_size=97"),
    (dict(intermediate_size=0), "intermediate_size=0"),
    (dict(num_key_value_heads=3), "num_key_value_heads=3"),
    (dict(num_key_value_heads=0), "num_key_value_heads=0"),
    (dict(hidden_size=65), "hidden_size=65"),
    (dict(hidden_size=48.0), "hidden_size=48.0"),
    # LlamaConfig wants hidden_size to be a multiple of num_attention_heads (4, or 2 with one KV group).
    (dict(hidden_size=62), r"hidden_size=62: .* not a multiple .*; e.g. model.student.prune.width.hidden_size=60 is"),
    (dict(hidden_size=63, num_key_value_heads=1), r"num_key_value_heads=1, model.student.prune.width.hidden_size=63: "
                                                  r".*; e.g. model.student.prune.width.hidden_size=62 is accepted"),
])
def test_bad_targets_name_the_option(targets, option):
    model = tiny("llama")
    scores = scores_of(model)
    with pytest.raises(ConfigError, match=f"model.student.prune.width.{option}"):
        prune_width(model, scores, **targets)
    # The same error from the teacher's config alone, as a run checks before the teacher loads and calibrates.
    with pytest.raises(ConfigError, match=f"model.student.prune.width.{option}"):
        check_width_targets(model.config, targets)


def test_other_architectures_and_foreign_scores_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=16)).eval()
    with pytest.raises(ConfigError, match=r"model.student.prune.width: cannot width-prune GPT2LMHeadModel: "
                                          r"missing module model.embed_tokens"):
        width_importance(gpt2, [batch(1, [4])])
    # Qwen3 has the Llama module names plus per-head q_norm/k_norm: refused, not pruned half-way.
    qwen3 = Qwen3ForCausalLM(Qwen3Config(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                                         num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM)).eval()
    with pytest.raises(ConfigError, match=r"cannot width-prune Qwen3ForCausalLM: it has parameters .*q_norm"):
        prune_width(qwen3, scores_of(qwen3), intermediate_size=40)
    model = tiny("llama")
    wrong = scores_of(model)
    wrong.mlp = wrong.mlp[:, :50]
    with pytest.raises(DistillationError, match="do not belong to this model"):
        prune_width(model, wrong, intermediate_size=40)
