"""Evaluation metrics: BLEU/ROUGE (ours and LLaMA-Factory's), MCQ loading and scoring,
teacher agreement, sample tables. Tiny random Qwen2 models with the real Qwen tokenizer."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import Qwen2Config, Qwen2ForCausalLM

from qwen_distillation.data.encode import encode_messages
from qwen_distillation.data.manager import IGNORE_INDEX, collate
from qwen_distillation.errors import DataError
from qwen_distillation.evaluation import (
    MCQItem,
    accuracy_from_scores,
    bleu4,
    corpus_scores,
    llamafactory_scores,
    mcq_accuracy,
    mcq_items,
    option_scores,
    predict,
    quality_samples,
    rouge_l,
    rouge_n,
    samples_markdown,
    segment,
    strip_think,
)
from qwen_distillation.evaluation.agreement import response_states, teacher_agreement
from qwen_distillation.evaluation.prompting import render_prompt
from qwen_distillation.evaluation.nll import heldout_nll
from qwen_distillation.modeling.parts import position_mask

MEDICAL_EVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "medical_eval"
STUDENT_COLUMNS, TEACHER_COLUMNS = 151936, 152064  # Qwen2.5-0.5B's and -7B's padded lm_heads

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_qwen2(columns: int, seed: int, tie: bool = True) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=columns, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=tie)
    return Qwen2ForCausalLM(config).eval()


@pytest.fixture(scope="module")
def student():
    return tiny_qwen2(STUDENT_COLUMNS, seed=0)


def first_record(name: str, where=lambda record: True) -> dict:
    path = MEDICAL_EVAL / name
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    with path.open(encoding="utf-8") as lines:
        return next(record for record in map(json.loads, lines) if where(record))


# --- text metrics -------------------------------------------------------------------------


def test_strip_think():
    assert strip_think("<think>a\nb</think>\n\nThe answer.") == "The answer."
    assert strip_think("x<think>1</think>y<think>2</think>z") == "xyz"
    # Qwen3-style: the template opened the block, the generation only closes it.
    assert strip_think("reasoning the template opened</think>答案：A") == "答案：A"
    assert strip_think("<think>cut off while reasoning") == ""
    assert strip_think("Answer first. <think>then unterminated") == "Answer first."
    assert strip_think("  no thinking  ") == "no thinking"


def test_segment():
    assert segment("我们在医院看病") == ["我们", "在", "医院", "看病"]
    assert segment("我在医院看病") == ["我", "在", "医院", "看病"]
    assert segment("患者 发热，咳嗽") == ["患者", "发热", "，", "咳嗽"]  # whitespace dropped, punctuation kept
    assert segment("Hello, World!  It's 3.5") == ["hello", "world", "it", "s", "3", "5"]


def test_bleu4_by_hand():
    # hyp "the cat sat on the mat" vs ref "the cat is on the mat" (both 6 words):
    #   p1 = 5/6 (the x2, cat, on, mat), p2 = 3/5 (the cat, on the, the mat),
    #   p3 = 1/4 (on the mat), p4: 0 of 3 matches -> method3 gives 1 / (2**1 * 3) = 1/6;
    #   equal lengths -> brevity penalty exp(1 - 6/6) = 1.
    #   BLEU = (5/6 * 3/5 * 1/4 * 1/6) ** (1/4) = (1/48) ** 0.25 = 0.37992
    assert bleu4("the cat sat on the mat", "the cat is on the mat") == pytest.approx(100 * (1 / 48) ** 0.25)
    # hyp "the cat" (2 words) vs the same ref: p1 = p2 = 1; no 3- or 4-grams at all: the
    # denominators are max(1, 0) = 1, so method3 gives 1/2 and 1/4; BP = exp(1 - 6/2).
    assert bleu4("The cat.", "the cat is on the mat") == pytest.approx(100 * math.exp(-2) * (1 / 8) ** 0.25)
    # Chinese, jieba words: [我, 在, 医院, 看病] vs [我们, 在, 医院, 看病]: p1 = 3/4, p2 = 2/3,
    # p3 = 1/2 (在 医院 看病), p4: 0 of 1 -> 1/2; BP = 1 -> (1/8) ** 0.25.
    assert bleu4("我在医院看病", "我们在医院看病") == pytest.approx(100 * (1 / 8) ** 0.25)
    assert bleu4("the same four words", "The same four words!") == pytest.approx(100.0)
    # Identical but 3 words: no 4-gram exists, method3 sets p4 = 1/2 -> 100 * 0.5 ** 0.25 (NLTK too).
    assert bleu4("same three words", "same three words") == pytest.approx(100 * 0.5 ** 0.25)
    assert bleu4("", "a reference") == 0.0
    assert bleu4("nothing shared", "a reference") == 0.0  # no unigram match


def test_rouge_by_hand():
    hyp, ref = "the cat sat on the mat", "the cat is on the mat"
    assert rouge_n(hyp, ref, 1) == pytest.approx(100 * 5 / 6)  # 5 clipped unigram matches of 6 and 6
    assert rouge_n(hyp, ref, 2) == pytest.approx(60.0)  # 3 of 5 bigrams each side
    assert rouge_l(hyp, ref) == pytest.approx(100 * 5 / 6)  # LCS "the cat on the mat"
    # Clipped counts: one "the" matches; P = 1/3, R = 1/2 -> F1 = 0.4.
    assert rouge_n("the the the", "the cat", 1) == pytest.approx(40.0)
    assert rouge_n("a", "a", 2) == 0.0  # no bigram on either side
    assert rouge_l("我在医院看病", "我们在医院看病") == pytest.approx(75.0)  # 3 of 4 words each side


def test_llamafactory_scores_by_hand():
    # Character BLEU: 我在医院看病 (6 chars) vs 我们在医院看病 (7 chars):
    #   p1 = 6/6; p2 = 4/5 (在医 医院 院看 看病); p3 = 3/4 (在医院 医院看 院看病);
    #   p4 = 2/3 (在医院看 医院看病); BP = exp(1 - 7/6).
    #   BLEU = exp(-1/6) * (1 * 4/5 * 3/4 * 2/3) ** 0.25 = 0.846482 * 0.795271 = 0.673182
    # ROUGE on jieba words, n-gram SETS: {我 在 医院 看病} vs {我们 在 医院 看病} -> 3/4, 3/4;
    #   bigrams {我在, 在医院, 医院看病} vs {我们在, 在医院, 医院看病} -> 2/3; LCS 3 of 4.
    #   F = 2PR / (P + R + 1e-8), then round(100 * F, 4).
    scores = llamafactory_scores("我在医院看病", "我们在医院看病")
    assert scores["bleu-4"] == round(100 * math.exp(-1 / 6) * 0.4 ** 0.25, 4) == 67.3182
    assert scores["rouge-1"] == 75.0 and scores["rouge-l"] == 75.0 and scores["rouge-2"] == 66.6667
    # 我们在医院 vs 我们在医院看病: every character n-gram matches; only BP = exp(1 - 7/5) is left.
    assert llamafactory_scores("我们在医院", "我们在医院看病")["bleu-4"] == round(100 * math.exp(-0.4), 4)
    # Sets, not clipped counts: {the} vs {the, cat} gives P = 1, R = 1/2 (ours gives 40, above).
    assert llamafactory_scores("the the the", "the cat")["rouge-1"] == 66.6667
    assert llamafactory_scores("   ", "参考")["rouge-1"] == 0.0  # LLaMA-Factory's empty-text guard


def test_corpus_scores_strip_think_and_average():
    pairs = [("<think>let me see</think>我在医院看病", "我们在医院看病"),
             ("the cat sat on the mat", "<think>x</think>the cat is on the mat")]
    result = corpus_scores(pairs)
    assert result["n"] == 2
    assert result["bleu-4"] == pytest.approx((100 * (1 / 8) ** 0.25 + 100 * (1 / 48) ** 0.25) / 2)
    expected_lf = (67.3182 + llamafactory_scores("the cat sat on the mat", "the cat is on the mat")["bleu-4"]) / 2
    assert result["llamafactory/bleu-4"] == pytest.approx(expected_lf)
    assert set(result) == {"n", "bleu-4", "rouge-1", "rouge-2", "rouge-l", "llamafactory/bleu-4",
                           "llamafactory/rouge-1", "llamafactory/rouge-2", "llamafactory/rouge-l"}
    assert math.isnan(corpus_scores([])["rouge-l"])


# --- multiple choice ----------------------------------------------------------------------


def test_mcq_loaders_on_real_records():
    cm = mcq_items([first_record("cmexam_val_eval_zh_1000.jsonl")], "cmexam")[0]
    assert cm.options == {"A": "急性喉炎", "B": "声带疾患", "C": "百日咳", "D": "胸膜炎", "E": "支气管扩张"}
    assert cm.answers == {"A"}
    assert cm.question.splitlines() == ["嘶哑样咳嗽，可见于", "A. 急性喉炎", "B. 声带疾患", "C. 百日咳",
                                        "D. 胸膜炎", "E. 支气管扩张"]
    assert cm.user_text.endswith("\n请直接回答选项字母。")

    record = first_record("cmexam_val_eval_zh_1000.jsonl", lambda r: len(r["Answer"]) > 1)
    multi = mcq_items([record], "cmexam")[0]
    assert len(multi.answers) > 1 and multi.answers == set(record["Answer"])

    record = first_record("medmcqa_dev_eval_500.jsonl")
    med = mcq_items([record], "medmcqa")[0]
    assert list(med.options) == ["A", "B", "C", "D"] and med.options["A"] == record["opa"]
    assert med.answers == {"ABCD"[record["cop"] - 1]}
    assert med.user_text.endswith("\nAnswer with the letter.")

    record = first_record("mmlu_medical_test_en.jsonl")
    mmlu = mcq_items([record], "mmlu")[0]
    assert mmlu.options == {letter: record[letter] for letter in "ABCD"} and mmlu.answers == {record["answer"]}

    record = first_record("pubmedqa_pqal_en.jsonl")
    pubmed = mcq_items([record], "pubmedqa")[0]
    assert pubmed.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert pubmed.answers == {"ABC"["yes no maybe".split().index(record["final_decision"])]}
    assert record["CONTEXTS"][0] in pubmed.question and record["QUESTION"] in pubmed.question
    assert mcq_items([record], "auto")[0] == pubmed


@pytest.mark.parametrize(("fmt", "record", "pattern"), [
    ("cmexam", {"Question": "q", "Options": "A 甲\\nB 乙", "Answer": "AC"},
     r"records record 2: cmexam field 'Answer'"),
    ("cmexam", {"Question": "q", "Options": "甲\\nB 乙", "Answer": "A"}, r"record 2: cmexam field 'Options'"),
    ("medmcqa", {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 5},
     r"record 2.*'cop'"),
    ("mmlu", {"question": "q", "A": "a", "B": "b", "C": "c", "answer": "A"}, r"record 2.*field 'D'"),
    ("pubmedqa", {"QUESTION": "q", "CONTEXTS": ["c"], "final_decision": "perhaps"},
     r"record 2.*'final_decision'"),
    # Was read as the option text "{'text': 'b'}"; refused as training refuses it (data.formats).
    ("medmcqa", {"question": "q", "opa": "a", "opb": {"text": "b"}, "opc": "c", "opd": "d", "cop": 1},
     r"record 2: field 'opb' of this medmcqa record holds a JSON object, \{'text': 'b'\}; write its text instead"),
    ("mmlu", {"question": ["q", True], "A": "a", "B": "b", "C": "c", "D": "d", "answer": "a"},
     r"record 2: item 2 of field 'question' of this mmlu record holds a boolean, true; write its text instead"),
])
def test_mcq_loader_errors_name_record_and_field(fmt, record, pattern):
    good = {"cmexam": {"Question": "q", "Options": "A 甲\nB 乙", "Answer": "B"},
            "medmcqa": {"question": "q", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1},
            "mmlu": {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "a"},
            "pubmedqa": {"QUESTION": "q", "CONTEXTS": [], "final_decision": "no"}}[fmt]
    assert len(mcq_items([good], fmt)) == 1
    with pytest.raises(DataError, match=pattern):
        mcq_items([good, record], fmt)


def test_cmexam_options_as_a_letter_to_text_object_read_as_in_training():
    """Training reads cmexam ``Options`` given as ``{letter: text}``; the MCQ set refused it as one bad line."""
    item = mcq_items([{"Question": "问", "Options": {"A": "甲", "B": "乙"}, "Answer": "B"}], "auto")[0]
    assert item.options == {"A": "甲", "B": "乙"} and item.answers == {"B"}
    with pytest.raises(DataError, match=r"cmexam field 'Answer' names letter\(s\) \['C'\]"):
        mcq_items([{"Question": "问", "Options": {"A": "甲", "B": "乙"}, "Answer": "C"}], "cmexam")
    # Read by training's reader, whose refusal of a NUL comes back as a DataError naming the record.
    with pytest.raises(DataError, match=r"^records record 1: option 'B' of field 'Options' holds a NUL character"):
        mcq_items([{"Question": "问", "Options": {"A": "甲", "B": "乙\x00"}, "Answer": "B"}], "cmexam")


def test_predict_set_rule():
    scores = {"A": -1.0, "B": -0.5, "C": -3.0, "D": -0.5}
    assert predict(scores) == {"B"}  # tie B/D goes to the earlier letter
    assert predict(scores, 2) == {"B", "D"}
    assert predict(scores, 3) == {"A", "B", "D"}
    items = [MCQItem("q", dict.fromkeys("ABCD", ""), frozenset(answers)) for answers in ("B", "C", "BD", "AB")]
    result = accuracy_from_scores(items, [scores] * 4)
    assert result == {"accuracy": 0.5, "n": 4, "multi_answer_n": 2, "multi_answer_accuracy": 0.5}


def test_a_model_scoring_nan_gets_no_accuracy_and_the_results_file_stays_json(tmp_path):
    """A model with a NaN weight scored 0.0 (or chance: the order of NaN scores picks the letters), and the
    evaluate command wrote a bare NaN into results.json, which strict JSON readers refuse."""
    import json
    import math

    from qwen_distillation.evaluate import write_results

    items = [MCQItem("q", dict.fromkeys("ABCD", ""), frozenset(answers)) for answers in ("A", "B", "CD")]
    nan = dict.fromkeys("ABCD", float("nan"))
    result = accuracy_from_scores(items, [nan, {"A": -1.0, "B": -0.1, "C": -2.0, "D": -3.0}, nan])
    assert math.isnan(result["accuracy"]) and math.isnan(result["multi_answer_accuracy"]) and result["n"] == 3
    write_results(tmp_path, {"bad": {"eval/mcq/m_accuracy": result["accuracy"], "eval/medical_nll": 2.5}})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads((tmp_path / "results.json").read_text(), parse_constant=refuse) == {
        "bad": {"eval/mcq/m_accuracy": "nan", "eval/medical_nll": 2.5}}
    assert "| bad |" in (tmp_path / "results.md").read_text()


def _manual_letter_logprob(model, tokenizer, item, letter, vocab_size):
    """Full forward of prompt + letter tokens; sum of the letter tokens' log-probs."""
    prompt = tokenizer(render_prompt(tokenizer, item.user_text), add_special_tokens=False)["input_ids"]
    letter_ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + letter_ids])
    logprobs = torch.log_softmax(model(ids).logits[0, :, :vocab_size].float(), dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + j, token]) for j, token in enumerate(letter_ids))


def test_option_scores_match_full_forward(tokenizer, student):
    vocab = len(tokenizer)
    items = [mcq_items([first_record("mmlu_medical_test_en.jsonl")], "mmlu")[0],
             mcq_items([first_record("cmexam_val_eval_zh_1000.jsonl")], "cmexam")[0],
             # "Zyzzyva" is several tokens: exercises the prompt + letter[:-1] sequences.
             MCQItem("Pick one.\nA. x\nZyzzyva. y", {"A": "x", "Zyzzyva": "y"}, frozenset("A"))]
    assert len(tokenizer("Zyzzyva", add_special_tokens=False)["input_ids"]) > 1
    with torch.no_grad():
        expected = [{letter: _manual_letter_logprob(student, tokenizer, item, letter, vocab)
                     for letter in item.options} for item in items]
    for batch_size in (1, 3):  # right padding must not change a score
        got = option_scores(student, tokenizer, items, vocab_size=vocab, batch_size=batch_size)
        for got_item, expected_item in zip(got, expected):
            assert got_item.keys() == expected_item.keys()
            for letter in got_item:
                assert got_item[letter] == pytest.approx(expected_item[letter], abs=1e-4)


def test_mcq_accuracy_counts_the_predicted_sets(tokenizer, student):
    vocab = len(tokenizer)
    base = mcq_items([first_record("cmexam_val_eval_zh_1000.jsonl")], "cmexam")[0]
    scores = option_scores(student, tokenizer, [base], vocab_size=vocab)[0]
    ranked = sorted(scores, key=scores.get, reverse=True)
    golds = [ranked[:1], ranked[-1:], ranked[:2], [ranked[0], ranked[-1]]]  # right, wrong, right, wrong
    items = [MCQItem(base.question, base.options, frozenset(gold)) for gold in golds]
    result = mcq_accuracy(student, tokenizer, items, vocab_size=vocab, batch_size=3)
    assert result == {"accuracy": 0.5, "n": 4, "multi_answer_n": 2, "multi_answer_accuracy": 0.5}


# --- teacher agreement --------------------------------------------------------------------


@pytest.fixture(scope="module")
def batches(tokenizer):
    conversations = [("你好，请介绍一下你自己。", "你好！我是一个助手，可以回答问题。"),
                     ("What is 2+2?", "It is 4."),
                     ("Name a colour.", "Blue, like the sky on a clear summer day."),
                     ("发烧怎么办？", "多喝水，注意休息；如果持续高热，请及时就医。")]
    examples = [encode_messages([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                                tokenizer, max_length=96) for q, a in conversations]
    return [collate(examples[:3], tokenizer.pad_token_id), collate(examples[3:], tokenizer.pad_token_id)]


def _full_logits_agreement(student, teacher, batches, vocab_size, topk):
    """The same quantities from the full (B, L, V) logits of both models."""
    nll = top1 = overlap = kl = 0.0
    tokens = 0
    for batch in batches:
        mask = position_mask(batch["labels"])
        targets = batch["labels"][:, 1:][batch["labels"][:, 1:] != IGNORE_INDEX]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = student(**inputs).logits[mask][:, :vocab_size].float()
        t = teacher(**inputs).logits[mask][:, :vocab_size].float()
        nll += float(F.cross_entropy(s, targets, reduction="sum"))
        top1 += float((s.argmax(-1) == t.argmax(-1)).sum())
        overlap += sum(len(set(a.topk(topk).indices.tolist()) & set(b.topk(topk).indices.tolist()))
                       for a, b in zip(s, t)) / topk
        # F.kl_div(input, target) = sum target * (log target - input): input is the student's
        # log q, target the teacher's log p, so this is KL(p_teacher || q_student).
        kl += float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="sum"))
        tokens += len(targets)
    return {"nll": nll / tokens, "top1_agreement": top1 / tokens, "topk_overlap": overlap / tokens,
            "kl_to_teacher": kl / tokens, "tokens": tokens}


def test_teacher_agreement_identical_models(tokenizer, student, batches):
    result = teacher_agreement(student, student, batches, len(tokenizer), chunk_size=5)
    tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
    assert result["tokens"] == tokens
    assert result["top1_agreement"] == 1.0 and result["topk_overlap"] == 1.0
    assert result["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert result["nll"] == pytest.approx(heldout_nll(student, batches, len(tokenizer))["nll"], rel=1e-5)


def test_teacher_agreement_perturbed_pair_matches_full_logits(tokenizer, batches):
    vocab = len(tokenizer)
    student = tiny_qwen2(STUDENT_COLUMNS, seed=1, tie=False)
    teacher = tiny_qwen2(TEACHER_COLUMNS, seed=2, tie=False)
    with torch.no_grad():
        student.lm_head.weight.mul_(20)  # peaked distributions: top-1/top-k are not coin flips
        state = teacher.state_dict()
        for name, value in student.state_dict().items():
            state[name][: value.shape[0]].copy_(value)  # teacher's extra padded rows stay random
        generator = torch.Generator().manual_seed(3)
        for weight in (teacher.lm_head.weight, teacher.model.layers[0].mlp.down_proj.weight):
            weight.add_(torch.randn(weight.shape, generator=generator) * weight.std() * 0.5)
        expected = _full_logits_agreement(student, teacher, batches, vocab, topk=5)
    result = teacher_agreement(student, teacher, batches, vocab, topk=5, chunk_size=4)
    assert result["tokens"] == expected["tokens"]
    for name in ("nll", "top1_agreement", "topk_overlap", "kl_to_teacher"):
        assert result[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
    assert 0 < result["top1_agreement"] < 1 and result["kl_to_teacher"] > 0.01
    # The trainer keeps the frozen teacher's states from its first evaluation: same numbers.
    states = [response_states(teacher, batch) for batch in batches]
    assert teacher_agreement(student, teacher, batches, vocab, topk=5, chunk_size=4, teacher_states=states) == result
    with pytest.raises(ValueError, match="teacher_states holds 1 entries"):
        teacher_agreement(student, teacher, batches, vocab, teacher_states=states[:1])


def test_a_model_with_nan_outputs_gets_no_agreement(tokenizer, batches):
    """A student with a NaN weight got top-1 agreement and top-k overlap 0.0 (argmax and topk of NaN
    logits pick token ids by chance) beside a NaN NLL and KL; the evaluate command showed them as
    measured values, where a NaN MCQ accuracy is reported for the same model."""
    vocab = len(tokenizer)
    teacher = tiny_qwen2(TEACHER_COLUMNS, seed=5, tie=False)
    broken = tiny_qwen2(STUDENT_COLUMNS, seed=0, tie=False)
    with torch.no_grad():
        broken.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")
    result = teacher_agreement(broken, teacher, batches, vocab, topk=5, chunk_size=4)
    assert result["tokens"] > 0
    for name in ("nll", "top1_agreement", "topk_overlap", "kl_to_teacher"):
        assert math.isnan(result[name]), name
    # A finite pair still gets numbers, and the teacher's kept states give the same.
    healthy = teacher_agreement(teacher, teacher, batches, vocab, topk=5)
    assert healthy["top1_agreement"] == 1.0 and healthy["topk_overlap"] == 1.0


def test_trainer_evaluator_agreement_keeps_nll_and_skips_the_teacher(tokenizer, student, batches):
    from qwen_distillation.evaluation.evaluator import Evaluator

    teacher = tiny_qwen2(TEACHER_COLUMNS, seed=5, tie=False)
    common = {"teacher": teacher, "tokenizer": tokenizer, "vocab_size": len(tokenizer), "heldout": {"chat": batches}}
    plain, agreeing = Evaluator(**common), Evaluator(**common, agreement=True, agreement_top_k=3)
    without, with_ = plain.metrics(student), agreeing.metrics(student)
    assert (plain.metric_names(), agreeing.metric_names()) == (set(without), set(with_))
    # The student's NLL now comes from the agreement pass: the same number.
    assert with_["eval/chat_nll"] == pytest.approx(without["eval/chat_nll"], rel=1e-5)
    assert with_["eval/chat_ppl"] == pytest.approx(without["eval/chat_ppl"], rel=1e-5)
    assert sorted(set(with_) - set(without)) == ["eval/chat_kl_to_teacher", "eval/chat_top1_agreement",
                                                 "eval/chat_topk_overlap"]
    expected = teacher_agreement(student, teacher, batches, len(tokenizer), topk=3)
    assert with_["eval/chat_kl_to_teacher"] == pytest.approx(expected["kl_to_teacher"], rel=1e-6)
    assert agreeing.metrics(student) == with_  # from the kept teacher states: identical
    assert agreeing.metrics(teacher) == plain.metrics(teacher)  # no agreement of the teacher with itself


# --- quality samples ----------------------------------------------------------------------


def test_quality_samples_are_greedy_and_tabulate(tokenizer, student):
    prompts = [{"lang": "zh", "domain": "medical", "prompt": "如何判断中暑？"},
               {"lang": "en", "domain": "general", "prompt": "Say hi | twice."}]
    other = tiny_qwen2(STUDENT_COLUMNS, seed=4)
    rows = quality_samples({"student": student, "other": other}, tokenizer, prompts, max_new_tokens=4)
    assert [list(row) for row in rows] == [["lang", "domain", "prompt", "student", "other"]] * 2
    with torch.no_grad():  # the same answer by an explicit argmax loop
        ids = tokenizer(render_prompt(tokenizer, prompts[0]["prompt"]), add_special_tokens=False)["input_ids"]
        new = []
        for _ in range(4):
            token = int(student(torch.tensor([ids + new])).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    assert rows[0]["student"] == tokenizer.decode(new, skip_special_tokens=True).strip()
    table = samples_markdown([{**rows[1], "other": "line one\nline | two"}])
    assert table.splitlines()[:2] == ["| lang | domain | prompt | student | other |", "|---|---|---|---|---|"]
    assert table.splitlines()[2].endswith("| line one<br>line \\| two |")
    assert "Say hi \\| twice." in table
