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
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_distillation.data.generated import TEACHER_FINGERPRINT, file_digest, teacher_weights_difference
from qwen_distillation.errors import CheckpointError, ConfigError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_hashes(paths: dict[str, str]) -> dict[str, str]:
    """``{source name: sha256 of its file}`` for the sources that are local files (hub datasets: None)."""
    return {name: file_digest(path) if os.path.isfile(path) else None for name, path in paths.items()}


def example_key(example: dict, hashes: dict[str, str | None]) -> str:
    """An example's name in the cache: its source file's content hash (else the source name) and
    its record index, so renaming or moving the file keeps the cache valid and editing it does not."""
    source = example["source"]
    return f"{(hashes.get(source) or source)[:16]}:{example['index']}"


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
        return {key: value for key, value in identity.items() if key != TEACHER_FINGERPRINT}

    return comparable(cached) == comparable(wanted) and teacher_weights_difference(cached, wanted) is None


def identity_differences(cached: dict, wanted: dict) -> list[str]:
    """What differs between two identities, as ``field: cache X, run Y`` strings. Data sources are
    compared by content hash (and options), so the same file under another path matches; the
    teacher's weights by their sampled fingerprint, when both identities record one."""
    out = []
    for key in ("format_version", "teacher", "tokenizer", "vocab_size", "max_length"):
        if cached.get(key) != wanted.get(key):
            out.append(f"{key}: cache {cached.get(key)!r}, run {wanted.get(key)!r}")
    weights = teacher_weights_difference(cached, wanted)
    if weights:
        out.append(f"{weights}: the cache was made from other teacher weights; rebuild it with `python -m "
                   f"qwen_distillation.cache_teacher --overwrite` and this teacher, or point the run at the "
                   f"original teacher")

    def sources(identity):
        return {(d["sha256"] or d["path"], d.get("format"), d.get("split"), d.get("subset"), d.get("max_records")): d
                for d in identity.get("data", [])}

    have = sources(cached)
    missing = [d["path"] for key, d in sources(wanted).items() if key not in have]
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
    """Writes rank ``rank``'s shards into ``directory`` (see the module docstring).

    The manifest is written (or checked: a different identity is refused unless ``overwrite``,
    which first removes the old shards) when the writer is made; :attr:`done` holds the keys the
    existing shards of every rank already cover, so a resumed writer skips them."""

    @staticmethod
    def check(directory: Path, identity: dict, *, overwrite: bool = False, cached: dict | None = None) -> bool:
        """Read-only: whether ``directory`` holds a cache of other inputs (which the writer will
        replace); refused unless ``overwrite``. ``cached`` is its manifest's identity when the caller
        has read it already. The cache command calls this before the teacher loads, and makes the
        writer (which deletes the old shards) only once the teacher has loaded."""
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

    def __init__(self, directory: Path, identity: dict, *, rank: int = 0, overwrite: bool = False):
        self.directory = Path(directory)
        self.identity, self.rank = identity, rank
        other_inputs = self.check(self.directory, identity, overwrite=overwrite)
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self.directory / MANIFEST
        if other_inputs and rank == 0:
            for shard in self.directory.glob("shard-*.safetensors"):
                shard.unlink()
        if rank == 0:
            _write_atomic(manifest, json.dumps(identity, indent=2).encode())
        self.done: set[str] = set()
        self._next = 0
        for shard in shard_files(self.directory):
            self.done.update(shard_index(shard))
            if shard.name.startswith(f"shard-R{rank:05d}-"):
                self._next = max(self._next, int(shard.stem.rsplit("-", 1)[1]) + 1)

    def write(self, examples: list[CachedExample]) -> Path:
        """One shard of ``examples``, written atomically; returns its path."""
        from safetensors.torch import save

        dtype = DTYPES[self.identity["dtype"]]
        tensors = {"ids": torch.cat([e.ids for e in examples]).to(torch.int32).contiguous(),
                   "logprobs": torch.cat([e.logprobs for e in examples]).to(dtype).contiguous(),
                   "tail_logmass": torch.cat([e.tail_logmass for e in examples]).float().contiguous()}
        index = [[e.key, int(e.ids.shape[0]), e.checksum] for e in examples]
        path = self.directory / f"shard-R{self.rank:05d}-{self._next:06d}.safetensors"
        _write_atomic(path, save({k: v.cpu() for k, v in tensors.items()}, metadata={"examples": json.dumps(index)}))
        self._next += 1
        self.done.update(e.key for e in examples)
        return path


def shard_files(directory: Path) -> list[Path]:
    return sorted(Path(directory).glob("shard-R*-*.safetensors"))


def shard_index(path: Path) -> dict[str, tuple[int, int, int]]:
    """``{key: (first row, rows, checksum)}`` of a shard, from its metadata alone."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            entries = json.loads(handle.metadata()["examples"])
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise CheckpointError(f"{path}: damaged teacher-cache shard ({err}); delete it and run the cache "
                              f"command again, which rewrites the missing examples") from err
    out, row = {}, 0
    for key, rows, checksum in entries:
        out[key] = (row, rows, checksum)
        row += rows
    return out


class CacheReader:
    """Looks up cached examples; every shard's tensors are loaded on first use and kept (a cache
    of a few GB sits in host memory; the rows are sliced from it per micro-batch)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.identity = read_manifest(self.directory)
        self.where: dict[str, tuple[Path, int, int, int]] = {}
        for shard in shard_files(self.directory):
            for key, (row, rows, checksum) in shard_index(shard).items():
                self.where[key] = (shard, row, rows, checksum)
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
                              f"the cache was written for other data or is incomplete: run the cache command "
                              f"again on this stage's data (it adds the missing examples)")
        shard, row, rows, cached_checksum = self.where[key]
        if cached_checksum != checksum or rows != responses:
            raise ConfigError(f"teacher cache {self.directory}: example {key} was cached with other tokens "
                              f"({rows} response tokens, checksum {cached_checksum}; the run has {responses}, "
                              f"{checksum}): the tokenizer, chat template or max_length changed; write a new cache")
        return shard, row, rows
