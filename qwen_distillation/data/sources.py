"""The data sources of a run (``data.general``, ``data.medical``, ``data.eval``) and the
tokenized general, medical and held-out evaluation sets built from them."""

from __future__ import annotations

import hashlib
import logging
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from qwen_distillation.data.encode import build_examples, record_messages, split_heldout
from qwen_distillation.data.formats import FORMATS
from qwen_distillation.data.generated import file_digest
from qwen_distillation.data.loading import check_local_path, load_records
from qwen_distillation.errors import ConfigError, require, require_one_of, require_strings
from qwen_distillation.paths import existing_local, file_identity, locate

log = logging.getLogger(__name__)

DOMAINS = ("general", "medical")  # an example's "domain" field is the index here
SOURCE_KEYS = ("path", "format", "split", "subset", "max_records")
# Where an evaluation set that is training data is refused: what a run scores as held out of its own.
OWN_SPLITS = "(each training source's own held-out split is scored as eval/general_nll and eval/medical_nll)"


@dataclass(frozen=True)
class DataSource:
    """One data source after normalisation (a bare string becomes ``DataSource(path=...)``)."""

    path: str
    format: str = "auto"
    split: str = "train"
    subset: str | None = None
    max_records: int | None = None


def normalise_sources(key: str, sources: Iterable[Any]) -> list[DataSource]:
    """Turn the entries of ``data.general`` / ``data.medical`` / ``data.eval`` (named ``key``
    in errors) into DataSources: a path string or a mapping with the keys of SOURCE_KEYS."""
    out = []
    for i, entry in enumerate(sources):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        require(isinstance(entry, dict), where, entry, "a data source is a path/dataset name or a mapping with a "
                "`path`", f"{key}=[my_data.jsonl]")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        require(not unknown, where, entry, f"unknown key(s) {unknown}; valid keys are {', '.join(SOURCE_KEYS)}",
                f"{key}=[{{path: my_data.jsonl, format: alpaca}}]")
        require(bool(entry.get("path")), where, entry, "a data source needs a non-empty `path`",
                f"{key}=[my_data.jsonl]")
        source = DataSource(**{k: v for k, v in entry.items() if v is not None or k in ("subset", "max_records")})
        # A list failed with an AttributeError (a None split is the default "train"; a None path was refused above).
        require_strings(where, entry, {"path": f"{where}.path=my_data.jsonl", "split": f"{where}.split=train"})
        require_one_of(f"{where}.format", source.format, ("auto", *FORMATS))
        if source.max_records is not None:  # `true` kept 1 record, 1.5 kept 2, and text failed with a TypeError
            require(type(source.max_records) is int and source.max_records >= 1, f"{where}.max_records",
                    source.max_records, "must be a whole number >= 1", f"{where}.max_records=1000")
        out.append(source)
    return out


def checked_sources(key: str, entries: Iterable[Any]) -> list[DataSource]:
    """:func:`normalise_sources`, and each local path must exist: a mistyped path fails here,
    naming ``key[i]``, before any model loads (a hub dataset id is not looked up)."""
    sources = normalise_sources(key, entries)
    for i, source in enumerate(sources):
        check_local_path(locate(source.path), f"{key}[{i}]")
        hub_only = [f"{name}: {value}" for name, value in (("split", source.split), ("subset", source.subset))
                    if value != DataSource.__dataclass_fields__[name].default]
        # A local file or folder is read whole: `{path: data/, split: test}` trained on all of data/.
        require(not hub_only or existing_local(source.path) is None, f"{key}[{i}]",
                f"{{path: {source.path}, {', '.join(hub_only)}}}", "`split` and `subset` choose a part of a Hugging "
                "Face hub dataset; a local file or folder is read whole, so they would be ignored. Give the file "
                "(or folder) of that part as the path", f"{key}[{i}]=data/test.jsonl")
    return sources


def data_sources(data_cfg) -> dict[str, list[DataSource]]:
    """``general``, ``medical`` and ``eval`` sources of a DataConfig, each entry checked."""
    return {key: checked_sources(f"data.{key}", getattr(data_cfg, key)) for key in (*DOMAINS, "eval")}


def _same_data(path: str, split: str, subset: str | None,
               digest: Callable[[str], str | None] = file_digest) -> list[tuple]:
    """What makes two sources the same data: a local file or folder by its ``file_identity`` (a link
    or another spelling of it included) or by its content (``digest`` of its located path: a copy), a
    hub dataset by its name, split and subset. Two sources are the same data when they share a key."""
    local = existing_local(path)
    if local is None:
        return [(path, split, subset)]
    return [file_identity(local), ("sha256", digest(local))]


def refuse_trained_eval_sets(sources: dict[str, list[DataSource]], more: Iterable[tuple[str, Any]] = (),
                             digest: Callable[[str], str | None] = file_digest) -> None:
    """Refuse an evaluation set that is also a training source of the run (the same file, a link
    to it or a copy of it): its scores would be reported as held out. ``sources``:
    :func:`data_sources`'s (its ``eval`` entries are checked); ``more``: other evaluation sets as
    ``(key, source)``, e.g. ``eval.mcq[0]`` (with ``path``, ``split``, ``subset``). The held-out
    split of a training source is the run's own evaluation (``eval/general_nll``,
    ``eval/medical_nll``); give another file here. Training sources that are the same data as one
    another are logged: each one's held-out records are trained on through the other. ``digest``:
    :func:`file_digest`, or a memo of it shared with the caller's other reads of the same files."""
    trained: dict[tuple, str] = {}
    for key in DOMAINS:
        for i, s in enumerate(sources[key]):
            entry, keys = f"data.{key}[{i}]", _same_data(s.path, s.split, s.subset, digest)
            earlier = next((trained[same] for same in keys if same in trained), None)
            if earlier:
                log.warning("%s=%s is the same data as %s (the same file, a link or a copy): each one's held-out "
                            "records are trained on through the other, and its records count twice; list it once",
                            entry, s.path, earlier)
            trained.update({same: trained.get(same, entry) for same in keys})
    for key, source in [*((f"data.eval[{i}]", s) for i, s in enumerate(sources["eval"])), *more]:
        entry = next((trained[same] for same in _same_data(source.path, source.split, source.subset, digest)
                      if same in trained), None)
        if entry:
            raise ConfigError(f"{key}={source.path}: also the training source {entry} (the same file, a link or "
                              f"a copy); its scores would be reported as held out. Evaluate on another file "
                              f"{OWN_SPLITS}")


@dataclass
class DomainData:
    """Training examples per domain and held-out evaluation sets by name
    (``general``, ``medical`` and one per ``data.eval`` source)."""

    general: list[dict] = field(default_factory=list)
    medical: list[dict] = field(default_factory=list)
    eval_sets: dict[str, list[dict]] = field(default_factory=dict)


def examples_digest(data: DomainData) -> str:
    """sha256 of the tokens of every training pool and evaluation set of ``data``, in order: which
    records a run trains on and which it holds out. A resumed run compares it with its start's
    (:func:`qwen_distillation.training.outputs.check_same_split`): the held-out split names a local
    file by its path from the project root (:func:`~qwen_distillation.paths.source_identity`), so a
    file outside it is split otherwise from a clone of the project in another folder, with the same
    bytes and the same example counts."""
    digest = hashlib.sha256()
    for name, examples in (("general", data.general), ("medical", data.medical), *sorted(data.eval_sets.items())):
        digest.update(f"\0{name}\0{len(examples)}\0".encode())
        for example in examples:
            digest.update(len(example["input_ids"]).to_bytes(8, "little"))
            digest.update(array("q", example["input_ids"]).tobytes())
    return digest.hexdigest()


def check_records(sources: dict[str, list[DataSource]]) -> None:
    """Read every record of the local sources of ``sources`` and convert it to chat messages as
    :func:`build_domain_data` will, without a tokenizer: a malformed record (a field missing or empty, a
    line that is not an object, a file without records) is named by its file and line before any model
    loads (minutes for a large teacher), not after. Hub datasets are read when the data is built."""
    for domain in sources.values():
        for source in domain:
            if existing_local(source.path) is None:
                continue
            records = load_records(locate(source.path), split=source.split, subset=source.subset,
                                   max_records=source.max_records, warn=False)
            for _ in record_messages(records, source.format, source.path):
                pass


def encode_source(source: DataSource, tokenizer, max_length: int,
                  max_length_key: str = "data.max_length") -> list[dict]:
    """The examples of one source; those of a hub dataset carry its ``subset`` and ``split`` as ``part``
    (``subset/split``), which names them apart from another subset's or split's in a teacher cache (a local
    file or folder is named there by its content hash)."""
    path = locate(source.path)
    records = load_records(path, split=source.split, subset=source.subset, max_records=source.max_records)
    examples = build_examples(records, source.format, tokenizer, max_length, source.path, max_length_key)
    if existing_local(source.path) is None:
        part = f"{source.subset or ''}/{source.split or ''}"
        examples = [{**example, "part": part} for example in examples]
    return examples


def _eval_name(source: DataSource, taken: set[str]) -> str:
    name = Path(source.path.split(":")[-1]).stem or "eval"
    while name in taken:
        name += "_"
    return name


def build_domain_data(sources: dict[str, list[DataSource]], tokenizer, *, max_length: int, eval_fraction: float,
                      max_eval_examples: int, seed: int, max_length_key: str = "data.max_length",
                      warn_held_out: bool = True) -> DomainData:
    """Load, encode and split every source of ``sources`` (from :func:`data_sources`); ``max_length_key``
    is the option that set ``max_length``, named where examples do not fit in it.

    Each training source gives ``eval_fraction`` of its examples (deterministically, by
    ``seed``) to the held-out set of its domain, capped at ``max_eval_examples`` per domain
    overall; each ``eval`` source becomes a held-out set of its own, named after its file.
    A held-out example whose tokens are also a training example's (a record repeated in a file or
    across files, an evaluation file that copies training records) is left out of its set, with a
    warning that counts them (:func:`_without_trained`): its score would be a training score.
    ``warn_held_out=False`` leaves out the warnings about the held-out sets (a caller that reads only the
    training pools, such as a pruning calibration drawn from the run's data, which the run warns of itself).
    """
    out = DomainData()
    held_by_domain = {}
    for domain_id, domain in enumerate(DOMAINS):
        heldout = []
        for source in sources[domain]:
            encoded = encode_source(source, tokenizer, max_length, max_length_key)
            examples = [{**e, "domain": domain_id} for e in encoded]
            train, held = split_heldout(examples, eval_fraction, max_eval_examples, seed)
            getattr(out, domain).extend(train)
            heldout.extend(held)
            log.info("data.%s: %s -> %d train, %d held out", domain, source.path, len(train), len(held))
        held_by_domain[domain] = heldout
    trained = {tuple(e["input_ids"]) for domain in DOMAINS for e in getattr(out, domain)}
    for domain, heldout in held_by_domain.items():
        heldout = _without_trained(f"data.{domain}'s held-out split", heldout, trained, warn_held_out)
        if warn_held_out and len(heldout) > max_eval_examples:  # kept as documented (docs/data.md)
            log.warning("data.%s: its sources hold out %d examples, over data.max_eval_examples=%d; the %d past it "
                        "are neither evaluated nor trained on. Raise data.max_eval_examples to evaluate them, or "
                        "lower data.eval_fraction to train on them", domain, len(heldout), max_eval_examples,
                        len(heldout) - max_eval_examples)
        if heldout:
            out.eval_sets[domain] = heldout[:max_eval_examples]
    for i, source in enumerate(sources["eval"]):
        name = _eval_name(source, set(out.eval_sets))
        examples = _without_trained(f"data.eval[{i}]={source.path}", encode_source(
            source, tokenizer, max_length, max_length_key), trained)
        if not examples:
            raise ConfigError(f"data.eval[{i}]={source.path}: every example is also a training example (the same "
                              f"tokens); its scores would be reported as held out. Evaluate on other records "
                              f"{OWN_SPLITS}")
        if len(examples) > max_eval_examples:  # scored on the first ones: say so, as for the held-out splits
            log.warning("data.eval[%d]=%s: %d examples, scored on the first %d (data.max_eval_examples=%d); raise "
                        "data.max_eval_examples to score them all", i, source.path, len(examples), max_eval_examples,
                        max_eval_examples)
        out.eval_sets[name] = examples[:max_eval_examples]
    return out


def _without_trained(what: str, examples: list[dict], trained: set[tuple], warn: bool = True) -> list[dict]:
    """``examples`` without those whose ``input_ids`` are a training example's, with a warning naming ``what``
    and counting them: the same record in a training source and held out (a duplicate line, a file listed
    twice under other names, an evaluation file that copies training records) was scored as held out."""
    kept = [e for e in examples if tuple(e["input_ids"]) not in trained]
    if warn and len(kept) < len(examples):
        log.warning("%s: %d of %d examples are also training examples (the same tokens: a repeated record, or "
                    "records copied between files); they are left out of its scores, which would be training "
                    "scores. Remove the repeats from the data to hold them out", what, len(examples) - len(kept),
                    len(examples))
    return kept
