"""Property-based tests of the data path (issue 14), with hypothesis.

Whatever a data file holds (arbitrary bytes, arbitrary JSON records, text with `<think>`, special
tokens, lone surrogates, very long or deeply nested values), `sources.encode_source` (loading,
format detection, chat template and tokenization with the real offline Qwen2.5 tokenizer) either
returns well-formed examples or raises `DataError` naming the file and, for a fault at a line,
record or row, its number. Any other exception is a bug.

Profiles: under CI (env CI set) the `ci` profile runs a fixed, derandomized set of 200 examples
per property with no example database; locally the `dev` profile draws 200 fresh examples each
run (failures are replayed from `.hypothesis/`); `HYPOTHESIS_PROFILE=thorough` runs 2000.
Measured with `CI=true python -m pytest -q tests/test_data_properties.py` on the 2-core
development machine (shared with other jobs): 15-28 s as pytest reports it, 20-36 s wall with
the imports; the thorough profile took about 4.5 minutes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import unicodedata
from pathlib import Path

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qwen_distillation.data.encode import IGNORE_INDEX
from qwen_distillation.data.formats import (
    CONTEXT_ALIASES,
    FORMATS,
    PROMPT_ALIASES,
    RESPONSE_ALIASES,
    SHAREGPT_ROLES,
    to_messages,
)
from qwen_distillation.data.sources import DataSource, encode_source
from qwen_distillation.errors import DataError
from qwen_distillation.modeling.tokenizer import build_qwen_tokenizer

EXAMPLES = 200  # per property; the `ci` profile's run time is in the module docstring
_COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}
settings.register_profile("ci", max_examples=EXAMPLES, derandomize=True, database=None, print_blob=True, **_COMMON)
settings.register_profile("dev", max_examples=EXAMPLES, **_COMMON)
settings.register_profile("thorough", max_examples=10 * EXAMPLES, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# Failures that concern the whole file, not one line or record; every other DataError must say where.
FILE_LEVEL = (
    "no records found",
    "no usable examples after filtering",
    "holds a single JSON object spread over several lines",
    "not a readable parquet file",
    "unsupported file type",
    "a Parquet file (it starts with the bytes PAR1) under a",
)
# A JSON list nested past Python's recursion limit: json does not say where.
JSON_DOCUMENT_LEVEL = ("JSON nested too deeply",)
LOCATION = re.compile(r" (line|record|row) (\d+)\b")


def qwen():
    """The real Qwen2.5 tokenizer, built offline (memoised; not a fixture, so that hypothesis's
    reports do not print its whole vocabulary of added tokens)."""
    return build_qwen_tokenizer()


# --- checking one run of the data path -------------------------------------------------------


def run_data_path(data: bytes, suffix: str, *, fmt: str = "auto", max_length: int = 1024,
                  last_number: int | None = None) -> list[dict] | None:
    """Write `data` to a fresh file, encode it as a source; return its examples, or None after
    checking that the DataError raised names the file and a line/record/row in 1..last_number
    (default: the file's line count) unless the failure concerns the whole file."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"data{suffix}"
        path.write_bytes(data)
        if last_number is None:
            last_number = len(re.split(rb"\r\n|\r|\n", data))
        try:
            examples = encode_source(DataSource(path=str(path), format=fmt), qwen(), max_length)
        except DataError as err:
            message = str(err)
            assert str(path) in message, message
            event("DataError: " + message.split(": ", 1)[-1][:40])  # see --hypothesis-show-statistics
            file_level = FILE_LEVEL + (JSON_DOCUMENT_LEVEL if suffix == ".json" else ())
            if not any(phrase in message for phrase in file_level):
                located = LOCATION.search(message[message.index(str(path)) + len(str(path)):])
                assert located, f"no line/record/row named: {message}"
                assert 1 <= int(located.group(2)) <= last_number, message
            return None
        check_examples(examples, str(path), max_length, last_number)
        event("examples")
        return examples


def check_examples(examples: list[dict], source: str, max_length: int, last_number: int) -> None:
    """What `encode.build_examples` promises of every example it returns."""
    tokenizer = qwen()
    assert examples
    indices = [example["index"] for example in examples]
    assert indices == sorted(set(indices)) and 1 <= indices[0] and indices[-1] <= last_number
    for example in examples:
        assert example["source"] == source
        input_ids, labels = example["input_ids"], example["labels"]
        assert 0 < len(input_ids) == len(labels) <= max_length
        assert all(isinstance(token, int) and 0 <= token < len(tokenizer) for token in input_ids)
        assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
        supervised = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert supervised, "an example without a supervised token"
        assert labels[0] == IGNORE_INDEX, "the prompt (at least the system turn) comes first"
        if len(input_ids) < max_length:  # not truncated: the last assistant turn ends with eos
            assert labels[supervised[-1]] == tokenizer.eos_token_id


# --- strategies ------------------------------------------------------------------------------

FIELD_NAMES = sorted({
    "instruction", "input", "output", "system", "history", "Question", "Complex_CoT", "Response",
    "conversations", "messages", "from", "value", "role", "content", "Options", "Answer", "Explanation",
    "question", "opa", "opb", "opc", "opd", "cop", "exp", "A", "B", "C", "D", "E", "answer",
    *PROMPT_ALIASES, *RESPONSE_ALIASES, *CONTEXT_ALIASES,
})
ROLES = [*SHAREGPT_ROLES, "", "tool", "GPT", "Human", "function"]
SNIPPETS = [
    "", " ", "\n", "\r\n", "\\n", "\t", "\u2028", "\x00", "<think>", "</think>", "<|im_end|>", "<|im_start|>",
    "<|endoftext|>", "A", "1", "答案", "é", "e\u0301", "{{ x }}", "{% if %}", "\U0001f600",
]

any_text = st.text(max_size=30) | st.sampled_from(SNIPPETS)
plain_text = any_text.map(lambda text: text.replace("\x00", ""))  # valid text: a NUL is refused as not text
# Not blank: a core of characters that are neither separators (Z) nor control characters (C).
nonblank_text = st.builds(lambda before, core, after: before + core + after, plain_text,
                          st.text(st.characters(exclude_categories=("Z", "C")), min_size=1, max_size=10), plain_text)
texts = st.one_of(
    any_text,
    any_text,
    st.lists(any_text, max_size=6).map("".join),
    st.integers(500, 3000).map(lambda n: "word " * n),  # long, but bounded
    st.characters(categories=["Cs"]).map(lambda c: f"a{c}b"),  # a lone surrogate: JSON can escape one ("\ud800")
)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=5), children, max_size=4),
    max_leaves=10,
)
turns = st.lists(
    st.fixed_dictionaries({}, optional={
        "from": st.sampled_from(ROLES) | json_values, "role": st.sampled_from(ROLES),
        "value": texts | json_values, "content": texts,
    }) | json_values,
    max_size=5,
)
field_values = texts | json_values | turns
arbitrary_records = st.dictionaries(st.sampled_from(FIELD_NAMES) | st.text(max_size=8), field_values, max_size=8)


@st.composite
def conversation(draw, role_key: str, content_key: str) -> list[dict]:
    """A valid sharegpt turn list: optional system, user/assistant pairs (no assistant turn blank: one in the
    middle is refused), maybe a trailing user turn."""
    user = draw(st.sampled_from(["human", "user"] if role_key == "from" else ["user"]))
    assistant = draw(st.sampled_from(["gpt", "assistant", "chatgpt", "model"] if role_key == "from" else ["assistant"]))
    out = [{role_key: "system", content_key: draw(plain_text)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        out += [{role_key: user, content_key: draw(plain_text)},
                {role_key: assistant, content_key: draw(nonblank_text)}]
    out[-1][content_key] = draw(nonblank_text)
    if draw(st.booleans()):
        out.append({role_key: user, content_key: draw(plain_text)})
    return out


# An answer in words, never one that reads as option letters ("E", "A, C"): those must name an option.
worded_answers = nonblank_text.filter(lambda answer: not re.fullmatch(r"[A-Z][A-Z\s,，、;；]*", answer.strip()))


@st.composite
def cmexam_records(draw) -> dict:
    """A valid cmexam record: options in any shape the converter reads (one string, a list, a dict),
    lettered or not, and an answer that is a subset of the options' letters or in words."""
    letters = draw(st.lists(st.sampled_from("ABCDE"), min_size=1, max_size=5, unique=True))
    texts_ = [draw(nonblank_text) for _ in letters]
    separator = draw(st.sampled_from([" ", ". ", "、", "："]))
    lines = [f"{letter}{separator}{text}" for letter, text in zip(letters, texts_)]
    chosen = draw(st.lists(st.sampled_from(letters), min_size=1, unique=True))
    if draw(st.booleans()):  # lettered options; the answer names some of them or is in words
        options = draw(st.sampled_from(["\\n".join(lines), "\n".join(lines), lines, dict(zip(letters, texts_))]))
        answer = draw(st.sampled_from(["".join(chosen), ", ".join(chosen)]) | worded_answers)
    else:  # options without letters (a text may still read as one by chance): an answer in words
        options = draw(st.sampled_from(["\\n".join(texts_), texts_]))
        answer = draw(worded_answers)
    record = {"Question": draw(nonblank_text), "Options": options, "Answer": answer}
    if draw(st.booleans()):
        record["Explanation"] = draw(plain_text | st.none())
    return record


def _valid(fmt: str) -> st.SearchStrategy[dict]:
    """Records of format `fmt` that must convert (no lone surrogates: they are not text)."""
    text, required = plain_text, nonblank_text
    before = {"system": text, "history": st.lists(st.tuples(required, required).map(list), max_size=2)}
    if fmt == "alpaca":
        return st.fixed_dictionaries({"instruction": required, "output": required}, optional={"input": text, **before})
    if fmt == "sharegpt":
        return st.one_of(conversation("from", "value").map(lambda c: {"conversations": c}),
                         conversation("role", "content").map(lambda c: {"messages": c}))
    if fmt == "medical_o1":
        return st.fixed_dictionaries({"Question": required, "Complex_CoT": required, "Response": required})
    if fmt == "cmexam":
        return cmexam_records()
    if fmt == "medmcqa":
        cop = st.integers(1, 4) | st.integers(1, 4).map(str)
        return st.fixed_dictionaries({"question": required, "opa": text, "opb": text, "opc": text, "opd": text,
                                      "cop": cop}, optional={"exp": text | st.none()})
    if fmt == "mmlu":
        return st.fixed_dictionaries({"question": required, "A": text, "B": text, "C": text, "D": text,
                                      "answer": st.sampled_from("ABCDabcd")}, optional={"E": text})
    assert fmt == "question_answer"
    return st.tuples(st.sampled_from(PROMPT_ALIASES[:3]), st.sampled_from(RESPONSE_ALIASES), required, required,
                     st.sampled_from(CONTEXT_ALIASES), text | st.lists(text, max_size=3),
                     st.fixed_dictionaries({}, optional={"input": text, **before})).map(
        lambda t: {t[0]: t[2], t[1]: t[3], t[4]: t[5], **t[6]})


VALID = {fmt: _valid(fmt) for fmt in FORMATS}


@st.composite
def near_valid(draw, fmt: str) -> dict:
    """A valid `fmt` record with fields dropped or replaced by arbitrary values: near-misses reach
    deeper into the converters than arbitrary dicts do."""
    record = dict(draw(VALID[fmt]))
    for key in draw(st.lists(st.sampled_from(sorted(record)), max_size=2, unique=True)):
        del record[key]
    record.update(draw(st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, min_size=1, max_size=2)))
    return record


@st.composite
def record_rows(draw, objects_only: bool = False) -> list:
    """Rows for one file: mostly (nearly) valid records of one format, as real files are, mixed with
    arbitrary records and (unless `objects_only`) JSON values that are not records."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    rows = draw(st.lists(st.one_of(VALID[fmt], VALID[fmt], VALID[fmt], near_valid(fmt), arbitrary_records),
                         min_size=1, max_size=3))
    if not objects_only and draw(st.integers(0, 5)) == 5:  # hypothesis favours small integers: rare
        rows.insert(draw(st.integers(0, len(rows))), draw(json_values))
    return rows


formats = st.sampled_from(["auto", "auto", *FORMATS])
max_lengths = st.sampled_from([4096, 256, 8])  # 8 leaves no response token: "no usable examples"


def dumps(value, ensure_ascii: bool) -> bytes:
    """JSON text as UTF-8; a lone surrogate written raw (ensure_ascii=False) makes invalid UTF-8."""
    return json.dumps(value, ensure_ascii=ensure_ascii).encode("utf-8", "surrogatepass")


# --- properties ------------------------------------------------------------------------------

JSON_FRAGMENTS = [
    b"{", b"}", b"[", b"]", b",", b":", b'"', b"\n", b"\r\n", b" ", b"\\", b"null", b"true", b"1", b"-0.5e3",
    b"NaN", b'"question"', b'"answer"', b'"instruction"', b'"output"', b'"messages"', b'"conversations"',
    b'"role"', b'"content"', b'"user"', b'"assistant"', b'"x"', b'"\\ud800"', b'"\\ud83d\\ude00"', b'"<think>"',
    b'{"question": "q", "answer": "a"}\n', b'{"instruction": "i", "input": "", "output": "o"}\n',
    b'{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}\n',
    b"\xef\xbb\xbf", b"\xff", b"\xe4\xb8\xad", b"\x00", b"\t",
    b"[" * 1500, b'{"a":' * 1500,  # nested past Python's recursion limit
    b"9" * 4400,  # past Python's limit on int digits
]
# Whole lines, valid and not, so that files get past their first line and faults sit at later lines.
JSON_LINES = [
    b'{"question": "q", "answer": "a"}\n', b'{"instruction": "i", "input": "", "output": "o"}\n',
    b'{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}\n',
    b'{"question": "<think>q</think>", "answer": "\\u00e9\\ud83d\\ude00"}\n', b"\n", b"  \r\n",
    b'{"question": "q", "answer": "\\udc00"}\n', b'{"question": "q", "answer": ' + b"7" * 5000 + b"}\n",
    b'{"question": "q", "answer": ' + b"[" * 1200 + b"]" * 1200 + b"}\n", b'{"question": "q"}\n', b"[1, 2]\n",
    b'{"question": "q", "answer": "a"', b"\xef\xbb\xbf", b'{"question": "\xe9", "answer": "a"}\n',
]
CSV_FRAGMENTS = [
    b"question,answer\n", b"instruction,input,output\n", b"messages\n", b",", b'"', b'""', b"\n", b"\r", b"\r\n",
    b"x", b"q,a\n", b"\xff", b"\xef\xbb\xbf", b"\x00", b"<think>",
    b'"' + b"a" * 140_000 + b'"',  # past csv's field size limit
]


def byte_soup(fragments: list[bytes]) -> st.SearchStrategy[bytes]:
    """Raw bytes, or (mostly) a concatenation of format fragments and short text."""
    piece = st.sampled_from(fragments) | st.text(max_size=3).map(str.encode)
    return st.one_of(st.binary(max_size=100), st.lists(piece, max_size=30).map(b"".join),
                     st.lists(piece, max_size=30).map(b"".join))


json_bytes = byte_soup(JSON_FRAGMENTS) | st.lists(st.sampled_from(JSON_LINES), max_size=6).map(b"".join)


@given(data=json_bytes, suffix=st.sampled_from([".jsonl", ".json"]), fmt=formats,
       max_length=max_lengths)
def test_arbitrary_json_bytes_yield_examples_or_located_data_error(data, suffix, fmt, max_length):
    # A JSON list may hold more records than the file has lines.
    run_data_path(data, suffix, fmt=fmt, max_length=max_length,
                  last_number=len(data) + 1 if suffix == ".json" else None)


@given(data=byte_soup(CSV_FRAGMENTS) | st.binary(max_size=100).map(lambda b: b"PAR1" + b + b"PAR1"),
       suffix=st.sampled_from([".csv", ".parquet", ".txt"]), fmt=formats)
def test_arbitrary_other_bytes_yield_examples_or_located_data_error(data, suffix, fmt):
    run_data_path(data, suffix, fmt=fmt)


@given(rows=record_rows(), blank_lines=st.lists(st.booleans(), max_size=4),
       ensure_ascii=st.booleans(), fmt=formats, max_length=max_lengths)
def test_arbitrary_jsonl_records_yield_examples_or_located_data_error(rows, blank_lines, ensure_ascii, fmt,
                                                                      max_length):
    lines = []
    for row, blank in zip(rows, blank_lines + [False] * len(rows)):
        lines += [dumps(row, ensure_ascii)] + ([b"   "] if blank else [])
    run_data_path(b"\n".join(lines) + b"\n", ".jsonl", fmt=fmt, max_length=max_length)


@given(rows=record_rows(), ensure_ascii=st.booleans(), fmt=formats)
def test_arbitrary_json_list_records_yield_examples_or_located_data_error(rows, ensure_ascii, fmt):
    run_data_path(dumps(rows, ensure_ascii), ".json", fmt=fmt, last_number=len(rows))


@given(rows=record_rows(objects_only=True), fmt=formats, max_length=max_lengths)
def test_arbitrary_csv_records_yield_examples_or_located_data_error(rows, fmt, max_length):
    # CSV holds text: every value is written as its string (a lone surrogate as invalid UTF-8).
    columns = sorted({key for row in rows for key in row})
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows({key: "" if value is None else str(value) for key, value in row.items()} for row in rows)
    run_data_path(buffer.getvalue().encode("utf-8", "surrogatepass"), ".csv", fmt=fmt,
                  max_length=max_length)


@given(rows=record_rows(objects_only=True), fmt=formats)
def test_arbitrary_parquet_records_yield_examples_or_located_data_error(rows, fmt):
    # A table of string columns (missing cells are nulls); Arrow strings are UTF-8, so no lone surrogates.
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = sorted({key for row in rows for key in row})
    table = pa.table({
        column: [None if row.get(column) is None else str(row[column]).encode("utf-8", "replace").decode()
                 for row in rows]
        for column in columns
    }, schema=pa.schema([(column, pa.string()) for column in columns]))
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    run_data_path(buffer.getvalue().to_pybytes(), ".parquet", fmt=fmt, last_number=len(rows))


@given(fmt=st.sampled_from(sorted(FORMATS)), data=st.data())
def test_valid_records_of_every_format_all_encode(fmt, data):
    """Positive property: valid records never fail, each gives one example, and its tokens are the
    rendered conversation with one supervised run per assistant turn, each ending in eos."""
    tokenizer = qwen()
    rows = data.draw(st.lists(VALID[fmt], min_size=1, max_size=3), label="rows")
    payload = b"".join(dumps(row, data.draw(st.booleans(), label="ensure_ascii")) + b"\n" for row in rows)
    examples = run_data_path(payload, ".jsonl", fmt=data.draw(st.sampled_from(["auto", fmt])),
                             max_length=1 << 20)
    assert examples is not None and [example["index"] for example in examples] == list(range(1, len(rows) + 1))
    for row, example in zip(rows, examples):
        messages = to_messages(row, fmt, "x.jsonl", 1)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
        assert tokenizer.decode(example["input_ids"]) == unicodedata.normalize("NFC", rendered)
        ends = [t for t in range(len(example["labels"]))
                if example["labels"][t] != IGNORE_INDEX
                and (t + 1 == len(example["labels"]) or example["labels"][t + 1] == IGNORE_INDEX)]
        assert len(ends) == sum(message["role"] == "assistant" for message in messages)
        assert all(example["input_ids"][t] == tokenizer.eos_token_id for t in ends)
