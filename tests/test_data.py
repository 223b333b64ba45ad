"""Data pipeline: formats -> messages, loading, assistant-only labels, held-out split.

Uses the real Qwen2.5 tokenizer (built offline) and one real record per shared data file.
"""

import json
import logging
import os
import pickle
import random
import re
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qwen_distillation.data.encode import (IGNORE_INDEX, build_examples, encode_messages, split_heldout,
                                          split_last_turn)
from qwen_distillation.data.formats import FORMATS, detect_format, to_messages
from qwen_distillation.data.generated import file_digest
from qwen_distillation.data.loading import load_records
from qwen_distillation.errors import DataError
from qwen_distillation.evaluation.mcq import mcq_items

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def first_record(name: str, where=lambda record: True) -> tuple[int, dict]:
    if not DATA.is_dir():
        pytest.skip(f"shared data not found at {DATA}")
    return next(pair for pair in load_records(str(DATA / name)) if where(pair[1]))


def labelled_runs(example: dict) -> list[list[int]]:
    """Maximal runs of consecutive labelled token ids."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def assert_assistant_only(messages: list[dict], tokenizer, max_length: int = 4096) -> dict:
    """Labels cover exactly `content<|im_end|>` of each assistant turn, and nothing else."""
    example = encode_messages(messages, tokenizer, max_length)
    assert example is not None and len(example["input_ids"]) == len(example["labels"])
    runs = [tokenizer.decode(run) for run in labelled_runs(example)]
    assert runs == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    # Everything before the first labelled token is exactly the rendered prompt.
    first = next(t for t, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    last_assistant = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    first_assistant = min(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(
        messages[:first_assistant], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer.decode(example["input_ids"][:first]) == prompt
    assert last_assistant == len(messages) - 1
    return example


# --- formats ---------------------------------------------------------------------------------


def test_alpaca_input_system_history(tokenizer):
    record = {
        "instruction": "Translate to French.",
        "input": "Good morning",
        "output": "Bonjour",
        "system": "You translate.",
        "history": [["Say hi", "Hi!"]],
    }
    messages = to_messages(record, "alpaca", "x.jsonl", 1)
    assert messages == [
        {"role": "system", "content": "You translate."},
        {"role": "user", "content": "Say hi"},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": "Translate to French.\n\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    assert_assistant_only(messages, tokenizer)


def test_alpaca_real_record_masks_prompt(tokenizer):
    _, record = first_record("general/alpaca_zh_demo.jsonl")
    messages = to_messages(record, "alpaca", "alpaca_zh_demo.jsonl", 1)
    assert messages[-2]["content"] == record["instruction"]
    assert_assistant_only(messages, tokenizer)


def test_medical_o1_renders_think_block(tokenizer):
    index, record = first_record("medical_sft/huatuogpt_o1_demo_en.jsonl")
    assert detect_format(record, "huatuo") == "medical_o1"
    messages = to_messages(record, "medical_o1", "huatuo.jsonl", index)
    assert messages[0] == {"role": "user", "content": record["Question"]}
    assert messages[1]["content"] == f"<think>{record['Complex_CoT']}</think>{record['Response']}"
    assert_assistant_only(messages, tokenizer)


def test_cmexam_multi_letter_answer_and_literal_backslash_n(tokenizer):
    _, record = first_record(
        "medical_sft/cmexam_val_reasoning_zh_1000.jsonl", lambda r: len(r["Answer"]) > 1
    )
    assert "\\n" in record["Options"] and "\n" not in record["Options"]
    messages = to_messages(record, "cmexam", "cmexam.jsonl", 1)
    prompt_lines = messages[0]["content"].split("\n")
    assert prompt_lines[0] == record["Question"]
    assert [line[0] for line in prompt_lines[1:]] == list("ABCDE")
    assert messages[1]["content"] == f"{record['Explanation']}\n\n答案：{record['Answer']}"
    assert_assistant_only(messages, tokenizer)

    real_newlines = {"Question": "选出正确项", "Options": "A 甲\nB 乙\nC 丙", "Answer": "AC",
                     "Explanation": ""}
    assert to_messages(real_newlines, "cmexam", "c.jsonl", 1) == [
        {"role": "user", "content": "选出正确项\nA 甲\nB 乙\nC 丙"},
        {"role": "assistant", "content": "答案：AC"},
    ]


@pytest.mark.parametrize("options, answer, unknown", [
    ("A 甲\\nB 乙\\nC 丙\\nD 丁", "E", "E"),  # the real files' shape: one string, literal backslash-n
    (["A. 甲", "B. 乙"], "AC", "C"),
    ({"A": "甲", "B": "乙", "C": "丙"}, "B, D", "D"),
])
def test_a_cmexam_answer_naming_a_missing_option_is_refused_at_its_line(options, answer, unknown):
    """eval.mcq refuses such a record; training refused it too late or not at all (it trained on
    "答案：E" for options A-D)."""
    record = {"Question": "选出正确项", "Options": options, "Answer": answer}
    with pytest.raises(DataError, match=rf"c\.jsonl line 7: cmexam field 'Answer' is '{answer}'.*no option {unknown}"):
        to_messages(record, "cmexam", "c.jsonl", 7)
    # options without letters, or an answer in words, are not checked
    assert to_messages({**record, "Options": ["甲", "乙"]}, "cmexam", "c.jsonl", 7)[1]["content"] == f"答案：{answer}"
    assert to_messages({**record, "Answer": "甲和乙"}, "cmexam", "c.jsonl", 7)[1]["content"] == "答案：甲和乙"


@pytest.mark.parametrize("cop, letter, text", [(1, "A", "w"), (2, "B", "x"), ("3", "C", "y"), (4, "D", "z")])
def test_medmcqa_cop_is_one_based(cop, letter, text):
    record = {"question": "Q?", "opa": "w", "opb": "x", "opc": "y", "opd": "z", "cop": cop, "exp": None}
    messages = to_messages(record, "medmcqa", "m.jsonl", 1)
    assert messages[0]["content"] == "Q?\nA. w\nB. x\nC. y\nD. z"
    assert messages[1]["content"] == f"Answer: {letter}. {text}"


def test_medmcqa_real_record_and_bad_cop(tokenizer):
    _, record = first_record("medical_sft/medmcqa_dev_exp_en_1000.jsonl", lambda r: r["cop"] == 3)
    messages = to_messages(record, "medmcqa", "m.jsonl", 1)
    assert messages[1]["content"] == f"{record['exp'].strip()}\n\nAnswer: C. {record['opc']}"
    assert_assistant_only(messages, tokenizer)
    with pytest.raises(DataError, match=r"m\.jsonl line 7: medmcqa field 'cop' is 0; it must be 1"):
        to_messages({**record, "cop": 0}, "medmcqa", "m.jsonl", 7)


def test_sharegpt_multi_turn_labels_every_assistant_turn(tokenizer):
    record = {"conversations": [
        {"from": "system", "value": "你是医生。"},
        {"from": "human", "value": "头痛怎么办？"},
        {"from": "gpt", "value": "多休息，必要时服用布洛芬。"},
        {"from": "human", "value": "剂量呢？"},
        {"from": "gpt", "value": "成人每次200-400mg，每日不超过1200mg。"},
    ]}
    messages = to_messages(record, "sharegpt", "s.jsonl", 1)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    example = assert_assistant_only(messages, tokenizer)
    assert len(labelled_runs(example)) == 2

    openai_style = {"messages": [{"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "hello"},
                                 {"role": "user", "content": "unanswered"}]}
    assert detect_format(openai_style, "o") == "sharegpt"
    assert to_messages(openai_style, "sharegpt", "o.jsonl", 1)[-1] == {"role": "assistant", "content": "hello"}


def test_sharegpt_real_record(tokenizer):
    _, record = first_record("medical_sft/medicalgpt_medical_sft_zh_1k.jsonl")
    assert_assistant_only(to_messages(record, "auto", "medicalgpt.jsonl", 1), tokenizer)


def test_question_answer_aliases():
    gsm = to_messages({"question": "1+1?", "answer": "2\n#### 2"}, "question_answer", "g", 1)
    assert gsm == [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2\n#### 2"}]
    pubmed = {"QUESTION": "Does X work?", "CONTEXTS": ["Part one.", "Part two."], "LONG_ANSWER": "Yes."}
    assert to_messages(pubmed, "auto", "p", 1)[0]["content"] == "Part one.\nPart two.\n\nDoes X work?"
    assert to_messages({"title": "t", "ask": "咳嗽", "answer": "多喝水"}, "auto", "t", 1)[1]["content"] == "多喝水"



def test_question_answer_reads_system_history_and_input_and_refuses_options():
    """Found by a probe: `question_answer` (the format detected from prompt/response aliases) dropped a
    `system` turn, a Qwen-style `history` (the answer lost its context), an `input` (a translation
    trained without its text), and a multiple-choice record's options (the reply "A" to a bare question),
    all without a word."""
    record = {"system": "你是一名儿科医生。", "query": "And his age?", "response": "He is 30.",
              "history": [["Who is Bob?", "Bob is my friend."]], "input": "Bob, 30"}
    assert to_messages(record, "auto", "q.jsonl", 4) == [
        {"role": "system", "content": "你是一名儿科医生。"},
        {"role": "user", "content": "Who is Bob?"}, {"role": "assistant", "content": "Bob is my friend."},
        {"role": "user", "content": "And his age?\n\nBob, 30"}, {"role": "assistant", "content": "He is 30."}]
    with pytest.raises(DataError, match=re.escape("q.jsonl line 2: question_answer record has option field(s) "
                                                  "['A', 'B', 'C'], which this format does not read")):
        to_messages({"question": "Which organ pumps blood?", "A": "heart", "B": "liver", "C": "lung",
                     "answer": "A"}, "auto", "q.jsonl", 2)


@pytest.mark.parametrize("fmt,record", [
    ("alpaca", {"instruction": "q", "output": "a", "history": [["earlier q", ""]]}),
    ("question_answer", {"prompt": "q", "response": "a", "history": [["  ", "an answer to nothing"]]})])
def test_a_history_turn_with_an_empty_side_is_refused_at_its_line(fmt, record):
    """An alpaca history pair with an empty response trained an empty assistant turn (sharegpt refuses it)."""
    side = "response" if fmt == "alpaca" else "query"
    with pytest.raises(DataError, match=re.escape(f"h.jsonl line 3: {fmt} history entry 1 has an empty {side}")):
        to_messages(record, "auto", "h.jsonl", 3)


# --- detection and errors --------------------------------------------------------------------

REAL_FILES = [
    ("general/alpaca_en_demo.jsonl", "alpaca"),
    ("general/alpaca_zh_mt_carbonz0_1500.jsonl", "alpaca"),
    ("general/gsm8k_train_1500.jsonl", "question_answer"),
    ("general_eval/alpacaeval_gpt4_outputs.jsonl", "alpaca"),
    ("medical_sft/huatuogpt_o1_demo_en.jsonl", "medical_o1"),
    ("medical_sft/medmcqa_dev_exp_en_1000.jsonl", "medmcqa"),
    ("medical_eval/medmcqa_dev_eval_500.jsonl", "medmcqa"),
    ("medical_sft/huatuo_llama_med_zh_1000.jsonl", "alpaca"),
    ("medical_sft/medicalgpt_medical_sft_zh_1k.jsonl", "sharegpt"),
    ("medical_sft/cmexam_val_reasoning_zh_1000.jsonl", "cmexam"),
    ("medical_eval/cmexam_val_eval_zh_1000.jsonl", "cmexam"),
    ("medical_eval/mmlu_medical_test_en.jsonl", "mmlu"),
    ("medical_eval/pubmedqa_pqal_en.jsonl", "question_answer"),
    ("medical_freetext/toyhom_im_dialogue_zh_300.jsonl", "question_answer"),
    ("medical_freetext/pubmedqa_long_answer_en_300.jsonl", "question_answer"),
]


@pytest.mark.parametrize("name, expected", REAL_FILES)
def test_detect_format_on_real_records(name, expected, tokenizer):
    index, record = first_record(name)
    assert detect_format(record, name) == expected
    assert build_examples([(index, record)], "auto", tokenizer, 4096, name)[0]["index"] == index


def test_undetectable_record_lists_fields_and_formats():
    _, record = first_record("general_eval/belle_eval_set_zh.jsonl")
    with pytest.raises(DataError) as err:
        detect_format(record, "belle.jsonl")
    message = str(err.value)
    assert message.startswith("belle.jsonl: cannot tell the format from the fields found [")
    assert "'std_answer'" in message and "alpaca (instruction, output)" in message
    assert "medical_o1 (Question, Complex_CoT, Response)" in message
    # "set format=..." could not help: no format reads std_answer. The fix names the field to rename.
    assert message.endswith("it has a prompt field (question) but no response field: rename the field that holds "
                            "the answer to one of answer/Answer/LONG_ANSWER/response/Response/completion")


@pytest.mark.parametrize("record, source, fix", [
    ({"instruction\toutput": "q\ta"}, "tabs.csv", "its one field name holds tabs: a tab-separated file read as "
                                                 "comma-separated; write it with commas (or as JSON Lines)"),
    ({"What is aspirin?": "A painkiller."}, "noheader.csv", "a CSV file's first row names the fields: if this file "
                                                           "has no header row, add one (e.g. instruction,output)"),
    ({"reply": "A painkiller.", "answer": "x"}, "r.jsonl", "it has a response field (answer) but no prompt field"),
    ({"x": 1}, "x.jsonl", "rename its fields to those of one of them, or set format=... for this source"),
])
def test_an_undetectable_record_gets_the_fix_its_fields_suggest(record, source, fix):
    """A CSV without a header row, a tab-separated .csv and a record with only one of a prompt and a response
    were all told to "set format=...", which no format could satisfy."""
    with pytest.raises(DataError, match=re.escape(fix)):
        detect_format(record, source)


def test_missing_field_names_line_and_fields_found():
    with pytest.raises(DataError) as err:
        to_messages({"instruction": "hi", "outptu": "typo"}, "alpaca", "data/x.jsonl", 12)
    message = str(err.value)
    assert "data/x.jsonl line 12" in message and "['output']" in message
    assert "fields found: ['instruction', 'outptu']" in message


def test_empty_response_and_unknown_format():
    with pytest.raises(DataError, match=r"x\.jsonl line 3: field 'output' .* is empty"):
        to_messages({"instruction": "hi", "output": "  "}, "alpaca", "x.jsonl", 3)
    with pytest.raises(DataError, match="unknown data format 'alpacca'") as err:
        to_messages({"instruction": "hi", "output": "yo"}, "alpacca", "x.jsonl", 1)
    assert all(name in str(err.value) for name in FORMATS)


# --- encoding --------------------------------------------------------------------------------


def test_truncation_keeps_left_and_drops_unlabelled(tokenizer):
    messages = [{"role": "user", "content": "Name three colours."},
                {"role": "assistant", "content": "Red, green and blue."}]
    full = encode_messages(messages, tokenizer, 4096)
    prompt_length = next(t for t, label in enumerate(full["labels"]) if label != IGNORE_INDEX)
    cut = encode_messages(messages, tokenizer, prompt_length + 3)
    assert cut["input_ids"] == full["input_ids"][: prompt_length + 3]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 3
    assert encode_messages(messages, tokenizer, prompt_length) is None


def test_no_usable_examples_error(tokenizer):
    records = [(1, {"instruction": "a long prompt " * 20, "output": "x"}),
               (2, {"instruction": "another long prompt " * 20, "output": "y"})]
    with pytest.raises(DataError) as err:
        build_examples(records, "auto", tokenizer, 16, "tiny.jsonl")
    assert str(err.value) == (
        "tiny.jsonl: no usable examples after filtering (2 records read, 2 had no response tokens "
        "left within max_length=16); raise data.max_length or check the response field"
    )


def _byte_level_tokenizer(chat_template=None) -> PreTrainedTokenizerFast:
    """A merge-free byte-level BPE tokenizer (one token per byte) with eos `</s>`."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {char: i for i, char in enumerate(bytes_to_unicode().values())}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", chat_template=chat_template)


def test_plain_template_without_chat_template():
    tokenizer = _byte_level_tokenizer()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}]
    example = encode_messages(messages, tokenizer, 512)
    assert tokenizer.decode(example["input_ids"]) == "User: Hi\n\nAssistant: Yo</s>\n\nUser: Bye\n\nAssistant: Ciao</s>"
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["Yo</s>", "Ciao</s>"]


def test_eos_appended_when_template_does_not_close_the_turn():
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}")
    tokenizer = _byte_level_tokenizer(template)
    example = encode_messages([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                              tokenizer, 512)
    assert tokenizer.decode(example["input_ids"]) == "user: Q\nassistant: A</s>"
    assert example["input_ids"][-1] == example["labels"][-1] == tokenizer.eos_token_id
    assert [tokenizer.decode(run) for run in labelled_runs(example)] == ["A</s>"]


# --- held-out split --------------------------------------------------------------------------


def _examples(source: str, n: int) -> list[dict]:
    return [{"input_ids": [i], "labels": [i], "source": source, "index": i} for i in range(1, n + 1)]


def test_split_is_deterministic_and_order_independent():
    examples = _examples("a.jsonl", 50) + _examples("b.jsonl", 50)
    train, heldout = split_heldout(examples, 0.1, 100, seed=3)
    assert len(heldout) == 10 and len(train) == 90
    assert split_heldout(examples, 0.1, 100, seed=3) == (train, heldout)
    shuffled = examples[:]
    random.Random(0).shuffle(shuffled)
    key = lambda e: (e["source"], e["index"])  # noqa: E731
    assert sorted(map(key, split_heldout(shuffled, 0.1, 100, seed=3)[1])) == sorted(map(key, heldout))
    assert split_heldout(examples, 0.1, 100, seed=4)[1] != heldout


def test_split_bounds():
    assert len(split_heldout(_examples("a", 10), 0.01, 100, seed=0)[1]) == 1
    assert len(split_heldout(_examples("a", 100), 0.5, 7, seed=0)[1]) == 7
    assert len(split_heldout(_examples("a", 2), 0.9, 100, seed=0)[1]) == 1
    assert split_heldout(_examples("a", 1), 0.5, 100, seed=0) == (_examples("a", 1), [])
    assert split_heldout(_examples("a", 5), 0.0, 100, seed=0) == (_examples("a", 5), [])


def _generated_rows(prompts: int, seed: int = 0) -> list[dict]:
    """Rows as `generate_data` writes them: 2 or 3 kept samples per prompt (rejection sampling
    drops some), each with its `_provenance`; in shuffled order, as a resumed run may leave them."""
    rng = random.Random(seed)
    rows = [{"instruction": f"Prompt {row}?", "input": "", "output": f"Answer {row}.{sample}",
             "_provenance": {"teacher": "t", "source": "prompts.jsonl", "sampling": {}, "reasoning": False,
                             "source_row": row, "sample": sample, "finished": True}}
            for row in range(1, prompts + 1) for sample in range(rng.choice((2, 3)))]
    rng.shuffle(rows)
    return rows


def test_split_never_puts_the_samples_of_one_prompt_on_both_sides(tmp_path):
    path = tmp_path / "teacher.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in _generated_rows(40)))
    examples = build_examples(load_records(str(path)), "auto", _byte_level_tokenizer(), 512, str(path))
    prompt = lambda e: tuple(split_last_turn(e)[0])  # noqa: E731  (the prompt's token ids)
    assert len(set(map(prompt, examples))) == 40
    for fraction, cap, seed in [(0.1, 100, 0), (0.25, 100, 1), (0.5, 100, 2), (0.3, 7, 3), (0.01, 100, 4)]:
        train, heldout = split_heldout(examples, fraction, cap, seed)
        assert heldout and len(train) + len(heldout) == len(examples)
        assert not set(map(prompt, train)) & set(map(prompt, heldout)), (fraction, cap, seed)
        target = min(max(1, int(len(examples) * fraction)), cap)  # in examples, as without groups
        assert target - 3 < len(heldout) <= target or len(set(map(prompt, heldout))) == 1
        shuffled = examples[:]
        random.Random(seed).shuffle(shuffled)
        key = lambda e: (e["source"], e["index"])  # noqa: E731
        assert sorted(map(key, split_heldout(shuffled, fraction, cap, seed)[1])) == sorted(map(key, heldout))
    assert {e["group"] for e in examples} == {f"prompts.jsonl\0{row}" for row in range(1, 41)}


def test_a_prompt_group_larger_than_the_held_out_target_is_held_out_whole():
    examples = [{"input_ids": [row, k], "labels": [row, k], "source": "g", "index": 3 * row + k,
                 "group": f"p\0{row}"} for row in range(4) for k in range(3)]
    train, heldout = split_heldout(examples, 0.05, 100, seed=0)  # target: 1 example, a group has 3
    assert len(heldout) == 3 and len({e["group"] for e in heldout}) == 1 and len(train) == 9
    one_prompt = [e for e in examples if e["group"] == "p\0" + "0"]
    assert split_heldout(one_prompt, 0.5, 100, seed=0) == (one_prompt, [])  # one prompt cannot be split


def test_split_of_records_without_provenance_is_unchanged():
    # Held-out indices pinned with the split as it was before prompt groups: runs resume by them.
    records = [(n, {"instruction": f"question {n % 7}", "output": f"answer {n}"}) for n in range(1, 31)]
    examples = build_examples(records, "auto", _byte_level_tokenizer(), 512, "ordinary.jsonl")
    assert not any("group" in e for e in examples)
    assert [e["index"] for e in split_heldout(examples, 0.2, 100, seed=5)[1]] == [2, 3, 14, 18, 19, 30]
    assert [e["index"] for e in split_heldout(examples, 0.5, 4, seed=0)[1]] == [7, 21, 24, 28]
    assert [e["index"] for e in split_heldout(_examples("a.jsonl", 40), 0.1, 100, seed=7)[1]] == [23, 25, 38, 40]
    bare = [{"input_ids": [i, i % 3], "labels": [i, i % 3]} for i in range(30)]  # no source/index
    assert [e["input_ids"][0] for e in split_heldout(bare, 0.2, 100, seed=1)[1]] == [3, 14, 16, 24, 26, 27]


# --- loading ---------------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", output: "d"}\n')
    with pytest.raises(DataError) as err:
        load_records(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} line 3: not valid JSON (")
    assert message.endswith("); fix or delete that line")


def test_jsonl_json_list_and_json_lines(tmp_path):
    rows = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_records(str(tmp_path / "x.jsonl")) == [(1, rows[0]), (2, rows[1])]
    (tmp_path / "list.json").write_text(json.dumps(rows, indent=2))
    assert load_records(str(tmp_path / "list.json"), max_records=1) == [(1, rows[0])]
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_records(str(tmp_path / "lines.json")) == [(1, rows[0]), (2, rows[1])]


def test_csv_and_parquet_loading(tmp_path, tokenizer):
    rows = [{"instruction": "Say hi", "input": "", "output": "Hi"},
            {"instruction": "说你好", "input": "礼貌地", "output": "您好"}]
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("instruction,input,output\nSay hi,,Hi\n说你好,礼貌地,您好\n", encoding="utf-8")
    assert load_records(str(csv_path)) == [(2, rows[0]), (3, rows[1])]

    parquet_path = tmp_path / "data.parquet"
    try:
        import pandas
        pandas.DataFrame(rows).to_parquet(parquet_path)
    except ImportError:
        import datasets
        datasets.Dataset.from_list(rows).to_parquet(str(parquet_path))
    records = load_records(str(parquet_path))
    assert records == [(1, rows[0]), (2, rows[1])]
    examples = build_examples(records, "auto", tokenizer, 256, str(parquet_path))
    assert [e["index"] for e in examples] == [1, 2]

    assert len(load_records(str(tmp_path))) == 4  # the directory: csv then parquet


def test_a_directory_sources_records_are_named_by_their_own_file_and_line(tmp_path, tokenizer):
    """A directory's records keep their running numbers (what the held-out split hashes, so the
    split of a directory source is what it was), and every error about one names its file and line."""
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.jsonl").write_text(json.dumps({"instruction": "q1", "output": "a1"}) + "\n\n"
                                    + json.dumps({"instruction": "q2", "output": "a2"}) + "\n")
    (folder / "sub" / "b.csv").write_text("instruction,output\nq3,a3\nq4,\n")
    records = load_records(str(folder))
    assert [number for number, _ in records] == [1, 2, 3, 4]
    assert [number.where for number, _ in records] == [f"{folder / 'a.jsonl'} line 1", f"{folder / 'a.jsonl'} line 3",
                                                       f"{folder / 'sub' / 'b.csv'} line 2",
                                                       f"{folder / 'sub' / 'b.csv'} line 3"]
    assert pickle.loads(pickle.dumps(records[2][0])) == 3 and json.dumps(records[2][0]) == "3"
    with pytest.raises(DataError, match=rf"^{re.escape(str(folder / 'sub' / 'b.csv'))} line 3: .*output"):
        build_examples(records, "alpaca", tokenizer, 256, str(folder))
    examples = build_examples(records[:3], "alpaca", tokenizer, 256, str(folder))
    assert [e["index"] for e in examples] == [1, 2, 3] and all(type(e["index"]) is int for e in examples)
    mcq = folder.parent / "mcq"
    mcq.mkdir()
    (mcq / "m.jsonl").write_text(json.dumps({"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "F"}))
    with pytest.raises(DataError, match=rf"^{re.escape(str(mcq / 'm.jsonl'))} line 1: "):
        mcq_items(load_records(str(mcq)), "mmlu", str(mcq))


def test_a_directory_sources_digest_covers_the_files_it_reads_and_only_those(tmp_path):
    """A run's resume check and a teacher cache hash a directory source by the files a run reads
    from it: a README or a hidden file beside the data changes nothing, a data file does."""
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    before = file_digest(str(folder))
    (folder / "README.md").write_text("notes")
    (folder / ".DS_Store").write_bytes(b"\0")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.jsonl").write_text("{}")
    assert file_digest(str(folder)) == before
    (folder / "b.csv").write_text("instruction,output\nq,a\n")
    assert file_digest(str(folder)) != before


def test_a_directory_sources_skipped_files_are_named(tmp_path, caplog):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    (folder / "b.tsv").write_text("q\ta\n")
    (folder / "c.jsonl.gz").write_bytes(b"\0")
    (folder / ".hidden.txt").write_text("x")
    with caplog.at_level(logging.WARNING):
        assert len(load_records(str(folder))) == 1
    assert f"{folder}: 2 file(s) skipped, not one of ['.jsonl', '.json', '.csv', '.parquet']: b.tsv, c.jsonl.gz" \
        in caplog.text


def _mixed_format_folder(root: Path) -> Path:
    folder = root / "mixed"
    folder.mkdir()
    (folder / "a_qa.jsonl").write_text(json.dumps({"Question": "What is 1+1?", "Answer": "2"}) + "\n")
    (folder / "b_cmexam.jsonl").write_text(json.dumps(
        {"Question": "下列哪项正确？", "Options": "A 甲\nB 乙\nC 丙\nD 丁", "Answer": "B", "Explanation": "因为乙。"},
        ensure_ascii=False) + "\n")
    return folder


def test_a_directory_of_several_formats_reads_each_file_in_its_own(tmp_path, tokenizer):
    """format=auto detects each file's format in a directory source: a CMExam file after a
    question/answer file keeps its options and explanation (it used to be read as question/answer)."""
    folder = _mixed_format_folder(tmp_path)
    examples = build_examples(load_records(str(folder)), "auto", tokenizer, 512, str(folder))
    cmexam = tokenizer.decode(examples[1]["input_ids"])
    assert "C 丙" in cmexam and "因为乙" in cmexam
    assert "What is 1+1?" in tokenizer.decode(examples[0]["input_ids"])


def test_records_dropped_for_length_are_counted_in_a_warning(tokenizer, caplog):
    """A source most of whose records do not fit max_length used to report only what was kept."""
    records = [(1, {"instruction": "word " * 200, "output": "a"}), (2, {"instruction": "q", "output": "a"})]
    with caplog.at_level(logging.WARNING):
        examples = build_examples(records, "alpaca", tokenizer, 64, "long.jsonl", "stage1.max_length")
    assert len(examples) == 1
    assert "long.jsonl: 1 of 2 records dropped: no response token left within max_length=64 (raise " \
        "stage1.max_length" in caplog.text


def test_examples_whose_responses_max_length_cuts_are_counted_in_a_warning(tokenizer, caplog):
    """At data.max_length=96 every example of the demo's medical_reasoning.jsonl lost the end of its answer (72%
    of its response tokens, the end-of-turn token too) and the run said nothing: only dropped records were
    counted. Examples that fit, and a cut that leaves the response whole, give no warning."""
    records = [(1, {"instruction": "q", "output": "word " * 100}), (2, {"instruction": "q", "output": "word " * 80}),
               (3, {"instruction": "q", "output": "a"})]
    whole = [sum(label != IGNORE_INDEX for label in e["labels"])
             for e in build_examples(records, "alpaca", tokenizer, 4096, "long.jsonl")]
    with caplog.at_level(logging.WARNING):
        examples = build_examples(records, "alpaca", tokenizer, 64, "long.jsonl", "stage1.max_length")
    kept = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples]
    assert len(examples) == 3 and kept[2] == whole[2]
    assert f"long.jsonl: 2 of 3 examples cut at max_length=64: their responses lose " \
        f"{whole[0] + whole[1] - kept[0] - kept[1]} of their {whole[0] + whole[1]} tokens, the end-of-turn token " \
        f"included (raise stage1.max_length to keep them whole)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_examples(records, "alpaca", tokenizer, 4096, "long.jsonl")
    assert "cut at max_length" not in caplog.text


def test_a_json_list_under_a_jsonl_name_is_named_with_the_rename(tmp_path):
    """A .json list renamed .jsonl was "line 1: not valid JSON (Expecting value ...); fix or delete that line"
    (deleting the '[' fixes nothing), and a list on one line "expected a JSON object, got list"."""
    records = [{"instruction": "q", "output": "a"}, {"instruction": "q2", "output": "b"}]
    for name, text in (("pretty.jsonl", json.dumps(records, indent=2)), ("one_line.jsonl", json.dumps(records))):
        path = tmp_path / name
        path.write_text(text + "\n", encoding="utf-8")
        with pytest.raises(DataError, match=rf"{name} line 1: .*holds a JSON list of records \(it starts with '\['\), "
                                            rf"not JSON Lines .*rename it to {path.stem}\.json"):
            load_records(str(path))
        renamed = path.rename(path.with_suffix(".json"))
        assert [record for _, record in load_records(str(renamed))] == records
    later = tmp_path / "later.jsonl"  # a list on a later line is one bad record, as before
    later.write_text(json.dumps(records[0]) + "\n" + json.dumps(records) + "\n")
    with pytest.raises(DataError, match=r"later\.jsonl line 2: expected a JSON object \(one record\), got list; each "
                                        r"record must be"):
        load_records(str(later))


def test_a_bom_inside_a_file_and_cr_line_endings_are_named(tmp_path):
    """Both gave a bare 'Expecting value' / 'Extra data' that an editor shows no cause for."""
    record = json.dumps({"instruction": "q", "output": "a"})
    joined = tmp_path / "joined.jsonl"
    joined.write_text(record + "\n\ufeff" + record + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"joined\.jsonl line 2: not valid JSON .*starts with a byte-order mark"):
        load_records(str(joined))
    old_mac = tmp_path / "old_mac.jsonl"
    old_mac.write_bytes((record + "\r" + record + "\r").encode())
    with pytest.raises(DataError, match=r"old_mac\.jsonl line 1: .*end in a carriage return alone"):
        load_records(str(old_mac))
    windows = tmp_path / "windows.jsonl"
    windows.write_bytes((record + "\r\n" + record + "\r\n").encode())
    assert len(load_records(str(windows))) == 2


def test_missing_empty_and_unreachable(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="file not found"):
        load_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="file not found"):
        load_records("data/medical/nope")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records found"):
        load_records(str(tmp_path / "empty.jsonl"))

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="neither a local file or directory .* nor a reachable"):
        load_records("some-org/some-dataset")


@pytest.mark.parametrize("entry,named", [
    ({"split": "test"}, "split: test"), ({"subset": "zh"}, "subset: zh"),
    ({"split": "validation", "subset": "zh"}, "split: validation, subset: zh")])
@pytest.mark.parametrize("folder", [False, True])
def test_a_split_or_subset_on_a_local_file_or_folder_is_refused(tmp_path, entry, named, folder):
    """`{path: data/, split: test}` (written as the datasets library's `data_dir` reads it) trained on all of
    data/, test files included: a local file or folder is read whole, and the keys were ignored without a word."""
    from qwen_distillation.data.sources import checked_sources
    from qwen_distillation.errors import ConfigError

    (tmp_path / "train.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    path = str(tmp_path if folder else tmp_path / "train.jsonl")
    with pytest.raises(ConfigError, match=re.escape(f"data.general[1]={{path: {path}, {named}}}: `split` and "
                                                    "`subset` choose a part of a Hugging Face hub dataset")):
        checked_sources("data.general", [path, {"path": path, **entry}])
    assert checked_sources("data.general", [{"path": path, "split": "train"}])[0].split == "train"
    hub = checked_sources("data.general", [{"path": "some-org/some-dataset", **entry}])[0]  # a hub id keeps them
    assert (hub.split, hub.subset) == (entry.get("split", "train"), entry.get("subset"))


def test_a_held_out_example_that_is_also_trained_on_is_left_out_and_counted(tmp_path, tokenizer, caplog,
                                                                           monkeypatch):
    """Three records repeated four times: the held-out split held copies of training records, and an
    evaluation file inside a training folder (or a CRLF copy of a training file) was scored as held out;
    eval/general_nll was a training score, without a word. Such examples are left out of the scores and
    counted; an evaluation file that is all training records is refused."""
    from qwen_distillation.data.sources import DataSource, build_domain_data, encode_source
    from qwen_distillation.errors import ConfigError

    def line(i):
        return json.dumps({"instruction": f"question {i}", "output": f"answer {i}"})

    monkeypatch.chdir(tmp_path)  # relative paths, as a config writes them
    tmp_path = Path(".")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "dup.jsonl").write_text("\n".join(line(i % 3) for i in range(12)) + "\n")
    (tmp_path / "train" / "own.jsonl").write_text("\n".join(line(i) for i in range(10, 30)) + "\n")
    (tmp_path / "copy.jsonl").write_text("".join(line(i) + "\r\n" for i in [3, 10, 11, 12, 40, 41]))

    def build(general, evals=(), fraction=0.25):
        sources = {"general": [DataSource(str(p)) for p in general], "medical": [],
                   "eval": [DataSource(str(p)) for p in evals]}
        return build_domain_data(sources, tokenizer, max_length=64, eval_fraction=fraction, max_eval_examples=64,
                                 seed=3)

    def trained(data):
        return {tuple(e["input_ids"]) for e in data.general}

    with caplog.at_level(logging.WARNING, logger="qwen_distillation.data.sources"):
        data = build([tmp_path / "train" / "dup.jsonl"])
    assert not {tuple(e["input_ids"]) for e in data.eval_sets.get("general", [])} & trained(data)
    assert "data.general's held-out split: 3 of 3 examples are also training examples" in caplog.text
    caplog.clear()
    # Half of the folder's 32 examples are held out: more than dup.jsonl's 12, so the split holds out some of
    # own.jsonl's records whatever it is. With a quarter (8) it held out only dup.jsonl's copies for about 1 path of
    # the tmp folder in 20,000: then own.jsonl was all training records and refused.
    with caplog.at_level(logging.WARNING, logger="qwen_distillation.data.sources"):
        data = build([tmp_path / "train"], [tmp_path / "train" / "own.jsonl", tmp_path / "copy.jsonl"], fraction=0.5)
    for name in ("general", "own", "copy"):
        assert data.eval_sets[name] and not {tuple(e["input_ids"]) for e in data.eval_sets[name]} & trained(data)
    # Which records the folder's split holds out depends on where the folder lies (the split names it by its path
    # from the project root): the expected sets come from that split, whatever it is.
    train, held = split_heldout(encode_source(DataSource("train"), tokenizer, 64), 0.5, 64, 3)
    kept = {tuple(e["input_ids"]) for e in train}

    def unseen(examples):
        return [tuple(e["input_ids"]) for e in examples if tuple(e["input_ids"]) not in kept]

    own, copy = (encode_source(DataSource(path), tokenizer, 64) for path in ("train/own.jsonl", "copy.jsonl"))
    for name, examples in (("general", held), ("own", own), ("copy", copy)):
        assert [tuple(e["input_ids"]) for e in data.eval_sets[name]] == unseen(examples)
    # The folder's split ranks records by a hash of the tmp folder's path, so a set may hold no training
    # record (the held-out split no copy of a repeat, about 1 path in 900; copy.jsonl only records the split held
    # out, about 1 path in 9): then nothing is said of it.
    sets = (("data.general's held-out split", held), (f"data.eval[0]={tmp_path / 'train' / 'own.jsonl'}", own),
            (f"data.eval[1]={tmp_path / 'copy.jsonl'}", copy))
    for label, examples in sets:
        repeats = len(examples) - len(unseen(examples))
        if repeats:
            assert f"{label}: {repeats} of {len(examples)} examples are also training examples" in caplog.text
        else:
            assert f"{label}:" not in caplog.text
    assert len(own) == 20 and len(copy) == 6 and len(held) == 16
    # copy.jsonl's records 3, 40 and 41 are in no training file, so its scores keep them whatever the split.
    assert {tuple(copy[i]["input_ids"]) for i in (0, 4, 5)} <= set(unseen(copy))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qwen_distillation.data.sources"):  # a cap cuts an eval file
        (tmp_path / "new.jsonl").write_text("\n".join(line(i) for i in range(50, 56)) + "\n")
        sources = {"general": [DataSource("train/own.jsonl")], "medical": [], "eval": [DataSource("new.jsonl")]}
        build_domain_data(sources, tokenizer, max_length=64, eval_fraction=0.25, max_eval_examples=4, seed=3)
    assert "data.eval[0]=new.jsonl: 6 examples, scored on the first 4 (data.max_eval_examples=4)" in caplog.text
    (tmp_path / "all_trained.jsonl").write_text(line(0) + "\n" + line(1) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"data.eval[0]={tmp_path / 'all_trained.jsonl'}: every example "
                                                    "is also a training example")):
        build([tmp_path / "train" / "dup.jsonl"], [tmp_path / "all_trained.jsonl"])


def test_compressed_files_patterns_and_plain_text_get_a_fix_that_works(tmp_path):
    """A .jsonl.gz said only "unsupported file type", `data/*.jsonl` said "file not found", and a plain-text
    record was told to "set format=...", which no format could satisfy."""
    import gzip

    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(b'{"instruction": "q", "output": "a"}\n'))
    with pytest.raises(DataError, match=re.escape("unsupported file type '.gz'; use one of ['.jsonl', '.json', "
                                                  "'.csv', '.parquet'] (a compressed file is not read: decompress")):
        load_records(str(tmp_path / "a.jsonl.gz"))
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}/*.jsonl: file not found; a pattern (`*`, `?`, "
                                                  f"`[...]`) is not expanded: give the folder that holds the files "
                                                  f"instead (every data file below it is read, e.g. {tmp_path})")):
        load_records(f"{tmp_path}/*.jsonl")
    with pytest.raises(DataError, match=re.escape("t.jsonl line 1: a record of plain text (fields ['id', 'text']) "
                                                  "is not training data here")):
        to_messages({"id": 1, "text": "Some pretraining text."}, "auto", "t.jsonl", 1)


def test_every_spelling_of_a_source_from_any_directory_holds_out_the_same_records(tmp_path, monkeypatch, tokenizer):
    """The split hashed the path as written: `/tmp/ud/x.jsonl`, `/tmp/ud/./x.jsonl` and `../ud/x.jsonl` held out
    three different sets, so a stage started in another directory, or with another spelling, scored records an
    earlier stage trained on (and a teacher cache built under one spelling had no entry under another)."""
    from qwen_distillation.data.sources import DataSource, encode_source
    from qwen_distillation.paths import PROJECT_ROOT, source_identity

    data = tmp_path / "ud"
    data.mkdir()
    (data / "x.jsonl").write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n"
                                          for i in range(40)))
    (tmp_path / "elsewhere").mkdir()

    def held(path):
        examples = encode_source(DataSource(path), tokenizer, 64)
        return sorted(e["index"] for e in split_heldout(examples, 0.2, 100, seed=5)[1])

    expected = held(str(data / "x.jsonl"))
    monkeypatch.chdir(data)
    assert held("x.jsonl") == held("./x.jsonl") == held(str(data / "." / "x.jsonl")) == expected
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert held("../ud/x.jsonl") == held("../ud/../ud/x.jsonl") == expected
    assert source_identity("../ud/x.jsonl") == os.path.relpath(data / "x.jsonl", PROJECT_ROOT)
    # What the configs write (relative to the project root) and what is not a local path keep their names.
    assert source_identity("package:qwen_distillation/data/demo/general.jsonl") == \
        "package:qwen_distillation/data/demo/general.jsonl"
    assert source_identity("some-org/some-dataset") == "some-org/some-dataset"
    monkeypatch.chdir(PROJECT_ROOT)
    assert source_identity("qwen_distillation/data/demo/general.jsonl") == "qwen_distillation/data/demo/general.jsonl"


# --- regressions found by the property tests (tests/test_data_properties.py) ---------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_invalid_utf8_names_file_and_line(tmp_path, suffix):
    path = tmp_path / f"x{suffix}"
    where = re.escape(str(path))
    path.write_bytes(b"\x80")  # hypothesis's minimal example; CSV raised UnicodeDecodeError
    with pytest.raises(DataError, match=rf"^{where} line 1: not UTF-8 text \(invalid start byte at byte 0\)"):
        load_records(str(path))
    path.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "a"}\n{"question": "\xe9"}\n')
    with pytest.raises(DataError, match=rf"^{where} line 2: not UTF-8 text \(.* at byte 50\); re-encode"):
        load_records(str(path))


def test_csv_field_over_the_size_limit_names_its_line(tmp_path):
    path = tmp_path / "x.csv"
    where = re.escape(str(path))
    path.write_bytes(b'"' + b"a" * 140_000 + b'"')  # csv.Error, then "line 0" (DictReader's lagging count)
    with pytest.raises(DataError, match=rf"^{where} line 1: not readable as CSV \(field larger than field limit"):
        load_records(str(path))
    path.write_bytes(b"question,answer\nq,a\nq," + b"a" * 140_000 + b"\n")
    with pytest.raises(DataError, match=rf"^{where} line 3: not readable as CSV"):
        load_records(str(path))


def test_unpaired_surrogate_escape_names_its_line_or_record(tmp_path, tokenizer):
    # json.loads turns "\ud800" into a lone surrogate; the tokenizer raised TypeError on it.
    record = '{"instruction": "0", "output": "0", "input": "\\ud800"}'
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "\\ud83d\\ude00"}\n' + record + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl line 2: a string holds an unpaired surrogate escape"):
        load_records(str(tmp_path / "x.jsonl"))
    (tmp_path / "x.json").write_text(f'[{{"question": "q", "answer": "a"}}, {record}]')
    with pytest.raises(DataError, match=r"x\.json record 2: a string holds an unpaired surrogate escape"):
        load_records(str(tmp_path / "x.json"))
    (tmp_path / "pair.jsonl").write_text('{"question": "q", "answer": "\\ud83d\\ude00"}\n')  # a pair is text
    records = load_records(str(tmp_path / "pair.jsonl"))
    assert records == [(1, {"question": "q", "answer": "\U0001f600"})]
    assert build_examples(records, "auto", tokenizer, 256, "pair.jsonl")[0]["index"] == 1


def test_integer_past_pythons_digit_limit_keeps_its_digits(tmp_path, tokenizer):
    digits = "7" * 5000  # int() refuses more than 4300 digits: json.loads raised a bare ValueError
    for name, text in [("x.jsonl", f'{{"question": "q", "answer": {digits}}}\n'),
                       ("x.json", f'[{{"question": "q", "answer": {digits}}}]')]:
        (tmp_path / name).write_text(text)
        [(number, record)] = load_records(str(tmp_path / name))
        assert number == 1 and str(record["answer"]) == digits
        assert to_messages(record, "auto", name, number)[-1] == {"role": "assistant", "content": digits}


def test_json_nested_past_the_recursion_limit(tmp_path):
    deep = "[" * 1500 + "]" * 1500  # json.loads raised RecursionError
    (tmp_path / "x.jsonl").write_text(f'{{"question": "q", "answer": "a"}}\n{deep}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 2: JSON nested too deeply to read"):
        load_records(str(tmp_path / "x.jsonl"))
    (tmp_path / "x.json").write_text(f'[{{"question": "q", "answer": {deep}}}]')
    with pytest.raises(DataError, match=r"x\.json: JSON nested too deeply to read .*; flatten the records$"):
        load_records(str(tmp_path / "x.json"))


def test_undetectable_first_record_names_its_line(tmp_path, tokenizer):
    (tmp_path / "x.jsonl").write_text('\n{}\n{"question": "q", "answer": "a"}\n')  # hypothesis: [{}]
    path = str(tmp_path / "x.jsonl")
    where = re.escape(path)
    with pytest.raises(DataError, match=rf"^{where} line 2: cannot tell the format from the fields found \[\]"):
        build_examples(load_records(path), "auto", tokenizer, 256, path)


def test_unlabelable_chat_template_names_the_record():
    # The turn count in front changes every earlier rendering, and the content is upper-cased: the
    # assistant turn can be found neither by prefix nor verbatim. The error named no file or line.
    template = "{{ messages | length }}{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    records = [(1, {"question": "Q", "answer": "A"}), (3, {"question": "q", "answer": "a"})]
    with pytest.raises(DataError, match=r"^x\.jsonl line 3: the tokenizer's chat template does not reproduce "
                                        r"assistant turn 2 verbatim"):
        build_examples(records, "auto", _byte_level_tokenizer(template), 512, "x.jsonl")


@pytest.mark.parametrize("fmt,record", [
    ("alpaca", {"instruction": "q", "input": "", "output": {"a": 1}}),
    ("alpaca", {"instruction": {"text": "q"}, "output": "a"}),
    ("medical_o1", {"Question": "q", "Complex_CoT": {"steps": []}, "Response": "r"}),
])
def test_a_text_field_holding_a_json_object_is_refused_naming_the_line(fmt, record):
    """str() of a JSON object would train on Python's dict syntax ("{'a': 1}")."""
    with pytest.raises(DataError, match=r"x\.jsonl line 3: field '\w+' holds a JSON object, \{"):
        to_messages(record, fmt, "x.jsonl", 3)
    assert to_messages({"instruction": "q", "output": 42}, "alpaca", "x.jsonl", 3)[-1]["content"] == "42"


@pytest.mark.parametrize("record,problem", [
    ({"instruction": "i", "output": ["a", {"b": 1}]}, r"item 2 of field 'output' holds a JSON object, \{'b': 1\}"),
    ({"instruction": "i", "output": True}, r"field 'output' holds a boolean, true"),
    ({"instruction": "i", "output": ["a", False]}, r"item 2 of field 'output' holds a boolean, false"),
    ({"instruction": "i", "output": ["a", ["b"]]}, r"item 2 of field 'output' holds a list, \['b'\]"),
    ({"question": "q", "answer": "a", "context": [{"text": "c"}]}, r"item 1 of field 'context' holds a JSON object"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "u"}]},
                   {"role": "assistant", "content": "a"}]}, r"item 1 of sharegpt turn 1 holds a JSON object"),
    ({"Question": "q", "Options": ["A x", {"B": "y"}], "Answer": "A"},
     r"item 2 of field 'Options' holds a JSON object"),
])
def test_a_boolean_or_a_non_text_list_item_is_refused_naming_the_field_and_line(record, problem):
    """str() of them trained on Python's syntax: "a\\n{'b': 1}", "True", "a\\n['b']"."""
    with pytest.raises(DataError, match=rf"^x\.jsonl line 3: {problem}.*; write its text instead \(fix or delete"):
        to_messages(record, "auto", "x.jsonl", 3)


def test_numbers_and_blanks_in_a_list_stay_text():
    record = {"instruction": "i", "output": ["a", 1, 2.5, None, " "]}
    assert to_messages(record, "alpaca", "x.jsonl", 3)[-1] == {"role": "assistant", "content": "a\n1\n2.5"}


def test_a_csv_row_with_more_cells_than_the_header_is_refused_at_its_line(tmp_path):
    # csv.DictReader put the extra cells under the key None: the run trained on 'Apple' alone.
    path = tmp_path / "commas.csv"
    path.write_text('instruction,output\nList primary colours,"Red, yellow and blue"\n'
                    "List three fruits,Apple, banana and cherry\n")
    message = (rf"^{re.escape(str(path))} line 3: 3 values for the 2 columns of the header "
               r"\['instruction', 'output'\]; quote fields that contain commas$")
    with pytest.raises(DataError, match=message):
        load_records(str(path))
    # Its line after a quoted field over two lines is the row's last line, as for every CSV record.
    path.write_text('instruction,output\n"Two\nlines",ok\nList,Apple, banana\n')
    with pytest.raises(DataError, match=r" line 4: 3 values for the 2 columns"):
        load_records(str(path))


def test_a_csv_row_with_fewer_cells_than_the_header_reads_them_as_empty(tmp_path):
    path = tmp_path / "short.csv"
    path.write_text("instruction,input,output\nSay hi\nSay bye,,Bye\n")
    records = load_records(str(path))
    assert records == [(2, {"instruction": "Say hi", "input": None, "output": None}),
                       (3, {"instruction": "Say bye", "input": "", "output": "Bye"})]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))} line 2: field 'output' of this alpaca record is "
                                        r"empty; fill it or delete the record$"):
        to_messages(records[0][1], "auto", str(path), 2)


def test_records_holding_the_text_of_a_special_token_are_counted_in_a_warning(tokenizer, caplog):
    """An answer holding the literal text `<|im_end|>` is encoded as the end-of-turn token and labelled: the
    student learns to end its turn mid-answer, and nothing said so. Ordinary text gives no warning."""
    records = [(1, {"instruction": "q", "output": "first part<|im_end|>second part"}),
               (2, {"instruction": "q", "output": "plain <|not a token|> text"}),
               (3, {"instruction": "<|endoftext|> in a prompt", "output": "a"})]
    with caplog.at_level(logging.WARNING):
        examples = build_examples(records, "alpaca", tokenizer, 512, "specials.jsonl")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(label == im_end for label in examples[0]["labels"]) == 2  # the answer's own, and the turn's end
    assert "specials.jsonl: 2 of 3 records hold the text of a special token in a message (first: specials.jsonl " \
        "line 1, <|im_end|>)" in caplog.text, caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        build_examples(records[1:2], "alpaca", tokenizer, 512, "plain.jsonl")
    assert "special token" not in caplog.text
