"""Teacher-generated datasets (sequence-level KD): the rows, their provenance, and the files a
generation run appends to and resumes from. No torch: ``evaluation/teacher_data.py`` runs the
teacher and calls these.

A run writes three files next to each other (``OUT`` is the ``--output`` path, a ``.jsonl``):

- ``OUT``: the kept samples, one row each, in the ``medical_o1`` format (``Question``,
  ``Complex_CoT``, ``Response``) or the ``alpaca`` one (``instruction``, ``input``, ``output``,
  optional ``system`` and ``history``). Each row also holds ``_provenance`` (:data:`PROVENANCE`),
  which no format reads (only the held-out split, to keep a prompt's samples on one side), so the
  file feeds any stage like any other dataset.
- ``OUT.rejected``: every sample that was not kept, with its text and the reason
  (:data:`REJECT_REASONS`). Its suffix is none the loaders read, so pointing ``data.medical`` at
  the directory never trains on wrong answers.
- ``OUT.manifest``: JSON; what the data depends on (teacher and the sampled fingerprint of a local
  one's weights, :func:`model_fingerprint`; source file and its sha256,
  sampling, format, instructions: :func:`identity_differences` compares it on a restart) and the
  counts and keep rate (:func:`summarise`).

Both JSON Lines files are append-only journals: a batch's rows are written whole in one write,
then flushed and fsynced (:func:`append_rows`). A killed run leaves at most a truncated last
line, which :func:`read_journal` cuts off; every ``(source_row, sample)`` found in either file
is done and is never written again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from qwen_distillation.data.loading import data_files
from qwen_distillation.errors import ConfigError, DataError

PROVENANCE = "_provenance"  # the row field holding where a sample came from; no format reads it
OUTPUT_FORMATS = ("medical_o1", "alpaca")
REJECTED_SUFFIX = ".rejected"
MANIFEST_SUFFIX = ".manifest"
# Why a sample was not kept (``reason`` of a row of OUT.rejected), in the order they are checked.
REJECT_REASONS = ("truncated", "empty_response", "no_reasoning", "no_answer", "wrong_answer", "duplicate")

_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_THINK_BLOCK = re.compile(r"^\s*<think>(.*?)</think>(.*)$", re.DOTALL)


@dataclass(frozen=True)
class Sampling:
    """How each prompt is answered: ``num_samples`` samples of at most ``max_new_tokens`` new
    tokens at ``temperature`` (0 = greedy) with nucleus ``top_p``; ``seed`` fixes the draws."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 512
    num_samples: int = 1
    seed: int = 0

    def check(self) -> None:
        """Raise a ConfigError naming the flag of a value out of range."""
        checks = [
            (self.temperature >= 0, "temperature", "must be >= 0 (0 is greedy decoding)", "0.7"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]", "0.95"),
            (self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", "512"),
            (self.num_samples >= 1, "num_samples", "must be >= 1", "4"),
            (self.temperature > 0 or self.num_samples == 1, "num_samples",
             "greedy decoding (--temperature 0) gives the same answer every time; use --num_samples 1 or a "
             "temperature above 0", "1"),
        ]
        for ok, flag, why, example in checks:
            if not ok:
                raise ConfigError(f"--{flag} {getattr(self, flag)}: {why} (e.g. `--{flag} {example}`)")


def split_reasoning(text: str) -> tuple[str, str]:
    """``(reasoning, response)`` of a generation: a leading ``<think>...</think>`` block and what
    follows it, both stripped. Without a block the reasoning is ``""`` and the response is the
    whole text; a block never closed (generation stopped while reasoning) gives the reasoning and
    an empty response."""
    match = _THINK_BLOCK.match(text)
    if match:
        return match.group(1).strip(), match.group(2).strip()
    stripped = text.strip()
    if stripped.startswith(_THINK_OPEN):
        return stripped[len(_THINK_OPEN):].strip(), ""
    return "", stripped


def dataset_row(fmt: str, messages: list[dict], reasoning: str, response: str, provenance: dict) -> dict:
    """One row of the generated dataset.

    Args:
        fmt: ``medical_o1`` or ``alpaca``.
        messages: the conversation the teacher answered, without the generation instructions:
            an optional system turn, earlier user/assistant turns, and the final user turn.
            ``medical_o1`` holds only the final user turn (check with :func:`single_turn`).
        reasoning, response: the two parts of the answer (:func:`split_reasoning`); ``alpaca``
            writes them as ``<think>{reasoning}</think>{response}``, the assistant text that
            ``medical_o1`` rows become when they are encoded.
        provenance: stored under :data:`PROVENANCE`.
    """
    question = messages[-1]["content"]
    if fmt == "medical_o1":
        row = {"Question": question, "Complex_CoT": reasoning, "Response": response}
    elif fmt == "alpaca":
        row = {"instruction": question, "input": "",
               "output": f"{_THINK_OPEN}{reasoning}{_THINK_CLOSE}{response}" if reasoning else response}
        system = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m["content"] for m in messages[:-1] if m["role"] != "system"]
        if system:
            row["system"] = system[0]
        if turns:
            row["history"] = [list(pair) for pair in zip(turns[::2], turns[1::2])]
    else:
        raise ConfigError(f"--format {fmt}: must be one of {', '.join(OUTPUT_FORMATS)}")
    row[PROVENANCE] = provenance
    return row


def single_turn(messages: list[dict]) -> bool:
    """Whether a prompt is one user turn (what a ``medical_o1`` row can hold)."""
    return len(messages) == 1 and messages[0]["role"] == "user"


def sample_key(row: dict) -> tuple[int, int]:
    """``(source_row, sample)`` of a row of either journal."""
    provenance = row[PROVENANCE]
    return int(provenance["source_row"]), int(provenance["sample"])


def content_key(row: dict) -> str:
    """A hash of a kept row without its provenance: two rows with the same key are duplicates."""
    body = {key: value for key, value in row.items() if key != PROVENANCE}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass(frozen=True)
class RunFiles:
    """The three files of a generation run (module docstring)."""

    output: Path
    rejected: Path
    manifest: Path

    @classmethod
    def of(cls, output: str | os.PathLike) -> RunFiles:
        output = Path(output)
        if output.suffix != ".jsonl":
            raise ConfigError(f"--output {output}: must end in .jsonl (the generated dataset is JSON Lines), "
                              f"e.g. `--output {output.with_suffix('.jsonl')}`")
        return cls(output, Path(f"{output}{REJECTED_SUFFIX}"), Path(f"{output}{MANIFEST_SUFFIX}"))

    def existing(self) -> list[Path]:
        return [path for path in (self.output, self.rejected, self.manifest) if path.exists()]

    def remove(self) -> None:
        for path in self.existing():
            path.unlink()


def read_journal(path: Path) -> list[dict]:
    """The rows of an append-only JSON Lines journal (``[]`` when it does not exist).

    A last line without its newline, or one that is not JSON, is what a killed write leaves:
    it is cut off the file (so the next append starts on a fresh line) and its sample is
    generated again. A bad line before the last is damage this command did not do: DataError.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.decode("utf-8", errors="strict").split("\n")[:-1]
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            sample_key(row)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            if number < len(lines):
                raise DataError(f"{path} line {number}: not a row this command wrote ({type(err).__name__}: "
                                f"{err}); delete that line, or pass --overwrite to start again") from None
            complete = complete[:len(complete) - len(line.encode()) - 1]
            break
        rows.append(row)
    if len(complete) != len(data):
        with open(path, "r+b") as handle:
            handle.truncate(len(complete))
            os.fsync(handle.fileno())
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append whole rows in one write, flushed and fsynced: after a kill the file ends with
    either all of them or a truncated last line (:func:`read_journal` cuts it)."""
    if not rows:
        return
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, value: dict) -> None:
    """Write JSON to a temporary file and rename it over ``path``: never half a file."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def file_digest(path: str) -> str | None:
    """sha256 of a local file, or of the names and bytes of the data files of a directory
    (:func:`~qwen_distillation.data.loading.data_files`: the ones a run reads); None for a hub dataset."""
    local = Path(os.path.expanduser(path))
    if not local.exists():
        return None
    digest = hashlib.sha256()
    files = [local] if local.is_file() else data_files(local)
    for file in files:
        if local.is_dir():
            digest.update(str(file.relative_to(local)).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
FINGERPRINT_WINDOWS, FINGERPRINT_WINDOW = 16, 1 << 20  # bytes read per weight file: at most 16 MiB
TEACHER_FINGERPRINT = "teacher_fingerprint"  # the identity key (teacher cache, generated data) that holds it


def _sample_file(digest, file: Path) -> None:
    """The size of ``file`` and its bytes: whole when small, else :data:`FINGERPRINT_WINDOWS` windows of
    :data:`FINGERPRINT_WINDOW` bytes evenly spaced from its start to its end."""
    size = file.stat().st_size
    digest.update(f"{size}\0".encode())
    with open(file, "rb") as handle:
        if size <= FINGERPRINT_WINDOWS * FINGERPRINT_WINDOW:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
            return
        for i in range(FINGERPRINT_WINDOWS):
            handle.seek(i * (size - FINGERPRINT_WINDOW) // (FINGERPRINT_WINDOWS - 1))
            digest.update(handle.read(FINGERPRINT_WINDOW))


def fingerprint_files(path: str, gguf_file: str | None = None) -> tuple[Path, list[Path]]:
    """The local path :func:`model_fingerprint` reads and its files, in the order it reads them (none:
    a hub id, or a directory without weight files)."""
    local = Path(os.path.expanduser(os.path.join(path, gguf_file) if gguf_file else path))
    if local.is_file():
        return local, [local]
    if not local.is_dir():
        return local, []
    weights = sorted(p for p in local.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    return local, ([local / n for n in MODEL_CONFIG_FILES if (local / n).is_file()] + weights if weights else [])


def model_fingerprint(path: str, gguf_file: str | None = None) -> str | None:
    """A sampled sha256 fingerprint of a local model's weights, so that another model saved at the same
    path (a stage re-run with ``overwrite_output_dir=true``) is told from the one that was there.

    A directory: its ``config.json`` and ``generation_config.json``, and the names, sizes and sampled
    bytes of its weight files (:data:`WEIGHT_SUFFIXES`); a file (``.gguf``, or ``gguf_file`` inside
    ``path``): its size and sampled bytes. Each file is read whole up to 16 MiB, beyond that in 16
    evenly spaced 1 MiB windows (the first holds a safetensors header and the start of the tensor
    data): a 145 GB teacher is fingerprinted in seconds, but **a change confined to bytes no window
    reads goes unseen**. Independent of the path: a copy elsewhere has the same fingerprint.

    None when there is nothing local to fingerprint: a hub id, or a directory without weight files
    (a run that reads a teacher cache needs only the teacher's config)."""
    local, files = fingerprint_files(path, gguf_file)
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        if local.is_dir():
            digest.update(file.name.encode() + b"\0")
        _sample_file(digest, file)
    return digest.hexdigest()


def tokenizer_description(tokenizer) -> str:
    """The tokenizer's size and a hash of its vocabulary and chat template (not its path: the
    student's copy of the teacher's tokenizer is the same tokenizer)."""
    digest = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(str(getattr(tokenizer, "chat_template", None)).encode())
    return f"{len(tokenizer)} tokens, sha256 {digest.hexdigest()[:16]}"


def teacher_weights_difference(recorded: dict, wanted: dict) -> str | None:
    """A line saying the teacher at the recorded path now holds other weights, when both identities
    record a :func:`model_fingerprint` under :data:`TEACHER_FINGERPRINT` and they differ; None otherwise
    (an identity written before fingerprints were recorded is not refused for lacking one)."""
    before, now = recorded.get(TEACHER_FINGERPRINT), wanted.get(TEACHER_FINGERPRINT)
    if before is None or now is None or before == now:
        return None
    return (f"teacher weights: {wanted.get('teacher')} now holds other weights (sampled fingerprint "
            f"{before[:12]} -> {now[:12]})")


# Keys an identity has recorded since some version: an older output, without them, is not refused for it.
LATER_KEYS = ("teacher_tokenizer",)
FP8_VARIANTS = (":fp8-fast-accum", ":fp8")  # how a teacher cache's identity names an FP8 teacher


def same_teacher(recorded: dict, wanted: dict) -> bool:
    """Whether two identities name the same teacher: the same ``teacher``, or two spellings of a local
    teacher's path (``/m/t/``, ``../t``, a copy elsewhere) whose sampled fingerprints both identities
    record and agree, run as the same variant (the FP8 suffix of a cache's identity)."""
    before, now = recorded.get("teacher"), wanted.get("teacher")
    if before == now:
        return True
    prints = recorded.get(TEACHER_FINGERPRINT), wanted.get(TEACHER_FINGERPRINT)
    if None in prints or prints[0] != prints[1] or not isinstance(before, str) or not isinstance(now, str):
        return False
    return next((v for v in FP8_VARIANTS if before.endswith(v)), "") == next((v for v in FP8_VARIANTS
                                                                             if now.endswith(v)), "")


def identity_differences(recorded: dict, wanted: dict) -> list[str]:
    """``key: recorded -> wanted`` for every setting of a run's identity that differs; the teacher's
    fingerprint as :func:`teacher_weights_difference` words it, and the teacher's path not where the
    fingerprints agree (:func:`same_teacher`)."""
    weights = teacher_weights_difference(recorded, wanted)
    if weights:
        weights += (": the output was generated by other teacher weights; point --teacher at the original teacher "
                    "to continue it")
    skip = {TEACHER_FINGERPRINT} | ({"teacher"} if same_teacher(recorded, wanted) else set())
    skip |= {key for key in LATER_KEYS if key not in recorded}  # an output written before the key was recorded
    return [f"{key}: {recorded.get(key)!r} -> {wanted.get(key)!r}" for key in sorted(set(recorded) | set(wanted))
            if key not in skip and recorded.get(key) != wanted.get(key)] + ([weights] if weights else [])


def sampling_identity(sampling: Sampling) -> dict:
    return asdict(sampling)


def summarise(kept: list[dict], rejected: list[dict], num_prompts: int, num_samples: int,
              asked: set[int] | None = None) -> dict:
    """Counts of a run from its two journals; ``asked``: the source rows of the prompts asked for (None:
    every row the journals hold).

    Returns:
        ``prompts`` (asked for), ``prompts_done`` (those with every sample kept or rejected),
        ``other_prompts`` (only where the journals hold rows of prompts not asked for: an earlier run
        over the same output with a larger ``--max_prompts``; their samples are counted below),
        ``samples`` (generated so far), ``kept``, ``keep_rate`` (kept / samples; NaN before any
        sample is written, as null in JSON), ``rejected`` (reason -> count, every reason listed),
        and for multiple-choice sources ``answered_correctly`` (samples whose answer matched the
        gold, duplicates included) and ``correct_rate`` (over samples).
    """
    per_prompt: dict[int, int] = {}
    for row in (*kept, *rejected):
        per_prompt[sample_key(row)[0]] = per_prompt.get(sample_key(row)[0], 0) + 1
    reasons = dict.fromkeys(REJECT_REASONS, 0)
    for row in rejected:
        reasons[row[PROVENANCE]["reason"]] = reasons.get(row[PROVENANCE]["reason"], 0) + 1
    samples = len(kept) + len(rejected)
    summary = {
        "prompts": num_prompts,
        "prompts_done": sum(count >= num_samples for row, count in per_prompt.items() if asked is None or row in asked),
        "samples": samples,
        "kept": len(kept),
        "keep_rate": len(kept) / samples if samples else None,
        "rejected": reasons,
    }
    other = len(per_prompt.keys() - asked) if asked is not None else 0
    if other:
        summary["other_prompts"] = other
    graded = [row for row in (*kept, *rejected) if "gold" in row[PROVENANCE]]
    if graded:
        correct = sum(row[PROVENANCE]["predicted"] == row[PROVENANCE]["gold"] for row in graded)
        summary.update(answered_correctly=correct, correct_rate=correct / len(graded))
    return summary
