"""Teacher-generated training data (sequence-level KD): the teacher answers the prompts of a
dataset, optionally reasoning first in a ``<think>`` block; the answers are filtered and
appended to a dataset in the medical-o1 or Alpaca format (``data/generated.py`` holds the rows
and files).

Prompts (:func:`read_prompts`): each record of a supported dataset, converted as training
reads it (``data.formats``), without its last assistant turn. Multiple-choice records with a
gold answer (cmexam, medmcqa, mmlu) become the lettered question of ``evaluation.mcq``.

Instructions (:func:`teacher_messages`): the teacher sees the prompt with one paragraph
appended to its last user turn: with ``reasoning``, "think inside ``<think></think>``, then
answer", and the assistant turn is opened with ``<think>\\n``, so even a small model writes the
block; for a multiple-choice prompt, "end with 'The answer is X'". The rows store the prompt
without these paragraphs: the student learns to reason and answer unprompted.

Budget forcing (:func:`force_answers`, as in s1): a sample that stops, or runs out of
``max_new_tokens``, inside its think block gets the block closed (``\\n</think>\\n\\n``) and the
teacher writes the final answer in at most ``answer_tokens`` more tokens; its provenance says
``answer_forced``. ``max_new_tokens`` is then the thinking budget.

Filters (:func:`judge`), in order: cut at ``max_new_tokens`` (unless ``keep_truncated``), an
empty response, no reasoning block where the ``medical_o1`` format needs one, and for
multiple-choice prompts no chosen letter or letters other than the gold ones (rejection
sampling, ``evaluation.mcq.answer_letters``); finally a row identical to one already written is a
duplicate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from typing import Callable

from qwen_distillation.data.formats import FORMATS, PROMPT_ALIASES, detect_format, to_messages
from qwen_distillation.data.generated import (PROVENANCE, RunFiles, Sampling, append_rows, content_key,
                                              dataset_row, identity_differences, read_journal, sample_key,
                                              single_turn, split_reasoning, summarise, write_json_atomic)
from qwen_distillation.data.loading import load_records, location
from qwen_distillation.errors import ConfigError, DataError
from qwen_distillation.evaluation.generation import Completion, Generate
from qwen_distillation.evaluation.mcq import MCQ_FORMATS, answer_letters
from qwen_distillation.evaluation.prompting import render_messages
from qwen_distillation.evaluation.text_metrics import has_han
from qwen_distillation.paths import locate

log = logging.getLogger(__name__)

GRADED_FORMATS = ("cmexam", "medmcqa", "mmlu")  # data formats whose records carry a gold letter
THINK_PREFILL = "<think>\n"
THINK_CLOSE = "</think>"
FORCED_CLOSE = "\n</think>\n\n"
REASONING_INSTRUCTION = {
    "en": "First think the question through step by step inside <think> and </think>, then write your final "
          "answer after </think>.",
    "zh": "请先在<think>和</think>之间逐步思考，然后在</think>之后写出最终回答。",
}
CHOICE_INSTRUCTION = {
    "en": 'End your answer with "The answer is X", where X is the letter of the correct option.',
    "zh": "回答最后请写“答案是X”，X为正确选项的字母。",
}
# A response field that the converters require; filled in for prompt-only records.
_PLACEHOLDER = "-"


@dataclass(frozen=True)
class GenerationPrompt:
    """One prompt of the source.

    row: the record's number as ``data.loading.load_records`` gives it (the line of a JSON
        Lines file), stored in each row's provenance as ``source_row``.
    messages: the conversation to answer: optional system turn, earlier turns, last user turn.
    options, gold: option letter -> text and the gold letters, for multiple-choice records.
    """

    row: int
    messages: tuple[dict, ...]
    options: dict[str, str] | None = None
    gold: frozenset[str] | None = None


def _prompt_record(record: dict, fmt: str) -> dict:
    """The record with a placeholder answer where it has none, so that its format's converter
    reads its prompt (the answer is dropped afterwards)."""
    record = dict(record)
    if fmt == "alpaca" and not str(record.get("output") or "").strip():
        record["output"] = _PLACEHOLDER
    elif fmt == "question_answer":
        record["response"] = _PLACEHOLDER
    elif fmt == "medical_o1":
        record.update({"Complex_CoT": _PLACEHOLDER, "Response": _PLACEHOLDER})
    elif fmt == "sharegpt":
        field = "conversations" if "conversations" in record else "messages"
        turns = list(record.get(field) or [])
        last = turns[-1] if turns and isinstance(turns[-1], dict) else {}
        if str(last.get("from", last.get("role"))).lower() in ("human", "user"):
            record[field] = turns + [{"role": "assistant", "content": _PLACEHOLDER}]
    return record


def _source_format(record: dict, source: str, number: int) -> str:
    """``detect_format``, plus prompt-only records: an ``instruction`` (alpaca) or a prompt field
    (question/prompt/...: question_answer) without an answer."""
    try:
        return detect_format(record, source, number)
    except DataError:
        if "instruction" in record:
            return "alpaca"
        if any(alias in record for alias in PROMPT_ALIASES):
            return "question_answer"
        raise


def _refuse_mixed_formats(records: list, fmt: str, path: str) -> None:
    """A directory whose files detect as different formats (the first record of each file) is
    refused: one run writes one format's rows, and reading a file as another format drops fields."""
    first_file = getattr(records[0][0], "file", None)
    seen = {first_file}
    for number, record in records:
        file = getattr(number, "file", None)
        if file in seen:
            continue
        seen.add(file)
        other = _source_format(record, path, number)
        if other != fmt:
            raise DataError(f"--data {path}: {first_file} holds {fmt} records and {file} holds {other} records; "
                            "generate from one format at a time (a --data per file, or a directory per format)")


def read_prompts(path: str, *, fmt: str = "auto", split: str = "train", subset: str | None = None,
                 max_prompts: int | None = None) -> tuple[list[GenerationPrompt], str]:
    """The prompts of a dataset and its format (detected from the first record when ``auto``).

    Any supported format works, answered or not; cmexam, medmcqa and mmlu records carry their
    gold letters. Raises DataError naming the file and line of a record that cannot be read.
    """
    if fmt != "auto" and fmt not in FORMATS:
        raise ConfigError(f"--source_format {fmt}: must be one of {', '.join(['auto', *FORMATS])}")
    records = load_records(locate(path), split=split, subset=subset, max_records=max_prompts)
    if fmt == "auto":
        fmt = _source_format(records[0][1], path, records[0][0])
        _refuse_mixed_formats(records, fmt, path)
    prompts = []
    for number, record in records:
        if fmt in GRADED_FORMATS:
            item = MCQ_FORMATS[fmt](record, location(path, number))
            prompts.append(GenerationPrompt(number, ({"role": "user", "content": item.question},),
                                            item.options, item.answers))
            continue
        messages = to_messages(_prompt_record(record, fmt), fmt, path, number)
        while messages and messages[-1]["role"] == "assistant":  # the answer to write, not to read
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user" or not messages[-1]["content"].strip():
            raise DataError(f"{location(path, number)}: this {fmt} record has no user turn to answer; "
                            "fix or delete it")
        prompts.append(GenerationPrompt(number, tuple(messages)))
    return prompts, fmt


def teacher_messages(prompt: GenerationPrompt, reasoning: bool) -> list[dict]:
    """The conversation the teacher answers: the prompt with the instructions of the module
    docstring appended to its last user turn (in Chinese when the turn holds Han characters)."""
    last = prompt.messages[-1]["content"]
    lang = "zh" if has_han(last) else "en"
    extra = ([REASONING_INSTRUCTION[lang]] if reasoning else []) + \
            ([CHOICE_INSTRUCTION[lang]] if prompt.gold is not None else [])
    content = "\n\n".join([last, " ".join(extra)]) if extra else last
    return [*prompt.messages[:-1], {"role": "user", "content": content}]


def encode_prompt(tokenizer, prompt: GenerationPrompt, reasoning: bool, chat_template_kwargs: dict | None = None
                  ) -> list[int]:
    """Token ids of the teacher's prompt; with ``reasoning`` the assistant turn opens the think
    block (:data:`THINK_PREFILL`)."""
    text = render_messages(tokenizer, teacher_messages(prompt, reasoning), chat_template_kwargs)
    text += THINK_PREFILL if reasoning else ""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def force_answers(generate: Generate, tokenizer, prompt_ids: list[list[int]], rows: list[int],
                  completions: list[list[Completion]], sampling: Sampling, answer_tokens: int
                  ) -> list[list[tuple[Completion, bool]]]:
    """Each completion (continuing an opened think block) with whether its answer was forced:
    one that never wrote ``</think>`` is continued from its text plus :data:`FORCED_CLOSE` for at
    most ``answer_tokens`` tokens, one sample each, in one ``generate`` call for the batch
    (seeded like the batch). ``answer_tokens`` 0 leaves every completion as it is."""
    out = [[(completion, False) for completion in samples] for samples in completions]
    open_blocks = [(b, k) for b, samples in enumerate(completions) for k, completion in enumerate(samples)
                   if THINK_CLOSE not in completion.text]
    if answer_tokens < 1 or not open_blocks:
        return out
    heads = [completions[b][k].text.rstrip() + FORCED_CLOSE for b, k in open_blocks]
    answers = generate([prompt_ids[b] + list(tokenizer(head, add_special_tokens=False)["input_ids"])
                        for (b, _), head in zip(open_blocks, heads)], [rows[b] for b, _ in open_blocks],
                       replace(sampling, num_samples=1, max_new_tokens=answer_tokens))
    for (b, k), head, (answer,) in zip(open_blocks, heads, answers, strict=True):
        out[b][k] = (Completion(text=head + answer.text, finished=answer.finished), True)
    return out


def judge(prompt: GenerationPrompt, completion: Completion, *, fmt: str, reasoning: bool, keep_truncated: bool,
          provenance: dict) -> tuple[dict, str | None]:
    """``(row, reason)``: the dataset row of one sample and why it is rejected (None: kept;
    the duplicate check is the caller's). With ``reasoning`` the text continues the prefilled
    ``<think>``. A multiple-choice sample's provenance gets ``gold`` and ``predicted`` (sorted
    letter strings)."""
    text = THINK_PREFILL + completion.text if reasoning else completion.text
    reasoning_text, response = split_reasoning(text)
    provenance = {**provenance, "finished": completion.finished}
    reason = None
    if not completion.finished and not keep_truncated:
        reason = "truncated"
    elif not response:
        reason = "empty_response"
    elif fmt == "medical_o1" and not reasoning_text:
        reason = "no_reasoning"
    if prompt.gold is not None:
        predicted = answer_letters(response, prompt.options)
        provenance.update(gold="".join(sorted(prompt.gold)), predicted="".join(sorted(predicted)))
        if reason is None:
            reason = "no_answer" if not predicted else None if predicted == prompt.gold else "wrong_answer"
    return dataset_row(fmt, list(prompt.messages), reasoning_text, response, provenance), reason


def check_run(prompts: list[GenerationPrompt], *, output: str, fmt: str, batch_size: int, identity: dict | None,
              overwrite: bool) -> RunFiles:
    """Refuse, before the teacher loads, what :func:`generate_dataset` would refuse: a bad
    ``--batch_size``, a multi-turn prompt for ``medical_o1``, or an existing output without a
    manifest or with one of another identity (teacher, source, sampling, ...; unless
    ``overwrite``; ``identity`` None: not compared yet, as before the teacher's tokenizer has loaded).
    Returns the run's files."""
    if batch_size < 1:
        raise ConfigError(f"--batch_size {batch_size}: must be >= 1 (e.g. `--batch_size 8`)")
    if fmt == "medical_o1":
        multi = next((p for p in prompts if not single_turn(list(p.messages))), None)
        if multi is not None:
            raise ConfigError(f"--format medical_o1 holds one question per row, but source row {multi.row} has a "
                              "system turn or earlier turns; use `--format alpaca` (system and history fields)")
    files = RunFiles.of(output)
    if overwrite or not files.existing():
        return files
    if not files.manifest.exists():
        raise ConfigError(f"--output {files.output}: exists without its manifest {files.manifest}, so what wrote "
                          "it is unknown; pass --overwrite to replace it, or choose another --output")
    if identity is None:
        return files
    differences = identity_differences(read_manifest(files.manifest).get("identity", {}), identity)
    if differences:
        raise ConfigError(f"--output {files.output}: was generated with other settings ({'; '.join(differences)}); "
                          "rerun with the recorded settings to continue it, pass --overwrite to start it again, "
                          "or choose another --output")
    return files


def read_manifest(path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: unreadable manifest ({err}); pass --overwrite to start the run again") from None


def generate_dataset(generate: Generate, tokenizer, prompts: list[GenerationPrompt], *, output: str, fmt: str,
                     sampling: Sampling, reasoning: bool, batch_size: int, identity: dict, provenance: dict,
                     answer_tokens: int = 128, keep_truncated: bool = False, overwrite: bool = False,
                     chat_template_kwargs: dict | None = None,
                     progress: Callable[[dict], None] | None = None) -> dict:
    """Generate, filter and append the answers to ``prompts``; resumes what ``output`` holds.

    Args:
        generate: a backend (``evaluation.generation``).
        prompts: from :func:`read_prompts`; split into batches of ``batch_size`` at fixed
            positions, so a resumed run draws every batch as an uninterrupted one does (a batch
            with any sample left is generated whole; samples already written are skipped).
        output: the ``.jsonl`` dataset; ``.rejected`` and ``.manifest`` go beside it.
        fmt: ``medical_o1`` (single-turn prompts only) or ``alpaca``.
        answer_tokens: with ``reasoning``, the budget of a forced answer (:func:`force_answers`;
            0: none, a sample without ``</think>`` has no response).
        identity: the settings the data depends on, stored in the manifest; a run over an
            existing output must have the same (else ConfigError, unless ``overwrite``).
        provenance: fields stored in every row's provenance (teacher, source, sampling, ...),
            besides ``source_row``, ``sample`` and ``finished``.
        progress: called with the summary after each batch.

    Returns:
        The summary of ``data.generated.summarise`` over both journals, also in the manifest.
    """
    files = check_run(prompts, output=output, fmt=fmt, batch_size=batch_size, identity=identity, overwrite=overwrite)
    if overwrite:
        files.remove()
    files.output.parent.mkdir(parents=True, exist_ok=True)
    files.output.touch()  # the dataset exists from the start, if only empty
    kept, rejected = read_journal(files.output), read_journal(files.rejected)
    done = {sample_key(row) for row in (*kept, *rejected)}
    seen = {content_key(row) for row in kept}
    manifest = {"identity": identity, "files": {"output": str(files.output), "rejected": str(files.rejected)}}

    asked = {p.row for p in prompts}

    def summary() -> dict:
        return summarise(kept, rejected, len(prompts), sampling.num_samples, asked)

    other = {sample_key(row)[0] for row in (*kept, *rejected)} - asked
    if other:
        log.warning("--output %s: also holds the answers to %d prompt(s) not asked for this time (source rows from "
                    "%d; an earlier run over it with a larger --max_prompts): they stay in it, and training on it "
                    "reads them; pass --overwrite to generate only these %d prompt(s)", files.output, len(other),
                    min(other), len(prompts))

    write_json_atomic(files.manifest, {**manifest, "summary": summary()})
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        if all((p.row, k) in done for p in batch for k in range(sampling.num_samples)):
            continue
        prompt_ids = [encode_prompt(tokenizer, p, reasoning, chat_template_kwargs) for p in batch]
        rows = [p.row for p in batch]
        completions = generate(prompt_ids, rows, sampling)
        completions = force_answers(generate, tokenizer, prompt_ids, rows, completions, sampling,
                                    answer_tokens if reasoning else 0)
        new_kept, new_rejected = [], []
        for prompt, samples in zip(batch, completions, strict=True):
            for index, (completion, forced) in enumerate(samples):
                if (prompt.row, index) in done:
                    continue
                extra = {"answer_forced": True} if forced else {}
                row, reason = judge(prompt, completion, fmt=fmt, reasoning=reasoning, keep_truncated=keep_truncated,
                                    provenance={**provenance, "source_row": prompt.row, "sample": index, **extra})
                if reason is None and content_key(row) in seen:
                    reason = "duplicate"
                if reason is None:
                    seen.add(content_key(row))
                    new_kept.append(row)
                else:
                    new_rejected.append({**row, PROVENANCE: {**row[PROVENANCE], "reason": reason,
                                                             "text": completion.text}})
                done.add((prompt.row, index))
        append_rows(files.rejected, new_rejected)
        append_rows(files.output, new_kept)
        kept += new_kept
        rejected += new_rejected
        current = summary()
        write_json_atomic(files.manifest, {**manifest, "summary": current})
        if progress is not None:
            progress(current)
    return summary()
