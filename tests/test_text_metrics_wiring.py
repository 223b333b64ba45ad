"""BLEU-4 / ROUGE wired into the evaluation: greedy answers to held-out prompts scored against
their responses (``eval.text_metrics``), reference answers of the quality-sample prompts, the
report's tables and the options' checks. Tiny random Qwen2 models with the real Qwen tokenizer."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hydra.errors import ConfigCompositionException
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import compose_config
from qwen_distillation.config.schema import EvalConfig
from qwen_distillation.config.validate import validate_config
from qwen_distillation.data.encode import IGNORE_INDEX, encode_messages, split_last_turn
from qwen_distillation.errors import ConfigError, DataError
from qwen_distillation.evaluation.answers import heldout_references
from qwen_distillation.evaluation.direction import best_direction
from qwen_distillation.evaluation.evaluator import Evaluator, build_evaluator, heldout_batches
from qwen_distillation.evaluation.mcq import load_mcq_sets, normalise_mcq_sources
from qwen_distillation.evaluation.report import results_table, write_report
from qwen_distillation.evaluation.samples import (load_prompts, mean_sample_scores, quality_samples,
                                                  samples_markdown, score_samples)
from qwen_distillation.evaluation.text_metrics import has_han, segment
from qwen_distillation.paths import locate

OURS = ("bleu4", "rouge1", "rouge2", "rougeL")
DEMO_PROMPTS = "package:qwen_distillation/data/demo/prompts.jsonl"
CPU = torch.device("cpu")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed: int) -> Qwen2ForCausalLM:
    # Untied: a tied random model mostly repeats the prompt's last token ("\n"), an empty answer.
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def example(tokenizer, *turns: str, max_length: int = 256) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return encode_messages([{"role": r, "content": t} for r, t in zip(roles, turns)], tokenizer, max_length)


def metric_names(sets: list[str]) -> set[str]:
    names = set()
    for name in sets:
        names |= {f"eval/{name}_nll", f"eval/{name}_ppl"}
        names |= {f"eval/{name}_{m}" for m in OURS} | {f"eval/llamafactory/{name}_{m}" for m in OURS}
    return names


# --- the held-out side ----------------------------------------------------------------------


def test_split_last_turn_is_the_context_and_the_last_answer(tokenizer):
    encoded = example(tokenizer, "Hi.", "Hello!", "Name a fruit.", "An apple.")
    prompt, response = split_last_turn(encoded)
    assert prompt + response == encoded["input_ids"][: len(prompt) + len(response)]
    assert tokenizer.decode(prompt).endswith("Name a fruit.<|im_end|>\n<|im_start|>assistant\n")
    assert "Hello!" in tokenizer.decode(prompt)  # the earlier turn is context, not reference
    assert tokenizer.decode(response) == "An apple.<|im_end|>"
    assert split_last_turn({"input_ids": [1, 2], "labels": [IGNORE_INDEX] * 2}) == ([], [])


def test_an_answer_identical_to_the_reference_scores_100_through_the_evaluator(tokenizer, model):
    """The model's own greedy answer becomes the reference of a held-out example: generating
    from the example's context must give it back, and every score must be 100."""
    for prompt in ("What is a fever?", "发烧是什么？"):
        (row,) = quality_samples({"model": model}, tokenizer, [{"prompt": prompt}], max_new_tokens=12)
        assert len(segment(row["model"])) >= 4, row  # enough words for every 4-gram order
        encoded = example(tokenizer, prompt, row["model"])
        evaluator = Evaluator(teacher=None, tokenizer=tokenizer, vocab_size=len(tokenizer),
                              heldout=heldout_batches({"chat": [encoded]}, tokenizer.pad_token_id, CPU),
                              text_sets={"chat": [encoded]}, max_new_tokens=12)
        assert evaluator.references["chat"] == [(split_last_turn(encoded)[0], row["model"])]
        metrics = evaluator.metrics(model)
        assert set(metrics) == metric_names(["chat"])
        for name in metric_names(["chat"]) - {"eval/chat_nll", "eval/chat_ppl"}:
            assert metrics[name] == pytest.approx(100.0), (prompt, name)
        # Another model's answer to the same context is not the reference.
        other = evaluator.metrics(tiny_model(seed=3))
        assert other["eval/chat_rougeL"] < 100.0 and other["eval/chat_bleu4"] < 100.0


def test_text_metrics_of_every_set_are_in_range_and_the_teacher_gets_them(tokenizer, model):
    general = [example(tokenizer, "Why is the sky blue?", "Air scatters blue sunlight more than red light."),
               example(tokenizer, "Name a prime number.", "Seven is a prime number.")]
    medical = [example(tokenizer, "什么是高血压？", "<think>按定义回答。</think>高血压是动脉血压持续高于正常范围。")]
    teacher = tiny_model(seed=1)
    mcq = load_mcq_sets(normalise_mcq_sources("eval.mcq", ["package:qwen_distillation/data/demo/medical_mcq.jsonl"]),
                        max_items=2)
    evaluator = Evaluator(teacher=teacher, tokenizer=tokenizer, vocab_size=len(tokenizer),
                          heldout=heldout_batches({"general": general, "medical": medical}, tokenizer.pad_token_id,
                                                  CPU),
                          agreement=True, text_sets={"general": general, "medical": medical[:1]}, mcq_sets=mcq,
                          max_new_tokens=6)
    # The reference is the final answer as encoded; corpus_scores strips the <think> block.
    assert evaluator.references["medical"][0][1].startswith("<think>按定义回答。</think>高血压")
    for scored in (model, teacher):
        metrics = evaluator.metrics(scored)
        expected = metric_names(["general", "medical"]) | {"eval/mcq/medical_mcq_accuracy"}
        if scored is model:
            expected |= {f"eval/{s}_{k}" for s in ("general", "medical")
                         for k in ("top1_agreement", "topk_overlap", "kl_to_teacher")}
            # What a run checks each stage's best_metric against, before any model runs.
            assert evaluator.metric_names() == expected
        assert set(metrics) == expected
        for name, value in metrics.items():
            if name.split("_")[-1] in OURS:
                assert 0.0 <= value <= 100.0, (name, value)
    assert model.training is False and teacher.training is False


def test_build_evaluator_answers_the_first_examples_of_each_set_only_when_asked(tokenizer, model):
    sets = {"general": [example(tokenizer, f"Count to {n}.", " ".join(map(str, range(1, n + 1)))) for n in (2, 3, 4)],
            "medical": [example(tokenizer, "What is a fever?", "A body temperature above normal.")]}
    common = {"mcq_sources": [], "teacher": None, "tokenizer": tokenizer, "vocab_size": len(tokenizer),
              "eval_sets": sets, "pad_token_id": tokenizer.pad_token_id, "device": CPU,
              "autocast": lambda: torch.autocast("cpu", enabled=False)}
    capped = build_evaluator(EvalConfig(text_metrics=True, text_metrics_max_examples=2), **common)
    assert capped.references == {"general": heldout_references(sets["general"][:2], tokenizer),
                                 "medical": heldout_references(sets["medical"], tokenizer)}
    assert [ref for _, ref in capped.references["general"]] == ["1 2", "1 2 3"]
    every = build_evaluator(EvalConfig(text_metrics=True, text_metrics_max_examples=None), **common)
    assert len(every.references["general"]) == 3
    off = build_evaluator(EvalConfig(text_metrics=False), **common)
    assert off.references == {} and not any(k.endswith("_bleu4") for k in off.metrics(model))


def test_bleu_and_rouge_metrics_are_maximised_when_chosen_as_best_metric():
    for metric in ("eval/medical_bleu4", "eval/general_rougeL", "eval/llamafactory/medical_rouge1"):
        assert best_direction(metric) == "max"


# --- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["eval.text_metrics_max_examples=0", "eval.text_metrics_max_examples=-3"])
def test_a_bad_cap_is_a_config_error_naming_the_key(override):
    with pytest.raises(ConfigError, match=r"eval\.text_metrics_max_examples=-?\d+: must be >= 1"):
        validate_config(compose_config(["experiment=none", override]))


def test_a_non_boolean_switch_is_refused_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config(["eval.text_metrics=sometimes"])
    assert "eval.text_metrics" in str(err.value.__cause__ or err.value)


def test_the_demo_preset_turns_text_metrics_on_and_nothing_else_does():
    demo = validate_config(compose_config([])).eval
    assert demo.text_metrics and demo.text_metrics_max_examples == 4 and demo.max_new_tokens == 32
    assert not validate_config(compose_config(["experiment=none"])).eval.text_metrics
    for experiment in ("smoke", "arms"):
        assert not validate_config(compose_config([f"experiment={experiment}"])).eval.text_metrics, experiment
    # One switch for the demo's generations; each stays settable on its own.
    assert not validate_config(compose_config(["eval.samples=false"])).eval.text_metrics
    assert validate_config(compose_config(["eval.samples=false", "eval.text_metrics=true"])).eval.text_metrics
    assert not validate_config(compose_config(["eval.text_metrics=false"])).eval.text_metrics


# --- quality-sample prompts with references ----------------------------------------------------


def test_every_demo_prompt_has_a_reference_in_its_language():
    prompts = load_prompts(locate(DEMO_PROMPTS))
    assert len(prompts) == 8
    for prompt in prompts:
        assert len(prompt["reference"]) > 20
        assert has_han(prompt["reference"]) == (prompt["lang"] == "zh") == has_han(prompt["prompt"]), prompt


def test_prompts_without_a_reference_still_work(tmp_path, tokenizer, model):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Say hi.", "reference": "Hi there, nice to meet you."}) + "\n"
                    + json.dumps({"lang": "en", "prompt": "Say bye.", "reference": None}) + "\n")
    prompts = load_prompts(str(path))
    assert prompts == [{"lang": "", "domain": "", "prompt": "Say hi.", "reference": "Hi there, nice to meet you."},
                       {"lang": "en", "domain": "", "prompt": "Say bye."}]
    rows = quality_samples({"teacher": model}, tokenizer, prompts, max_new_tokens=3)
    assert [list(row) for row in rows] == [["lang", "domain", "prompt", "reference", "teacher"],
                                           ["lang", "domain", "prompt", "teacher"]]
    scored = score_samples(rows, ["teacher"])
    assert "scores" in scored[0] and "scores" not in scored[1]
    assert mean_sample_scores(scored, "teacher")["n"] == 1
    unscored = score_samples(rows[1:], ["teacher"])
    assert samples_markdown(unscored).count("\n") == 3  # the answers table alone: header, rule, one row
    assert math.isnan(mean_sample_scores(unscored, "teacher")["bleu4"])


@pytest.mark.parametrize("reference", ["", "   ", 3, ["an answer"]])
def test_a_bad_reference_is_a_data_error_naming_the_file_and_record(tmp_path, reference):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "Say hi.", "reference": reference}))
    with pytest.raises(DataError, match=rf"{path} line 2: 'reference' must be a non-empty string"):
        load_prompts(str(path))


def test_a_directory_for_eval_prompts_is_refused_naming_the_key(tmp_path):
    # It was read as a directory of data files: "record 1: a prompt record needs ... 'prompt'".
    (tmp_path / "general.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    (tmp_path / "prompts.jsonl").write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    message = rf"^eval\.prompts={re.escape(str(tmp_path))}: a directory, not a file \(looked at .*\); expected one"
    with pytest.raises(DataError, match=message):
        load_prompts(str(tmp_path))
    assert load_prompts(str(tmp_path / "prompts.jsonl")) == [{"lang": "", "domain": "", "prompt": "Say hi."}]


def test_sample_scores_are_per_model_and_tabulated():
    rows = [{"lang": "en", "domain": "general", "prompt": "p1", "reference": "the cat sat on the mat",
             "teacher": "the cat sat on the mat", "student": "a dog"},
            {"lang": "zh", "domain": "medical", "prompt": "p2", "reference": "多喝水，注意休息。",
             "teacher": "<think>想一想</think>多喝水，注意休息。", "student": "多喝水，注意休息。"},
            {"lang": "en", "domain": "general", "prompt": "p3", "teacher": "t", "student": "s"}]
    scored = score_samples(rows, ["teacher", "student"])
    assert scored[0]["scores"]["teacher"] == {m: pytest.approx(100.0) for m in OURS}
    assert scored[0]["scores"]["student"] == {m: 0.0 for m in OURS}
    assert scored[1]["scores"]["teacher"] == {m: pytest.approx(100.0) for m in OURS}  # <think> stripped
    assert "scores" not in scored[2] and "scores" not in rows[0]  # the input rows are left alone
    assert mean_sample_scores(scored, "student") == {**{m: pytest.approx(50.0) for m in OURS}, "n": 2}
    table = samples_markdown(scored)
    assert "| lang | domain | prompt | reference | teacher | student |" in table
    assert "| prompt | model | bleu4 | rouge1 | rouge2 | rougeL |" in table
    assert "| p1 | student | 0.00 | 0.00 | 0.00 | 0.00 |" in table
    assert "| mean of 2 | teacher | 100.00 | 100.00 | 100.00 | 100.00 |" in table
    assert "| mean of 2 | student | 50.00 | 50.00 | 50.00 | 50.00 |" in table


# --- the report ----------------------------------------------------------------------------------


def test_report_shows_heldout_and_sample_bleu_rouge(tmp_path):
    pytest.importorskip("matplotlib")
    scores = {"teacher": {"bleu4": 40.0, "rouge1": 60.0, "rouge2": 30.0, "rougeL": 50.0},
              "student": {"bleu4": 10.0, "rouge1": 20.0, "rouge2": 5.0, "rougeL": 15.0}}
    for stage in (1, 2):
        row = {"lang": "en", "domain": "general", "prompt": "p", "reference": "r", "teacher": "t",
               "student": "s", "scores": {**scores, "student": {k: v * stage for k, v in scores["student"].items()}}}
        (tmp_path / f"stage{stage}").mkdir()
        (tmp_path / f"stage{stage}" / "samples.jsonl").write_text(
            json.dumps(row) + "\n" + json.dumps({"prompt": "q", "teacher": "t", "student": "s"}) + "\n")
    heldout = {"eval/medical_nll": 2.0, "eval/medical_bleu4": 12.3456, "eval/medical_rougeL": 33.3,
               "eval/llamafactory/medical_bleu4": 45.0}
    summary = {"teacher": heldout, "student_before": {**heldout, "eval/medical_bleu4": 0.0},
               "student_after_stage": {"1": {**heldout, "eval/medical_bleu4": 5.5}}}
    (tmp_path / "metrics.jsonl").write_text("")
    text = write_report(tmp_path, summary).read_text()
    assert "| `eval/medical_bleu4` | 12.35 | 0.00 | 5.50 |" in text
    assert "| `eval/medical_rougeL` | 33.30 | 33.30 | 33.30 |" in text
    assert "llamafactory" not in "\n".join(results_table(summary))  # kept in the logs, not the table
    assert "BLEU-4 and ROUGE of greedy answers against the held-out references are 0-100" in text
    assert "| score | teacher | after stage 1 | after stage 2 |" in text
    assert "| `bleu4` | 40.00 | 10.00 | 20.00 |" in text
    assert "| `rougeL` | 50.00 | 15.00 | 30.00 |" in text
    assert "greedy answers to the prompts that have a reference answer (1 of them)" in text


# --- a run ----------------------------------------------------------------------------------------


def test_turning_text_metrics_on_changes_no_training_number(tmp_path):
    """Greedy answers between training steps leave the student as they found it (weights, mode,
    caches) and draw on no generator the run uses: every number a run logs with the option on,
    evaluated after every step, equals the run without it, besides the added keys."""
    from conftest import read_metrics, tiny_overrides
    from qwen_distillation.app import run

    rows = {}
    for switch in ("false", "true"):
        out = tmp_path / switch
        run(compose_config(tiny_overrides(out, steps=3) + [
            "end_stage=1", "stage1.eval_every=1", f"eval.text_metrics={switch}", "eval.text_metrics_max_examples=2",
            "eval.max_new_tokens=3", "train.device=cpu", "train.precision=fp32"]))
        rows[switch] = read_metrics(out)
    assert len(rows["true"]) == len(rows["false"]) == 6  # 3 steps, each followed by an evaluation
    for with_, without in zip(rows["true"], rows["false"]):
        extra = {k for k in with_ if k.endswith(OURS)}
        assert (extra != set()) == ("eval/medical_nll" in with_)
        assert {k: v for k, v in with_.items() if k not in extra and k != "tokens_per_s"} == {
            k: v for k, v in without.items() if k != "tokens_per_s"}
