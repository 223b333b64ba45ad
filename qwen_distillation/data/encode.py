"""Chat messages -> token ids with assistant-only labels; held-out split.

An encoded example is `{"input_ids": list[int], "labels": list[int]}` (same length, at most
`max_length`). `labels[t] == input_ids[t]` on the tokens of each assistant turn's content and on
the end-of-turn token that closes it (`<|im_end|>` for Qwen); every other token (system and user
turns, role headers, the newline after `<|im_end|>`) is `IGNORE_INDEX`, so neither the
distillation loss nor the CE loss trains the student to produce the prompt.

Boundaries come from the chat template itself: the text between rendering `messages[:i]` with
`add_generation_prompt=True` and rendering `messages[:i + 1]` is assistant turn `i`; token offsets
then map those character spans to tokens. Tokenizers without a chat template use the plain
template `"User: {content}\n\nAssistant: {content}{eos}"` (turns joined by a blank line, a system
turn as `"System: {content}\n\n"`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

from qwen_distillation.data.formats import detect_format, to_messages
from qwen_distillation.data.generated import PROVENANCE
from qwen_distillation.data.loading import location
from qwen_distillation.errors import DataError
from qwen_distillation.paths import source_identity

log = logging.getLogger(__name__)

IGNORE_INDEX = -100

Span = tuple[int, int]  # [start, end) character offsets of one assistant turn in the text


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _render_with_template(messages: list[dict], tokenizer) -> tuple[str, list[Span]]:
    text = _render(tokenizer, messages)
    eos = tokenizer.eos_token
    spans: list[Span] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], add_generation_prompt=True) if i else None
        through = _render(tokenizer, messages[: i + 1])
        if before is not None and text.startswith(through) and through.startswith(before):
            start, end = len(before), len(through)
        else:
            # The template renders earlier turns differently once later turns follow (Qwen3 drops
            # old <think> blocks): fall back to finding the content itself.
            start = text.find(message["content"], cursor)
            if start < 0:
                raise DataError(
                    "the tokenizer's chat template does not reproduce assistant turn "
                    f"{i + 1} verbatim, so its labels cannot be located; use another template"
                )
            end = start + len(message["content"])
            if eos and text.startswith(eos, end):
                end += len(eos)
        # Keep the end-of-turn token but not the separator the template writes after it.
        if eos and eos in text[start:end]:
            end = text.rindex(eos, start, end) + len(eos)
        else:
            end = start + len(text[start:end].rstrip())
        spans.append((start, end))
        cursor = end
    return text, spans


def _render_plain(messages: list[dict], eos: str | None) -> tuple[str, list[Span]]:
    """The fallback template for tokenizers without one (see the module docstring)."""
    text, spans = "", []
    headers = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
    for i, message in enumerate(messages):
        text += headers[message["role"]]
        if message["role"] == "assistant":
            start = len(text)
            text += message["content"] + (eos or "")
            spans.append((start, len(text)))
        else:
            text += message["content"]
        if i + 1 < len(messages):
            text += "\n\n"
    return text, spans


def _tokenize_and_label(tokenizer, text: str, spans: list[Span]) -> tuple[list[int], list[int]]:
    """Token ids of `text` and labels that copy the ids of tokens starting inside a span.

    A token is labelled when its first character lies in an assistant span, so a token that
    straddles the prompt/response boundary stays unlabelled: no prompt text is ever a target.
    """
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        # Slow tokenizers have no offsets: count the tokens of each span's prefix instead.
        input_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        labels = [IGNORE_INDEX] * len(input_ids)
        for start, end in spans:
            first = len(tokenizer(text[:start], add_special_tokens=False)["input_ids"])
            last = len(tokenizer(text[:end], add_special_tokens=False)["input_ids"])
            labels[first:last] = input_ids[first:last]
        return input_ids, labels
    input_ids = list(encoded["input_ids"])
    labels = [IGNORE_INDEX] * len(input_ids)
    span_at = 0
    for t, (start, _) in enumerate(encoded["offset_mapping"]):
        # Tokens come in text order, so one pass over the sorted spans suffices.
        while span_at < len(spans) and start >= spans[span_at][1]:
            span_at += 1
        if span_at < len(spans) and spans[span_at][0] <= start:
            labels[t] = input_ids[t]
    return input_ids, labels


def encode_messages(messages: list[dict], tokenizer, max_length: int) -> dict | None:
    """Tokenise one conversation and label its assistant turns.

    Args:
        messages: `[{"role", "content"}, ...]` ending with an assistant turn.
        tokenizer: a Hugging Face tokenizer; its chat template is used when it has one.
        max_length: keep the first `max_length` tokens.

    Returns:
        `{"input_ids": list[int], "labels": list[int]}`, or None when truncation leaves no
        labelled token. The last assistant turn always ends in `tokenizer.eos_token_id`: it is
        appended (and labelled) when the template does not close the turn with it.
    """
    return _encode(messages, tokenizer, max_length)[0]


def _encode(messages: list[dict], tokenizer, max_length: int) -> tuple[dict | None, int]:
    """:func:`encode_messages`'s result, and how many labelled (response) tokens ``max_length`` cut off."""
    eos = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None):
        text, spans = _render_with_template(messages, tokenizer)
    else:
        text, spans = _render_plain(messages, eos)
    append_eos = False
    if spans and eos and tokenizer.eos_token_id is not None:
        last_start, last_end = spans[-1]
        if not text[last_start:last_end].endswith(eos):
            # Whatever the template writes after the final turn is dropped: eos ends the example.
            text = text[:last_end]
            append_eos = True

    input_ids, labels = _tokenize_and_label(tokenizer, text, spans)
    if append_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)

    cut = sum(label != IGNORE_INDEX for label in labels[max_length:])
    input_ids, labels = input_ids[:max_length], labels[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None, cut
    return {"input_ids": input_ids, "labels": labels}, cut


def split_last_turn(example: dict) -> tuple[list[int], list[int]]:
    """The context and the reference answer of an encoded example's last assistant turn.

    Returns:
        ``(prompt_ids, response_ids)``: the ``input_ids`` before the last run of labelled tokens
        (earlier turns and the chat template's generation prompt: what a model sees when it
        starts that turn) and the ids of that run (the turn's content and its end-of-turn token,
        cut where ``max_length`` cut the example). ``([], [])`` when nothing is labelled.
    """
    labels = example["labels"]
    end = len(labels)
    while end and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    start = end
    while start and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return list(example["input_ids"][:start]), list(example["input_ids"][start:end])


def special_texts(tokenizer) -> tuple[str, ...]:
    """The texts the tokenizer encodes as its special (control) tokens: ``<|im_end|>``, ``<|endoftext|>``..."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or ())
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts.update(token.content for token in decoder.values() if getattr(token, "special", False))
    return tuple(sorted(text for text in texts if text))


def record_messages(records: list[tuple[int, dict]], fmt: str, source: str) -> Iterator[tuple[int, dict, list]]:
    """``(number, record, messages)`` of each record of one source, converted to chat messages by ``fmt``
    ("auto": detected from the first record of the source, or of each file of a directory source, whose
    records carry their file: a directory may hold files of several formats); DataError naming the file,
    line and field of the first record that does not convert, or a source without records."""
    if not records:
        raise DataError(f"{source}: no records to encode")
    detected: dict[str | None, str] = {}
    for index, record in records:
        file = getattr(index, "file", None)
        if fmt == "auto" and file not in detected:
            detected[file] = detect_format(record, source, index)
        yield index, record, to_messages(record, detected.get(file, fmt), source, index)


def build_examples(
    records: list[tuple[int, dict]], fmt: str, tokenizer, max_length: int, source: str,
    max_length_key: str = "data.max_length",
) -> list[dict]:
    """Convert and encode the records of one source.

    Args:
        records: `(number, record)` pairs from `loading.load_records`.
        fmt: a format name, or "auto" to detect it from the first record (of each file, for a
            directory source).
        source: the file or dataset name, used in messages and stored in each example.
        max_length_key: the option that set `max_length`, named when no example fits in it.

    Returns:
        Examples `{"input_ids", "labels", "source": str, "index": int}`; records with no
        response token left within `max_length` are dropped. A record written by
        `generate_data` (one with a `_provenance` holding `source_row`) also gets `"group"`
        (:func:`prompt_group`), which keeps the samples of one prompt on one side of
        :func:`split_heldout`; other records get no `"group"`.
    """
    examples = []
    cut_examples, cut_tokens, response_tokens = 0, 0, 0  # of the kept examples whose responses max_length cut
    specials, with_specials = special_texts(tokenizer), {}  # record location -> the special texts it holds
    for index, record, messages in record_messages(records, fmt, source):
        held = sorted({text for m in messages for text in specials if text in str(m.get("content") or "")})
        if held:
            with_specials[location(source, index)] = held
        try:
            encoded, cut = _encode(messages, tokenizer, max_length)
        except DataError as err:  # the chat template could not be labelled: say for which record
            raise DataError(f"{location(source, index)}: {err}") from None
        if encoded is not None:
            if cut:
                cut_examples, cut_tokens = cut_examples + 1, cut_tokens + cut
                response_tokens += cut + sum(label != IGNORE_INDEX for label in encoded["labels"])
            example = {**encoded, "source": source, "index": int(index)}
            group = prompt_group(record)
            if group is not None:
                example["group"] = group
            examples.append(example)
    if not examples:
        raise DataError(
            f"{source}: no usable examples after filtering ({len(records)} records read, "
            f"{len(records)} had no response tokens left within max_length={max_length}); "
            f"raise {max_length_key} or check the response field"
        )
    if len(examples) < len(records):
        log.warning("%s: %d of %d records dropped: no response token left within max_length=%d (raise %s to "
                    "keep them)", source, len(records) - len(examples), len(records), max_length, max_length_key)
    if with_specials:  # the tokenizer reads them as its control tokens: an answer that "ends" mid-way
        first, held = next(iter(with_specials.items()))
        log.warning("%s: %d of %d records hold the text of a special token in a message (first: %s, %s): it is "
                    "encoded as that token, so a response teaches the student to emit it there (e.g. to end its "
                    "turn mid-answer); remove or escape it in the data", source, len(with_specials), len(records),
                    first, ", ".join(held))
    if cut_examples:  # kept, but their answers end early: no end-of-turn token to learn from them
        log.warning("%s: %d of %d examples cut at max_length=%d: their responses lose %d of their %d tokens, the "
                    "end-of-turn token included (raise %s to keep them whole)", source, cut_examples,
                    len(examples), max_length, cut_tokens, response_tokens, max_length_key)
    return examples


def prompt_group(record: dict) -> str | None:
    """The prompt a generated record answers, or None for any other record.

    `generate_data` writes `num_samples` rows per prompt, each with `_provenance` naming the
    prompt's file (`source`) and record number (`source_row`); those rows share the group
    `"{source}\0{source_row}"`, the identity a record of that file has in the split. Records
    without a `_provenance` mapping holding `source_row` (all ordinary data) have no group.
    """
    provenance = record.get(PROVENANCE) if isinstance(record, dict) else None
    if not isinstance(provenance, dict) or provenance.get("source_row") is None:
        return None
    return f"{provenance.get('source', '')}\0{provenance['source_row']}"


def _split_key(example: dict, seed: int, sources: dict[str, str]) -> str:
    if "group" in example:
        identity = str(example["group"])
    elif "source" in example and "index" in example:
        identity = f"{sources[example['source']]}\0{example['index']}"
    else:
        identity = ",".join(map(str, example["input_ids"]))
    return hashlib.sha256(f"{seed}\0{identity}".encode()).hexdigest()


def split_heldout(
    examples: list, eval_fraction: float, max_eval: int, seed: int
) -> tuple[list, list]:
    """Deterministic train/held-out split that never splits a prompt group.

    The split is over units: an example with a `"group"` (the samples `generate_data` wrote for
    one prompt, see :func:`prompt_group`) belongs to the unit of all examples of that group, any
    other example is a unit of its own. Each unit's rank is a hash of (seed, group), or of
    (seed, source, index) (the source by :func:`~qwen_distillation.paths.source_identity`, not
    its spelling), or of its input_ids when it has no source/index, so the chosen set
    depends neither on the list order nor on the order in which other sources were added.

    The held-out size is counted in examples: the target is `int(len * eval_fraction)`, at least
    1 when `eval_fraction > 0` and there are at least 2 units, at most `max_eval`, never all of
    them. Units are taken whole in rank order while the held-out examples stay within the
    target, stopping at the first unit that would overshoot it (so a grouped split may hold out
    fewer than the target, by less than one group). When even the first-ranked unit is larger
    than the target, that unit alone is held out (one prompt with all its samples, which may
    exceed `max_eval`; callers that cap an evaluation set truncate it, and the dropped samples
    are not trained on either). Without groups every unit is one example and this is exactly the
    ungrouped split: the first `target` examples by rank.

    Returns:
        `(train, heldout)`, each in the input order.
    """
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    count = len(examples)
    units: dict[tuple, list[int]] = {}  # in the order of first appearance
    for i, example in enumerate(examples):
        units.setdefault(("group", str(example["group"])) if "group" in example else ("example", i), []).append(i)
    if eval_fraction == 0.0 or max_eval <= 0 or len(units) < 2:
        return list(examples), []
    n_eval = min(max(1, int(count * eval_fraction)), max_eval, count - 1)
    # sorted() is stable: units with equal keys keep their order, as the examples did before groups.
    # Each source by its identity, not its spelling: `../x/a.jsonl` and `/abs/x/a.jsonl` hold out the same records.
    sources = {e["source"]: source_identity(e["source"]) for e in examples if "source" in e}
    ranked = sorted(units.values(), key=lambda members: _split_key(examples[members[0]], seed, sources))
    heldout: set[int] = set()
    for members in ranked:
        if len(heldout) + len(members) > n_eval:
            break
        heldout.update(members)
    if not heldout:  # the first-ranked unit alone is larger than the target: hold out that one prompt
        heldout.update(ranked[0])
    train = [ex for i, ex in enumerate(examples) if i not in heldout]
    return train, [ex for i, ex in enumerate(examples) if i in heldout]
