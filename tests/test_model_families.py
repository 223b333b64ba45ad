"""Causal LMs laid out otherwise than the Llama family: GPT-NeoX (its attention module is
``attention``, its final norm ``final_layer_norm``) and OLMo-2 (its layers normalise after each
block, with no ``input_layernorm``). GradNorm's shared layer and the attention term's q/k/v
capture find their equivalents, a run trains with every stage-2 term on such a pair, and a layer
with no attention module is refused before anything trains."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import compose_config, loss_plan, read_metrics, run_cli, tiny_overrides
from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.capture import check_qkv_capture
from qwen_distillation.training.plan import build_plan, shared_parameter

SHAPE = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)


def _tiny(config_cls, model_cls):
    torch.manual_seed(0)
    return model_cls(config_cls(**SHAPE))


def _plan(pairs=()):
    return loss_plan({"kd": 1.0, "feature": 0.1}, SHAPE["vocab_size"], feature_pairs=tuple(pairs))


def test_gradnorm_measures_the_nearest_shared_layer_of_each_layout():
    qwen2 = _tiny(Qwen2Config, Qwen2ForCausalLM)
    assert shared_parameter(qwen2, _plan([(1, 2), (2, 2)])) == [qwen2.model.layers[1].input_layernorm.weight]
    assert shared_parameter(qwen2, _plan()) == [qwen2.model.norm.weight]
    neox = _tiny(GPTNeoXConfig, GPTNeoXForCausalLM)
    norm = neox.gpt_neox.final_layer_norm
    assert shared_parameter(neox, _plan()) == [norm.weight, norm.bias]
    assert shared_parameter(neox, _plan([(1, 1)])) == list(neox.gpt_neox.layers[1].input_layernorm.parameters())
    olmo2 = _tiny(Olmo2Config, Olmo2ForCausalLM)
    assert shared_parameter(olmo2, _plan([(2, 1)])) == [olmo2.model.layers[2].self_attn.q_proj.weight]
    assert shared_parameter(olmo2, _plan()) == [olmo2.model.norm.weight]


def test_a_layer_without_an_attention_module_is_refused_naming_the_setting(tmp_path):
    from qwen_distillation.config.validate import validate_config

    student = _tiny(Qwen2Config, Qwen2ForCausalLM)
    teacher = _tiny(Qwen2Config, Qwen2ForCausalLM)
    check_qkv_capture(student, [0, 2])  # the Llama layout passes
    student.model.layers[2].self_attn = nn.Identity()
    with pytest.raises(ConfigError, match=r"decoder layer 2 \(Qwen2DecoderLayer\) has no attention module.*the "
                                          r"layers that have one: \[0, 1\]"):
        check_qkv_capture(student, [2])
    stage = validate_config(compose_config(tiny_overrides(tmp_path) + [
        "stage2.loss.weights.attention=0.1", "stage2.loss.attention.layer_map=[[2,2]]"])).stage2
    with pytest.raises(ConfigError, match=r"stage2\.loss\.weights\.attention > 0 needs the student's queries and keys.*"
                                          r"decoder layer 2.*Pair layers that have one \(stage2\.loss\.attention\."
                                          r"layer_map=\[\[student, teacher\]\]\), or set stage2\.loss\.weights\."
                                          r"attention=0"):
        build_plan(stage, "stage2", student, teacher, SHAPE["vocab_size"], _plan().kd)


def test_a_gpt_neox_pair_trains_stage_2_with_every_term_and_gradnorm(tmp_path, capsys):
    """GPT-NeoX: no ``decoder.norm`` for GradNorm, ``attention`` instead of ``self_attn`` for the
    attention term. Every term is logged finite and the student changes."""
    out = tmp_path / "run"
    models = [f"model.{role}.random_init.model_type=gpt_neox" for role in ("teacher", "student")]
    models += [f"~model.{role}.random_init.{key}" for role in ("teacher", "student")
               for key in ("num_key_value_heads", "tie_word_embeddings")]
    code, printed = run_cli(tiny_overrides(out, steps=2) + models + [
        "stage1.enabled=false", "stage3.enabled=false", "stage2.loss.balancing.method=gradnorm",
        *[f"stage2.loss.weights.{term}=0.1" for term in ("feature", "attention", "contrastive")]], capsys)
    assert code == 0, printed
    rows = [row for row in read_metrics(out) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    for term in ("ce", "kd", "feature", "attention", "contrastive"):
        assert all(torch.isfinite(torch.tensor(row[f"loss/{term}"])) for row in rows), term
    assert rows[-1]["loss/attention"] > 0
    config = json.loads((out / "stage2" / "final" / "config.json").read_text())
    assert config["model_type"] == "gpt_neox"


def test_a_qwen3_5_hybrid_captures_its_attention_layers_and_names_them_for_the_others():
    """Qwen3.5 interleaves gated linear-attention layers (no ``self_attn``) with attention layers,
    every fourth one last: the default pairing (the last layers) captures, a linear-attention layer
    is refused with the indices that would capture."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3_5TextConfig"):
        pytest.skip("this transformers has no Qwen3.5")
    torch.manual_seed(0)
    model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(
        vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=8,
        linear_value_head_dim=8))
    check_qkv_capture(model, [3, 7])
    from test_attention_capture import _captured_qkv, attention_probs_reference, eager_copy, padded_batch

    input_ids, attention_mask = padded_batch()  # the captured queries and keys give the eager attention maps
    with torch.no_grad():
        maps = eager_copy(model).model(input_ids=input_ids, attention_mask=attention_mask,
                                       output_attentions=True).attentions  # one per attention layer
    captured, valid = _captured_qkv(model.eval(), input_ids, attention_mask, [3, 7]), attention_mask.bool()
    assert len(maps) == 2
    for layer, want in zip((3, 7), maps):
        probs = attention_probs_reference(*captured[layer][:2], valid)
        torch.testing.assert_close(probs.transpose(1, 2)[valid], want.transpose(1, 2)[valid], rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=r"decoder layer 5 \(Qwen3_5DecoderLayer\) has no attention module.*"
                                          r"the layers that have one: \[3, 7\] \(a hybrid"):
        check_qkv_capture(model, [5])
