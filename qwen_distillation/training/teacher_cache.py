"""The teacher, run once: writing its top-k cache over a run's training data, and the teacher
runner of a stage that reads the cache instead (``stageN.teacher.source=cache``).

The cache's format on disk is :mod:`qwen_distillation.data.teacher_cache`'s; what each entry
means and what the sparse KD approximates is :mod:`qwen_distillation.losses.topk`'s. Entries are
taken at the positions :func:`~qwen_distillation.modeling.parts.position_mask` selects, in its
order, so a micro-batch's cached rows line up with the student's hidden states there.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from qwen_distillation.data.generated import model_fingerprint, tokenizer_description
from qwen_distillation.data.loading import location
from qwen_distillation.data.manager import collate
from qwen_distillation.data.sources import DataSource
from qwen_distillation.data.teacher_cache import (CachedExample, CacheReader, CacheWriter, cache_identity,
                                                  example_key, identity_differences, ids_checksum, source_hashes)
from qwen_distillation.errors import ConfigError
from qwen_distillation.losses.topk import teacher_topk
from qwen_distillation.modeling.parts import decoder_and_head, model_inputs, position_mask, supports_hidden_path
from qwen_distillation.paths import locate, resolve_path
from qwen_distillation.training.teacher import Launched

log = logging.getLogger(__name__)


def teacher_description(spec, seed: int) -> str:
    """The teacher as the cache's identity names it: where its weights come from, and ``:fp8``
    for the FP8 teacher (``model.teacher.fp8``; ``:fp8-fast-accum`` with ``fp8_fast_accum``), whose
    distribution is not the original's: a cache it wrote never matches a run of the original
    teacher, nor the other way round. (``fp8_head`` changes only the online loss's teacher logits;
    the cache writer reads the teacher's own ``lm_head``.)"""
    if spec.random_init:
        name = f"random_init:{json.dumps(dict(spec.random_init), sort_keys=True)}:seed={seed}"
    else:
        name = ":".join(str(v) for v in (spec.path, spec.gguf_file, spec.revision) if v)
    return name + ((":fp8-fast-accum" if spec.fp8_fast_accum else ":fp8") if spec.fp8 else "")


def teacher_fingerprint(spec) -> str | None:
    """The sampled :func:`~qwen_distillation.data.generated.model_fingerprint` of a local teacher's
    weights, which :func:`teacher_description` (its path) does not tell apart from another model saved
    at the same path; None for a random-init teacher or a hub id."""
    if spec.random_init or not spec.path:
        return None
    return model_fingerprint(resolve_path(spec.path), spec.gguf_file)


def source_paths(sources: list[DataSource]) -> dict[str, str]:
    """``{source name as examples carry it: local file path}``."""
    return {s.path: locate(s.path) for s in sources}


# What every manifest the cache writer wrote holds (cache_identity): a manifest.json without them is
# another tool's file, not a teacher cache's.
MANIFEST_KEYS = ("format_version", "teacher", "tokenizer", "vocab_size", "data", "max_length")


def not_a_cache_manifest(identity) -> str | None:
    """Why a directory's ``manifest.json``, as read, is not a teacher cache's (a JSON list, another
    tool's manifest), or None when it is one."""
    if not isinstance(identity, dict):
        return f"it holds a JSON {type(identity).__name__}, not a teacher cache's identity"
    missing = [key for key in MANIFEST_KEYS if key not in identity]
    if missing:
        return f"it has no {', '.join(missing)}: it was not written by the cache command"
    return None


def data_identity(sources: list[DataSource], hashes: dict[str, str | None]) -> list[dict]:
    return [{"path": s.path, "sha256": hashes.get(s.path), "format": s.format, "split": s.split, "subset": s.subset,
             "max_records": s.max_records} for s in sources]


@dataclass
class CacheSpec:
    """The identity a run's data and models give a cache, and each example's key."""

    identity: dict
    hashes: dict[str, str | None]

    def key(self, example: dict) -> str:
        return example_key(example, self.hashes)


def cache_spec(*, teacher_spec, seed: int, tokenizer, vocab_size: int, sources: list[DataSource], max_length: int,
               k: int | None, dtype: str | None) -> CacheSpec:
    """The identity of a cache of these inputs (``k``/``dtype`` None: what a training stage asks
    for, which reads a cache of any k and dtype) and the data files' hashes."""
    hashes = source_hashes(source_paths(sources))
    identity = cache_identity(teacher=teacher_description(teacher_spec, seed), tokenizer=tokenizer_description(
        tokenizer), vocab_size=vocab_size, data=data_identity(sources, hashes), max_length=max_length, k=k, dtype=dtype,
        teacher_fingerprint=teacher_fingerprint(teacher_spec))
    return CacheSpec(identity, hashes)


@torch.no_grad()
def teacher_entries(teacher: nn.Module, batch: dict[str, torch.Tensor], *, vocab_size: int, k: int,
                    chunk_size: int = 1024) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per example of the collated ``batch``: the teacher's (ids (n, k), logprobs (n, k), tail (n,))
    at its n response positions, from its final hidden states ``chunk_size`` tokens at a time; from the
    model's own logits where they are more than ``hidden @ lm_head.weight.T`` (a final softcap, a logit
    scale, a head bias: :func:`~qwen_distillation.modeling.parts.supports_hidden_path`), as the online
    teacher's are."""
    mask = position_mask(batch["labels"])
    if supports_hidden_path(teacher):
        decoder, head = decoder_and_head(teacher)
        rows = decoder(**model_inputs(batch)).last_hidden_state[mask]
        weight = head.weight[:vocab_size]

        def logits(rows):
            return rows @ weight.T
    else:
        rows = teacher(**model_inputs(batch)).logits[mask]

        def logits(rows):
            return rows[:, :vocab_size]
    parts = [teacher_topk(logits(rows[s:s + chunk_size]).float(), k) for s in range(0, rows.shape[0], chunk_size)]
    ids = torch.cat([p.ids for p in parts]) if parts else torch.zeros(0, k, dtype=torch.long)
    logprobs = torch.cat([p.logprobs for p in parts]) if parts else torch.zeros(0, k)
    tail = torch.cat([p.tail_logmass for p in parts]) if parts else torch.zeros(0)
    counts = mask.sum(1).tolist()
    return list(zip(ids.split(counts), logprobs.split(counts), tail.split(counts)))


def responses(example: dict) -> int:
    """Response tokens of an example: the positions whose next token is labelled."""
    return sum(1 for label in example["labels"][1:] if label != -100)


def write_cache(teacher: nn.Module, examples: list[dict], writer: CacheWriter, spec: CacheSpec, *, vocab_size: int,
                k: int, batch_size: int, pad_token_id: int, device: torch.device, autocast: Callable,
                examples_per_shard: int = 256, rank: int = 0, world_size: int = 1,
                progress: Callable[[int], None] | None = None) -> int:
    """Cache the teacher's top-k over ``examples`` not yet in the cache; this rank takes every
    ``world_size``-th example. One shard per ``examples_per_shard`` examples, each written whole.
    Returns the number of examples written."""
    todo = [e for i, e in enumerate(examples) if i % world_size == rank and spec.key(e) not in writer.done]
    written = 0
    teacher.eval()
    for start in range(0, len(todo), examples_per_shard):
        group = todo[start:start + examples_per_shard]
        entries = []
        # Sorted by length inside the shard: less padding; the shard's metadata keeps the keys.
        group = sorted(group, key=lambda e: len(e["input_ids"]))
        for b in range(0, len(group), batch_size):
            chunk = group[b:b + batch_size]
            batch = {name: value.to(device) for name, value in collate(chunk, pad_token_id).items()}
            with autocast():
                per_example = teacher_entries(teacher, batch, vocab_size=vocab_size, k=k)
            for example, (ids, logprobs, tail) in zip(chunk, per_example):
                entries.append(CachedExample(spec.key(example), ids_checksum(example["input_ids"]), ids.cpu(),
                                             logprobs.cpu(), tail.cpu()))
        writer.write(entries)
        written += len(group)
        if progress is not None:
            progress(written)
    return written


@dataclass
class CachedTopK:
    """The cached teacher of a micro-batch, at the positions ``position_mask(labels)`` selects, in
    its order: ``ids`` (N, k) int64, ``logprobs`` (N, k) fp32, ``tail_logmass`` (N,) fp32."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor


class CachedTeacher:
    """The teacher runner of a stage that reads a cache: looks the micro-batch's examples up (by the
    ``example_id`` the run gave each training example) and returns their rows, never a model.

    Args:
        reader: the open cache.
        examples: the run's training examples, indexed by their ``example_id``.
        spec: the run's cache identity (keys of the examples).
        tail: the stage's ``teacher.tail``.
    """

    def __init__(self, reader: CacheReader, examples: list[dict], spec: CacheSpec, *, tail: str, where: str):
        why = not_a_cache_manifest(reader.identity)
        if why:
            raise ConfigError(f"{where}={reader.directory}: its manifest.json is not a teacher cache's ({why}); "
                              f"give the --out directory of `python -m qwen_distillation.cache_teacher`")
        differences = identity_differences(reader.identity, spec.identity)
        if differences:
            raise ConfigError(f"{where}={reader.directory}: the cache does not match this stage: "
                              f"{'; '.join(differences)}; write a cache for it with `python -m "
                              f"qwen_distillation.cache_teacher --out DIR` and the run's config")
        self.reader, self.tail = reader, tail
        self.keys = [(spec.key(e), ids_checksum(e["input_ids"]), responses(e)) for e in examples]
        self.examples = examples

    def check_examples(self, example_ids: Iterable[int]) -> None:
        """Every example of ``example_ids`` is in the cache, with the run's tokens: a stage checks its
        examples before it starts (and before an old run is cleared), not at the first one missing. The
        error names the example's source and record, which its key (a content hash) does not."""
        for example_id in example_ids:
            try:
                self.reader.locate(*self.keys[example_id])
            except ConfigError as err:
                example = self.examples[example_id]
                raise ConfigError(f"{location(example['source'], example['index'])}: {err}") from None

    def __call__(self, batch: dict[str, torch.Tensor], plan) -> Launched[CachedTopK] | None:
        if not plan.needs_teacher:
            return None
        # example_id stays on the host (data.manager.to_device): the lookup waits for no device.
        parts = [self.reader.lookup(*self.keys[int(i)]) for i in batch["example_id"].tolist()]
        device = batch["input_ids"].device
        rows = [torch.cat([p[j] for p in parts]) for j in range(3)]
        if device.type == "cuda":  # from pinned memory the copy does not block the host
            rows = [r.pin_memory() for r in rows]
        ids, logprobs, tail = (r.to(device, non_blocking=True) for r in rows)
        return Launched(CachedTopK(ids, logprobs, tail))
