"""The offline teacher cache on disk: the teacher's top-k token distribution at every response
token of a stage's training examples, written once and read by training instead of the teacher.

Layout of a cache directory::

    manifest.json                 what the cache was computed from (:func:`cache_identity`)
    shard-R00000-000000.safetensors, ...   rank R's shards, each complete or absent

A shard holds the entries of up to ``examples_per_shard`` examples, concatenated: ``ids`` (T, k)
int32, the teacher's top-k token ids (most probable first); ``logprobs`` (T, k) in the manifest's
dtype, their log-probabilities at T = 1; ``tail_logmass`` (T,) fp32, the log of the teacher's
T = 1 mass outside those ids (:class:`qwen_distillation.losses.topk.TeacherTopK`), where T is the
number of response tokens of those examples (the positions ``position_mask(labels)`` selects, in
the same order). Its safetensors metadata names each example (:func:`example_key`: the source
file's content hash and the record index), its number of response tokens and a checksum of its
input ids, so a reader finds an example's rows and can tell when the data or the tokenizer
changed. A shard is written under a temporary name and renamed into place, so a killed writer
leaves only whole shards; a new writer skips the examples they hold.

Each shard's metadata also records :func:`identity_digest` of the identity it was written under, and
that alone says which cache it belongs to: ranks run with no process group, so while ``--overwrite``
replaces a cache, one rank may meet the old manifest and another the new one beside shards of both
caches. A writer counts as done only the shards of its own identity's digest and deletes only stale
shards it owns (:class:`CacheWriter`); a reader serves only the shards of its manifest's identity. A
manifest written since shards record the digest says so (:data:`SHARD_DIGESTS`); under an older one
(an older cache), a shard without a digest is the manifest's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_distillation.data.generated import (TEACHER_FINGERPRINT, file_digest, same_teacher,
                                              teacher_weights_difference)
from qwen_distillation.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The manifest key (beside the identity) saying that every shard of the cache records its identity's
# digest: a shard without one is then of an earlier cache.
SHARD_DIGESTS = "shard_digests"
# The shard metadata key holding identity_digest of the identity the shard was written under.
SHARD_IDENTITY = "identity"
SHARD_NAME = re.compile(r"\.?shard-R(\d+)-(\d+)\.safetensors(\.tmp)?")


def source_hashes(paths: dict[str, str]) -> dict[str, str]:
    """``{source name: sha256}`` of the sources that are local files or folders (:func:`file_digest`: a
    folder's data files, names and bytes); None for a hub dataset."""
    return {name: file_digest(path) for name, path in paths.items()}


def example_key(example: dict, hashes: dict[str, str | None]) -> str:
    """An example's name in the cache: its source's content hash and its record index, so renaming or
    moving the file or folder keeps the cache valid and editing it does not. A hub dataset (no hash) is
    named whole, with the subset and split its examples carry as ``part``: two subsets of one dataset, or
    two datasets whose names share a beginning, are told apart."""
    source, digest = example["source"], hashes.get(example["source"])
    if digest:
        return f"{digest[:16]}:{example['index']}"
    part = example.get("part")
    return f"{source}{f'[{part}]' if part else ''}:{example['index']}"


def ids_checksum(input_ids) -> int:
    return zlib.crc32(torch.as_tensor(input_ids, dtype=torch.int64).numpy().tobytes())


def cache_identity(*, teacher: str, tokenizer: str, vocab_size: int, data: list[dict], max_length: int,
                   k: int | None, dtype: str | None, teacher_fingerprint: str | None = None) -> dict:
    """What a cache depends on; training refuses a cache whose identity differs from the stage's.

    ``data``: one entry per source, ``{"path", "sha256", "format", "split", "subset", "max_records"}``.
    ``teacher_fingerprint``: :func:`~qwen_distillation.data.generated.model_fingerprint` of a local
    teacher's weights (None: a hub id or a random-init teacher, which ``teacher`` names fully)."""
    return {"format_version": FORMAT_VERSION, "teacher": teacher, TEACHER_FINGERPRINT: teacher_fingerprint,
            "tokenizer": tokenizer, "vocab_size": vocab_size, "data": data, "max_length": max_length, "k": k,
            "dtype": dtype}


def same_identity(cached: dict, wanted: dict) -> bool:
    """Whether a cache's manifest is of ``wanted``'s inputs; a manifest written before the teacher's
    fingerprint was recorded (no such key) is not told apart by it, nor is a run whose teacher
    directory holds no weights to fingerprint."""
    def comparable(identity):
        return {key: value for key, value in identity.items() if key not in (TEACHER_FINGERPRINT, SHARD_DIGESTS)}

    return comparable(cached) == comparable(wanted) and teacher_weights_difference(cached, wanted) is None


def identity_digest(identity: dict) -> str:
    """sha256 of an identity's canonical JSON: what a shard records of the identity it was written under."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_identity(manifest) -> tuple[dict, bool]:
    """A manifest as read: the cache's identity, and whether its shards record their identity's digest
    (:data:`SHARD_DIGESTS`; False for a manifest written before they did, or one that is not a dict)."""
    if not isinstance(manifest, dict):
        return manifest, False
    return {key: value for key, value in manifest.items() if key != SHARD_DIGESTS}, bool(manifest.get(SHARD_DIGESTS))


def _same_size_hint(key: str, cached, wanted) -> str:
    """For two tokenizer descriptions (``N tokens, sha256 H``) of one size: what else their hash covers."""
    if key != "tokenizer" or not isinstance(cached, str) or not isinstance(wanted, str):
        return ""
    if cached.partition(",")[0] != wanted.partition(",")[0]:
        return ""
    return (" (the same number of tokens: the ids of the vocabulary or the chat template differ, e.g. a tokenizer "
            "saved with an edited chat_template)")


def identity_differences(cached: dict, wanted: dict) -> list[str]:
    """What differs between two identities, as ``field: cache X, run Y`` strings. Data sources are
    compared by content hash (and options), so the same file under another path matches; the
    teacher's weights by their sampled fingerprint, when both identities record one, and then its path
    not by its spelling (:func:`~qwen_distillation.data.generated.same_teacher`)."""
    out = []
    for key in ("format_version", "teacher", "tokenizer", "vocab_size", "max_length"):
        if key == "teacher" and same_teacher(cached, wanted):
            continue
        if cached.get(key) != wanted.get(key):
            out.append(f"{key}: cache {cached.get(key)!r}, run {wanted.get(key)!r}" + _same_size_hint(
                key, cached.get(key), wanted.get(key)))
    weights = teacher_weights_difference(cached, wanted)
    if weights:
        out.append(f"{weights}: the cache was made from other teacher weights; rebuild it with `python -m "
                   f"qwen_distillation.cache_teacher --overwrite` and this teacher, or point the run at the "
                   f"original teacher")

    options = ("format", "split", "subset", "max_records")

    def sources(identity):
        return {(d["sha256"] or d["path"], *(d.get(name) for name in options)): d for d in identity.get("data", [])}

    have = sources(cached)
    missing = []
    for key, source in sources(wanted).items():
        if key in have:
            continue
        # The same file read with other options: name the options, not the file twice.
        same_file = [d for other, d in have.items() if other[0] == key[0]]
        if same_file:
            out.append(f"data: {source['path']} read otherwise (" + "; ".join(
                f"{name}: cache {same_file[0].get(name)!r}, run {source.get(name)!r}"
                for name in options if same_file[0].get(name) != source.get(name)) + ")")
        else:
            missing.append(source["path"])
    if missing:
        out.append(f"data: the cache holds no entries for {', '.join(missing)} (or a different version of it); "
                   f"it was written for {', '.join(d['path'] for d in cached.get('data', [])) or 'no data'}")
    return out


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    if Path(directory).is_file():
        raise ConfigError(f"{directory}: a file, not a teacher-cache directory; give the --out directory of "
                          f"`python -m qwen_distillation.cache_teacher`")
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{directory}: no teacher cache here ({MANIFEST} missing); write one with "
                          f"`python -m qwen_distillation.cache_teacher --out {directory}`") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); write the cache again with --overwrite") from err


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@dataclass
class CachedExample:
    """One example's entries: ``ids`` (n, k), ``logprobs`` (n, k), ``tail_logmass`` (n,)."""

    key: str
    checksum: int
    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor


class CacheWriter:
    """Writes rank ``rank``'s shards (of ``world_size`` ranks) into ``directory`` (see the module docstring).

    The manifest is checked when the writer is made: a different identity (or an unreadable manifest)
    is refused unless ``overwrite``, which replaces the cache; rank 0 then writes the manifest.
    :attr:`done` holds the keys that shards of this identity (by their digest) already cover, of any
    rank, so a resumed writer skips them. A stale shard (of another digest; without one, unless the
    manifest is of this identity and older than shard digests) is never counted, and is deleted by
    the writer of the rank that wrote it; rank 0 deletes those of ranks ``>= world_size`` too. No rank
    deletes a shard of another rank below ``world_size``, which may be writing its shards meanwhile:
    the ranks share no process group, so each rank's files are its own."""

    @staticmethod
    def check(directory: Path, identity: dict, *, overwrite: bool = False, cached: dict | None = None) -> bool:
        """Read-only: whether ``directory`` holds a cache of other inputs (which the writer will
        replace); refused unless ``overwrite``. ``cached`` is its manifest's identity when the caller
        has read it already. The cache command calls this before the teacher loads, and makes the
        writer (which deletes the old cache's shards) only once the teacher has loaded."""
        if cached is None:
            if not (Path(directory) / MANIFEST).exists():
                return False
            cached = read_manifest(Path(directory))
        other = not same_identity(cached, identity)
        if other and not overwrite:
            diff = identity_differences(cached, identity) or [
                f"k/dtype: cache {cached.get('k')}/{cached.get('dtype')}, "
                f"run {identity.get('k')}/{identity.get('dtype')}"]
            raise ConfigError(f"--out {directory}: holds a teacher cache of other inputs ({'; '.join(diff)});"
                              f" choose another directory or pass --overwrite")
        return other

    def __init__(self, directory: Path, identity: dict, *, rank: int = 0, world_size: int = 1,
                 overwrite: bool = False):
        self.directory = Path(directory)
        self.identity, self.rank = identity, rank
        self.digest = identity_digest(identity)
        manifest = self.directory / MANIFEST
        cached = None
        if manifest.exists():
            try:
                cached = read_manifest(self.directory)
            except CheckpointError:
                # Unreadable: replaced as a cache of other inputs (the cache command has checked that the
                # directory holds nothing but a cache's files); rank 0 may have replaced it already.
                if not overwrite:
                    raise
        other_inputs = cached is not None and self.check(self.directory, identity, overwrite=overwrite, cached=cached)
        # A shard without a digest is the manifest's only under a manifest of this identity written
        # before shards recorded their digest (an older cache, resumed).
        undigested_current = cached is not None and not other_inputs and not manifest_identity(cached)[1]
        self.directory.mkdir(parents=True, exist_ok=True)

        def owned(match: re.Match | None) -> bool:  # a file's SHARD_NAME match: written by this rank, or left to it
            return match is not None and (int(match[1]) == rank or (rank == 0 and int(match[1]) >= world_size))

        self.done: set[str] = set()
        self._next = 0
        stale = []
        for shard in shard_files(self.directory):
            match = SHARD_NAME.fullmatch(shard.name)
            if match and int(match[1]) == rank:  # numbered past every shard of this rank, stale or not
                self._next = max(self._next, int(match[2]) + 1)
            try:
                index, digest = shard_header(shard)
            except CheckpointError:
                if shard.exists() and not overwrite:
                    raise
                # Deleted meanwhile by the rank that owns it (a stale shard), or damaged: replaced with
                # --overwrite, by the rank that owns it.
                stale += [shard] if owned(match) else []
                continue
            if (digest == self.digest) if digest is not None else undigested_current:
                self.done.update(index)
            elif owned(match):
                stale.append(shard)
        # This rank's stale shards, and what a killed writer of this rank left half-written.
        for path in stale + [p for p in self.directory.glob(".shard-R*.tmp") if owned(SHARD_NAME.fullmatch(p.name))]:
            path.unlink(missing_ok=True)
        if rank == 0:
            written = identity if undigested_current else {**identity, SHARD_DIGESTS: True}
            _write_atomic(manifest, json.dumps(written, indent=2).encode())

    def write(self, examples: list[CachedExample]) -> Path:
        """One shard of ``examples``, written atomically; returns its path."""
        from safetensors.torch import save

        dtype = DTYPES[self.identity["dtype"]]
        tensors = {"ids": torch.cat([e.ids for e in examples]).to(torch.int32).contiguous(),
                   "logprobs": torch.cat([e.logprobs for e in examples]).to(dtype).contiguous(),
                   "tail_logmass": torch.cat([e.tail_logmass for e in examples]).float().contiguous()}
        index = [[e.key, int(e.ids.shape[0]), e.checksum] for e in examples]
        path = self.directory / f"shard-R{self.rank:05d}-{self._next:06d}.safetensors"
        metadata = {"examples": json.dumps(index), SHARD_IDENTITY: self.digest}
        _write_atomic(path, save({k: v.cpu() for k, v in tensors.items()}, metadata=metadata))
        self._next += 1
        self.done.update(e.key for e in examples)
        return path


def shard_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("shard-R*-*.safetensors"))


def shard_header(path: Path) -> tuple[dict[str, tuple[int, int, int]], str | None]:
    """A shard's index, ``{key: (first row, rows, checksum)}``, and the digest of the identity it was
    written under (None: a shard written before shards recorded it), from its metadata alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            entries = json.loads(metadata["examples"])
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: damaged teacher-cache shard ({err}); delete it and run the cache "
                              f"command again, which rewrites the missing examples") from err
    out, row = {}, 0
    for key, rows, checksum in entries:
        out[key] = (row, rows, checksum)
        row += rows
    return out, metadata.get(SHARD_IDENTITY)


def shard_index(path: Path) -> dict[str, tuple[int, int, int]]:
    """``{key: (first row, rows, checksum)}`` of a shard, from its metadata alone."""
    return shard_header(path)[0]


class CacheReader:
    """Looks up cached examples; every shard's tensors are loaded on first use and kept (a cache
    of a few GB sits in host memory; the rows are sliced from it per micro-batch).

    Only the shards of the manifest's identity are read (by their digest; a shard without one only
    under a manifest older than shard digests): a rank that died while ``--overwrite`` replaced the
    cache leaves its old shards, which are skipped (:attr:`stale`), so their examples are missing,
    not served from the old cache."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.identity, digested = manifest_identity(read_manifest(self.directory))
        digest = identity_digest(self.identity) if isinstance(self.identity, dict) else None
        self.where: dict[str, tuple[Path, int, int, int]] = {}
        self.stale: list[Path] = []
        for shard in shard_files(self.directory):
            index, shard_digest = shard_header(shard)
            if (shard_digest != digest) if shard_digest is not None else digested:
                self.stale.append(shard)
                continue
            for key, (row, rows, checksum) in index.items():
                self.where[key] = (shard, row, rows, checksum)
        if self.stale:
            names = ", ".join(p.name for p in self.stale[:3]) + (", ..." if len(self.stale) > 3 else "")
            log.warning("teacher cache %s: %d shard(s) of an earlier cache skipped (%s), left by a rank that stopped "
                        "while the cache was replaced; run the cache command again: it deletes them and writes the "
                        "examples they miss", self.directory, len(self.stale), names)
        self._loaded: dict[Path, dict[str, torch.Tensor]] = {}

    def _tensors(self, shard: Path) -> dict[str, torch.Tensor]:
        if shard not in self._loaded:
            from safetensors.torch import load_file

            self._loaded[shard] = load_file(str(shard))
        return self._loaded[shard]

    def lookup(self, key: str, checksum: int, responses: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (n, k) int64, logprobs (n, k) fp32, tail_logmass (n,)) of one example.

        Raises ConfigError when the cache does not hold it or holds another version of it."""
        shard, row, rows = self.locate(key, checksum, responses)
        tensors = self._tensors(shard)
        return (tensors["ids"][row:row + rows].long(), tensors["logprobs"][row:row + rows].float(),
                tensors["tail_logmass"][row:row + rows])

    def locate(self, key: str, checksum: int, responses: int) -> tuple[Path, int, int]:
        """(shard, first row, rows) of one example, read from the index alone (no tensors load).

        Raises ConfigError when the cache does not hold it or holds another version of it."""
        if key not in self.where:
            raise ConfigError(f"teacher cache {self.directory}: no entry for example {key} (source hash:record); "
                              f"the cache was written for other data, or for the same file in another folder (the "
                              f"held-out split names a file by its path relative to the project, so a moved file "
                              f"holds out other records), or is incomplete: run the cache command again on this "
                              f"stage's data (it adds the missing examples)")
        shard, row, rows, cached_checksum = self.where[key]
        if cached_checksum != checksum or rows != responses:
            raise ConfigError(f"teacher cache {self.directory}: example {key} was cached with other tokens "
                              f"({rows} response tokens, checksum {cached_checksum}; the run has {responses}, "
                              f"{checksum}): the tokenizer, chat template or max_length changed; write a new cache")
        return shard, row, rows
