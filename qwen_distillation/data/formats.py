"""Raw records -> chat messages.

Every converter returns `[{"role": "system" | "user" | "assistant", "content": str}, ...]`: an
optional system turn, then user/assistant turns, ending with an assistant turn whose content is
non-empty. The supported formats and the fields each one reads:

- `alpaca`: instruction, output; optional input (appended to the instruction after a blank line),
  system, history (list of [query, response] pairs before this turn, as in LLaMA-Factory).
- `medical_o1`: Question, Complex_CoT, Response -> assistant `<think>{Complex_CoT}</think>{Response}`.
- `sharegpt`: conversations = [{from: human|gpt|system, value}] or OpenAI-style
  messages = [{role: user|assistant|system, content}]; multi-turn; optional top-level system.
- `cmexam`: Question, Options, Answer, Explanation; Options is one string whose options are
  separated by the two characters backslash + n (real newlines are accepted too).
- `medmcqa`: question, opa..opd, cop (1-based: 1=opa .. 4=opd), exp (may be null).
- `mmlu`: question, A..D (E optional), answer letter.
- `question_answer`: one prompt field (question/Question/QUESTION/ask/query/prompt) and one
  response field (answer/Answer/LONG_ANSWER/response/Response/completion); an optional context
  field (context/contexts/CONTEXTS) goes before the question, an optional input after it; system
  and history as in alpaca. A record with option fields (A..E, options, choices) is refused: they
  would be dropped.

`detect_format` tries them in the order of `FORMAT_FIELDS`, most specific first, because real
files carry several schemas at once (HuatuoGPT-o1's demo has question/answer *and*
Question/Complex_CoT/Response).
"""

from __future__ import annotations

import re
from typing import Any, Callable

from qwen_distillation.data.loading import location
from qwen_distillation.errors import DataError

Messages = list[dict[str, str]]

PROMPT_ALIASES = ("question", "Question", "QUESTION", "ask", "query", "prompt")
RESPONSE_ALIASES = ("answer", "Answer", "LONG_ANSWER", "response", "Response", "completion")
CONTEXT_ALIASES = ("context", "contexts", "CONTEXTS")
# Fields of a multiple-choice record: a question_answer record with them lost its options.
OPTION_FIELDS = ("A", "B", "C", "D", "E", "options", "Options", "choices", "opa")

SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
    "system": "system",
}

# Formats in detection order with the fields that identify them (shown in error messages).
FORMAT_FIELDS: dict[str, str] = {
    "sharegpt": "conversations or messages",
    "medical_o1": "Question, Complex_CoT, Response",
    "cmexam": "Question, Options, Answer, optional Explanation",
    "medmcqa": "question, opa, opb, opc, opd, cop",
    "mmlu": "question, A, B, C, D, answer",
    "alpaca": "instruction, output",
    "question_answer": f"one of {'/'.join(PROMPT_ALIASES)} and one of {'/'.join(RESPONSE_ALIASES)}",
}


def _fields(record: dict) -> list[str]:
    return sorted(str(key) for key in record)


def _is_blank(value: Any) -> bool:
    # NaN is what pandas/xlsx exports put in empty cells.
    return value is None or (isinstance(value, float) and value != value) or str(value).strip() == ""


class NotText(ValueError):
    """A text field holds a value whose ``str()`` is Python syntax, not its text: a JSON object
    ("{'a': 1}"), a boolean ("True"), or, as a list item, a list ("['a']"); or text with a NUL
    character, which no model input holds (a raw one in CSV or Parquet, the escape \u0000 in JSON).
    Its message names the value but not the record: the caller adds that."""


def _named(what: str, item: int | None) -> str:
    return what if item is None else f"item {item} of {what}"


def _refuse_non_text(value: Any, what: str, item: int | None = None) -> None:
    """Raise NotText naming ``what`` (e.g. "field 'output'") and the 1-based list ``item``, if any:
    for a NUL character, or for the types :func:`refuse_non_text_type` refuses."""
    if isinstance(value, str) and "\x00" in value:
        raise NotText(f"{_named(what, item)} holds a NUL character (U+0000, the JSON escape \\u0000) at position "
                      f"{value.index(chr(0)) + 1}, which is not text; delete it")
    refuse_non_text_type(value, what, item)


def refuse_non_text_type(value: Any, what: str, item: int | None = None) -> None:
    """Raise NotText naming ``what`` (e.g. "field 'output'") and the 1-based list ``item``, if any,
    when ``value`` is a boolean or a JSON object, or (as a list ``item``) a list. Numbers are text
    enough (real answers are numeric), and a whole field may be a list: check its items one by one.
    Shared by training's formats and the multiple-choice evaluation reader."""
    named = _named(what, item)
    if isinstance(value, bool):
        kind, shown = "a boolean", str(value).lower()  # as JSON writes it
    elif isinstance(value, dict) or (item is not None and isinstance(value, (list, tuple))):
        kind = "a JSON object" if isinstance(value, dict) else "a list"
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    else:
        return
    raise NotText(f"{named} holds {kind}, {shown}; write its text instead")


def _text(value: Any, what: str) -> str:
    """``value`` as text (a list: its items, one per line); ``what`` names it in errors."""
    _refuse_non_text(value, what)
    if isinstance(value, (list, tuple)):
        for item, part in enumerate(value, start=1):
            _refuse_non_text(part, what, item)
        return "\n".join(str(part) for part in value if not _is_blank(part))
    return "" if _is_blank(value) else str(value)


def _field(record: dict, field: str) -> str:
    return _text(record.get(field), f"field '{field}'")


def _require(record: dict, fields: tuple[str, ...], fmt: str, where: str) -> None:
    missing = [field for field in fields if field not in record]
    if missing:
        raise DataError(
            f"{where}: {fmt} record is missing field(s) {missing}; fields found: {_fields(record)}. "
            f"Add the field(s), or set format=... for this source if it is not {fmt} data"
        )


def _nonempty(record: dict, field: str, fmt: str, where: str) -> str:
    text = _field(record, field).strip()
    if not text:
        raise DataError(
            f"{where}: field '{field}' of this {fmt} record is empty; fill it or delete the record"
        )
    return text


def _first_alias(record: dict, aliases: tuple[str, ...]) -> str | None:
    return next((alias for alias in aliases if alias in record), None)


def _alpaca(record: dict, where: str) -> Messages:
    _require(record, ("instruction", "output"), "alpaca", where)
    parts = [_field(record, field).strip() for field in ("instruction", "input")]
    prompt = "\n\n".join(part for part in parts if part)
    if not prompt:
        raise DataError(f"{where}: alpaca fields 'instruction' and 'input' are both empty; fill one")
    return [*_system_and_history(record, "alpaca", where), {"role": "user", "content": prompt},
            {"role": "assistant", "content": _nonempty(record, "output", "alpaca", where)}]


def _system_and_history(record: dict, fmt: str, where: str) -> Messages:
    """The turns before a record's own prompt: its optional ``system`` field, then its ``history``, a list
    of ``[query, response]`` pairs (as in LLaMA-Factory's alpaca and Qwen's query/response/history).
    A turn with an empty side is refused (it trained an empty assistant turn, or a reply to nothing)."""
    messages: Messages = []
    system = _field(record, "system").strip()
    if system:
        messages.append({"role": "system", "content": system})
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(f"{where}: {fmt} field 'history' must be a list of [query, response] pairs")
    for turn, pair in enumerate(history, start=1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataError(
                f"{where}: {fmt} history entry {turn} must be a [query, response] pair, got {pair!r}"
            )
        query, response = (_text(part, f"history entry {turn}") for part in pair)
        for side, text in (("query", query), ("response", response)):
            if not text.strip():
                raise DataError(f"{where}: {fmt} history entry {turn} has an empty {side}; fill it or delete "
                                f"the entry")
        messages.append({"role": "user", "content": query})
        messages.append({"role": "assistant", "content": response})
    return messages


def _medical_o1(record: dict, where: str) -> Messages:
    _require(record, ("Question", "Complex_CoT", "Response"), "medical_o1", where)
    question = _nonempty(record, "Question", "medical_o1", where)
    reasoning = _nonempty(record, "Complex_CoT", "medical_o1", where)
    response = _nonempty(record, "Response", "medical_o1", where)
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"<think>{reasoning}</think>{response}"},
    ]


def _sharegpt(record: dict, where: str) -> Messages:
    field = "conversations" if "conversations" in record else "messages"
    if field not in record:
        raise DataError(
            f"{where}: sharegpt record has neither 'conversations' nor 'messages'; "
            f"fields found: {_fields(record)}"
        )
    turns = record[field]
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: sharegpt field '{field}' must be a non-empty list of turns")
    messages: Messages = []
    system = _field(record, "system").strip()
    if system:
        messages.append({"role": "system", "content": system})
    answers, blank_answers = [], []  # the turn numbers of the assistant turns, and of the blank ones
    for number, turn in enumerate(turns, start=1):
        if not isinstance(turn, dict):
            raise DataError(f"{where}: sharegpt turn {number} must be an object, got {turn!r}")
        role_name = turn.get("from", turn.get("role"))
        if "value" not in turn and "content" not in turn:  # e.g. under "text": it was read as an empty turn
            raise DataError(
                f"{where}: sharegpt turn {number} has no 'value' or 'content' (keys {sorted(map(str, turn))}); "
                "write the turn's text under 'value' (with 'from') or 'content' (with 'role')"
            )
        content = turn.get("value", turn.get("content"))
        role = SHAREGPT_ROLES.get(str(role_name).lower())
        if role is None:
            raise DataError(
                f"{where}: sharegpt turn {number} has role {role_name!r} (keys {sorted(turn)}); "
                f"accepted roles: {sorted(SHAREGPT_ROLES)} under 'from'/'role'"
            )
        messages.append({"role": role, "content": _text(content, f"sharegpt turn {number}")})
        if role == "assistant":
            answers.append(number)
            if not messages[-1]["content"].strip():
                blank_answers.append(number)
    turn_systems = [m for m in messages[1 if system else 0:] if m["role"] == "system"]
    if system and turn_systems:
        if any(m["content"].strip() != system for m in turn_systems):
            raise DataError(
                f"{where}: sharegpt record has a 'system' field and a system turn in '{field}': the conversation "
                "would hold two system prompts; keep one (delete the field or the turn)"
            )
        messages = [messages[0], *(m for m in messages[1:] if m["role"] != "system")]  # the same prompt twice
    # A trailing user turn has no response to learn from.
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    first_turn = next((m for m in messages if m["role"] != "system"), None)
    if first_turn is None or not messages[-1]["content"].strip():
        raise DataError(
            f"{where}: sharegpt conversation has no non-empty assistant turn at its end; "
            "fix or delete the record"
        )
    if first_turn["role"] != "user":
        raise DataError(f"{where}: sharegpt conversation must start with a user turn, not assistant")
    # The last one is non-empty (checked above); a blank one before it would train an empty answer.
    if blank_answers and blank_answers[0] < answers[-1]:
        raise DataError(
            f"{where}: sharegpt turn {blank_answers[0]} is an empty assistant turn in the middle of the "
            "conversation (it would train the model to answer with nothing); write its answer, or delete "
            "it and the user turn it answers"
        )
    return messages


def option_lines(options: Any) -> list[str]:
    """A cmexam ``Options`` value as its option lines: a ``{letter: text}`` object as ``"X. text"``
    lines, a list as its non-blank items, a string split at backslash-n or newlines. Raises
    NotText for a value that is not text (the caller names the record); also read by the
    multiple-choice evaluation for ``{letter: text}`` options."""
    if isinstance(options, dict):
        for key, value in options.items():  # as str(): only a NUL in them is refused here
            for part in (key, value):
                _refuse_non_text(str(part), f"option {key!r} of field 'Options'")
        return [f"{key}. {value}" for key, value in options.items()]
    if isinstance(options, (list, tuple)):
        for item, option in enumerate(options, start=1):
            _refuse_non_text(option, "field 'Options'", item)
        return [str(option).strip() for option in options if not _is_blank(option)]
    text = _text(options, "field 'Options'").replace("\\n", "\n")
    return [line.strip() for line in text.splitlines() if line.strip()]


_LETTERED_OPTION = re.compile(r"([A-Z])(?:[ \t.．、:：)）]|$)")  # "E 尿比重固定", "B. text", "C、text"
_LETTER_ANSWER = re.compile(r"[A-Z][A-Z\s,，、;；]*")  # "E", "ACD", "A, C"


def _check_answer_letters(options: list[str], answer: str, where: str) -> None:
    """An ``Answer`` written as option letters must name options the record has: a letter beyond
    them (answer "E" of options A-D) would train the student on an answer it was never offered.
    Options without letters, or an answer in words, are not checked."""
    lettered = [_LETTERED_OPTION.match(option) for option in options]
    if not options or not all(lettered) or not _LETTER_ANSWER.fullmatch(answer.strip()):
        return
    letters = [match.group(1) for match in lettered]
    unknown = sorted(set(re.findall("[A-Z]", answer)) - set(letters))
    if unknown:
        raise DataError(f"{where}: cmexam field 'Answer' is {answer!r}, but the record's options are "
                        f"{', '.join(letters)}: no option {', '.join(unknown)}; fix the answer or the options")


def _cmexam(record: dict, where: str) -> Messages:
    _require(record, ("Question", "Options", "Answer"), "cmexam", where)
    question = _nonempty(record, "Question", "cmexam", where)
    options = option_lines(record["Options"])
    answer = _nonempty(record, "Answer", "cmexam", where)
    _check_answer_letters(options, answer, where)
    explanation = _field(record, "Explanation").strip()
    answer_line = f"答案：{answer}"
    response = f"{explanation}\n\n{answer_line}" if explanation else answer_line
    return [
        {"role": "user", "content": "\n".join([question, *options])},
        {"role": "assistant", "content": response},
    ]


def _lettered_choice(question: str, options: list[str], letter_index: int, explanation: str) -> Messages:
    letters = "ABCDE"
    lines = [f"{letters[i]}. {option}" for i, option in enumerate(options)]
    answer = f"Answer: {letters[letter_index]}. {options[letter_index]}"
    response = f"{explanation}\n\n{answer}" if explanation else answer
    return [
        {"role": "user", "content": "\n".join([question, *lines])},
        {"role": "assistant", "content": response},
    ]


def _medmcqa(record: dict, where: str) -> Messages:
    fields = ("question", "opa", "opb", "opc", "opd", "cop")
    _require(record, fields, "medmcqa", where)
    question = _nonempty(record, "question", "medmcqa", where)
    options = [_field(record, field).strip() for field in fields[1:5]]
    try:
        cop = int(str(record["cop"]).strip())
    except ValueError:
        cop = 0
    if not 1 <= cop <= 4:
        raise DataError(
            f"{where}: medmcqa field 'cop' is {record['cop']!r}; it must be 1, 2, 3 or 4 "
            "(1-based: 1=opa .. 4=opd, as in the original MedMCQA JSON; add 1 to 0-based copies)"
        )
    return _lettered_choice(question, options, cop - 1, _field(record, "exp").strip())


def _mmlu(record: dict, where: str) -> Messages:
    _require(record, ("question", "A", "B", "C", "D", "answer"), "mmlu", where)
    question = _nonempty(record, "question", "mmlu", where)
    # A blank E (an empty column of a table) is no option, as for the multiple-choice evaluation; it
    # was offered as "E. " and could be the answer.
    letters = [letter for letter in "ABCDE" if letter in record and (letter != "E" or not _is_blank(record["E"]))]
    answer = _field(record, "answer").strip().upper()
    if answer not in letters:
        raise DataError(
            f"{where}: mmlu field 'answer' is {record['answer']!r}; it must be one of {letters}"
        )
    options = [_field(record, letter).strip() for letter in letters]
    return _lettered_choice(question, options, letters.index(answer), "")


def _question_answer(record: dict, where: str) -> Messages:
    prompt_field = _first_alias(record, PROMPT_ALIASES)
    response_field = _first_alias(record, RESPONSE_ALIASES)
    if prompt_field is None or response_field is None:
        wanted = [] if prompt_field else [f"one of {list(PROMPT_ALIASES)}"]
        wanted += [] if response_field else [f"one of {list(RESPONSE_ALIASES)}"]
        raise DataError(
            f"{where}: question_answer record is missing {' and '.join(wanted)}; "
            f"fields found: {_fields(record)}"
        )
    options = [field for field in OPTION_FIELDS if field in record]
    if options:  # `{"question", "A", "B", "C", "answer": "A"}` trained the reply "A" to a question without its options
        raise DataError(
            f"{where}: question_answer record has option field(s) {options}, which this format does not read "
            f"(it would train the answer without its options); write the options into the question, or use "
            f"format=mmlu (question, A, B, C, D, answer) or format=cmexam (Question, Options, Answer)"
        )
    prompt = _nonempty(record, prompt_field, "question_answer", where)
    context_field = _first_alias(record, CONTEXT_ALIASES)
    context = _field(record, context_field).strip() if context_field else ""
    if context:
        prompt = f"{context}\n\n{prompt}"
    extra = _field(record, "input").strip()  # {"question": "Translate to French", "input": "good morning"}
    if extra:
        prompt = f"{prompt}\n\n{extra}"
    return [
        *_system_and_history(record, "question_answer", where),
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": _nonempty(record, response_field, "question_answer", where)},
    ]


FORMATS: dict[str, Callable[[dict, str], Messages]] = {
    "alpaca": _alpaca,
    "medical_o1": _medical_o1,
    "sharegpt": _sharegpt,
    "cmexam": _cmexam,
    "medmcqa": _medmcqa,
    "mmlu": _mmlu,
    "question_answer": _question_answer,
}

_DETECTORS: dict[str, Callable[[dict], bool]] = {
    "sharegpt": lambda r: "conversations" in r or "messages" in r,
    "medical_o1": lambda r: {"Question", "Complex_CoT", "Response"} <= r.keys(),
    "cmexam": lambda r: {"Question", "Options", "Answer"} <= r.keys(),
    "medmcqa": lambda r: {"question", "opa", "opb", "opc", "opd", "cop"} <= r.keys(),
    "mmlu": lambda r: {"question", "A", "B", "C", "D", "answer"} <= r.keys(),
    "alpaca": lambda r: {"instruction", "output"} <= r.keys(),
    "question_answer": lambda r: bool(
        _first_alias(r, PROMPT_ALIASES) and _first_alias(r, RESPONSE_ALIASES)
    ),
}


def detect_format(record: dict, source: str, index: int | None = None) -> str:
    """Name of the first format in `FORMAT_FIELDS` whose identifying fields `record` has; the
    error names `source` and, when given, the record's `index` (as in `to_messages`)."""
    for name, matches in _DETECTORS.items():
        if matches(record):
            return name
    expected = ", ".join(f"{name} ({fields})" for name, fields in FORMAT_FIELDS.items())
    where = source if index is None else location(source, index)
    if set(record) <= {"text", "content", "id", "meta", "url", "source"} and ("text" in record or "content" in record):
        raise DataError(  # pretraining text: no format reads it, so "set format=..." could not help
            f"{where}: a record of plain text (fields {_fields(record)}) is not training data here: every format "
            f"reads a prompt and a response (the student learns the response, scored against the teacher). "
            f"Write each record as a prompt and a response, e.g. {{\"prompt\": ..., \"response\": ...}}"
        )
    raise DataError(
        f"{where}: cannot tell the format from the fields found {_fields(record)}; "
        f"expected one of: {expected}; {_undetected_fix(record, source)}"
    )


def _undetected_fix(record: dict, source: str) -> str:
    """What to do about a record no format reads: the likely cause where the fields show it."""
    fields = [str(key) for key in record]
    if len(fields) == 1 and "\t" in fields[0]:
        return ("its one field name holds tabs: a tab-separated file read as comma-separated; write it with commas "
                "(or as JSON Lines)")
    if source.lower().split(":")[-1].endswith(".csv"):
        hint = ("a CSV file's first row names the fields: if this file has no header row, add one (e.g. "
                "instruction,output)")
    else:
        hint = ""
    prompt, response = _first_alias(record, PROMPT_ALIASES), _first_alias(record, RESPONSE_ALIASES)
    if prompt and not response:
        rename = (f"it has a prompt field ({prompt}) but no response field: rename the field that holds the answer "
                  f"to one of {'/'.join(RESPONSE_ALIASES)}")
    elif response and not prompt:
        rename = (f"it has a response field ({response}) but no prompt field: rename the field that holds the "
                  f"question to one of {'/'.join(PROMPT_ALIASES)}")
    else:
        rename = "rename its fields to those of one of them, or set format=... for this source"
    return f"{hint}; {rename}" if hint else rename


def to_messages(record: dict, fmt: str, source: str, index: int) -> Messages:
    """Convert one record to chat messages ending with a non-empty assistant turn.

    Args:
        record: the raw record (field names as in the file).
        fmt: a key of `FORMATS`, or "auto" to detect it from this record.
        source: file path or dataset name, used in error messages.
        index: 1-based line number for JSON Lines files, else 1-based record number.

    Raises:
        DataError: unknown `fmt`, missing required fields, or an empty response.
    """
    if fmt == "auto":
        fmt = detect_format(record, source, index)
    converter = FORMATS.get(fmt)
    if converter is None:
        raise DataError(
            f"{source}: unknown data format {fmt!r}; valid formats: {['auto', *FORMATS]}"
        )
    where = location(source, index)
    try:
        return converter(record, where)
    except NotText as err:
        raise DataError(f"{where}: {err} (fix or delete the record)") from None
