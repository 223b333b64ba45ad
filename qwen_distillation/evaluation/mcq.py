"""Multiple-choice accuracy from the log-likelihood of the answer letter.

Scoring rule (MMLU-style, the same for every format): the user turn is the question with its
lettered options and one instruction line ("Answer with the letter." or, for Chinese text,
"请直接回答选项字母。"); the prompt is that turn rendered by the chat template with
``add_generation_prompt=True``. The score of option ``X`` is the summed log-probability of
the tokens of the bare letter ``"X"`` as the first tokens of the assistant's reply, over the
first ``vocab_size`` logit columns (a padded lm_head's extra columns are no tokens). The
option texts are not scored: they appear in the prompt, so the model picks a letter, as a
grader reading its answer would.

Prediction: the top-scoring letter; an item with several gold letters (CMExam) predicts its
``len(gold)`` top-scoring letters. An item is correct iff the predicted set equals the gold
set exactly. Ties go to the earlier letter.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from qwen_distillation.data.formats import NotText, option_lines, refuse_non_text_type
from qwen_distillation.data.loading import check_local_path, load_records, location
from qwen_distillation.errors import DataError, require, require_one_of, require_strings
from qwen_distillation.evaluation.prompting import model_device, render_prompt
from qwen_distillation.evaluation.sharding import Shard, map_shared
from qwen_distillation.evaluation.text_metrics import has_han, strip_think
from qwen_distillation.modeling.parts import decoder_and_head, supports_hidden_path
from qwen_distillation.paths import locate

log = logging.getLogger(__name__)

INSTRUCTION_EN = "Answer with the letter."
INSTRUCTION_ZH = "请直接回答选项字母。"
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
_OPTION_SEPARATORS = " \t.．、:：)）"


@dataclass
class MCQItem:
    """One multiple-choice question.

    question: the prompt text, stem followed by one ``"X. text"`` line per option.
    options: option letter -> option text, in letter order.
    answers: the gold letters (several for CMExam's multi-answer items).
    """

    question: str
    options: dict[str, str]
    answers: frozenset[str]

    @property
    def user_text(self) -> str:
        """The user turn: the question, then the instruction in the question's language."""
        instruction = INSTRUCTION_ZH if has_han(self.question) else INSTRUCTION_EN
        return f"{self.question}\n{instruction}"


def _lettered(stem: str, options: dict[str, str]) -> str:
    return "\n".join([stem, *(f"{letter}. {text}" for letter, text in options.items())])


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def _field(record: dict, name: str, fmt: str, where: str) -> str:
    if name not in record:
        raise DataError(f"{where}: {fmt} record has no field '{name}'; fields found: {sorted(record)}")
    value = record[name]
    what = f"field '{name}' of this {fmt} record"
    try:  # its str() is Python syntax, read as the text ("{'a': 1}", "True"): refused as training refuses it
        refuse_non_text_type(value, what)
        if isinstance(value, (list, tuple)):
            for item, part in enumerate(value, start=1):
                refuse_non_text_type(part, what, item)
    except NotText as err:
        raise DataError(f"{where}: {err}") from None
    if isinstance(value, (list, tuple)):
        value = "\n".join(str(part).strip() for part in value if not _blank(part))
    if _blank(value):
        raise DataError(f"{where}: field '{name}' of this {fmt} record is empty; fill it or drop the record")
    return str(value).strip()


def _item(stem: str, options: dict[str, str], answers: Iterable[str], where: str, fmt: str, field: str) -> MCQItem:
    answers = frozenset(answers)
    unknown = sorted(answers - options.keys())
    if not answers or unknown:
        raise DataError(f"{where}: {fmt} field '{field}' names letter(s) {unknown or '(none)'} "
                        f"but the options are {list(options)}")
    return MCQItem(question=_lettered(stem, options), options=options, answers=answers)


def _cmexam_options(text: str, where: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for line in text.replace("\\n", "\n").splitlines():
        line = line.strip()
        if not line:
            continue
        letter, rest = line[0], line[1:]
        if not ("A" <= letter <= "Z") or (rest and rest[0] not in _OPTION_SEPARATORS):
            raise DataError(f"{where}: cmexam field 'Options' has the line {line!r}; each option must "
                            "read 'X text' (a capital letter, a space, the text), options separated by \\n")
        text_ = rest.lstrip(_OPTION_SEPARATORS).strip()
        if not text_ or letter in options:
            problem = "is empty" if not text_ else "appears twice"
            raise DataError(f"{where}: cmexam field 'Options': option {letter} {problem}")
        options[letter] = text_
    if len(options) < 2:
        raise DataError(f"{where}: cmexam field 'Options' holds {len(options)} option(s); need at least 2")
    return options


def _cmexam(record: dict, where: str) -> MCQItem:
    stem = _field(record, "Question", "cmexam", where)
    if isinstance(record.get("Options"), dict):  # {letter: text}, as training reads it (was refused as one line)
        try:
            record = {**record, "Options": option_lines(record["Options"])}
        except NotText as err:  # a NUL character in a letter or a text
            raise DataError(f"{where}: {err}") from None
    options = _cmexam_options(_field(record, "Options", "cmexam", where), where)
    answer = _field(record, "Answer", "cmexam", where).upper()
    letters = [char for char in answer if char not in " ,，、;；"]
    if len(set(letters)) != len(letters):
        raise DataError(f"{where}: cmexam field 'Answer' is {answer!r}; a letter appears twice")
    return _item(stem, options, letters, where, "cmexam", "Answer")


def _medmcqa(record: dict, where: str) -> MCQItem:
    stem = _field(record, "question", "medmcqa", where)
    fields = ("opa", "opb", "opc", "opd")
    options = {letter: _field(record, name, "medmcqa", where) for letter, name in zip("ABCD", fields)}
    cop = _field(record, "cop", "medmcqa", where)
    if cop not in ("1", "2", "3", "4"):
        raise DataError(f"{where}: medmcqa field 'cop' is {record['cop']!r}; it must be 1, 2, 3 or 4 "
                        "(1-based: 1=opa .. 4=opd)")
    return _item(stem, options, "ABCD"[int(cop) - 1], where, "medmcqa", "cop")


def _mmlu(record: dict, where: str) -> MCQItem:
    stem = _field(record, "question", "mmlu", where)
    letters = "ABCDE" if not _blank(record.get("E")) else "ABCD"
    options = {letter: _field(record, letter, "mmlu", where) for letter in letters}
    answer = _field(record, "answer", "mmlu", where).upper()
    if len(answer) != 1:
        raise DataError(f"{where}: mmlu field 'answer' is {record['answer']!r}; it must be one letter")
    return _item(stem, options, answer, where, "mmlu", "answer")


def _pubmedqa(record: dict, where: str) -> MCQItem:
    question = _field(record, "QUESTION", "pubmedqa", where)
    contexts = record.get("CONTEXTS") or []
    contexts = [contexts] if isinstance(contexts, str) else contexts
    context = "\n".join(str(part).strip() for part in contexts if not _blank(part))
    decision = _field(record, "final_decision", "pubmedqa", where).lower()
    letter = {text: letter for letter, text in PUBMEDQA_OPTIONS.items()}.get(decision)
    if letter is None:
        raise DataError(f"{where}: pubmedqa field 'final_decision' is {record['final_decision']!r}; "
                        "it must be yes, no or maybe")
    stem = f"{context}\n\n{question}" if context else question
    return _item(stem, dict(PUBMEDQA_OPTIONS), letter, where, "pubmedqa", "final_decision")


MCQ_FORMATS: dict[str, Callable[[dict, str], MCQItem]] = {
    "cmexam": _cmexam,
    "medmcqa": _medmcqa,
    "mmlu": _mmlu,
    "pubmedqa": _pubmedqa,
}

# Fields that identify each format, for fmt="auto".
_MCQ_FIELDS = {
    "cmexam": ("Question", "Options", "Answer"),
    "medmcqa": ("question", "opa", "cop"),
    "mmlu": ("question", "A", "B", "answer"),
    "pubmedqa": ("QUESTION", "final_decision"),
}


def mcq_items(records: Iterable[dict | tuple[int, dict]], fmt: str, source: str = "records") -> list[MCQItem]:
    """Multiple-choice items from raw records.

    Args:
        records: dicts, or the ``(number, record)`` pairs of ``data.loading.load_records``
            (the number is then used in error messages; else the 1-based position).
        fmt: ``cmexam`` (Question; Options one string, options separated by backslash-n or
            newlines, each ``"X text"``; Answer one or more letters such as ``"ACD"``),
            ``medmcqa`` (question, opa..opd, cop 1-based), ``mmlu`` (question, A..D, optional
            E, answer letter), ``pubmedqa`` (QUESTION, CONTEXTS list, final_decision
            yes/no/maybe -> options A yes, B no, C maybe), or ``auto`` (per record).
        source: file or dataset name for error messages.

    Raises:
        DataError: unknown ``fmt``, or a record with a missing, empty or malformed field;
            the message names the record and the field.
    """
    if fmt != "auto" and fmt not in MCQ_FORMATS:
        raise DataError(f"{source}: unknown multiple-choice format {fmt!r}; valid: {['auto', *MCQ_FORMATS]}")
    items = []
    for position, entry in enumerate(records, start=1):
        number, record = entry if isinstance(entry, tuple) else (position, entry)
        where = location(source, number) if isinstance(entry, tuple) else f"{source} record {number}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        name = fmt
        if fmt == "auto":
            name = next((n for n, fields in _MCQ_FIELDS.items() if all(f in record for f in fields)), None)
            if name is None:
                raise DataError(f"{where}: cannot tell the multiple-choice format from the fields "
                                f"{sorted(record)}; expected one of {_MCQ_FIELDS}")
        items.append(MCQ_FORMATS[name](record, where))
    return items



# "The answer is B", "Answer: (A, C)", "答案是B", "答案：ACD", "选B": the letters after the phrase;
# a letter must not run on into a word ("The answer is Aspirin" names no letter).
_LETTERS = r"([A-Z](?:(?:\s*(?:,|，|、|&|和|and|\s)\s*)?[A-Z])*)(?![A-Za-z])"
_ANSWER_PHRASES = (
    re.compile(r"(?i:answer)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:：=]?\s*(?i:option\s*)?[(\[]?\s*" + _LETTERS),
    re.compile(r"(?:答案|正确答案|故选|应选|选)\s*(?:是|为|应为|：|:)?\s*[(（]?\s*" + _LETTERS),
)
_LEADING_LETTER = re.compile(r"^\s*[(\[]?([A-Z])(?:[)\].．、:：]|\s*$)")


def answer_letters(text: str, options: dict[str, str]) -> frozenset[str]:
    """The option letters a free-text answer chooses, or an empty set when it names none.

    Read from ``text`` with any ``<think>`` block removed, in this order: the letters after the
    last answer phrase that names only option letters ("The answer is B", "Answer: A, C",
    "答案是ACD", "选B"); else a letter that opens the answer on its own ("B.", "(B)", "B"); else
    the one option whose text the answer quotes (case-insensitive; none when several are quoted).
    """
    answer = strip_think(text)
    for phrase in _ANSWER_PHRASES:
        for match in reversed(list(phrase.finditer(answer))):
            letters = frozenset(re.findall(r"[A-Z]", match.group(1)))
            if letters and letters <= options.keys():
                return letters
    leading = _LEADING_LETTER.match(answer)
    if leading and leading.group(1) in options:
        return frozenset(leading.group(1))
    quoted = [letter for letter, option in options.items() if option.strip() and option.lower() in answer.lower()]
    return frozenset(quoted) if len(quoted) == 1 else frozenset()


MCQ_SOURCE_KEYS = ("path", "name", "format", "split", "subset")
# A set's name becomes part of a metric key: eval/mcq/<name>_accuracy.
MCQ_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class MCQSource:
    """One ``eval.mcq`` entry after normalisation; ``name`` names its metric, ``where`` the entry
    in errors (``eval.mcq[1]``; not compared)."""

    name: str
    path: str
    format: str = "auto"
    split: str = "train"
    subset: str | None = None
    where: str = field(default="", compare=False)


def normalise_mcq_sources(key: str, entries: Iterable[Any]) -> list[MCQSource]:
    """Turn the entries of ``eval.mcq`` (named ``key`` in errors: ``PATH``, ``NAME=PATH`` or a
    mapping) into MCQSources with unique names; a bare path is named after its file stem. A local
    path must exist (a hub dataset id is not looked up)."""
    out: list[MCQSource] = []
    example = f"{key}=[{{name: medqa, path: my_mcq.jsonl}}]"
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            name, eq, path = entry.partition("=")
            entry = {"name": name, "path": path} if eq and MCQ_NAME.match(name) else {"path": entry}
        require(isinstance(entry, dict), where, entry, "an MCQ set is PATH, NAME=PATH or a mapping with a `path`",
                example)
        unknown = sorted(set(entry) - set(MCQ_SOURCE_KEYS))
        require(not unknown, where, entry, f"unknown key(s) {unknown}; valid keys are {', '.join(MCQ_SOURCE_KEYS)}",
                f"{key}=[{{name: medqa, path: my_mcq.jsonl, format: cmexam}}]")
        require(bool(entry.get("path")), where, entry, "an MCQ set needs a non-empty `path`", example)
        # A list or a number here failed with an AttributeError.
        require_strings(where, entry, dict.fromkeys(("path", "name", "split"), example))
        fields = {k: v for k, v in entry.items() if v is not None or k == "subset"}
        fields.setdefault("name", Path(str(entry["path"]).split(":")[-1]).stem)
        source = MCQSource(**fields, where=where)
        require(bool(MCQ_NAME.match(source.name)), f"{where}.name", source.name,
                "a set name may hold only letters, digits, '_', '.' and '-' (it names eval/mcq/<name>_accuracy)",
                f"{where}.name=medqa")
        require(source.name not in {s.name for s in out}, f"{where}.name", source.name,
                "two MCQ sets share this name; name them apart", example)
        require_one_of(f"{where}.format", source.format, ("auto", *MCQ_FORMATS))
        out.append(source)
    for i, source in enumerate(out):  # every entry well formed, then its path: before any model loads
        check_local_path(locate(source.path), f"{key}[{i}]")
    return out


def load_mcq_sets(sources: list[MCQSource], max_items: int | None) -> dict[str, list[MCQItem]]:
    """Set name -> items (the first ``max_items`` records of each source; all when None).

    Raises:
        DataError: a file that is empty, unreadable or holds a malformed record, naming the
            entry (``eval.mcq[1]: FILE line 3: ...``) as well as the file.
    """
    sets = {}
    for source in sources:
        try:
            # One record past the cap tells whether the cap cut the set (its items are counted in the log).
            records = load_records(locate(source.path), split=source.split, subset=source.subset,
                                   max_records=None if max_items is None else max_items + 1)
            if max_items is not None and len(records) > max_items:
                log.info("%s: scored on the first %d items (the cap: eval.mcq_max_items in a run, null for all; "
                         "--mcq_max_items of evaluate, 0 for all)", source.where or source.path, max_items)
            sets[source.name] = mcq_items(records[:max_items], source.format, source=source.path)
        except DataError as err:
            if not source.where:
                raise
            raise DataError(f"{source.where}: {err} (fix the file, point {source.where} at another one, or remove "
                            f"that entry)") from None
    return sets


def predict(scores: dict[str, float], k: int = 1) -> frozenset[str]:
    """The ``k`` top-scoring letters (ties go to the earlier letter)."""
    return frozenset(sorted(scores, key=lambda letter: (-scores[letter], letter))[:k])


def _letter_ids(tokenizer, letter: str) -> list[int]:
    ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
    if not ids:
        raise DataError(f"the tokenizer turns the option letter {letter!r} into no token")
    return list(ids)


@torch.no_grad()
def option_scores(model: nn.Module, tokenizer, items: list[MCQItem], *, vocab_size: int, batch_size: int = 8,
                  chat_template_kwargs: dict | None = None) -> list[dict[str, float]]:
    """Per item, letter -> summed log-probability of the letter's tokens after the prompt.

    A letter that is one token (every Qwen letter) is read off the prompt's last position,
    so each item costs one sequence; a multi-token letter adds one sequence
    ``prompt + letter[:-1]``. Sequences are right-padded in batches of ``batch_size``, and
    logits are formed only at the scored positions (from the final hidden states when the
    lm_head is a plain projection), never for the whole sequence.
    """
    letter_cache: dict[str, list[int]] = {}
    # One row per sequence: (item index, token ids, [(position, target token, letter), ...]).
    rows: list[tuple[int, list[int], list[tuple[int, int, str]]]] = []
    for index, item in enumerate(items):
        prompt = render_prompt(tokenizer, item.user_text, chat_template_kwargs)
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        last = len(prompt_ids) - 1
        single = []
        for letter in item.options:
            ids = letter_cache.setdefault(letter, _letter_ids(tokenizer, letter))
            if len(ids) == 1:
                single.append((last, ids[0], letter))
            else:
                rows.append((index, prompt_ids + ids[:-1], [(last + j, tok, letter) for j, tok in enumerate(ids)]))
        if single:
            rows.append((index, prompt_ids, single))
    rows.sort(key=lambda row: len(row[1]), reverse=True)  # Similar lengths share a batch: less padding.

    was_training = model.training
    model.eval()
    device = model_device(model)
    hidden_path = supports_hidden_path(model)
    decoder, head = decoder_and_head(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[dict[str, float]] = [dict.fromkeys(item.options, 0.0) for item in items]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        length = max(len(ids) for _, ids, _ in chunk)
        input_ids = torch.full((len(chunk), length), pad, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for b, (_, ids, _) in enumerate(chunk):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            attention_mask[b, :len(ids)] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device), "use_cache": False}
        batch_rows = torch.tensor([b for b, (_, _, queries) in enumerate(chunk) for _ in queries], device=device)
        positions = torch.tensor([q[0] for _, _, queries in chunk for q in queries], device=device)
        targets = torch.tensor([q[1] for _, _, queries in chunk for q in queries], device=device)
        if hidden_path:
            hidden = decoder(**inputs).last_hidden_state[batch_rows, positions]
            logits = hidden @ head.weight[:vocab_size].T
        else:
            logits = model(**inputs).logits[batch_rows, positions, :vocab_size]
        logprobs = torch.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0].tolist()
        flat = [(index, letter) for index, _, queries in chunk for _, _, letter in queries]
        for (index, letter), value in zip(flat, logprobs):
            scores[index][letter] += value
    model.train(was_training)
    return scores


def accuracy_from_scores(items: list[MCQItem], scores: list[dict[str, float]]) -> dict[str, float]:
    """``accuracy``, ``n``, ``multi_answer_n``, ``multi_answer_accuracy`` of the predictions
    ``predict(scores, len(item.answers))``; an accuracy over no items is NaN, and so is one over items
    any of whose scores is not finite (a model that outputs NaN), which no prediction stands for: the
    order of NaN scores would pick letters by chance."""
    correct = [predict(s, len(item.answers)) == item.answers for item, s in zip(items, scores, strict=True)]
    finite = [all(math.isfinite(v) for v in s.values()) for s in scores]
    multi = [(ok, fine) for item, ok, fine in zip(items, correct, finite) if len(item.answers) > 1]

    def share(pairs) -> float:
        return sum(ok for ok, _ in pairs) / len(pairs) if pairs and all(fine for _, fine in pairs) else float("nan")

    return {"accuracy": share(list(zip(correct, finite))), "n": len(correct), "multi_answer_n": len(multi),
            "multi_answer_accuracy": share(multi)}


@torch.no_grad()
def mcq_accuracy(model: nn.Module, tokenizer, items: list[MCQItem], *, vocab_size: int, batch_size: int = 8,
                 chat_template_kwargs: dict | None = None, shard: Shard | None = None) -> dict[str, float]:
    """Accuracy of ``model`` on ``items`` by answer-letter log-likelihood (module docstring), the
    items split over the ranks of ``shard`` a batch at a time.

    Returns ``{"accuracy", "n", "multi_answer_n", "multi_answer_accuracy"}``; accuracies are
    fractions in [0, 1], NaN over no items.
    """
    def scores_of(chunk: list[MCQItem]) -> list[dict[str, float]]:
        return option_scores(model, tokenizer, chunk, vocab_size=vocab_size, batch_size=batch_size,
                             chat_template_kwargs=chat_template_kwargs)

    if shard is None or shard.world_size == 1:
        return accuracy_from_scores(items, scores_of(items))
    chunks = [items[start:start + batch_size] for start in range(0, len(items), batch_size)]
    return accuracy_from_scores(items, [score for part in map_shared(scores_of, chunks, shard) for score in part])
