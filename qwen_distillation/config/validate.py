"""Range checks on a composed config; each error names the override that fixes it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

from qwen_distillation.config.schema import DistillationConfig, EvalConfig, StageConfig
from qwen_distillation.data.formats import FORMATS
from qwen_distillation.errors import ConfigError
from qwen_distillation.losses.fused import KERNELS, TRITON_KINDS

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
RATIO_SCHEDULES = ("constant", "linear", "cosine", "step")
LR_SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BALANCING = ("none", "gradnorm", "pcgrad")
FEATURE_LOSSES = ("mse", "cosine")
ATTENTION_MODES = ("relations", "attention")
SAMPLING_MODES = ("uniform", "hard")
DATA_FORMATS = ("auto", *FORMATS)
SOURCE_KEYS = ("path", "format", "split", "subset", "max_records")
MCQ_SOURCE_KEYS = ("path", "name", "format", "split", "subset")
# A set's name becomes part of a metric key: eval/mcq/<name>_accuracy.
MCQ_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
BEST_MODES = ("auto", "min", "max")
STAGES = ("stage1", "stage2", "stage3")


@dataclasses.dataclass(frozen=True)
class DataSource:
    """One data source after normalisation (a bare string becomes ``DataSource(path=...)``)."""

    path: str
    format: str = "auto"
    split: str = "train"
    subset: str | None = None
    max_records: int | None = None


@dataclasses.dataclass(frozen=True)
class MCQSource:
    """One ``eval.mcq`` entry after normalisation; ``name`` names its metric."""

    name: str
    path: str
    format: str = "auto"
    split: str = "train"
    subset: str | None = None


def _fail(key: str, value: Any, why: str, example: str) -> None:
    raise ConfigError(f"{key}={value}: {why} (override it, e.g. `{example}`)")


def _check(ok: bool, key: str, value: Any, why: str, example: str) -> None:
    if not ok:
        _fail(key, value, why, example)


def _one_of(key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    _check(value in allowed, key, value, f"must be one of {', '.join(allowed)}", f"{key}={allowed[0]}")


def _validate_stage(key: str, stage: StageConfig) -> None:
    _check(stage.temperature > 0, f"{key}.temperature", stage.temperature, "the temperature must be > 0",
           f"{key}.temperature=2")
    weights = dataclasses.asdict(stage.loss.weights)
    for name, weight in weights.items():
        _check(weight >= 0, f"{key}.loss.weights.{name}", weight, "loss weights must be >= 0",
               f"{key}.loss.weights.{name}=0.5")
    _check(sum(weights.values()) > 0, f"{key}.loss.weights", weights, "at least one loss weight must be > 0",
           f"{key}.loss.weights.ce=1")
    loss = stage.loss
    _one_of(f"{key}.loss.kd", loss.kd, KD_KINDS)
    _one_of(f"{key}.loss.kernel", loss.kernel, KERNELS)
    if loss.kernel in ("triton", "liger"):
        _check(loss.kd in TRITON_KINDS, f"{key}.loss.kernel", loss.kernel,
               f"computes loss.kd in {sorted(TRITON_KINDS)}, not {loss.kd!r}", f"{key}.loss.kernel=auto")
    _one_of(f"{key}.loss.balancing.method", loss.balancing.method, BALANCING)
    _check(loss.balancing.gradnorm_lr > 0, f"{key}.loss.balancing.gradnorm_lr", loss.balancing.gradnorm_lr,
           "must be > 0", f"{key}.loss.balancing.gradnorm_lr=0.025")
    _one_of(f"{key}.loss.feature.loss", loss.feature.loss, FEATURE_LOSSES)
    _one_of(f"{key}.loss.attention.mode", loss.attention.mode, ATTENTION_MODES)
    for part in ("feature", "attention"):
        sub = getattr(loss, part)
        if sub.num_pairs is not None:
            _check(sub.num_pairs >= 1, f"{key}.loss.{part}.num_pairs", sub.num_pairs, "must be >= 1 (or null)",
                   f"{key}.loss.{part}.num_pairs=1")
        if sub.layer_map is not None:
            ok = all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in sub.layer_map) and sub.layer_map
            _check(bool(ok), f"{key}.loss.{part}.layer_map", sub.layer_map,
                   "must be a non-empty list of [student_layer, teacher_layer] pairs",
                   f"{key}.loss.{part}.layer_map=[[0,1],[1,3]]")
    _check(loss.attention.relation_heads >= 1, f"{key}.loss.attention.relation_heads", loss.attention.relation_heads,
           "must be >= 1", f"{key}.loss.attention.relation_heads=8")
    _check(loss.attention.chunk_size >= 1, f"{key}.loss.attention.chunk_size", loss.attention.chunk_size,
           "must be >= 1", f"{key}.loss.attention.chunk_size=256")
    _check(loss.contrastive.temperature > 0, f"{key}.loss.contrastive.temperature", loss.contrastive.temperature,
           "must be > 0", f"{key}.loss.contrastive.temperature=0.1")
    _check(loss.contrastive.projection_dim >= 1, f"{key}.loss.contrastive.projection_dim",
           loss.contrastive.projection_dim, "must be >= 1", f"{key}.loss.contrastive.projection_dim=256")
    sampling = stage.sampling
    _one_of(f"{key}.sampling.mode", sampling.mode, SAMPLING_MODES)
    _check(0 < sampling.uniform_floor <= 1, f"{key}.sampling.uniform_floor", sampling.uniform_floor,
           "must be in (0, 1] so no example starves", f"{key}.sampling.uniform_floor=0.3")
    _check(sampling.temperature > 0, f"{key}.sampling.temperature", sampling.temperature, "must be > 0",
           f"{key}.sampling.temperature=1")
    _check(sampling.rescore_every >= 1, f"{key}.sampling.rescore_every", sampling.rescore_every, "must be >= 1",
           f"{key}.sampling.rescore_every=50")
    if sampling.max_scored is not None:
        _check(sampling.max_scored >= 1, f"{key}.sampling.max_scored", sampling.max_scored, "must be >= 1 (or null)",
               f"{key}.sampling.max_scored=256")
    _check(0 <= stage.loss.jsd_beta <= 1, f"{key}.loss.jsd_beta", stage.loss.jsd_beta, "must be in [0, 1]",
           f"{key}.loss.jsd_beta=0.5")
    _check(0 <= stage.loss.skew_alpha < 1, f"{key}.loss.skew_alpha", stage.loss.skew_alpha, "must be in [0, 1)",
           f"{key}.loss.skew_alpha=0.1")
    _check(stage.loss.chunk_size >= 0, f"{key}.loss.chunk_size", stage.loss.chunk_size,
           "must be >= 0 (0 materialises full logits)", f"{key}.loss.chunk_size=1024")
    ratio = stage.medical_ratio
    _one_of(f"{key}.medical_ratio.schedule", ratio.schedule, RATIO_SCHEDULES)
    for end in ("start", "end"):
        value = getattr(ratio, end)
        _check(0 <= value <= 1, f"{key}.medical_ratio.{end}", value, "a ratio must be in [0, 1]",
               f"{key}.medical_ratio.{end}=0.5")
    _check(ratio.num_steps >= 1, f"{key}.medical_ratio.num_steps", ratio.num_steps, "must be >= 1",
           f"{key}.medical_ratio.num_steps=5")
    _check(stage.lr > 0, f"{key}.lr", stage.lr, "the learning rate must be > 0", f"{key}.lr=1e-5")
    _check(stage.batch_size >= 1, f"{key}.batch_size", stage.batch_size, "must be >= 1", f"{key}.batch_size=8")
    _check(stage.grad_accum >= 1, f"{key}.grad_accum", stage.grad_accum, "must be >= 1", f"{key}.grad_accum=1")
    _check(stage.epochs > 0 or (stage.max_steps or 0) > 0, f"{key}.epochs", stage.epochs,
           "set epochs > 0 or max_steps > 0", f"{key}.epochs=1")
    if stage.max_steps is not None:
        _check(stage.max_steps >= 1, f"{key}.max_steps", stage.max_steps, "must be >= 1 (or null)",
               f"{key}.max_steps=100")
    _check(0 <= stage.warmup_ratio <= 1, f"{key}.warmup_ratio", stage.warmup_ratio, "must be in [0, 1]",
           f"{key}.warmup_ratio=0.05")
    _check(0 <= stage.min_lr_ratio <= 1, f"{key}.min_lr_ratio", stage.min_lr_ratio, "must be in [0, 1]",
           f"{key}.min_lr_ratio=0.1")
    _one_of(f"{key}.lr_scheduler", stage.lr_scheduler, LR_SCHEDULERS)
    _check(stage.max_grad_norm >= 0, f"{key}.max_grad_norm", stage.max_grad_norm, "must be >= 0 (0 disables)",
           f"{key}.max_grad_norm=1.0")
    _one_of(f"{key}.best_mode", stage.best_mode, BEST_MODES)
    for name in ("eval_every", "save_every"):
        value = getattr(stage, name)
        _check(value >= 0, f"{key}.{name}", value, "must be >= 0 (0 = only at the end of the stage)",
               f"{key}.{name}=50")
    if sampling.mode == "hard":
        ratio = stage.medical_ratio
        _check(ratio.schedule == "constant" and ratio.start in (0.0, 1.0), f"{key}.sampling.mode", sampling.mode,
               "hard-example sampling draws from one domain: it needs medical_ratio constant 0 or 1",
               f"{key}.sampling.mode=uniform")


def normalise_sources(key: str, sources: Iterable[Any]) -> list[DataSource]:
    """Turn the entries of ``data.general`` / ``data.medical`` / ``data.eval`` into DataSources."""
    out = []
    for i, entry in enumerate(sources):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            _fail(where, entry, "a data source is a path/dataset name or a mapping with a `path`",
                  f"{key}=[my_data.jsonl]")
        unknown = sorted(set(entry) - set(SOURCE_KEYS))
        if unknown:
            _fail(where, entry, f"unknown key(s) {unknown}; valid keys are {', '.join(SOURCE_KEYS)}",
                  f"{key}=[{{path: my_data.jsonl, format: alpaca}}]")
        if not entry.get("path"):
            _fail(where, entry, "a data source needs a non-empty `path`", f"{key}=[my_data.jsonl]")
        source = DataSource(**{k: v for k, v in entry.items() if v is not None or k in ("subset", "max_records")})
        _one_of(f"{where}.format", source.format, DATA_FORMATS)
        if source.max_records is not None:
            _check(source.max_records >= 1, f"{where}.max_records", source.max_records, "must be >= 1",
                   f"{where}.max_records=1000")
        out.append(source)
    return out


def normalise_mcq_sources(key: str, entries: Iterable[Any]) -> list[MCQSource]:
    """Turn the entries of ``eval.mcq`` (``PATH``, ``NAME=PATH`` or a mapping) into MCQSources
    with unique names; a bare path is named after its file stem."""
    from qwen_distillation.evaluation.mcq import MCQ_FORMATS  # torch is imported only when needed

    out: list[MCQSource] = []
    example = f"{key}=[{{name: medqa, path: my_mcq.jsonl}}]"
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if isinstance(entry, str):
            name, eq, path = entry.partition("=")
            entry = {"name": name, "path": path} if eq and MCQ_NAME.match(name) else {"path": entry}
        if not isinstance(entry, dict):
            _fail(where, entry, "an MCQ set is PATH, NAME=PATH or a mapping with a `path`", example)
        unknown = sorted(set(entry) - set(MCQ_SOURCE_KEYS))
        if unknown:
            _fail(where, entry, f"unknown key(s) {unknown}; valid keys are {', '.join(MCQ_SOURCE_KEYS)}",
                  f"{key}=[{{name: medqa, path: my_mcq.jsonl, format: cmexam}}]")
        if not entry.get("path"):
            _fail(where, entry, "an MCQ set needs a non-empty `path`", example)
        fields = {k: v for k, v in entry.items() if v is not None or k == "subset"}
        fields.setdefault("name", Path(str(entry["path"]).split(":")[-1]).stem)
        source = MCQSource(**fields)
        _check(bool(MCQ_NAME.match(source.name)), f"{where}.name", source.name,
               "a set name may hold only letters, digits, '_', '.' and '-' (it names eval/mcq/<name>_accuracy)",
               f"{where}.name=medqa")
        _check(source.name not in {s.name for s in out}, f"{where}.name", source.name,
               "two MCQ sets share this name; name them apart", example)
        _one_of(f"{where}.format", source.format, ("auto", *MCQ_FORMATS))
        out.append(source)
    return out


def _validate_eval(cfg: EvalConfig) -> None:
    _check(cfg.agreement_top_k >= 1, "eval.agreement_top_k", cfg.agreement_top_k, "must be >= 1",
           "eval.agreement_top_k=5")
    for name in ("mcq_max_items", "samples_max_prompts"):
        value = getattr(cfg, name)
        if value is not None:
            _check(value >= 1, f"eval.{name}", value, "must be >= 1 (or null for all)", f"eval.{name}=8")
    _check(cfg.max_new_tokens >= 1, "eval.max_new_tokens", cfg.max_new_tokens, "must be >= 1",
           "eval.max_new_tokens=64")
    if cfg.samples:
        _check(bool(cfg.prompts), "eval.prompts", cfg.prompts, "eval.samples=true needs a prompts file",
               "eval.prompts=package:qwen_distillation/data/demo/prompts.jsonl")
    normalise_mcq_sources("eval.mcq", cfg.mcq)


def validate_config(cfg: DictConfig | DistillationConfig) -> DistillationConfig:
    """Check ranges and return the config as a typed :class:`DistillationConfig` object."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    for key, value in (("start_stage", cfg.start_stage), ("end_stage", cfg.end_stage)):
        _check(1 <= value <= 3, key, value, "stages are numbered 1..3", f"{key}=2")
    _check(cfg.start_stage <= cfg.end_stage, "start_stage", cfg.start_stage,
           f"start_stage must not exceed end_stage={cfg.end_stage}", f"end_stage={max(cfg.start_stage, 1)}")
    for key in STAGES:
        _validate_stage(key, getattr(cfg, key))
    data = cfg.data
    _check(data.max_length >= 16, "data.max_length", data.max_length, "must be >= 16 tokens", "data.max_length=512")
    _check(0 <= data.eval_fraction <= 0.5, "data.eval_fraction", data.eval_fraction, "must be in [0, 0.5]",
           "data.eval_fraction=0.05")
    _check(data.max_eval_examples >= 1, "data.max_eval_examples", data.max_eval_examples, "must be >= 1",
           "data.max_eval_examples=64")
    for key in ("general", "medical", "eval"):
        normalise_sources(f"data.{key}", getattr(data, key))
    _validate_eval(cfg.eval)
    _one_of("train.precision", cfg.train.precision, PRECISIONS)
    _check(cfg.train.device == "auto" or cfg.train.device.split(":")[0] in ("cpu", "cuda"), "train.device",
           cfg.train.device, "must be auto, cpu, cuda or cuda:N", "train.device=cpu")
    _check(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", cfg.train.max_bad_steps, "must be >= 1",
           "train.max_bad_steps=10")
    _one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("auto", "online", "offline", "disabled"))
    student = cfg.model.student
    if student.keep_layers is not None:
        _check(student.keep_layers >= 1, "model.student.keep_layers", student.keep_layers, "must be >= 1",
               "model.student.keep_layers=15")
    if cfg.lora.quantize_4bit and not cfg.lora.enabled:
        _fail("lora.quantize_4bit", True, "QLoRA needs LoRA on", "lora.enabled=true")
    _check(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "must be >= 1", "lora.r=16")
    _check(bool(cfg.output_dir), "output_dir", cfg.output_dir, "must be a directory path", "output_dir=outputs/run")
    return cfg
