"""Read raw records from a local file, a directory of files, or a Hugging Face dataset.

`load_records` returns `(number, record)` pairs, where `number` is what an error message should
point the user at:

- `.jsonl` (and `.json` holding JSON Lines): 1-based line number in the file;
- `.json` holding a JSON list: 1-based position in the list;
- `.csv`: line number in the file (the header is line 1, so the first row is line 2);
- `.parquet` and hub datasets: 1-based row number;
- a directory: its supported files in sorted path order, numbered 1, 2, ... across all files
  (the number the held-out split hashes); each number is a :class:`RecordNumber` that also knows
  its file and line, so that every error about the record names them (:func:`location`).

Whatever a file holds, reading it gives records or a `DataError` naming the file and, where the
fault is at a line or record, its number (tests/test_data_properties.py checks this on arbitrary
input). JSON integers longer than Python's 4300-digit limit are read as `Decimal`. What Python's json
reads but JSON is not, an object that repeats a key and a bare NaN/Infinity, is refused at its line or
record (`_NotJson`).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
from decimal import Decimal
from pathlib import Path
from typing import Iterator

from qwen_distillation.errors import DataError

SUPPORTED_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# A name ending in one of these is meant as a file, never a hub dataset id.
_FILE_LIKE_SUFFIXES = SUPPORTED_SUFFIXES + (
    ".tsv", ".txt", ".arrow", ".xlsx", ".xls", ".gz", ".zst", ".bz2", ".zip",
)

Numbered = Iterator[tuple[int, dict]]

log = logging.getLogger(__name__)


class RecordNumber(int):
    """A record's number in a directory source (its position across the directory's files, the
    identity :func:`qwen_distillation.data.encode.split_heldout` hashes) that also carries its own
    ``file`` and ``where`` (``dir/b.jsonl line 3``), for error messages and for detecting each
    file's format. Arithmetic, ``str()`` and JSON see the plain number; a pickle or copy keeps only
    the number."""

    file: str
    where: str

    def __new__(cls, number: int, file: str, where: str) -> "RecordNumber":
        value = super().__new__(cls, number)
        value.file, value.where = file, where
        return value

    def __reduce__(self):
        return int, (int(self),)


def location(source: str, index: int) -> str:
    """`data.jsonl line 12` for JSON Lines and CSV (index is the line number), `x.parquet row 3`,
    else `source record 12` (see :func:`load_records` for what the number means); a record of a
    directory source (a :class:`RecordNumber`) is named by its own file and line."""
    where = getattr(index, "where", None)
    if where is not None:
        return where
    if source.endswith((".jsonl", ".csv")):
        return f"{source} line {index}"
    return f"{source} {'row' if source.endswith('.parquet') else 'record'} {index}"


def _object(value: object, file: Path, unit: str, number: int) -> dict:
    if not isinstance(value, dict):
        raise DataError(
            f"{file} {unit} {number}: expected a JSON object (one record), got "
            f"{type(value).__name__}; each record must be {{\"field\": value, ...}}"
        )
    return value


def _integer(digits: str) -> int | Decimal:
    # Python refuses to convert more than 4300 digits to an int (a ValueError without a position);
    # such a number keeps its digits as a Decimal.
    try:
        return int(digits)
    except ValueError:
        return Decimal(digits)


class _NotJson(Exception):
    """What Python's json reads but JSON is not: an object that repeats a key (json keeps the last
    value without a word) or a bare NaN/Infinity. Raised by `_DECODER`'s hooks, which do not know
    where they are; the readers catch it and name the line or record. ``str()`` says what and the fix."""


def _shown(key: str) -> str:
    return repr(key) if len(repr(key)) <= 60 else repr(key)[:57] + "..."


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    record = dict(pairs)
    if len(record) < len(pairs):
        seen: set[str] = set()
        key = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise _NotJson(f"an object repeats the key {_shown(key)} (only its last value would be read); "
                       "give each key once: rename or delete the repeat")
    return record


def _refuse_constant(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON value (Python's json.dumps writes it for a float NaN or infinity); "
                   "write null, or the number as a string")


_DECODER = json.JSONDecoder(parse_int=_integer, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
# The same reading with what _DECODER refuses replaced by _REFUSED: it finds the record of a JSON
# list that holds the fault, and tells a single object spread over several lines by its syntax alone.
_REFUSED = object()


def _marked_keys(pairs: list[tuple[str, object]]) -> dict | object:
    record = dict(pairs)
    return record if len(record) == len(pairs) else _REFUSED


_MARKING_DECODER = json.JSONDecoder(parse_int=_integer, parse_constant=lambda name: _REFUSED,
                                    object_pairs_hook=_marked_keys)


def _holds_refused(value: object) -> bool:
    """Whether a value read by _MARKING_DECODER holds a _REFUSED mark."""
    pending = [value]
    while pending:  # a loop, not recursion, as in _require_text
        item = pending.pop()
        if item is _REFUSED:
            return True
        if isinstance(item, dict):
            pending += item.values()
        elif isinstance(item, list):
            pending += item
    return False


def _decode_list(text: str) -> tuple[object, _NotJson | None]:
    """A JSON list file's value, and what _DECODER refused in it (None if nothing): then the value
    is read again with that fault marked (see _MARKING_DECODER), so that it can be named at its record."""
    try:
        return _DECODER.decode(text), None
    except _NotJson as err:
        return _MARKING_DECODER.decode(text), err


def _require_text(value: object, where: str) -> None:
    """Refuse parsed JSON that holds a lone surrogate: json turns an unpaired escape such as
    "\\ud800" into one, and it is not text (it has no UTF-8 form and no tokenizer takes it).
    Only a "\\u" escape can make one (the file itself is valid UTF-8), so callers check only then."""
    pending = [value]
    while pending:  # a loop, not recursion: the value may be nested nearly as deep as json reads
        item = pending.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(
                    f"{where}: a string holds an unpaired surrogate escape (\\ud800 to \\udfff without its "
                    "pair), which is not text; fix or delete that escape"
                ) from None
        elif isinstance(item, dict):
            pending += [*item, *item.values()]
        elif isinstance(item, list):
            pending += item


def _read_text(file: Path) -> str:
    """The file as text, without a UTF-8 byte order mark; invalid UTF-8 is reported at its line."""
    data = file.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        if data.startswith(b"PAR1"):  # "re-encode it as UTF-8" would not help
            raise DataError(f"{file}: a Parquet file (it starts with the bytes PAR1) under a {file.suffix} name; "
                            "rename it to .parquet") from None
        line = data.count(b"\n", 0, bom + err.start) + 1
        raise DataError(
            f"{file} line {line}: not UTF-8 text ({err.reason} at byte {bom + err.start}); "
            "re-encode the file as UTF-8"
        ) from None


def _invisible_cause(line: str) -> str:
    """The fix for a line that does not parse, naming what an editor does not show: a byte-order mark
    inside the file (files joined with ``cat``), or lines ending in a carriage return alone (old Mac)."""
    if line.lstrip(" \t").startswith("\ufeff"):
        return "; the line starts with a byte-order mark (U+FEFF), as where files with one were joined: delete it"
    if "\r" in line.rstrip("\r"):
        return "; the file's lines end in a carriage return alone (CR): convert its line endings to LF"
    return "; fix or delete that line"


def _list_in_json_lines(file: Path, first_line: str) -> str | None:
    """The fix for a ``.jsonl`` file whose first record line opens a JSON list, or None: such a file
    holds a JSON list of records (a ``.json`` file renamed, or a list written on one line), and neither
    "fix or delete that line" nor "expected a JSON object" says so."""
    if file.suffix.lower() != ".jsonl" or not first_line.lstrip().startswith("["):
        return None
    return (f"; {file.name} holds a JSON list of records (it starts with '['), not JSON Lines (one object per "
            f"line): rename it to {file.stem}.json, which is read as a list, or write one record per line")


def _read_json_lines(file: Path, text: str) -> Numbered:
    # Split on "\n" only: str.splitlines() also breaks at U+2028, U+0085 etc., which JSON
    # allows unescaped inside strings (PubMedQA has them).
    first = True
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        listed = _list_in_json_lines(file, line) if first else None
        first = False
        try:
            value = _DECODER.decode(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{file} line {number}: not valid JSON ({err})"
                            f"{listed or _invisible_cause(line)}") from None
        except _NotJson as err:
            raise DataError(f"{file} line {number}: {err}") from None
        except RecursionError:
            raise DataError(
                f"{file} line {number}: JSON nested too deeply to read (about 1000 levels of [ or {{); "
                "flatten or delete that line"
            ) from None
        if "\\u" in line:
            _require_text(value, f"{file} line {number}")
        if listed and isinstance(value, list):
            raise DataError(f"{file} line {number}: expected a JSON object (one record), got list{listed}")
        yield number, _object(value, file, "line", number)


def _read_json(file: Path, text: str) -> Numbered:
    """A `.json` file: a JSON list of objects, or JSON Lines under a .json name (common)."""
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            value, fault = _decode_list(text)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{file} line {err.lineno}: not valid JSON ({err.msg}, column {err.colno}); "
                "fix the file so it holds one JSON list of records"
            ) from None
        except RecursionError:  # json says not where
            raise DataError(
                f"{file}: JSON nested too deeply to read (about 1000 levels of [ or {{); flatten the records"
            ) from None
        escapes = "\\u" in text
        for number, item in enumerate(value, start=1):
            if fault is not None and _holds_refused(item):
                raise DataError(f"{file} record {number}: {fault}")
            record = _object(item, file, "record", number)
            if escapes:
                _require_text(record, f"{file} record {number}")
            yield number, record
        return
    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) > 1 and stripped.startswith("{"):
        try:
            _MARKING_DECODER.decode(text)
        except (json.JSONDecodeError, RecursionError):
            pass  # several objects, one per line: JSON Lines (read line by line, errors at their line)
        else:
            raise DataError(
                f"{file}: holds a single JSON object spread over several lines; expected a JSON "
                "list of records or JSON Lines (one object per line)"
            )
    yield from _read_json_lines(file, text)


def _read_csv(file: Path) -> Numbered:
    # A row with fewer cells than the header gets None for the missing ones (blank to the formats);
    # one with more would keep the extra cells under the key None, out of every field: refused.
    reader = csv.DictReader(io.StringIO(_read_text(file), newline=""))
    try:
        for row in reader:
            if None in row:
                raise DataError(
                    f"{file} line {reader.line_num}: {len(reader.fieldnames) + len(row[None])} values for the "
                    f"{len(reader.fieldnames)} columns of the header {reader.fieldnames}; quote fields that "
                    "contain commas"
                )
            yield reader.line_num, dict(row)
    except csv.Error as err:  # e.g. a field over csv.field_size_limit() (128 KiB)
        # The line being parsed: the DictReader's own line_num still names the previous row's.
        raise DataError(
            f"{file} line {reader.reader.line_num}: not readable as CSV ({err}); fix that line, or "
            "convert the file to JSON Lines"
        ) from None


def _read_parquet(file: Path) -> Numbered:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with `datasets`
        import datasets

        table = datasets.Dataset.from_parquet(str(file))
        yield from enumerate(table, start=1)
        return
    try:
        parquet = pq.ParquetFile(file)
    except Exception as err:  # pyarrow raises its own ArrowInvalid for corrupt files
        raise DataError(f"{file}: not a readable parquet file ({err})") from None
    number = 0
    for batch in parquet.iter_batches():
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _read_file(file: Path) -> Numbered:
    suffix = file.suffix.lower()
    if suffix == ".csv":
        yield from _read_csv(file)
    elif suffix == ".parquet":
        yield from _read_parquet(file)
    elif suffix in (".jsonl", ".json"):
        text = _read_text(file)
        yield from (_read_json_lines(file, text) if suffix == ".jsonl" else _read_json(file, text))
    else:
        packed = " (a compressed file is not read: decompress it first, e.g. `gunzip -k FILE`)" if suffix in (
            ".gz", ".bz2", ".xz", ".zst", ".zip") else ""
        raise DataError(
            f"{file}: unsupported file type '{suffix}'; use one of {list(SUPPORTED_SUFFIXES)}{packed}"
        )


def _looks_local(path: str) -> bool:
    """True when `path` cannot be a hub id (`name` or `org/name`) and must be a missing file."""
    if path.startswith((".", "/", "~")) or "\\" in path:
        return True
    if Path(path).suffix.lower() in _FILE_LIKE_SUFFIXES:
        return True
    return path.count("/") > 1 or (os.sep != "/" and os.sep in path)


def check_local_path(path: str, where: str | None = None) -> None:
    """Raise the DataError that reading ``path`` would raise when it names a local file or
    directory that does not exist (a hub dataset id passes), without reading anything: entry
    points call it on their config so that a mistyped path fails before any model loads.
    ``where`` (e.g. ``data.general[0]``) names the config entry in the message."""
    local = Path(os.path.expanduser(path))
    if local.exists() or not _looks_local(path):
        return
    named = f"{where}={path}" if where else path
    if any(c in path for c in "*?["):  # `data/*.jsonl`: a shell pattern is not expanded here
        raise DataError(f"{named}: file not found; a pattern (`*`, `?`, `[...]`) is not expanded: give the folder "
                        f"that holds the files instead (every data file below it is read, e.g. {Path(path).parent})")
    raise DataError(f"{named}: file not found (looked at {local.resolve()}); check the data path "
                    "(relative paths are resolved from the working directory)")


def _take(rows: Numbered, max_records: int | None) -> list[tuple[int, dict]]:
    records = []
    for item in rows:
        if max_records is not None and len(records) >= max_records:
            break
        records.append(item)
    return records


def _load_hub(path: str, subset: str | None, split: str, max_records: int | None) -> list:
    try:
        import datasets

        dataset = datasets.load_dataset(path, subset, split=split)
    except Exception as err:
        raise DataError(
            f"{path!r} is neither a local file or directory (no such path) nor a reachable "
            f"Hugging Face dataset (subset={subset!r}, split={split!r}: {type(err).__name__}: "
            f"{err}); fix the path, or the dataset name/subset/split, or the network access"
        ) from err
    if max_records is not None:
        dataset = dataset.select(range(min(max_records, len(dataset))))
    return [(number, dict(row)) for number, row in enumerate(dataset, start=1)]


def data_files(directory: Path) -> list[Path]:
    """The files a directory source is read from: every supported file below it, in sorted path
    order, hidden files and directories skipped (what :func:`load_records` reads, and what a run's
    resume check and a teacher cache hash, so that a README or ``.DS_Store`` beside the data is no
    change to it)."""
    return sorted(
        file for file in directory.rglob("*")
        if file.is_file() and file.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in file.relative_to(directory).parts)
    )


def load_records(
    path: str,
    *,
    split: str = "train",
    subset: str | None = None,
    max_records: int | None = None,
    warn: bool = True,
) -> list[tuple[int, dict]]:
    """Read records as `(number, record)` pairs; see the module docstring for what `number` is.

    Args:
        path: a `.jsonl`/`.json`/`.csv`/`.parquet` file, a directory of them, or a hub dataset id.
        split, subset: passed to `datasets.load_dataset` for hub datasets; ignored for files.
        max_records: keep only the first N records (None keeps all).
        warn: log the files a directory holds that are not read (off for a check that reads it again).

    Raises:
        DataError: missing file, malformed JSON (names file and line), unsupported file type,
            no records, or an unreachable hub dataset.
    """
    if max_records is not None and max_records < 1:
        raise DataError(f"{path}: max_records must be >= 1 or unset, got {max_records}")
    local = Path(os.path.expanduser(path))
    if local.is_dir():
        files = data_files(local)
        read = set(files)
        skipped = sorted(str(file.relative_to(local)) for file in local.rglob("*") if file.is_file()
                         and file not in read and not any(p.startswith(".") for p in file.relative_to(local).parts))
        if skipped and warn:  # a .tsv or .jsonl.gz among the data would otherwise vanish without a word
            log.warning("%s: %d file(s) skipped, not one of %s: %s", path, len(skipped), list(SUPPORTED_SUFFIXES),
                        ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else ""))
        if not files:
            raise DataError(
                f"{path}: directory holds no data files; expected {list(SUPPORTED_SUFFIXES)}"
            )
        rows = ((file, number, record) for file in files for number, record in _read_file(file))
        numbered = ((RecordNumber(position, str(file), location(str(file), number)), record)
                    for position, (file, number, record) in enumerate(rows, start=1))
        records = _take(numbered, max_records)
    elif local.is_file():
        records = _take(_read_file(local), max_records)
    elif _looks_local(path):
        check_local_path(path)
    else:
        records = _load_hub(path, subset, split, max_records)
    if not records:
        raise DataError(f"{path}: no records found (empty file or dataset); point to data with records")
    return records
