"""Range checks on a composed config; each error names the override that fixes it."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qwen_distillation.config.presets import preset_names
from qwen_distillation.config.schema import (RENAMED_KEYS, DistillationConfig, DistributedConfig, EvalConfig,
                                             LoraConfig, MedicalRatioConfig, StageConfig)
from qwen_distillation.errors import ConfigError, require, require_one_of

KD_KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tv")
RATIO_SCHEDULES = ("constant", "linear", "cosine", "step")
LR_SCHEDULERS = ("cosine", "linear", "constant")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BALANCING = ("none", "gradnorm", "pcgrad")
FEATURE_LOSSES = ("mse", "cosine")
ATTENTION_MODES = ("relations", "attention")
SAMPLING_MODES = ("uniform", "hard")
BEST_MODES = ("auto", "min", "max")
STAGES = ("stage1", "stage2", "stage3")
ENGINES = ("none", "deepspeed", "fsdp2")
BACKENDS = ("auto", "nccl", "gloo")
TEACHER_SOURCES = ("online", "cache")
CACHE_TAILS = ("bucket", "renormalize")  # qwen_distillation.losses.topk.TAILS
CACHE_KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
MAX_TEMPERATURE = 100.0  # a KD temperature above this: the KD term is fp32 round-off times T**2
FAINT_TEMPERATURE = 0.5  # a KD temperature below this: the term's pull on the logits is under half of T = 1's
PRUNE_METHODS = ("even", "block_influence", "perplexity")  # qwen_distillation.modeling.depth.METHODS
PRUNE_SEARCHES = ("single", "greedy")


def _validate_stage(key: str, stage: StageConfig) -> None:
    require(stage.temperature > 0, f"{key}.temperature", stage.temperature, "the temperature must be > 0",
            f"{key}.temperature=2")
    require(stage.temperature <= MAX_TEMPERATURE, f"{key}.temperature", stage.temperature,
            f"must be at most {MAX_TEMPERATURE:g}: far above it both softened distributions are uniform to fp32's "
            f"precision, and the T**2 factor makes the KD term their round-off (even negative)", f"{key}.temperature=4")
    weights = dataclasses.asdict(stage.loss.weights)
    for name, weight in weights.items():
        require(weight >= 0, f"{key}.loss.weights.{name}", weight, "loss weights must be >= 0",
                f"{key}.loss.weights.{name}=0.5")
    require(sum(weights.values()) > 0, f"{key}.loss.weights", weights, "at least one loss weight must be > 0",
            f"{key}.loss.weights.ce=1")
    loss = stage.loss
    require_one_of(f"{key}.loss.kd", loss.kd, KD_KINDS)
    require_one_of(f"{key}.loss.balancing.method", loss.balancing.method, BALANCING)
    require(loss.balancing.gradnorm_lr > 0, f"{key}.loss.balancing.gradnorm_lr", loss.balancing.gradnorm_lr,
            "must be > 0", f"{key}.loss.balancing.gradnorm_lr=0.025")
    require(loss.balancing.gradnorm_alpha >= 0, f"{key}.loss.balancing.gradnorm_alpha", loss.balancing.gradnorm_alpha,
            "GradNorm's asymmetry must be >= 0 (0: equal gradient norms; higher pushes slower-training terms up "
            "harder; below 0 would push them down)", f"{key}.loss.balancing.gradnorm_alpha=1.5")
    require_one_of(f"{key}.loss.feature.loss", loss.feature.loss, FEATURE_LOSSES)
    require_one_of(f"{key}.loss.attention.mode", loss.attention.mode, ATTENTION_MODES)
    for part in ("feature", "attention"):
        sub = getattr(loss, part)
        if sub.num_pairs is not None:
            require(sub.num_pairs >= 1, f"{key}.loss.{part}.num_pairs", sub.num_pairs, "must be >= 1 (or null)",
                    f"{key}.loss.{part}.num_pairs=1")
        if sub.layer_map is not None:
            ok = all(isinstance(pair, (list, tuple)) and len(pair) == 2 for pair in sub.layer_map) and sub.layer_map
            require(bool(ok), f"{key}.loss.{part}.layer_map", sub.layer_map,
                    "must be a non-empty list of [student_layer, teacher_layer] pairs",
                    f"{key}.loss.{part}.layer_map=[[0,1],[1,3]]")
    require(loss.attention.relation_heads >= 1, f"{key}.loss.attention.relation_heads", loss.attention.relation_heads,
            "must be >= 1", f"{key}.loss.attention.relation_heads=8")
    require(loss.attention.chunk_size >= 1, f"{key}.loss.attention.chunk_size", loss.attention.chunk_size,
            "must be >= 1", f"{key}.loss.attention.chunk_size=256")
    require(loss.contrastive.temperature > 0, f"{key}.loss.contrastive.temperature", loss.contrastive.temperature,
            "must be > 0", f"{key}.loss.contrastive.temperature=0.1")
    require(loss.contrastive.projection_dim >= 1, f"{key}.loss.contrastive.projection_dim",
            loss.contrastive.projection_dim, "must be >= 1", f"{key}.loss.contrastive.projection_dim=256")
    if loss.weights.contrastive > 0 and loss.contrastive.domain_aware:
        ratio = stage.medical_ratio  # a flat schedule stays at start (data.manager.stage_domains)
        shares = (ratio.start, ratio.start if _flat_schedule(ratio) else ratio.end)
        require(min(shares) < 1 and max(shares) > 0, f"{key}.loss.contrastive.domain_aware", "true",
                f"{key} serves {'medical' if min(shares) >= 1 else 'general'} data only (medical_ratio "
                f"{ratio.schedule} {ratio.start:g}), so every sequence would be a positive of every other and the "
                f"contrastive term would pull all representations together; domain-aware positives need a stage "
                f"that mixes both domains", f"{key}.loss.contrastive.domain_aware=false")
    sampling = stage.sampling
    require_one_of(f"{key}.sampling.mode", sampling.mode, SAMPLING_MODES)
    require(0 < sampling.uniform_floor <= 1, f"{key}.sampling.uniform_floor", sampling.uniform_floor,
            "must be in (0, 1] so no example starves", f"{key}.sampling.uniform_floor=0.3")
    require(sampling.temperature > 0, f"{key}.sampling.temperature", sampling.temperature, "must be > 0",
            f"{key}.sampling.temperature=1")
    require(sampling.rescore_every >= 1, f"{key}.sampling.rescore_every", sampling.rescore_every, "must be >= 1",
            f"{key}.sampling.rescore_every=50")
    if sampling.max_scored is not None:
        require(sampling.max_scored >= 1, f"{key}.sampling.max_scored", sampling.max_scored, "must be >= 1 (or null)",
                f"{key}.sampling.max_scored=256")
    require(0 <= stage.loss.jsd_beta <= 1, f"{key}.loss.jsd_beta", stage.loss.jsd_beta, "must be in [0, 1]",
            f"{key}.loss.jsd_beta=0.5")
    require(0 <= stage.loss.skew_alpha < 1, f"{key}.loss.skew_alpha", stage.loss.skew_alpha, "must be in [0, 1)",
            f"{key}.loss.skew_alpha=0.1")
    require(stage.loss.chunk_size >= 0, f"{key}.loss.chunk_size", stage.loss.chunk_size,
            "must be >= 0 (0 materialises full logits)", f"{key}.loss.chunk_size=1024")
    ratio = stage.medical_ratio
    require_one_of(f"{key}.medical_ratio.schedule", ratio.schedule, RATIO_SCHEDULES)
    for end in ("start", "end"):
        value = getattr(ratio, end)
        require(0 <= value <= 1, f"{key}.medical_ratio.{end}", value, "a ratio must be in [0, 1]",
                f"{key}.medical_ratio.{end}=0.5")
    require(ratio.plateaus >= 1, f"{key}.medical_ratio.plateaus", ratio.plateaus, "must be >= 1",
            f"{key}.medical_ratio.plateaus=5")
    require(0 < stage.lr < math.inf, f"{key}.lr", stage.lr, "the learning rate must be a finite number > 0",
            f"{key}.lr=1e-5")
    require(0 <= stage.weight_decay < math.inf, f"{key}.weight_decay", stage.weight_decay,
            "must be a finite number >= 0 (0: none)", f"{key}.weight_decay=0.01")
    require(stage.batch_size >= 1, f"{key}.batch_size", stage.batch_size, "must be >= 1", f"{key}.batch_size=8")
    require(stage.grad_accum >= 1, f"{key}.grad_accum", stage.grad_accum, "must be >= 1", f"{key}.grad_accum=1")
    require(stage.epochs >= 0, f"{key}.epochs", stage.epochs,
            "a number of passes over the stage's data must be >= 0 (max_steps, when set, decides the length)",
            f"{key}.epochs=1")
    require(stage.epochs > 0 or (stage.max_steps or 0) > 0, f"{key}.epochs", stage.epochs,
            "set epochs > 0 or max_steps > 0", f"{key}.epochs=1")
    if stage.max_steps is not None:
        require(stage.max_steps >= 1, f"{key}.max_steps", stage.max_steps, "must be >= 1 (or null)",
                f"{key}.max_steps=100")
    if stage.tokens_per_step is not None:
        require(stage.tokens_per_step >= 1, f"{key}.tokens_per_step", stage.tokens_per_step,
                "a step's token budget must be >= 1 (or null: batch_size x grad_accum examples a step)",
                f"{key}.tokens_per_step=16384")
    require(0 <= stage.warmup_ratio <= 1, f"{key}.warmup_ratio", stage.warmup_ratio, "must be in [0, 1]",
            f"{key}.warmup_ratio=0.05")
    require(0 <= stage.min_lr_ratio <= 1, f"{key}.min_lr_ratio", stage.min_lr_ratio, "must be in [0, 1]",
            f"{key}.min_lr_ratio=0.1")
    require_one_of(f"{key}.lr_scheduler", stage.lr_scheduler, LR_SCHEDULERS)
    require(stage.max_grad_norm >= 0, f"{key}.max_grad_norm", stage.max_grad_norm, "must be >= 0 (0 disables)",
            f"{key}.max_grad_norm=1.0")
    require_one_of(f"{key}.best_mode", stage.best_mode, BEST_MODES)
    require(stage.eval_every >= 0, f"{key}.eval_every", stage.eval_every,
            "must be >= 0 (0 = only at the end of the stage)", f"{key}.eval_every=50")
    require(stage.save_every is None or stage.save_every >= 0, f"{key}.save_every", stage.save_every,
            "must be >= 0 (0 = by time only, train.save_every_minutes) or null (every quarter of the stage)",
            f"{key}.save_every=50")
    _validate_stage_teacher(key, stage)
    if sampling.mode == "hard":
        ratio = stage.medical_ratio
        if not (ratio.schedule == "constant" and ratio.start in (0.0, 1.0)):
            # Name the ratio the user set (stage3.medical_ratio.start=0.5 was reported as sampling.mode=hard alone).
            now = (f"{key}.medical_ratio.schedule={ratio.schedule}" if ratio.schedule != "constant"
                   else f"{key}.medical_ratio.start={ratio.start:g}")
            raise ConfigError(f"{key}.sampling.mode=hard: hard-example sampling draws from one domain, so it needs "
                              f"{key}.medical_ratio.schedule=constant with {key}.medical_ratio.start 0 (general data) "
                              f"or 1 (medical data), but {now}; set {key}.medical_ratio.schedule=constant "
                              f"{key}.medical_ratio.start=1 (or 0), or {key}.sampling.mode=uniform")


def _validate_contrastive_batch(key: str, stage: StageConfig, train) -> None:
    """The contrastive term's negatives are the other sequences of a micro-batch: a micro-batch of one
    example (batch_size 1, unless train.pack_step or a token budget packs several into it) makes the
    term exactly 0, so its weight would train nothing."""
    several = train.packing and (train.pack_step or stage.tokens_per_step is not None)
    require(stage.loss.weights.contrastive == 0 or stage.batch_size >= 2 or several, f"{key}.batch_size",
            stage.batch_size, f"{key}.loss.weights.contrastive={stage.loss.weights.contrastive:g} takes its "
            f"negatives from the other sequences of a micro-batch, and a micro-batch of one has none: the term "
            f"would be exactly 0; use a batch_size of at least 2 or {key}.loss.weights.contrastive=0",
            f"{key}.batch_size=4")


def _validate_stage_teacher(key: str, stage: StageConfig) -> None:
    teacher = stage.teacher
    require_one_of(f"{key}.teacher.source", teacher.source, TEACHER_SOURCES)
    require_one_of(f"{key}.teacher.tail", teacher.tail, CACHE_TAILS)
    if teacher.source != "cache":
        return
    require(bool(teacher.cache), f"{key}.teacher.cache", teacher.cache, "source=cache reads a teacher cache "
            "directory", f"{key}.teacher.cache=out/teacher_cache")
    # Every such term at once: stage 2's defaults weigh three of them, which came back one error at a time.
    weights = {f"{key}.loss.weights.{name}": getattr(stage.loss.weights, name)
               for name in ("feature", "attention", "contrastive")}
    hidden = [k for k, weight in weights.items() if weight != 0]
    if hidden:
        raise ConfigError(f"{', '.join(f'{k}={weights[k]}' for k in hidden)}: "
                          f"{'needs' if len(hidden) == 1 else 'need'} the teacher's hidden states, which a top-k "
                          f"logit cache does not hold: set {'it' if len(hidden) == 1 else 'them'} to 0 or use the "
                          f"online teacher (override {'it' if len(hidden) == 1 else 'them'}, e.g. "
                          f"`{' '.join(f'{k}=0' for k in hidden)}`)")
    require(stage.loss.kd in CACHE_KD_KINDS, f"{key}.loss.kd", stage.loss.kd, f"the top-k cache has sparse versions "
            f"of {', '.join(CACHE_KD_KINDS)} only", f"{key}.loss.kd=forward_kl")


# The attention implementations that keep a packed row's examples apart (train.packing): transformers 5
# builds a per-example causal mask from the restarting position ids (sdpa, eager, flex) or runs
# flash attention's varlen kernel from them; ``varlen`` (modeling/varlen.py) runs PyTorch's flash varlen
# kernel from the packed batch's cu_seq_lens; any other implementation would attend across examples.
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", "varlen")
PACK_LAYOUTS = ("rows", "padding_free")  # qwen_distillation.data.manager.PACK_LAYOUTS
# The implementations that read a packed batch's cu_seq_lens and build no (L, L) mask: the one-row
# layout (train.pack_layout=padding_free) would give any other a mask over all of a micro-batch's tokens.
PADDING_FREE_ATTENTION = ("varlen", "flash_attention_2", "flash_attention_3")


def _alloc_conf_shaped(conf) -> bool:
    """Whether ``conf`` has ``PYTORCH_CUDA_ALLOC_CONF``'s shape: non-empty option:value pairs separated
    by commas (PyTorch itself judges the options when the run applies them)."""
    pairs = [item.split(":") for item in conf.split(",")] if isinstance(conf, str) else [[]]
    return all(len(pair) == 2 and all(part.strip() for part in pair) for pair in pairs)


def _validate_packing(cfg: DistillationConfig) -> None:
    """``train.packing`` needs attention that keeps a packed row's examples apart. Every loss term
    works per example on packed rows (training/module.py), so none is refused."""
    require(cfg.train.packing or not cfg.train.pack_step, "train.pack_step", True,
            "packs the step's examples into shared rows, which needs train.packing=true",
            "train.packing=true train.pack_step=true")
    require_one_of("train.pack_layout", cfg.train.pack_layout, PACK_LAYOUTS)
    require(cfg.train.packing or cfg.train.pack_layout == "rows", "train.pack_layout", cfg.train.pack_layout,
            "lays out packed micro-batches, which needs train.packing=true",
            f"train.packing=true train.pack_layout={cfg.train.pack_layout}")
    if not cfg.train.packing:
        return
    for side in ("teacher", "student"):
        implementation = getattr(cfg.model, side).attn_implementation
        if cfg.train.pack_layout == "padding_free":
            require(implementation in PADDING_FREE_ATTENTION, f"model.{side}.attn_implementation", implementation,
                    f"train.pack_layout=padding_free puts a micro-batch's examples in one row, which needs an "
                    f"attention that reads their bounds and builds no mask over the row: one of "
                    f"{', '.join(PADDING_FREE_ATTENTION)} (varlen on a CUDA GPU); otherwise use "
                    f"train.pack_layout=rows", f"model.{side}.attn_implementation=varlen")
        else:
            require(implementation is None or implementation in PACKED_ATTENTION,
                    f"model.{side}.attn_implementation", implementation,
                    f"train.packing=true needs an attention that keeps packed examples apart: one of "
                    f"{', '.join(PACKED_ATTENTION)} (or null); otherwise turn packing off with train.packing=false",
                    f"model.{side}.attn_implementation=sdpa")


def _validate_eval(cfg: EvalConfig) -> None:
    require(cfg.agreement_top_k >= 1, "eval.agreement_top_k", cfg.agreement_top_k, "must be >= 1",
            "eval.agreement_top_k=5")
    for name in ("mcq_max_items", "text_metrics_max_examples", "samples_max_prompts"):
        value = getattr(cfg, name)
        if value is not None:
            require(value >= 1, f"eval.{name}", value, "must be >= 1 (or null for all)", f"eval.{name}=8")
    require(cfg.max_new_tokens >= 1, "eval.max_new_tokens", cfg.max_new_tokens, "must be >= 1",
            "eval.max_new_tokens=64")
    if cfg.samples:
        require(bool(cfg.prompts), "eval.prompts", cfg.prompts, "eval.samples=true needs a prompts file",
                "eval.prompts=package:qwen_distillation/data/demo/prompts.jsonl")


def pruned_from_teacher(student) -> bool:
    """Whether the student is built from the teacher (``keep_layers`` or a width target set)."""
    width = student.prune.width
    return student.keep_layers is not None or any(
        v is not None for v in (width.intermediate_size, width.num_key_value_heads, width.hidden_size))


def pruning_keys(student) -> list[str]:
    """The keys set that build the student from the teacher (:func:`pruned_from_teacher`)."""
    width = [f"model.student.prune.width.{name}" for name in ("intermediate_size", "num_key_value_heads", "hidden_size")
             if getattr(student.prune.width, name) is not None]
    return (["model.student.keep_layers"] if student.keep_layers is not None else []) + width


def _validate_prune(cfg: DistillationConfig) -> None:
    student, prune = cfg.model.student, cfg.model.student.prune
    if student.keep_layers is not None:
        require(student.keep_layers >= 1, "model.student.keep_layers", student.keep_layers, "must be >= 1",
                "model.student.keep_layers=15")
    require_one_of("model.student.prune.method", prune.method, PRUNE_METHODS)
    require_one_of("model.student.prune.perplexity_search", prune.perplexity_search, PRUNE_SEARCHES)
    loaded = next((k for k in ("path", "random_init") if getattr(student, k)), None)  # not built from the teacher
    require(prune.method == "even" or student.keep_layers is not None, "model.student.prune.method", prune.method,
            "chooses which of the teacher's layers model.student.keep_layers keeps, and keep_layers is not set",
            "model.student.keep_layers=15" if loaded is None else
            f"model.student.prune.method=even (the student is model.student.{loaded}, not pruned from the teacher)")
    for name in ("intermediate_size", "num_key_value_heads", "hidden_size"):
        value = getattr(prune.width, name)
        require(value is None or value >= 1, f"model.student.prune.width.{name}", value, "must be >= 1 (null: keep "
                "the teacher's)", f"model.student.prune.width.{name}=null")
    calibration = prune.calibration
    for name in ("num_examples", "batch_size"):
        require(getattr(calibration, name) >= 1, f"model.student.prune.calibration.{name}",
                getattr(calibration, name), "must be >= 1", f"model.student.prune.calibration.{name}=8")
    require(calibration.max_length is None or calibration.max_length >= 16, "model.student.prune.calibration."
            "max_length", calibration.max_length, "must be >= 16 tokens (null: data.max_length)",
            "model.student.prune.calibration.max_length=256")
    if pruned_from_teacher(student) and loaded is not None:
        pruning = pruning_keys(student)
        require(False, f"model.student.{loaded}", getattr(student, loaded),
                f"is set, but {', '.join(pruning)} build{'s' if len(pruning) == 1 else ''} the student from the "
                f"teacher", f"{' '.join(f'{key}=null' for key in pruning)} to use model.student.{loaded}, or "
                f"model.student.{loaded}=null to prune the teacher")
    teacher_prune = OmegaConf.to_container(OmegaConf.structured(cfg.model.teacher.prune))
    default_prune = OmegaConf.to_container(OmegaConf.structured(type(prune)()))
    require(teacher_prune == default_prune, "model.teacher.prune", teacher_prune, "applies to the student only",
            "model.student.prune.method=block_influence")
    require(cfg.model.teacher.keep_layers is None, "model.teacher.keep_layers", cfg.model.teacher.keep_layers,
            "applies to the student only", "model.student.keep_layers=15")


def _validate_fp8(cfg: DistillationConfig) -> None:
    require(not cfg.model.student.fp8, "model.student.fp8", True, "FP8 applies to the frozen teacher only (the "
            "student trains; its weights need their full precision); for an FP8 teacher set model.teacher.fp8=true",
            "model.student.fp8=false")
    for option in ("fp8_head", "fp8_fast_accum"):
        require(not getattr(cfg.model.student, option), f"model.student.{option}", True,
                f"applies to the frozen FP8 teacher only; set model.teacher.{option}=true",
                f"model.student.{option}=false")
        require(cfg.model.teacher.fp8 or not getattr(cfg.model.teacher, option), f"model.teacher.{option}", True,
                "refines the FP8 teacher, which is off (model.teacher.fp8=false)", "model.teacher.fp8=true")
    if cfg.model.teacher.fp8_head:
        for key in STAGES[cfg.start_stage - 1:cfg.end_stage]:
            stage = getattr(cfg, key)
            require(not stage.enabled or stage.loss.kernel != "liger", f"{key}.loss.kernel", "liger",
                    "Liger's loss takes the teacher's lm_head weight, not the FP8 head's logits "
                    "(model.teacher.fp8_head=true)", f"{key}.loss.kernel=auto")


def engine_label(distributed) -> str:
    """How the user chose the engine, for messages: ``distributed=zero3`` or ``--deepspeed FILE``."""
    if distributed.deepspeed_config:
        return f"--deepspeed {distributed.deepspeed_config}"
    # What each option of the group sets (conf/distributed/*.yaml); the keys overridden after it are named too,
    # so `distributed=zero2 distributed.zero_stage=3` is not called zero2 (nor `distributed.engine=fsdp2` none).
    option = {"none": ("none", None, False), "zero2": ("deepspeed", 2, False), "zero3": ("deepspeed", 3, False),
              "zero3_offload": ("deepspeed", 3, True), "fsdp2": ("fsdp2", None, False)}.get(distributed.name)
    ours = (distributed.engine, distributed.zero_stage, distributed.offload)
    if option is None or option == ours:
        return f"distributed={distributed.name}"
    changed = [f"distributed.{key}={str(value).lower() if isinstance(value, bool) else value}"
               for key, value, default in zip(("engine", "zero_stage", "offload"), ours, option) if value != default]
    return " ".join([f"distributed={distributed.name}", *changed])


def _validate_distributed(cfg: DistillationConfig) -> None:
    """The engine and the options it cannot work with, refused before anything starts."""
    d = cfg.distributed
    require_one_of("distributed.engine", d.engine, ENGINES)
    require_one_of("distributed.backend", d.backend, BACKENDS)
    require(d.timeout_minutes > 0, "distributed.timeout_minutes", d.timeout_minutes, "must be > 0",
            "distributed.timeout_minutes=30")
    chosen = {"fsdp2": "fsdp2", "zero2": "deepspeed", "zero3": "deepspeed", "zero3_offload": "deepspeed"}.get(d.name)
    require(chosen in (None, d.engine), "distributed.engine", d.engine,
            f"contradicts distributed={d.name}, which runs {chosen} (--deepspeed sets the engine to deepspeed); "
            f"keep one of the two", f"distributed={d.name} without --deepspeed")
    if d.engine == "none":
        return
    if d.engine == "fsdp2":
        for key, value in (("zero_stage", d.zero_stage), ("deepspeed_config", d.deepspeed_config)):
            require(value is None, f"distributed.{key}", value, "a DeepSpeed setting, not used by FSDP2",
                    f"distributed.{key}=null")
        require(not d.offload, "distributed.offload", True, "FSDP2 keeps everything on the GPU; CPU offload is "
                "DeepSpeed's (distributed=zero3_offload)", "distributed.offload=false")
    else:
        require(d.zero_stage in (None, 1, 2, 3), "distributed.zero_stage", d.zero_stage,
                "ZeRO stages are 1, 2 and 3", "distributed=zero2")
        require(d.zero_stage is not None or d.deepspeed_config is not None, "distributed.zero_stage", None,
                "DeepSpeed needs a ZeRO stage: choose an option of the distributed group or pass --deepspeed "
                "ds_config.json", "distributed=zero2")
        require(not d.offload or d.zero_stage in (None, 3), "distributed.offload", True,
                f"offload needs ZeRO stage 3 (this run: {d.zero_stage})", "distributed=zero3_offload")
    engine = engine_label(d)
    # A step whose number of micro-batches varies (train.pack_step, stageN.tokens_per_step).
    varying = ("has a varying number of micro-batches, while DeepSpeed expects a fixed gradient_accumulation_steps "
               "and the ranks of a launch must run the same number of micro-batches")
    if cfg.train.pack_step:
        raise ConfigError(f"train.pack_step=true does not work under {engine}: a packed step {varying}; use "
                          f"train.pack_step=false or run on one device (distributed=none)")
    for key in STAGES[cfg.start_stage - 1:cfg.end_stage]:
        stage = getattr(cfg, key)
        if stage.enabled and stage.tokens_per_step is not None:
            raise ConfigError(f"{key}.tokens_per_step={stage.tokens_per_step} does not work under {engine}: a step "
                              f"of a token budget {varying}; use {key}.tokens_per_step=null (batch_size x grad_accum "
                              f"examples a step) or run on one device (distributed=none)")
        if stage.enabled and stage.loss.balancing.method != "none":
            raise ConfigError(f"{key}.loss.balancing.method={stage.loss.balancing.method} does not work under "
                              f"{engine}: it takes per-term gradients with torch.autograd.grad, which a sharded "
                              f"engine does not support; use {key}.loss.balancing.method=none (fixed loss weights) "
                              f"or run on one device (distributed=none)")
    require(cfg.train.precision != "fp16", "train.precision", "fp16",
            f"fp16 (--fp16) is not supported under {engine}; use bf16 (--bf16)", "train.precision=bf16")
    require(not cfg.lora.quantize_4bit, "lora.quantize_4bit", True,
            f"QLoRA (--use_qlora) is not supported under {engine}; use LoRA (--use_lora) or distributed=none",
            "lora.quantize_4bit=false")
    sharded = d.zero_stage == 3 or d.engine == "fsdp2"
    require(not (cfg.model.teacher.fp8 and sharded), "model.teacher.fp8", True,
            f"the FP8 teacher is not supported under {engine}, which partitions the teacher's weights over the "
            f"ranks (its FP8 weights and their scales are not DeepSpeed/FSDP2 parameters); use distributed=zero2 "
            f"(the teacher whole on every rank) or the bf16 teacher", "model.teacher.fp8=false")
    require(not (cfg.lora.merge_on_export and sharded), "lora.merge_on_export", True,
            f"merging the adapters at export needs the whole student on one rank, which {engine} never holds; "
            f"merge after the run with peft's merge_and_unload", "lora.merge_on_export=false")


def renamed_key(key: str) -> str | None:
    """The new name of a dotted key that was renamed (``stage2.loss.weights.kl`` ->
    ``stage2.loss.weights.kd``, by RENAMED_KEYS), else None."""
    for old, new in RENAMED_KEYS.items():
        if key == old or key.endswith(f".{old}"):
            return key[: len(key) - len(old)] + new
    return None


def _schema_keys(schema: type, path: str = "") -> list[str]:
    """Every dotted key the dataclass ``schema`` declares, into the fields typed by a dataclass."""
    keys = []
    for field in dataclasses.fields(schema):
        hint = typing.get_type_hints(schema)[field.name]
        keys += _schema_keys(hint, f"{path}{field.name}.") if dataclasses.is_dataclass(hint) else [path + field.name]
    return keys


def _unknown(name: str, key: str, fields: set[str], path: str, rest: str = "") -> str:
    """``name`` (the full dotted key) with its new name if it was renamed, else the closest
    declared key of its node, when one is close, else the declared keys that end as it does
    (``train.max_grad_norm``: it is a stage's key, ``stage1.max_grad_norm``, ...)."""
    new = renamed_key(name)
    if new is not None:
        return f"{name} (renamed to {new})"
    close = difflib.get_close_matches(key, fields, n=1)
    if close:
        return f"{name} (did you mean {path}{close[0]}?)"
    tail = f".{key}" + (f".{rest}" if rest else "")
    elsewhere = [declared for declared in _schema_keys(DistillationConfig) if declared.endswith(tail)]
    return name + (f" (did you mean {' or '.join(elsewhere[:3])}?)" if elsewhere else "")


def _unknown_keys(node: DictConfig, schema: type, path: str = "") -> list[str]:
    """Keys of ``node`` that the dataclass ``schema`` does not declare, recursively into the
    fields typed by a dataclass, each with the closest declared key when one is close.

    Hydra refuses ``stage2.foo=1`` while composing, but ``+stage2.foo=1`` and ``++stage2.foo=1``
    add the key, and turning the config into its dataclasses would then drop it silently."""
    fields = {field.name for field in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        if key not in fields:
            found.append(_unknown(f"{path}{key}", str(key), fields, path))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(node._get_node(key), DictConfig):
            found += _unknown_keys(node._get_node(key), hints[key], f"{path}{key}.")
    return found


def unknown_override_key(key: str) -> str | None:
    """For a dotted override key (``stage2.eval_evry``): None if the schema declares it (or it
    leads into a field that is not a dataclass, such as a list or a free mapping), else the key
    with the closest declared one."""
    schema, path = DistillationConfig, ""
    for part in key.split("."):
        if not dataclasses.is_dataclass(schema):
            return None
        fields = {field.name for field in dataclasses.fields(schema)}
        if part not in fields:
            rest = key[len(path) + len(part) + 1:]
            return _unknown(f"{path}{part}", part, fields, path, rest)
        schema, path = typing.get_type_hints(schema)[part], f"{path}{part}."
    return None


def _refuse_non_finite(node, key: str = "") -> None:
    """No number of the config is inf or nan: a temperature or loss weight of inf passed the range
    checks and the run stopped later as "diverged", with advice about the learning rate."""
    if isinstance(node, dict):
        for name, value in node.items():
            _refuse_non_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for index, value in enumerate(node):
            _refuse_non_finite(value, f"{key}[{index}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"{key}={node}: must be a finite number; give it a finite value "
                          f"(`python run_distillation.py --cfg job` prints every key with its default)")


def eval_every_past_end(key: str, eval_every: int, steps: int, length: str) -> list[str]:
    """The warning for a ``stageN.eval_every`` past the stage's ``steps`` (``length`` says what gives that
    count: ``max_steps`` here, its ``epochs`` over its data once loaded): the stage is evaluated at its end alone."""
    if eval_every <= steps:
        return []
    return [f"{key}.eval_every={eval_every}: ignored, the stage runs {steps} steps ({length}), so it is evaluated "
            f"only at its end; to evaluate during it, lower it (e.g. {key}.eval_every={max(1, steps // 4)}), or set 0 "
            f"for the end only"]


def save_every_past_end(key: str, save_every: int | None, steps: int, length: str) -> list[str]:
    """The warning for a ``stageN.save_every`` past the stage's ``steps`` (``length`` as for
    :func:`eval_every_past_end`): no checkpoint by steps, so a stop mid-stage starts it over."""
    if not save_every or save_every <= steps:
        return []
    return [f"{key}.save_every={save_every}: past the stage's {steps} steps ({length}), so it writes no checkpoint "
            f"by steps (only by time, train.save_every_minutes) and a stop mid-stage starts it over; lower it (e.g. "
            f"{key}.save_every={max(1, steps // 4)}), or leave it null to save every quarter of the stage"]


def ignored_settings(cfg: DistillationConfig) -> list[str]:
    """The values a run of the validated ``cfg`` ignores, one line each for a warning: LoRA options
    while LoRA is off (the run trains all of the student's weights), the layer map of a feature
    or attention term whose weight is 0 in a stage that runs, and the medical-ratio keys its schedule
    does not read (:func:`_ignored_ratio_settings`), the loss, balancing and sampling options its other
    options turn off (:func:`_ignored_loss_settings`), a teacher cache of a stage that runs the teacher
    online, an ``eval_every`` past the stage's ``max_steps`` (it evaluates at its end alone), and the
    engine options of the ``distributed`` group (offload, ZeRO stage, DeepSpeed JSON, backend,
    timeout) under ``distributed=none``. Not errors: an ablation (a sweep over ``lora.enabled``, over a term's
    weight, over the schedule or over ``distributed=none,zero3``) keeps them while it turns their feature off."""
    lines = []
    changed = [f"lora.{name}={getattr(cfg.lora, name)}" for name, default in dataclasses.asdict(LoraConfig()).items()
               if getattr(cfg.lora, name) != default]
    if changed and not cfg.lora.enabled:
        lines.append(f"{', '.join(changed)}: ignored, LoRA is off (lora.enabled=false), so the run trains all of "
                     f"the student's weights; turn it on with lora.enabled=true (--use_lora)")
    for index in range(cfg.start_stage, cfg.end_stage + 1):
        key = f"stage{index}"
        stage = getattr(cfg, key)
        for part in ("feature", "attention", "contrastive"):
            sub = getattr(stage.loss, part)
            # Its layer map, and its other options set apart from their defaults (`feature.loss=cosine`).
            off = ([f"{key}.loss.{part}.layer_map"] if getattr(sub, "layer_map", None) is not None else []) + \
                _changed_settings(f"{key}.loss.{part}.", sub, [f.name for f in dataclasses.fields(sub)
                                                               if f.name != "layer_map"])
            if stage.enabled and off and getattr(stage.loss.weights, part) == 0:
                lines.append(f"{', '.join(off)}: ignored, the {part} term is off ({key}.loss.weights.{part}=0); give "
                             f"it a weight (e.g. {key}.loss.weights.{part}=0.1) to train it")
        if stage.enabled:
            lines += _ignored_ratio_settings(key, stage.medical_ratio) + _ignored_loss_settings(key, stage)
        if stage.enabled and stage.max_steps:
            lines += eval_every_past_end(key, stage.eval_every, stage.max_steps, f"{key}.max_steps={stage.max_steps}")
            lines += save_every_past_end(key, stage.save_every, stage.max_steps, f"{key}.max_steps={stage.max_steps}")
        if stage.enabled and stage.lr_scheduler == "constant" and stage.min_lr_ratio != StageConfig.min_lr_ratio:
            lines.append(f"{key}.min_lr_ratio={stage.min_lr_ratio}: ignored, the learning rate stays at {key}.lr after "
                         f"its warmup ({key}.lr_scheduler=constant); a decay to it needs {key}.lr_scheduler=cosine or "
                         f"linear")
        if stage.enabled and stage.teacher.cache and stage.teacher.source != "cache":
            lines.append(f"{key}.teacher.cache={stage.teacher.cache}: ignored, the stage runs the teacher online "
                         f"({key}.teacher.source={stage.teacher.source}); read the cache with "
                         f"{key}.teacher.source=cache")
    lines += _ignored_projection_dims(cfg)
    if not cfg.eval.agreement and cfg.eval.agreement_top_k != EvalConfig().agreement_top_k:
        lines.append(f"eval.agreement_top_k={cfg.eval.agreement_top_k}: ignored, the agreement with the teacher is "
                     f"off (eval.agreement=false); turn it on with eval.agreement=true")
    if cfg.distributed.engine == "none":
        engine_options = [f"distributed.{name}={getattr(cfg.distributed, name)}"
                          for name, default in dataclasses.asdict(DistributedConfig()).items()
                          if name not in ("name", "engine") and getattr(cfg.distributed, name) != default]
        if engine_options:
            lines.append(f"{', '.join(engine_options)}: ignored, the run has no training engine (distributed=none: "
                         f"one process, one device); choose one with distributed=zero2, zero3, zero3_offload or "
                         f"fsdp2, or --deepspeed ds_config.json")
    return lines


def _ignored_projection_dims(cfg: DistillationConfig) -> list[str]:
    """A later stage's ``loss.contrastive.projection_dim`` that differs from the first contrastive stage's: one
    contrastive head serves the whole run, sized by that first stage (``training.module.build_heads``)."""
    keys = [f"stage{index}" for index in range(cfg.start_stage, cfg.end_stage + 1)
            if getattr(cfg, f"stage{index}").enabled and getattr(cfg, f"stage{index}").loss.weights.contrastive > 0]
    if not keys:
        return []
    first, dim = keys[0], getattr(cfg, keys[0]).loss.contrastive.projection_dim
    return [f"{key}.loss.contrastive.projection_dim={getattr(cfg, key).loss.contrastive.projection_dim}: ignored, one "
            f"contrastive head serves the whole run, sized by the first stage that uses it "
            f"({first}.loss.contrastive.projection_dim={dim}); give both the same value"
            for key in keys[1:] if getattr(cfg, key).loss.contrastive.projection_dim != dim]


def faint_settings(cfg: DistillationConfig) -> list[str]:
    """The values a run of the validated ``cfg`` reads but that all but turn a term off, one line each for a
    warning: a KD temperature below :data:`FAINT_TEMPERATURE` in a stage that runs with the KD term on. The
    term is ``T**2`` times its divergence between the softened distributions (Hinton's scaling, which keeps
    its gradient the same size as T grows above 1); below 1 the same factor shrinks it: the gradient on the
    student's logits is ``T * (q_T - p_T)`` for forward KL, at most ``2 * T`` in sum over a token's vocabulary,
    so the CE outweighs the term ``1 / T`` times more than at T = 1. Not an error: a sharpening temperature
    is a choice, and the run trains as asked."""
    lines = []
    for index in range(cfg.start_stage, cfg.end_stage + 1):
        key = f"stage{index}"
        stage = getattr(cfg, key)
        if stage.enabled and stage.loss.weights.kd > 0 and stage.temperature < FAINT_TEMPERATURE:
            lines.append(f"{key}.temperature={stage.temperature:g}: the KD term is T**2 times its divergence, so "
                         f"its gradient on the student's logits is {1 / stage.temperature:.3g}x smaller than at "
                         f"T=1 while the CE's is not; for softened KD use {key}.temperature=1 or more (e.g. "
                         f"{key}.temperature=2), or give the term more weight ({key}.loss.weights.kd)")
    return lines


def _flat_schedule(ratio) -> bool:
    """Whether a medical-ratio schedule never leaves its ``start``: ``constant``, or ``step`` with one
    plateau (as ``data.manager.medical_ratio_at`` and ``stage_domains`` read it)."""
    return ratio.schedule == "constant" or (ratio.schedule == "step" and ratio.plateaus == 1)


def _ignored_ratio_settings(key: str, ratio) -> list[str]:
    """The medical-ratio keys of stage ``key`` that its schedule does not read: ``end`` under a schedule
    that never leaves ``start`` (``constant``, or ``step`` with one plateau), ``plateaus`` under a schedule
    other than ``step``. The stage served ``start`` from its first step to its last, without a word."""
    lines = []
    flat = ("the constant schedule" if ratio.schedule == "constant" else "a step schedule of one plateau")
    if _flat_schedule(ratio) and ratio.end != ratio.start:
        lines.append(f"{key}.medical_ratio.end={ratio.end:g}: ignored, {flat} serves the medical share "
                     f"{key}.medical_ratio.start={ratio.start:g} at every step of the stage; to move it to the end "
                     f"value use {key}.medical_ratio.schedule=linear (or step with {key}.medical_ratio.plateaus=2 "
                     f"or more)")
    if ratio.schedule != "step" and ratio.plateaus != MedicalRatioConfig().plateaus:
        lines.append(f"{key}.medical_ratio.plateaus={ratio.plateaus}: ignored, only the step schedule has plateaus "
                     f"({key}.medical_ratio.schedule={ratio.schedule}); use {key}.medical_ratio.schedule=step")
    return lines


def _changed_settings(prefix: str, node, names: list[str]) -> list[str]:
    """``PREFIXname=value`` of each field ``names`` of the config dataclass ``node`` set apart from its schema
    default (a value a stage option or the user chose)."""
    defaults = {field.name: field.default for field in dataclasses.fields(node)}
    shown = {None: "null"}
    return [f"{prefix}{name}={shown.get(value, f'{value:g}' if isinstance(value, float) else value)}"
            for name in names if (value := getattr(node, name)) != defaults[name]]


def _ignored_loss_settings(key: str, stage: StageConfig) -> list[str]:
    """The loss, balancing and sampling keys of stage ``key``, set apart from their defaults, that its other
    options turn off: the KD term's temperature and divergence options with its weight 0, ``jsd_beta`` and
    ``skew_alpha`` under a divergence that does not read them, GradNorm's options under another balancing
    method, and the hard-example options under uniform sampling. The stage trained without them, without a word."""
    loss, lines = stage.loss, []
    if loss.weights.kd == 0:
        off = (_changed_settings(f"{key}.", stage, ["temperature"])
               + _changed_settings(f"{key}.loss.", loss, ["kd", "jsd_beta", "skew_alpha"]))
        if off:
            lines.append(f"{', '.join(off)}: ignored, the KD term is off ({key}.loss.weights.kd=0); give it a weight "
                         f"(e.g. {key}.loss.weights.kd=0.5) to train it")
    else:
        readers = {"jsd_beta": ("jsd",), "skew_alpha": ("skew_forward_kl", "skew_reverse_kl")}
        for name, kinds in readers.items():
            if loss.kd not in kinds:
                lines += [f"{setting}: ignored, only {' and '.join(kinds)} read{'s' * (len(kinds) == 1)} it "
                          f"({key}.loss.kd={loss.kd}); use {key}.loss.kd={kinds[0]}"
                          for setting in _changed_settings(f"{key}.loss.", loss, [name])]
    balancing = _changed_settings(f"{key}.loss.balancing.", loss.balancing, ["gradnorm_alpha", "gradnorm_lr"])
    if balancing and loss.balancing.method != "gradnorm":
        lines.append(f"{', '.join(balancing)}: ignored, only GradNorm reads {'them' if balancing[1:] else 'it'} "
                     f"({key}.loss.balancing.method={loss.balancing.method}); use "
                     f"{key}.loss.balancing.method=gradnorm")
    sampling = _changed_settings(f"{key}.sampling.", stage.sampling,
                                 ["uniform_floor", "temperature", "rescore_every", "max_scored"])
    if sampling and stage.sampling.mode != "hard":
        lines.append(f"{', '.join(sampling)}: ignored, only hard-example sampling reads "
                     f"{'them' if sampling[1:] else 'it'} ({key}.sampling.mode={stage.sampling.mode}); use "
                     f"{key}.sampling.mode=hard")
    return lines


def _group_hint(key: str) -> str:
    """For a value missing under a config group (``stage2.name`` after ``~stage2`` removed the group's preset):
    the presets that fill it."""
    group = key.partition(".")[0]
    names = preset_names(group) if "." in key else []
    if not names:
        return ""
    return (f", or choose a {group} preset ({group}=NAME, one of {', '.join(names)}; an override ~{group} removes "
            f"it)")


def validate_config(cfg: DictConfig | DistillationConfig) -> DistillationConfig:
    """Check keys and ranges and return the config as a typed :class:`DistillationConfig`.

    Raises:
        ConfigError: a key the schema does not declare (added with ``+key=`` or ``++key=``),
            with the closest valid key; a value missing or interpolated from a key that does
            not exist; or a value out of range, naming the override.
    """
    if isinstance(cfg, DictConfig):
        unknown = _unknown_keys(cfg, DistillationConfig)
        if unknown:
            raise ConfigError(f"unknown config key(s): {', '.join(unknown)}; `python run_distillation.py --cfg job` "
                              f"prints every valid key (docs/configuration.md describes them)")
        try:
            cfg = OmegaConf.to_object(cfg)
        except OmegaConfBaseException as err:  # a missing value (`~model`), an interpolation to nowhere
            key = err.full_key or "the config"
            raise ConfigError(f"{key}: {str(err).splitlines()[0]}; set {key}{_group_hint(key)} (`python "
                              f"run_distillation.py --cfg job` prints every key with its value)") from err
    _refuse_non_finite(dataclasses.asdict(cfg))
    for key, value in (("start_stage", cfg.start_stage), ("end_stage", cfg.end_stage)):
        require(1 <= value <= 3, key, value, "stages are numbered 1..3", f"{key}=2")
    require(cfg.start_stage <= cfg.end_stage, "start_stage", cfg.start_stage,
            f"start_stage must not exceed end_stage={cfg.end_stage}", f"end_stage={max(cfg.start_stage, 1)}")
    for key in STAGES:
        _validate_stage(key, getattr(cfg, key))
        _validate_contrastive_batch(key, getattr(cfg, key), cfg.train)
    data = cfg.data
    require(data.max_length >= 16, "data.max_length", data.max_length, "must be >= 16 tokens", "data.max_length=512")
    require(0 <= data.eval_fraction <= 0.5, "data.eval_fraction", data.eval_fraction, "must be in [0, 0.5]",
            "data.eval_fraction=0.05")
    require(data.max_eval_examples >= 1, "data.max_eval_examples", data.max_eval_examples, "must be >= 1",
            "data.max_eval_examples=64")
    _validate_eval(cfg.eval)
    require_one_of("train.precision", cfg.train.precision, PRECISIONS)
    require(cfg.train.device == "auto" or cfg.train.device.split(":")[0] in ("cpu", "cuda"), "train.device",
            cfg.train.device, "must be auto, cpu, cuda or cuda:N", "train.device=cpu")
    require(cfg.train.max_bad_steps >= 1, "train.max_bad_steps", cfg.train.max_bad_steps, "must be >= 1",
            "train.max_bad_steps=10")
    require(cfg.train.divergence_window >= 1, "train.divergence_window", cfg.train.divergence_window,
            "must be >= 1", "train.divergence_window=20")
    require(cfg.train.save_every_minutes >= 0, "train.save_every_minutes", cfg.train.save_every_minutes,
            "must be >= 0 (0 = save by steps only)", "train.save_every_minutes=30")
    require(cfg.train.keep_checkpoints >= 1, "train.keep_checkpoints", cfg.train.keep_checkpoints,
            "must be >= 1 (stageN.save_every=0 train.save_every_minutes=0 turns mid-stage saves off)",
            "train.keep_checkpoints=2")
    require(not cfg.train.async_checkpoint or cfg.distributed.engine == "none", "train.async_checkpoint", True,
            f"writes a single process's checkpoints in the background; a launch with "
            f"distributed.engine={cfg.distributed.engine} saves each rank's share in step",
            "train.async_checkpoint=false")
    require_one_of("logging.wandb.mode", cfg.logging.wandb.mode, ("auto", "online", "offline", "disabled"))
    conf = cfg.train.cuda_alloc_conf
    require(conf is None or _alloc_conf_shaped(conf), "train.cuda_alloc_conf", conf,
            "takes PYTORCH_CUDA_ALLOC_CONF's syntax, option:value pairs separated by commas, or null for "
            "PyTorch's default", "train.cuda_alloc_conf=expandable_segments:True")
    _validate_prune(cfg)
    _validate_packing(cfg)
    _validate_fp8(cfg)
    require(cfg.lora.enabled or not cfg.lora.quantize_4bit, "lora.quantize_4bit", True, "QLoRA needs LoRA on",
            "lora.enabled=true")
    require(cfg.lora.r >= 1, "lora.r", cfg.lora.r, "must be >= 1", "lora.r=16")
    require(cfg.lora.alpha > 0, "lora.alpha", cfg.lora.alpha, "must be > 0 (the adapter is scaled by alpha / r)",
            "lora.alpha=32")
    require(0 <= cfg.lora.dropout < 1, "lora.dropout", cfg.lora.dropout, "a dropout probability must be in [0, 1)",
            "lora.dropout=0.05")
    require(bool(cfg.lora.target_modules) or not cfg.lora.enabled, "lora.target_modules", cfg.lora.target_modules,
            "LoRA needs at least one module to adapt", "lora.target_modules=[q_proj,v_proj]")
    targets = list(cfg.lora.target_modules)
    require("all-linear" not in targets or targets == ["all-linear"], "lora.target_modules", targets,
            "all-linear (peft's shorthand for every linear layer but the output one) stands alone, not beside "
            "module names", "lora.target_modules=[all-linear]")
    require(bool(cfg.output_dir), "output_dir", cfg.output_dir, "must be a directory path", "output_dir=outputs/run")
    if cfg.checkpoint_path is not None and not cfg.checkpoint_path.strip():  # `checkpoint_path=$UNSET_VARIABLE`
        raise ConfigError("checkpoint_path is empty, which would start from the initial student; give the saved "
                          "stage to start from (e.g. checkpoint_path=OUTPUT_DIR/stage1/best), or leave it out")
    # `~` is the home directory, as in the shell (which leaves `output_dir='~/x'` or `--output_dir=~/x` alone):
    # a run wrote a folder named `~` into the working directory, and could not find a checkpoint under it.
    cfg.output_dir = os.path.expanduser(cfg.output_dir)
    cfg.checkpoint_path = cfg.checkpoint_path and os.path.expanduser(cfg.checkpoint_path)
    for key in STAGES:  # a teacher cache the cache command wrote to `--out ~/cache` is read from there
        teacher = getattr(cfg, key).teacher
        teacher.cache = teacher.cache and os.path.expanduser(teacher.cache)
    _validate_distributed(cfg)
    return cfg
