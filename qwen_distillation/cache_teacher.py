"""Run the teacher once over a run's training data and write its top-k cache.

    python -m qwen_distillation.cache_teacher --out out/teacher_cache --k 32
    python run_distillation.py stage1.teacher.source=cache stage1.teacher.cache=out/teacher_cache

The same config as a run (``conf/``, Hydra overrides, the classic flags such as ``--teacher_model``
and ``--general_dataset``): the teacher, the tokenizer the run encodes its data with (the student's;
the teacher's for a student pruned from it), ``data.*`` (the training examples of
``data.general`` and ``data.medical``, held-out ones excluded, as the run splits them) and
``train.device`` / ``train.precision``; with ``model.teacher.fp8=true`` the FP8 teacher writes the
cache and the cache's identity names it, so only a run with the FP8 teacher reads it. For every
response token the cache holds the teacher's ``--k`` most probable token ids, their
log-probabilities and the log of the rest of its mass (docs/teacher_offline.md). A killed run
continues where it stopped (shards are written whole);
``torchrun --nproc_per_node N -m qwen_distillation.cache_teacher ...`` splits the examples over the
ranks, each writing (and, when the cache is replaced, deleting) only its own shards; each shard
records the identity it was written under, so the ranks need no process group. A directory holding
a cache of other inputs is refused unless ``--overwrite`` (so is one whose ``manifest.json`` cannot
be read, when it holds nothing but a cache's files); one holding other files and no cache, another
tool's ``manifest.json``, or lying inside a data directory, always. No training examples (empty
``data.general`` and ``data.medical``) is refused.
Prints one JSON line: examples, response tokens, seconds, tokens/s, bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import time
from pathlib import Path

import torch

from qwen_distillation.errors import CheckpointError, ConfigError
from qwen_distillation.paths import refuse_file_in_the_way, some_names

log = logging.getLogger(__name__)
# The files of a cache directory: its manifest, the ranks' shards, and what a killed writer left half-written.
CACHE_FILE = re.compile(r"manifest\.json|shard-R\d+-\d+\.safetensors|\..+\.tmp")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_distillation.cache_teacher",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments: classic flags and Hydra overrides, as for "
                                            "run_distillation.py.", allow_abbrev=False)
    parser.add_argument("--out", required=True, type=os.path.expanduser, help="the cache directory")
    parser.add_argument("--k", type=int, default=32, help="top-k token ids kept per response token")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the stored log-probabilities (ids are int32, the tail log-mass fp32)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--examples_per_shard", type=int, default=256)
    parser.add_argument("--overwrite", action="store_true", help="replace a cache of other inputs in --out")
    return parser


def run_tokenizer(model_cfg):
    """The tokenizer a run of ``model_cfg`` encodes its data with, whose ids the online teacher reads: the
    student's (the teacher's, for a student pruned from it). The cache is of those ids, or the run refuses
    it (another chat template: other ids and another tokenizer hash). Its vocabulary must be the teacher's."""
    from qwen_distillation.config.validate import pruned_from_teacher
    from qwen_distillation.modeling.pair import tokenizer_for
    from qwen_distillation.modeling.vocab import shared_vocab_size

    def source(spec):
        return (spec.tokenizer,) if spec.tokenizer else (spec.path, spec.gguf_file, spec.revision)

    teacher_spec, student_spec = model_cfg.teacher, model_cfg.student
    teacher = tokenizer_for(teacher_spec, "teacher")
    if pruned_from_teacher(student_spec) or source(student_spec) == source(teacher_spec):
        return teacher
    student = tokenizer_for(student_spec, "student")
    shared_vocab_size(teacher, student, len(student), len(student), teacher_spec.path or "model.teacher",
                      student_spec.path or "model.student")  # the run refuses other vocabularies alike
    return student


def existing_cache(out: Path, overwrite: bool) -> tuple[list[Path], dict | None]:
    """Check what ``out`` holds under its ``manifest.json``, before anything loads. Returns the files of
    a cache whose manifest cannot be read, which ``--overwrite`` replaces once the teacher has loaded
    ([] when there is no manifest or it reads), and the identity the manifest holds (None when there is
    none or it cannot be read). Refused: a manifest that is not a teacher cache's (another tool's
    ``manifest.json``), even with ``--overwrite``; an unreadable one without it, or beside files a cache
    does not hold."""
    from qwen_distillation.data.teacher_cache import MANIFEST, read_manifest
    from qwen_distillation.training.teacher_cache import not_a_cache_manifest

    if not (out / MANIFEST).exists():
        return [], None
    try:
        identity = read_manifest(out)
    except CheckpointError as err:
        if not overwrite:
            raise
        entries = sorted(out.iterdir())
        others = [e.name for e in entries if not (e.is_file() and CACHE_FILE.fullmatch(e.name))]
        if others:
            raise ConfigError(f"--out {out}: its {MANIFEST} cannot be read and it holds {some_names(others)}, "
                              f"which a teacher cache does not; choose an empty or new directory for the "
                              f"cache") from err
        return entries, None
    why = not_a_cache_manifest(identity)
    if why:
        raise ConfigError(f"--out {out}: its {MANIFEST} is not a teacher cache's ({why}); --overwrite "
                          f"replaces only a teacher cache: choose an empty or new directory for the cache")
    return [], identity


def cache_teacher(cfg, out: Path, *, k: int, dtype: str = "float32", batch_size: int = 8,
                  examples_per_shard: int = 256, overwrite: bool = False) -> dict:
    """Write (or complete) the teacher cache of ``cfg``'s training data in ``out``; returns the stats."""
    from qwen_distillation.data.sources import build_domain_data, data_sources
    from qwen_distillation.data.teacher_cache import MANIFEST, CacheWriter
    from qwen_distillation.modeling.fp8 import check_fp8_device, convert_to_fp8
    from qwen_distillation.modeling.loading import load_causal_lm
    from qwen_distillation.modeling.parts import weight_shape
    from qwen_distillation.modeling.tokenizer import pad_token_id
    from qwen_distillation.training.distiller import data_entries, seed_everything, select_device
    from qwen_distillation.training.distributed import env_topology
    from qwen_distillation.training.outputs import refuse_output_among_inputs
    from qwen_distillation.training.teacher_cache import cache_spec, write_cache

    if k < 1:
        raise ConfigError(f"--k {k}: keep at least one token id per position")
    for flag, value in (("--batch_size", batch_size), ("--examples_per_shard", examples_per_shard)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1 (e.g. `{flag} 8`)")
    refuse_file_in_the_way(out, f"--out {out}", "give a directory for the cache")
    topo = env_topology()
    rank, world_size = topo.rank, topo.world_size
    device, precision = select_device(cfg.train)
    if device.type == "cuda" and world_size > 1:
        device = torch.device("cuda", topo.local_rank)
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    tokenizer = run_tokenizer(cfg.model)
    sources = data_sources(cfg.data)
    refuse_output_among_inputs(out, f"--out {out}", data_entries(sources), holding=True,
                               why="a run over that data would read the cache's files as records",
                               fix="write the cache elsewhere (e.g. --out out/teacher_cache)")
    # Another rank may be writing the manifest (under a temporary name): that alone is this cache's.
    foreign = sorted(e.name for e in Path(out).iterdir() if e.name != f".{MANIFEST}.tmp") if Path(out).is_dir() else []
    if foreign and not (Path(out) / MANIFEST).exists():
        raise ConfigError(f"--out {out}: is not empty ({some_names(foreign)})"
                          f" and holds no teacher cache (no {MANIFEST}); choose an empty or new directory for the "
                          f"cache")
    damaged, cached = existing_cache(Path(out), overwrite)
    data = build_domain_data(sources, tokenizer, max_length=cfg.data.max_length,
                             eval_fraction=cfg.data.eval_fraction, max_eval_examples=cfg.data.max_eval_examples,
                             seed=cfg.data.split_seed)
    examples = data.general + data.medical
    if not examples:  # else an empty cache, written and reported as a success
        raise ConfigError("data.general, data.medical: no training examples to cache (both are empty); the cache "
                          "holds the teacher's top-k over a run's training data: give some, e.g. "
                          "data.general=[my_data.jsonl]")
    vocab_size = len(tokenizer)
    spec = cache_spec(teacher_spec=cfg.model.teacher, seed=cfg.seed, tokenizer=tokenizer, vocab_size=vocab_size,
                      sources=sources["general"] + sources["medical"], max_length=cfg.data.max_length, k=k,
                      dtype=dtype)
    if k > vocab_size:
        raise ConfigError(f"--k {k}: larger than the vocabulary ({vocab_size} tokens)")
    if cached is not None:  # before the teacher loads (minutes)
        CacheWriter.check(out, spec.identity, overwrite=overwrite, cached=cached)
    seed_everything(cfg.seed)  # a random-init teacher gets the weights a run with this seed gives it
    if cfg.model.teacher.fp8:
        check_fp8_device(device)
    teacher = load_causal_lm(cfg.model.teacher, dtype=teacher_dtype, role="teacher").to(device).eval()
    if cfg.model.teacher.fp8:  # the identity says so (teacher_description): a bf16 run never reads this cache
        convert_to_fp8(teacher, fast_accum=cfg.model.teacher.fp8_fast_accum)
    if weight_shape(teacher.get_output_embeddings().weight)[0] < vocab_size:
        raise ConfigError(f"model.teacher: its lm_head has fewer columns than its tokenizer has tokens "
                          f"({vocab_size}); the model and tokenizer do not belong together")
    # Only now, with the teacher loaded, may --overwrite delete the old cache's shards. The writer of each
    # rank deletes only its own (rank 0 also those of ranks past world_size): the ranks share no process
    # group, and another rank may be reading the directory or writing its shards meanwhile.
    if damaged and rank == 0:  # a cache whose manifest cannot be read: replaced, as --overwrite says
        log.warning("--out %s: its %s cannot be read; --overwrite replaces the cache there (%d file(s))", out,
                    MANIFEST, len(damaged))
    writer = CacheWriter(out, spec.identity, rank=rank, world_size=world_size, overwrite=overwrite)
    autocast = (lambda: torch.autocast(device.type, dtype=teacher_dtype)) if teacher_dtype != torch.float32 else (
        lambda: torch.autocast(device.type, enabled=False))
    pad = pad_token_id(tokenizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    mine = [e for i, e in enumerate(examples) if i % world_size == rank and spec.key(e) not in writer.done]
    tokens = sum(sum(1 for label in e["labels"][1:] if label != -100) for e in mine)
    written = write_cache(teacher, examples, writer, spec, vocab_size=vocab_size, k=k, batch_size=batch_size,
                          pad_token_id=pad, device=device, autocast=autocast, examples_per_shard=examples_per_shard,
                          rank=rank, world_size=world_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    disk = sum(p.stat().st_size for p in Path(out).glob(f"shard-R{rank:05d}-*.safetensors"))
    all_tokens = sum(sum(1 for label in e["labels"][1:] if label != -100) for e in examples)
    return {"out": str(out), "rank": rank, "k": k, "dtype": dtype, "examples_written": written,
            "tokens_written": tokens, "examples_total": len(examples), "tokens_total": all_tokens,
            "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "shard_bytes_this_rank": disk, "device": str(device), "precision": precision}


def main(argv: list[str] | None = None) -> None:
    from qwen_distillation.cli import config_command

    def body(args, cfg):
        print(json.dumps(cache_teacher(cfg, Path(args.out), k=args.k, dtype=args.dtype, batch_size=args.batch_size,
                                       examples_per_shard=args.examples_per_shard, overwrite=args.overwrite)))

    config_command(_parser(), argv, body,
                   one_device="the cache command runs the whole teacher on each process: under torchrun every rank "
                              "loads it unsharded and writes its own share of the examples")

if __name__ == "__main__":
    main()
