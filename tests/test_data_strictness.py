"""What Python's json and the format converters used to accept without a word is refused with a
DataError naming the file, the line (or the record of a JSON list), what is wrong and the fix: an
object that repeats a key (the last value won), a bare NaN/Infinity (not JSON), a NUL character in a
text field, an empty assistant turn in the middle of a conversation."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwen_distillation.data.formats import to_messages
from qwen_distillation.data.loading import load_records
from qwen_distillation.errors import DataError


def refused(path: Path) -> str:
    """The DataError message reading ``path`` gives, or converting its records (format auto)."""
    with pytest.raises(DataError) as err:
        for number, record in load_records(str(path)):
            to_messages(record, "auto", str(path), number)
    return str(err.value)


def converted(path: Path) -> list[list[dict]]:
    return [to_messages(record, "auto", str(path), number) for number, record in load_records(str(path))]


QA = '{"question": "q", "answer": "a"}'


@pytest.mark.parametrize("name,text,where,key", [
    ("x.jsonl", f'{QA}\n\n{{"question": "a", "question": "b", "answer": "c"}}\n', "line 3", "'question'"),
    ("x.jsonl", f'{QA}\n{{"question": "q", "answer": {{"text": "a", "meta": {{"id": 1, "id": 2}}}}}}\n',
     "line 2", "'id'"),  # a nested object
    ("x.json", f'[{QA},\n {QA},\n {{"question": "q", "answer": "a", "answer": "b"}}]', "record 3", "'answer'"),
    ("x.json", f'{QA}\n{{"instruction": "i", "output": "o", "output": "p"}}\n', "line 2", "'output'"),  # JSON Lines
], ids=["jsonl", "jsonl-nested", "json-list", "json-lines"])
def test_a_repeated_key_is_refused_naming_the_key_and_its_line_or_record(tmp_path, name, text, where, key):
    path = tmp_path / name
    path.write_text(text)
    message = refused(path)
    assert message == (f"{path} {where}: an object repeats the key {key} (only its last value would be read); "
                       "give each key once: rename or delete the repeat")


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_a_bare_nan_or_infinity_is_refused_naming_it_and_its_line_or_record(tmp_path, constant):
    fix = (f"{constant} is not a JSON value (Python's json.dumps writes it for a float NaN or infinity); "
           "write null, or the number as a string")
    lines = tmp_path / "x.jsonl"
    lines.write_text(f'{QA}\n{{"question": "q", "answer": "a", "score": {constant}}}\n')
    assert refused(lines) == f"{lines} line 2: {fix}"
    listed = tmp_path / "x.json"
    listed.write_text(f'[{QA}, {QA},\n {{"question": "q", "answer": [1, {constant}]}}]')
    assert refused(listed) == f"{listed} record 3: {fix}"


def test_records_like_the_refused_ones_still_load(tmp_path):
    """The same key in two objects, the constants' names as strings, a literal backslash-zero."""
    rows = [
        {"question": "q", "answer": {"question": "inner", "answer": {"question": "deeper"}}},
        {"question": "NaN", "answer": "Infinity -Infinity", "score": None},
        {"question": "a\\0 and \\u0000, written out", "answer": 1e308},
    ]
    for name, text in [("x.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n"),
                       ("x.json", json.dumps(rows, indent=2))]:
        (tmp_path / name).write_text(text)
        assert load_records(str(tmp_path / name)) == [(1, rows[0]), (2, rows[1]), (3, rows[2])]
    assert re.search(r"\\0", load_records(str(tmp_path / "x.jsonl"))[2][1]["question"])


def test_a_nul_in_a_text_field_is_refused_naming_the_field_and_its_line(tmp_path):
    """A NUL (the escape \\u0000 in JSON, raw in CSV and Parquet) is refused wherever a text field is read."""
    nul = "holds a NUL character (U+0000, the JSON escape \\u0000) at position 3, which is not text; delete it " \
          "(fix or delete the record)"
    lines = tmp_path / "x.jsonl"
    lines.write_text(f'{QA}\n{{"instruction": "i", "output": "ok\\u0000"}}\n')
    assert refused(lines) == f"{lines} line 2: field 'output' {nul}"
    listed = tmp_path / "x.json"
    listed.write_text(f'[{QA}, {{"question": "q", "answer": "a", "context": ["c", "ab\\u0000c"]}}]')
    assert refused(listed) == f"{listed} record 2: item 2 of field 'context' {nul}"
    table = tmp_path / "x.csv"
    table.write_text("question,answer\nq,a\nno\x00t,a\n")
    assert refused(table) == f"{table} line 3: field 'question' {nul}"
    pandas = pytest.importorskip("pandas")
    parquet = tmp_path / "x.parquet"
    pandas.DataFrame([{"question": "q", "answer": "a"}, {"question": "q", "answer": "a\x00"}]).to_parquet(parquet)
    assert refused(parquet).startswith(f"{parquet} row 2: field 'answer' holds a NUL character (U+0000")
    chat = tmp_path / "chat.jsonl"
    chat.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a\\u0000"}]}\n')
    assert refused(chat).startswith(f"{chat} line 1: sharegpt turn 2 holds a NUL character (U+0000")


@pytest.mark.parametrize("turns", [
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
    [{"from": "system", "value": "s"}, {"from": "human", "value": "u1"}, {"from": "gpt", "value": " \n"},
     {"from": "human", "value": "u2"}, {"from": "gpt", "value": "a2"}, {"from": "human", "value": "u3"}],
], ids=["messages", "conversations"])
def test_an_empty_assistant_turn_mid_conversation_is_refused_naming_the_turn(tmp_path, turns):
    field = "messages" if "role" in turns[0] else "conversations"
    number = next(n for n, turn in enumerate(turns, start=1) if turn.get("content", turn.get("value")) in ("", " \n"))
    path = tmp_path / "chat.jsonl"
    path.write_text(f"{QA}\n" + json.dumps({field: turns}) + "\n")
    assert refused(path) == (
        f"{path} line 2: sharegpt turn {number} is an empty assistant turn in the middle of the conversation (it "
        "would train the model to answer with nothing); write its answer, or delete it and the user turn it answers")


def test_a_conversations_last_turns_read_as_before(tmp_path):
    """Trailing user turns are dropped and the last assistant turn must hold text, as before."""
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
             {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a\\0"},
             {"role": "user", "content": "unanswered"}]
    path.write_text(json.dumps({"messages": turns}) + "\n")
    assert converted(path) == [turns[:4]]
    path.write_text(json.dumps({"messages": turns[:3] + [{"role": "assistant", "content": " "}]}) + "\n")
    assert "sharegpt conversation has no non-empty assistant turn at its end" in refused(path)


def test_a_sharegpt_turn_without_its_text_key_is_refused_not_read_as_empty(tmp_path):
    """A turn whose text is under another key ('text') was read as an empty user turn without a word."""
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "text": "What is 1+1?"},
                                             {"role": "assistant", "content": "2"}]}) + "\n")
    assert refused(path) == (f"{path} line 1: sharegpt turn 1 has no 'value' or 'content' (keys ['role', 'text']); "
                             "write the turn's text under 'value' (with 'from') or 'content' (with 'role')")


def test_a_sharegpt_system_field_and_system_turn_are_not_both_trained(tmp_path):
    """A record with a top-level 'system' and a system turn in its messages trained a conversation with two
    system prompts without a word; the same prompt twice is kept once, two different ones are refused."""
    path = tmp_path / "chat.jsonl"
    turns = [{"role": "system", "content": "You are a doctor."}, {"role": "user", "content": "Fever?"},
             {"role": "assistant", "content": "Rest."}]
    path.write_text(json.dumps({"system": "You are a doctor.", "messages": turns}) + "\n")
    assert converted(path) == [turns]
    path.write_text(json.dumps({"system": "You are a nurse.", "messages": turns}) + "\n")
    assert refused(path) == (f"{path} line 1: sharegpt record has a 'system' field and a system turn in 'messages': "
                             "the conversation would hold two system prompts; keep one (delete the field or the "
                             "turn)")
    path.write_text(json.dumps({"messages": turns}) + "\n")  # either one alone is as before
    assert converted(path) == [turns]


def test_a_blank_mmlu_option_e_is_no_option(tmp_path):
    """A blank E column (a table with one for some rows) was offered as "E. " and could be the answer."""
    path = tmp_path / "mmlu.jsonl"
    row = {"question": "q", "A": "a", "B": "b", "C": "c", "D": "d", "E": "", "answer": "B"}
    path.write_text(json.dumps(row) + "\n")
    assert converted(path)[0][0]["content"] == "q\nA. a\nB. b\nC. c\nD. d"
    path.write_text(json.dumps({**row, "answer": "E"}) + "\n")
    assert "mmlu field 'answer' is 'E'; it must be one of ['A', 'B', 'C', 'D']" in refused(path)


def test_a_parquet_file_under_a_jsonl_name_is_named_as_parquet(tmp_path):
    pandas = pytest.importorskip("pandas")
    path = tmp_path / "data.jsonl"
    pandas.DataFrame([{"question": "q", "answer": "a"}]).to_parquet(path)  # was: "not UTF-8 text; re-encode it"
    assert refused(path) == f"{path}: a Parquet file (it starts with the bytes PAR1) under a .jsonl name; rename it " \
                            "to .parquet"
