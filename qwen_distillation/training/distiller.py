"""The Distiller: runs stages ``start_stage..end_stage`` over one teacher/student pair.

construct (checks everything that needs no I/O: data and MCQ sources, device, each stage's
loss kernel) -> run: read the output directory, load the models and data, build the
evaluator, then evaluate the teacher and the initial student -> for each stage: train,
evaluate, export ``stageN/best`` and ``stageN/final``, write the quality samples -> summary
and report. A stage saves its training state as it goes (``stageN/checkpoint-STEP``); a killed
run resumes from the newest readable one when the same command is run again. A stage that
diverges (mostly skipped steps, or a non-finite evaluation) fails without exporting anything new.

A stage's story is :meth:`Distiller._run_stage`; the forward pass of what is trained is the
:class:`~qwen_distillation.training.module.DistillationModule`, the teacher's pass the
:class:`~qwen_distillation.training.teacher.TeacherRunner`, and the backward pass, optimizer
step and their state the engine (``training/engine.py``). docs/architecture.md draws the map.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import random
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwen_distillation.config.schema import DistillationConfig, StageConfig
from qwen_distillation.config.validate import (engine_label, eval_every_past_end, pruned_from_teacher,
                                               save_every_past_end)
from qwen_distillation.data.hard_sampling import HardExampleSampler, score_indices
from qwen_distillation.data.manager import (StageSampler, check_stage_pools, collate, length_grouped_batches,
                                            micro_batches, schedule_end, stage_domains, to_device)
from qwen_distillation.data.generated import file_digest, model_fingerprint
from qwen_distillation.data.loading import check_local_path
from qwen_distillation.data.sources import (DomainData, build_domain_data, check_records, data_sources,
                                            examples_digest, refuse_trained_eval_sets)
from qwen_distillation.data.teacher_cache import read_manifest
from qwen_distillation.errors import CheckpointError, ConfigError, DistillationError
from qwen_distillation.evaluation.direction import best_direction, improves
from qwen_distillation.evaluation.evaluator import AGREEMENT_METRICS, Evaluator, build_evaluator
from qwen_distillation.evaluation.mcq import normalise_mcq_sources
from qwen_distillation.evaluation.nll import per_example_nll
from qwen_distillation.evaluation.report import summary_text
from qwen_distillation.evaluation.samples import REFERENCE, check_prompts_file, sample_columns, samples_markdown
from qwen_distillation.evaluation.sharding import Shard, map_shared
from qwen_distillation.modeling.capture import find_decoder
from qwen_distillation.modeling.device import parse_device
from qwen_distillation.modeling.pair import ModelPair, build_pair
from qwen_distillation.modeling.parts import (check_packed_attention, head_weights, response_positions,
                                              whole_parameters)
from qwen_distillation.modeling.speed import apply_speedups
from qwen_distillation.modeling.prune import calibration_source_set, needs_calibration, save_pruning
from qwen_distillation.paths import locate
from qwen_distillation.training import checkpoint as ckpt
from qwen_distillation.training.allocator import set_cuda_allocator
from qwen_distillation.training.balancing import Balancer, step_logs
from qwen_distillation.training import distributed as dist
from qwen_distillation.training.engine import SingleDeviceEngine, StepOutcome, other_engine
from qwen_distillation.training.metrics import (METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, NullLogger,
                                                 check_wandb_login)
from qwen_distillation.training.module import (DistillationModule, build_heads, holds_pair, pair_batches,
                                               per_step_mean)
from qwen_distillation.training.optim import build_optimizer, build_scheduler
from qwen_distillation.training.outputs import (cache_record, check_output_dir, check_same_caches,
                                                check_same_checkpoint, check_same_data, check_same_split,
                                                finished_run, prepare_output_dir, recorded_config, run_hash,
                                                STAGED_STUDENT_BASE, STUDENT_BASE)
from qwen_distillation.training.plan import LossPlan, build_plan, loss_weights, shared_parameter, stage_kd_options
from qwen_distillation.training.teacher import TeacherRunner

log = logging.getLogger(__name__)

STAGE_KEYS = {1: "stage1", 2: "stage2", 3: "stage3"}
# A step holding the stage's whole pool more times than this is refused as a mistyped size (_check_step_size).
MAX_PASSES_PER_STEP = 100


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def select_device(train) -> tuple[torch.device, str]:
    """The device and precision of ``train`` (a TrainConfig) with ``auto`` resolved: CUDA when
    one is visible, bf16 on a GPU that supports it, fp32 on the CPU."""
    if train.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = parse_device(train.device, f"train.device={train.device}", "train.device=auto or cpu")
    precision = train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 (--fp16) needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return device, precision


def data_entries(sources: dict) -> list[tuple[str, str]]:
    """``(config key, path)`` of data sources (``data_sources``'s): ``data.general[0]``, ``data.eval[1]``."""
    return [(f"data.{key}[{i}]", source.path) for key, domain in sources.items() for i, source in enumerate(domain)]


def model_inputs(cfg) -> list[tuple[str, str]]:
    """``(config key, path)`` of the models ``cfg`` loads and, for a student pruned from the teacher,
    the calibration sources given apart from the data: ``model.teacher.path``,
    ``model.student.prune.calibration.sources[0]``."""
    paths = [(f"model.{role}.{name}", value) for role in ("student", "teacher") for name in ("path", "tokenizer")
             if (value := getattr(getattr(cfg.model, role), name))]
    student = cfg.model.student
    if pruned_from_teacher(student) and needs_calibration(student) and student.prune.calibration.sources:
        calibration = calibration_source_set(student.prune.calibration, cfg.data)[0]["general"]
        paths += [(f"model.student.prune.calibration.sources[{i}]", source.path)
                  for i, source in enumerate(calibration)]
    return paths


def _domains(stage: StageConfig) -> tuple[str, ...]:
    """The domains ``stage`` serves, by its medical-ratio schedule (``stage_domains``)."""
    ratio = stage.medical_ratio
    return stage_domains(ratio.schedule, ratio.start, ratio.end, ratio.plateaus)


def stages_to_run(config: DistillationConfig, sources: dict) -> list[int]:
    """The stages ``config`` trains (enabled, in ``start_stage..end_stage``), ``sources`` (``data_sources``'s)
    serving each of their domains; known from the config alone, so a run (and a sweep's check of its jobs)
    refuses them before any model loads.

    Raises:
        ConfigError: no stage to run, or a stage's domain given no data source at all (``data.medical=[]``
            with stage 2's medical share).
    """
    stages = [i for i in range(config.start_stage, config.end_stage + 1) if getattr(config, STAGE_KEYS[i]).enabled]
    if not stages:
        span = range(config.start_stage, config.end_stage + 1)
        raise ConfigError(f"no stage to run: {', '.join(f'{STAGE_KEYS[i]}.enabled=false' for i in span)} "
                          f"(start_stage={config.start_stage}, end_stage={config.end_stage}); enable one, "
                          f"e.g. {STAGE_KEYS[config.start_stage]}.enabled=true")
    for i in stages:
        check_stage_pools(STAGE_KEYS[i], _domains(getattr(config, STAGE_KEYS[i])), sources["general"],
                          sources["medical"])
    return stages


def stage_kernels(config: DistillationConfig, stages: list[int], device: torch.device) -> dict:
    """Each of the ``stages``' loss options (:func:`stage_kd_options`) with its ``loss.kernel`` resolved for
    ``device``; known from the config and the device alone, so a sweep's checks refuse a kernel its device
    cannot run (``stage2.loss.kernel=triton`` on the CPU) before the first job trains.

    Raises:
        ConfigError: naming the stage's key (``stage2.loss.kernel=triton needs a CUDA device ...``).
    """
    options = {}
    for i in stages:
        try:
            options[i] = stage_kd_options(getattr(config, STAGE_KEYS[i]), device)
        except ValueError as err:
            raise ConfigError(f"{STAGE_KEYS[i]}.{err}") from err
    return options


def check_input_files(config: DistillationConfig, stages: list[int], completed: set[int]) -> None:
    """A mistyped path fails here, before any model loads (minutes for a large teacher), naming
    its config entry: the data and MCQ paths were checked as their entries were read
    (``data_sources``, ``normalise_mcq_sources``); here the calibration set of a student pruned
    from the teacher, the prompts of the quality samples and the teacher caches the ``stages`` read
    (their manifests, not the shards), but for the ``completed`` ones (:func:`completed_stages`)."""
    cfg = config
    student = cfg.model.student
    if pruned_from_teacher(student) and needs_calibration(student) and not cfg.checkpoint_path:
        calibration_source_set(student.prune.calibration, cfg.data)
    if cfg.eval.samples:
        check_local_path(locate(cfg.eval.prompts), "eval.prompts")
        check_prompts_file(locate(cfg.eval.prompts))
    for key in (STAGE_KEYS[i] for i in stages if i not in completed):
        teacher = getattr(cfg, key).teacher
        if teacher.source == "cache":
            try:
                read_manifest(Path(teacher.cache))
            except ConfigError as err:
                raise ConfigError(f"{key}.teacher.cache={err}") from None


def completed_stages(config: DistillationConfig, output_dir: Path, run_id: str) -> set[int]:
    """The stages this command's resume will not train again: those the run state in ``output_dir``
    records complete, for a resume of this very run (``resume=true``, no ``overwrite_output_dir``, the
    same run hash ``run_id``). Their inputs read by those stages alone (a teacher cache) need not be there any
    more. Empty otherwise, and for a damaged run state (:func:`check_output_dir` names it later)."""
    if not config.resume or config.overwrite_output_dir:
        return set()
    try:
        state = ckpt.read_run_state(output_dir)
    except CheckpointError:
        return set()
    if not state or state.get("run_hash") != run_id:
        return set()
    return set(state.get("completed_stages") or [])


class NonFiniteLossError(DistillationError):
    """A stage diverged: too many skipped (non-finite) steps, or a non-finite evaluation."""


def host_floats(values: dict[str, torch.Tensor | float]) -> dict[str, float]:
    """``values`` as Python floats, the tensors among them (0-d, on one device) read in one transfer."""
    names = [name for name, value in values.items() if isinstance(value, torch.Tensor)]
    read = dict(zip(names, torch.stack([values[n] for n in names]).tolist())) if names else {}
    return {name: read[name] if name in read else float(value) for name, value in values.items()}


@dataclass
class StageRun:
    """One stage in progress: what it computes and serves, its engine, and its counters."""

    index: int
    key: str
    stage: StageConfig
    plan: LossPlan
    directory: Path
    total_steps: int
    sampler: StageSampler | HardExampleSampler
    engine: SingleDeviceEngine  # or training.deepspeed_engine.DeepSpeedEngine, training.fsdp_engine.FSDP2Engine
    save_every: int
    step: int = 0
    best: float | None = None
    best_step: int | None = None  # the step stageN/best was exported at by this process
    recent_skipped: deque = field(default_factory=deque)  # of the last train.divergence_window steps
    last_save: float = field(default_factory=time.monotonic)
    # Rank 0's clock, read at the last step's reduction and the same on every rank:
    # train.save_every_minutes have passed since last_save.
    clock_due: bool = False

    def extra(self, global_step: int) -> dict:
        """What a checkpoint keeps beside the engine's and sampler's state."""
        return {"best": self.best, "global_step": global_step, "recent_skipped": list(self.recent_skipped)}


class Distiller:
    """Multi-stage teacher->student distillation driven by a :class:`DistillationConfig`."""

    def __init__(self, config: DistillationConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.run_config = recorded_config(config)
        self.run_id = run_hash(self.run_config)
        self.cuda_alloc_conf: str | None = None  # the allocator settings in force, set by run() on a GPU
        # Entries the config schema cannot type, choices that depend on this machine and input
        # paths that do not exist fail here, before any model loads and anything is written.
        self.sources = data_sources(config.data)
        self.mcq_sources = normalise_mcq_sources("eval.mcq", config.eval.mcq)
        # One digest per data file per run: the check below and the resume check (_data_sha256) share it.
        self._file_digest = functools.lru_cache(maxsize=None)(file_digest)
        refuse_trained_eval_sets(self.sources, ((f"eval.mcq[{i}]", s) for i, s in enumerate(self.mcq_sources)),
                                 digest=self._file_digest)
        self.device, self.precision = select_device(config.train)
        self.topo = dist.SINGLE  # the launch, once run() has started its process group
        self.mesh = None  # the ranks FSDP2 shards the models over (distributed=fsdp2), once built
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # Student master weights stay fp32 and autocast runs the matmuls in low precision;
        # the frozen teacher is stored in the low-precision dtype directly.
        self.teacher_dtype = self.autocast_dtype or torch.float32
        self.stages = stages_to_run(config, self.sources)
        self.kd_options = stage_kernels(config, self.stages, self.device)
        self._check_input_files()

    def _check_input_files(self) -> None:
        check_input_files(self.config, self.stages, self._completed_stages())

    def _completed_stages(self) -> set[int]:
        return completed_stages(self.config, self.output_dir, self.run_id)

    def _input_paths(self) -> list[tuple[str, str]]:
        """``(config key, path)`` of every file or folder the run reads besides ``checkpoint_path``:
        an ``overwrite_output_dir=true`` run refuses to start when one lies in what it would clear."""
        cfg = self.config
        paths = model_inputs(cfg) + self._data_entries()
        paths += [("eval.prompts", locate(cfg.eval.prompts))] if cfg.eval.samples else []
        paths += [(f"{STAGE_KEYS[i]}.teacher.cache", getattr(cfg, STAGE_KEYS[i]).teacher.cache) for i in self.stages
                  if getattr(cfg, STAGE_KEYS[i]).teacher.source == "cache"]
        return [(key, path) for key, path in paths if not str(path).startswith("package:")]

    def _data_entries(self) -> list[tuple[str, str]]:
        """``(config key, path)`` of the run's data and MCQ sources: ``data.general[0]``, ``eval.mcq[1]``."""
        return data_entries(self.sources) + [(f"eval.mcq[{i}]", source.path)
                                             for i, source in enumerate(self.mcq_sources)]

    def _check_trainable(self) -> None:
        """A student none of whose parameters trains (transformers loads a LoRA adapter given as
        ``model.student.path`` frozen onto its base) is refused before the run writes anything; the
        optimizer used to stop it with "got an empty parameter list" after the first evaluation."""
        if any(p.requires_grad for p in self.pair.student.parameters()):
            return
        path = self.config.model.student.path
        adapter = bool(path) and (Path(path) / "adapter_config.json").is_file()
        raise ConfigError(f"model.student.path={path}: no parameter of the student is trainable"
                          + (" (it is a LoRA adapter, which loads frozen onto its base); continue it with "
                             f"checkpoint_path={path}, or give its merged model ({Path(path) / 'merged'} when "
                             f"the stage exported one)" if adapter else "; give a model whose weights load trainable"))

    def _data_sha256(self) -> dict[str, str]:
        """``{"data.general[0]=PATH": sha256}`` of the local data and MCQ files the run reads: a resumed
        run checks them (a changed file changes the held-out split under the same record count)."""
        digests = {f"{key}={path}": self._file_digest(locate(path)) for key, path in self._data_entries()}
        return {entry: digest for entry, digest in digests.items() if digest is not None}

    def _autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @contextlib.contextmanager
    def _timed(self, *keys: str):
        """Add the block's wall seconds to ``self.timings[keys[0]][keys[1]]...`` (the run's phase
        times, in summary.json: what a run costs besides its training steps)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            node = self.timings
            for key in keys[:-1]:
                node = node.setdefault(key, {})
            node[keys[-1]] = node.get(keys[-1], 0.0) + time.perf_counter() - started

    # ----------------------------------------------------------------- set-up
    def _build(self, resume_from: int) -> None:
        """Models, data, evaluator, loss plans, the trainable module and the teacher runner.
        (Random initialisations happen in this order: models, then heads. Under FSDP2 the ranks
        other than 0 build the models empty and receive rank 0's weights and heads as they shard.)"""
        cfg = self.config
        placement = "device"
        if cfg.distributed.engine == "fsdp2":  # rank 0 alone reads the weights; shard_model spreads them
            placement = "cpu" if self.topo.is_main else "meta"
        load_teacher = self._teacher_needed()
        self.pair: ModelPair = build_pair(cfg, device=self.device, teacher_dtype=self.teacher_dtype,
                                          output_dir=self.output_dir, resume_after_stage=resume_from,
                                          teacher_zero3=self._teacher_zero3() if load_teacher else None,
                                          placement=placement, load_teacher=load_teacher)
        if cfg.train.packing:  # on the models as loaded, before any engine wraps them
            check_packed_attention({"teacher": self.pair.teacher, "student": self.pair.student},
                                   cfg.train.pack_layout, self._autocast)
        if self._teacher_zero3_config is not None and self.pair.teacher is not None:
            from qwen_distillation.training.deepspeed_engine import shard_teacher

            self.pair.teacher = shard_teacher(self.pair.teacher, self._teacher_zero3())
        if cfg.distributed.engine == "fsdp2":
            from qwen_distillation.training.fsdp_engine import device_mesh, shard_model

            self.mesh = device_mesh(self.topo, self.device.type)
            if self.pair.teacher is not None:
                shard_model(self.pair.teacher, self.mesh, device=self.device, name="teacher")
        self.teacher_stream = bool(cfg.train.teacher_stream and self.device.type == "cuda"
                                   and self.pair.teacher is not None)
        if self.teacher_stream and self._sharded():
            log.info("train.teacher_stream is off under %s: a sharded teacher gathers its weights with "
                     "collectives that must stay in order with the student's", engine_label(cfg.distributed))
            self.teacher_stream = False
        self.speedups = apply_speedups([m for m in (self.pair.student, self.pair.teacher) if m is not None],
                                       device=self.device, compile=cfg.train.compile,
                                       liger_kernels=cfg.train.liger_kernels)
        self.data: DomainData = build_domain_data(
            self.sources, self.pair.tokenizer, max_length=cfg.data.max_length, eval_fraction=cfg.data.eval_fraction,
            max_eval_examples=cfg.data.max_eval_examples, seed=cfg.data.split_seed)
        # Built before the output directory is touched: a bad MCQ or prompts file costs no old outputs.
        self.evaluator: Evaluator = build_evaluator(
            cfg.eval, mcq_sources=self.mcq_sources, teacher=self.pair.teacher, tokenizer=self.pair.tokenizer,
            vocab_size=self.pair.vocab_size, eval_sets=self.data.eval_sets, pad_token_id=self.pair.pad_token_id,
            device=self.device, autocast=self._autocast, shard=self._shard())

    def _teacher_needed(self) -> bool:
        """Whether the teacher model is loaded: unless every stage this run trains reads the
        teacher's top-k cache (``stageN.teacher.source=cache``). Without it, evaluation reports no
        agreement with the teacher and no teacher metrics or samples; ``python -m
        qwen_distillation.evaluate --teacher`` computes them afterwards from the saved stages."""
        return any(getattr(self.config, STAGE_KEYS[i]).teacher.source != "cache" for i in self.stages)

    def _teacher_runner(self, index: int):
        """What gives stage ``index`` its teacher: the model, or its top-k cache
        (``stageN.teacher.source=cache``), opened and checked by :meth:`_build_plans`."""
        return self.cached_teachers.get(index, self.online_teacher)

    def _cached_teacher(self, index: int):
        """Stage ``index``'s top-k cache, its identity and its entries for the stage's examples
        checked (the examples are numbered for the lookup)."""
        key, stage = STAGE_KEYS[index], getattr(self.config, STAGE_KEYS[index])
        from qwen_distillation.data.teacher_cache import CacheReader
        from qwen_distillation.training.teacher_cache import CachedTeacher, cache_spec

        examples = self.data.general + self.data.medical
        for example_id, example in enumerate(examples):
            example["example_id"] = example_id
        domains = _domains(stage)
        spec = cache_spec(teacher_spec=self.config.model.teacher, seed=self.config.seed, tokenizer=self.pair.tokenizer,
                          vocab_size=self.pair.vocab_size, sources=[s for d in domains for s in self.sources[d]],
                          max_length=self.config.data.max_length, k=None, dtype=None)  # a stage reads any k, dtype
        log.info("%s: the teacher's top-k distribution is read from the cache %s", key, stage.teacher.cache)
        teacher = CachedTeacher(CacheReader(stage.teacher.cache), examples, spec, tail=stage.teacher.tail,
                                where=f"{key}.teacher.cache")
        teacher.check_examples(e["example_id"] for d in domains for e in getattr(self.data, d))
        return teacher

    def _deepspeed_config(self, index: int) -> dict:
        from qwen_distillation.training.deepspeed_engine import deepspeed_config

        key = STAGE_KEYS[index]
        return deepspeed_config(self.config.distributed, stage=getattr(self.config, key), stage_key=key,
                                world_size=self.topo.world_size, precision=self.precision)

    @functools.cached_property
    def _teacher_zero3_config(self) -> dict | None:
        """The teacher's DeepSpeed config when it is partitioned (ZeRO-3), else None; read once (the
        user's JSON) per run. It holds the first stage's micro-batch, accumulation and ZeRO-3
        options, none of which depend on the launch size."""
        if self.config.distributed.engine != "deepspeed":
            return None
        config = self._deepspeed_config(self.stages[0])
        if config["zero_optimization"]["stage"] != 3:
            return None
        from qwen_distillation.training.deepspeed_engine import teacher_config

        return teacher_config(config)

    def _teacher_zero3(self) -> dict | None:
        """A copy of :attr:`_teacher_zero3_config` for DeepSpeed and transformers to keep."""
        return copy.deepcopy(self._teacher_zero3_config)

    def _sharded(self) -> bool:
        """Whether the models' weights are partitioned over the ranks (ZeRO-3, FSDP2)."""
        return self.config.distributed.engine == "fsdp2" or self._teacher_zero3_config is not None

    def _shard(self) -> Shard | None:
        """How evaluations and scoring split over the ranks of the launch (None: one process)."""
        if self.topo.world_size == 1:
            return None
        return Shard(rank=self.topo.rank, world_size=self.topo.world_size,
                     all_gather=functools.partial(dist.all_gather_object, self.topo), synced=self._sharded())

    def _whole_heads(self):
        """The student's and teacher's lm_head weights held whole for the block, for what reads
        them outside their modules or runs the models outside the engine (evaluation, scoring,
        generation): under ZeRO-3 the heads gathered, under FSDP2 both root units (embedding, final
        norm, lm_head, the distillation heads; ``training.fsdp_engine``)."""
        if self.mesh is not None:
            from qwen_distillation.training.fsdp_engine import unsharded

            return unsharded([getattr(self, "module", None), self.pair.teacher])
        return whole_parameters(head_weights(self.pair.student, self.pair.teacher))

    def _own_student_base(self) -> bool:
        """Whether the LoRA student's adapters are based on ``output_dir/student_base`` (which this run
        wrote, or a resumed one kept): overwriting an old run then keeps it."""
        base = self.pair.base_model_dir
        return bool(base) and Path(base).resolve() == (self.output_dir / STUDENT_BASE).resolve()

    def _build_plans(self, to_run: list[int]) -> None:
        """Each stage's LossPlan (its layer maps and relation heads checked against the two models,
        whose decoders the layer capture must support), and the teacher caches of the stages
        ``to_run`` opened and checked against the run's examples: all before an old run is cleared,
        so that none of these mistakes costs its outputs."""
        cfg, pair = self.config, self.pair
        for role, model in (("student", pair.student), ("teacher", pair.teacher)):
            if model is not None:  # every step runs both through the layer capture
                try:
                    find_decoder(model)
                except ConfigError as err:
                    raise ConfigError(f"model.{role}: {err}") from None
        self.plans = {i: build_plan(getattr(cfg, STAGE_KEYS[i]), STAGE_KEYS[i], pair.student, pair.teacher,
                                    pair.vocab_size, self.kd_options[i]) for i in self.stages}
        self.cached_teachers = {i: self._cached_teacher(i) for i in to_run
                                if getattr(cfg, STAGE_KEYS[i]).teacher.source == "cache"}

    def _build_module(self, resume_from: int) -> None:
        cfg, pair = self.config, self.pair
        heads = build_heads([getattr(cfg, STAGE_KEYS[i]) for i in self.stages], list(self.plans.values()),
                            pair.student, pair.teacher).to(self.device)
        if resume_from:
            ckpt.load_heads(self.output_dir / f"stage{resume_from}" / "heads.pt", heads)
        elif cfg.checkpoint_path and self.topo.is_main and any(True for _ in heads.parameters()):
            log.info("the feature/contrastive heads start from random weights: checkpoint_path gives the student "
                     "only (%s; the heads.pt a finished stage saved beside it is not read)", cfg.checkpoint_path)
        self.module = DistillationModule(pair.student, heads)
        if self.mesh is not None:  # sharded once for the whole run; each stage's optimizer takes the shards
            from qwen_distillation.training.fsdp_engine import shard_model

            shard_model(pair.student, self.mesh, device=self.device, root=self.module, name="student")
        teacher_spec = cfg.model.teacher
        self.online_teacher = self.teacher = TeacherRunner(pair.teacher, concurrent=self.teacher_stream,
                                                           fp8_head=teacher_spec.fp8 and teacher_spec.fp8_head,
                                                           fast_accum=teacher_spec.fp8_fast_accum)

    # ------------------------------------------------------------------ stage
    def _stage_steps(self, key: str, stage: StageConfig) -> int:
        """``max_steps`` if set, else the steps of ``epochs`` passes over the stage's pool: its
        examples over the examples of a step, or, with ``tokens_per_step``, its input tokens over
        the budget, rounded up (a step fills its budget up to the last example that fits, so such
        steps serve ``epochs`` passes give or take one step; an example longer than the budget takes
        a step of its own and counts as one, and is logged). A step larger than the whole pool is
        logged: each of its steps serves some examples more than once."""
        pool = self._pool(stage)
        steps_per_pass = None
        step, size = self._step_and_pool_size(stage, pool)
        if stage.tokens_per_step is not None:
            what = (f"{key}.tokens_per_step={step} is more than the {size:,} input tokens of the stage's "
                    f"{len(pool):,} examples", f"lower {key}.tokens_per_step")
            if stage.grad_accum != 1:
                log.warning("%s.grad_accum=%d is not used with %s.tokens_per_step: a step holds as many micro-batches "
                            "of %s.batch_size examples as its budget takes", key, stage.grad_accum, key, key)
            longer = [len(example["input_ids"]) for example in pool if len(example["input_ids"]) > step]
            if longer:  # each fills a step alone: counted in tokens, epochs=0.1 served 0.9 passes
                log.warning("%s.tokens_per_step=%d is below the length of %d of the stage's %d examples "
                            "(the longest: %d tokens): each of them takes a step of its own, over the budget; "
                            "raise it to at least %d", key, step, len(longer), len(pool), max(longer), max(longer))
                steps_per_pass = (size - sum(longer)) / step + len(longer)
        else:
            what = (f"{key}: a step of {step} examples (batch_size x grad_accum x ranks) is more than the "
                    f"stage's {size:,} examples", f"lower {key}.batch_size or {key}.grad_accum")
        if step > size:
            log.warning("%s: every step serves some examples more than once (%s, or add data)", *what)
        elif stage.tokens_per_step is None and len(_domains(stage)) == 2:
            # A mix: one domain's share of a step can outgrow its pool though the step fits the two pools together
            # (0.7 of 8 examples from 5 medical ones); its steps then repeat examples without a word.
            ratio = stage.medical_ratio
            end = schedule_end(ratio.schedule, ratio.start, ratio.end, ratio.plateaus)
            for domain, share in (("general", 1 - min(ratio.start, end)), ("medical", max(ratio.start, end))):
                most, held = math.ceil(share * step - 1e-9), len(getattr(self.data, domain))
                if most > held:
                    log.warning("%s: a step serves up to %d %s examples (%s.medical_ratio %g -> %g of %d) but data.%s "
                                "holds %d training examples: those steps serve some of them more than once (add %s "
                                "data, or lower %s.batch_size or %s.grad_accum)", key, most, domain, key, ratio.start,
                                end, step, domain, held, domain, key, key)
        if stage.max_steps:
            return stage.max_steps  # an eval_every past it is warned of with the config (ignored_settings)
        steps = max(1, math.ceil(stage.epochs * (size / step if steps_per_pass is None else steps_per_pass)))
        length = f"{key}.epochs={stage.epochs} over its data"
        for line in (eval_every_past_end(key, stage.eval_every, steps, length)
                     + save_every_past_end(key, stage.save_every, steps, length)):
            log.warning(line)
        return steps

    def _pool(self, stage: StageConfig) -> list[dict]:
        """The stage's training examples, its domains' pools together."""
        return [example for domain in _domains(stage) for example in getattr(self.data, domain)]

    def _step_and_pool_size(self, stage: StageConfig, pool: list[dict]) -> tuple[int, int]:
        """A step's size and the stage's ``pool`` (:meth:`_pool`) in the same unit: input tokens with
        ``tokens_per_step``, else examples (all ranks together)."""
        if stage.tokens_per_step is not None:
            return stage.tokens_per_step, sum(len(example["input_ids"]) for example in pool)
        return self._examples_per_step(stage), len(pool)

    def _check_step_size(self, index: int) -> None:
        """A step over ``MAX_PASSES_PER_STEP`` times the stage's whole pool is a mistyped size (10**8 tokens
        of 60 examples): building it would take hours before the first step ends. Refused before anything
        trains; a step merely larger than the pool is warned of by :meth:`_stage_steps`."""
        key, stage = STAGE_KEYS[index], getattr(self.config, STAGE_KEYS[index])
        step, size = self._step_and_pool_size(stage, self._pool(stage))
        if step <= MAX_PASSES_PER_STEP * size:
            return
        if stage.tokens_per_step is not None:
            given, unit = f"{key}.tokens_per_step={step}", f"{size:,} input tokens"
        else:
            given = f"{key}.batch_size={stage.batch_size} x {key}.grad_accum={stage.grad_accum}"
            given += f" x {self.topo.world_size} ranks" if self.topo.world_size > 1 else ""
            unit = f"{size:,} examples"
        raise ConfigError(f"{given}: a step of {step:,} would hold the stage's {unit} {step // size:,} times over "
                          f"(more than {MAX_PASSES_PER_STEP}); give a step at most the size of the stage's data, or "
                          f"add data")

    def _check_contrastive_pairs(self, index: int) -> None:
        """A contrastive term takes its negatives from the other sequences of a micro-batch. Validation
        lets ``batch_size`` 1 pass when packing by tokens (``train.pack_step``, ``tokens_per_step``) puts
        several examples into a micro-batch, and a token budget cuts steps by tokens; but when not even the
        stage's two shortest examples fit together (in a step's budget, or in the ``batch_size x
        data.max_length`` tokens of a packed micro-batch), every micro-batch holds one example and the
        term is exactly 0 at every step: refused, naming the option that keeps them apart."""
        key, stage = STAGE_KEYS[index], getattr(self.config, STAGE_KEYS[index])
        weight = stage.loss.weights.contrastive
        if weight <= 0:
            return
        shortest = sorted(len(example["input_ids"]) for example in self._pool(stage))[:2]
        if len(shortest) < 2:
            return
        pair, train, max_length = sum(shortest), self.config.train, self.config.data.max_length
        limits = []
        if stage.tokens_per_step is not None:
            limits.append((stage.tokens_per_step, f"{key}.tokens_per_step={stage.tokens_per_step}",
                           "a step's token budget", f"{key}.tokens_per_step={pair}"))
        if train.packing and (train.pack_step or stage.tokens_per_step is not None):
            capacity = stage.batch_size * max_length
            limits.append((capacity, f"{key}.batch_size={stage.batch_size}",
                           f"a packed micro-batch's {capacity} tokens ({key}.batch_size x data.max_length)",
                           f"{key}.batch_size={-(-pair // max_length)}"))
        for limit, override, what, fix in limits:
            if pair > limit:
                raise ConfigError(
                    f"{override}: {key}.loss.weights.contrastive={weight:g} takes its negatives from the other "
                    f"sequences of a micro-batch, but {what} cannot hold two examples of this data (the "
                    f"stage's two shortest have {pair} tokens together): every micro-batch would hold one "
                    f"example and the term would be exactly 0 at every step; use {fix} or "
                    f"{key}.loss.weights.contrastive=0")

    def _examples_per_step(self, stage: StageConfig) -> int:
        """Examples of one optimizer step, all ranks together: micro-batch x accumulation x ranks."""
        return stage.batch_size * stage.grad_accum * self.topo.world_size

    def _sampler(self, key: str, stage: StageConfig, total_steps: int, index: int):
        per_step = self._examples_per_step(stage)
        seed = self.config.seed + index
        ratio = stage.medical_ratio
        if stage.sampling.mode == "hard":
            (domain,) = _domains(stage)  # validated: constant 0 or 1
            return HardExampleSampler(getattr(self.data, domain), examples_per_step=per_step, seed=seed,
                                      domain=domain, stage=key, uniform_floor=stage.sampling.uniform_floor,
                                      temperature=stage.sampling.temperature,
                                      rescore_every=stage.sampling.rescore_every,
                                      tokens_per_step=stage.tokens_per_step)
        return StageSampler(self.data.general, self.data.medical, examples_per_step=per_step,
                            total_steps=total_steps, schedule=ratio.schedule, start=ratio.start, end=ratio.end,
                            plateaus=ratio.plateaus, seed=seed, stage=key, tokens_per_step=stage.tokens_per_step)

    def _open_stage(self, index: int) -> StageRun:
        """The stage's plan, sampler and engine, restored from the newest readable
        ``stageN/checkpoint-STEP`` if there is one."""
        key = STAGE_KEYS[index]
        stage: StageConfig = getattr(self.config, key)
        plan = self.module.plan = self.plans[index]
        self.teacher = self._teacher_runner(index)
        total_steps = self._stage_steps(key, stage)
        params = self.module.trainable_parameters()
        optimizer = build_optimizer(params, lr=stage.lr, weight_decay=stage.weight_decay,
                                    fused=self.device.type == "cuda")
        scheduler = build_scheduler(optimizer, total_steps=total_steps, warmup_ratio=stage.warmup_ratio,
                                    scheduler=stage.lr_scheduler, min_lr_ratio=stage.min_lr_ratio)
        weights, balancing = loss_weights(plan), stage.loss.balancing
        if self.config.distributed.engine == "deepspeed":
            from qwen_distillation.training.deepspeed_engine import DeepSpeedEngine

            if getattr(self, "_engine", None) is not None:
                self._engine.destroy()  # the previous stage's hooks and buffers
            engine = DeepSpeedEngine(self.module, optimizer=optimizer, scheduler=scheduler, weights=weights,
                                     config=self._deepspeed_config(index), topology=self.topo,
                                     whole=head_weights(self.pair.student, self.pair.teacher))
        elif self.config.distributed.engine == "fsdp2":
            from qwen_distillation.training.fsdp_engine import FSDP2Engine

            engine = FSDP2Engine(self.module, optimizer=optimizer, scheduler=scheduler, weights=weights,
                                 topology=self.topo, max_grad_norm=stage.max_grad_norm, gathered=[self.pair.teacher])
        else:
            if balancing.method != "none" and len(weights) < 2:
                log.warning("%s.loss.balancing.method=%s with one active loss term (%s) balances nothing and costs "
                            "its per-term gradients every step; set %s.loss.balancing.method=none", key,
                            balancing.method, ", ".join(weights) or "none", key)
            balancer = Balancer(balancing.method, list(weights), weights, alpha=balancing.gradnorm_alpha,
                                lr=balancing.gradnorm_lr, seed=self.config.seed + index)
            engine = SingleDeviceEngine(self.module, optimizer=optimizer, scheduler=scheduler, balancer=balancer,
                                        shared=shared_parameter(self.pair.student, plan), precision=self.precision,
                                        max_grad_norm=stage.max_grad_norm)
        self._engine = engine
        save_every = stage.save_every if stage.save_every is not None else math.ceil(total_steps / 4)
        run = StageRun(index, key, stage, plan, self.output_dir / f"stage{index}", total_steps,
                       self._sampler(key, stage, total_steps, index), engine, save_every,
                       recent_skipped=deque(maxlen=self.config.train.divergence_window))
        restored = ckpt.load_stage_checkpoint(run.directory, engine=engine, sampler=run.sampler, topology=self.topo)
        if restored is not None:
            saved, resume_dir = restored
            run.step, run.best = saved["step"], saved["extra"].get("best")
            run.recent_skipped.extend(saved["extra"].get("recent_skipped", []))
            self.global_step = saved["extra"]["global_step"]
            log.info("%s: resuming at step %d/%d from %s", key, run.step, total_steps, resume_dir)
        return run

    def _run_stage(self, index: int, state: dict) -> None:
        run = self._open_stage(index)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.logger.truncate(index, run.step, self.global_step)
        self.module.train()
        progress = self._progress(run.key, run.total_steps, run.step)
        while run.step < run.total_steps:
            with self._timed("stages", run.key, "train_s"):
                row, outcome = self._train_step(run)
            self.logger.log(row)
            if progress is not None:
                progress.set_postfix(loss="skipped" if outcome.skipped else f"{row['loss']:.3f}",
                                     medical_ratio=f"{row['medical_ratio']:.2f}")
                progress.update(1)
            is_last = run.step == run.total_steps
            self._check_divergence(run, outcome, is_last)
            if (run.stage.eval_every and run.step % run.stage.eval_every == 0) or is_last:
                with self._timed("stages", run.key, "eval_s"):
                    self._evaluate(run)
            if not is_last and self._save_due(run):
                with self._timed("stages", run.key, "checkpoints_s"):
                    self.saves.save(run.directory, keep=self.config.train.keep_checkpoints, engine=run.engine,
                                    sampler=run.sampler, step=run.step, extra=run.extra(self.global_step))
                run.last_save = time.monotonic()
                log.info("%s: saved checkpoint-%d", run.key, run.step)
        if progress is not None:
            progress.close()
        if self.saves.background:  # a save still being written, before the stage's checkpoints are removed
            with self._timed("stages", run.key, "checkpoints_s"):
                self.saves.wait()
        with self._timed("stages", run.key, "finish_s"):  # exports, samples, the stage's records
            self._finish_stage(run, state)

    def _save_due(self, run: StageRun) -> bool:
        """Every ``save_every`` steps, and when ``train.save_every_minutes`` have passed since
        the stage's last save (or its start). Rank 0's clock decides for the launch (every rank
        takes part in a save); it is read at the step's reduction of the loss sums
        (:meth:`_train_step`), before the step's evaluation, so a save that falls due during an
        evaluation is taken after the next step."""
        return bool((run.save_every and run.step % run.save_every == 0) or run.clock_due)

    def _diverged(self, run: StageRun, what: str) -> NonFiniteLossError:
        previous = [i for i in self.stages if i < run.index]
        keep = (f"; stage {previous[-1]}'s exports are kept: continue from them with --start_stage {run.index} "
                f"--checkpoint_path {self.output_dir / f'stage{previous[-1]}' / 'final'} and a new output_dir"
                if previous else "")
        # Only a half-precision run can be helped by fp32.
        precision = (f", or use train.precision=fp32 (now {self.precision})" if self.precision in ("bf16", "fp16")
                     else "")
        return NonFiniteLossError(
            f"{run.key} diverged at step {run.step}/{run.total_steps}: {what}. Nothing new was exported as "
            f"{run.key}/final (or as {run.key}/best after the divergence). Lower {run.key}.lr (now "
            f"{run.stage.lr:g}), check the data and {run.key}.loss.weights{precision}{keep}")

    def _check_divergence(self, run: StageRun, outcome: StepOutcome, is_last: bool) -> None:
        """Fail the stage after ``train.max_bad_steps`` skipped steps in a row, or when more than
        half of its last ``train.divergence_window`` steps (all of its steps, at its end) were skipped."""
        run.recent_skipped.append(outcome.skipped)
        if outcome.bad_in_row >= self.config.train.max_bad_steps:
            raise self._diverged(run, f"{outcome.bad_in_row} non-finite losses or gradients in a row "
                                      f"(last: {outcome.nonfinite})")
        window = run.recent_skipped
        if (len(window) == window.maxlen or is_last) and 2 * sum(window) > len(window):
            raise self._diverged(run, f"{sum(window)} of its last {len(window)} steps had non-finite losses or "
                                      f"gradients and were skipped (last: {outcome.nonfinite or 'finite'})")

    def _train_step(self, run: StageRun) -> tuple[dict, StepOutcome]:
        """One optimizer step: serve the examples, run the micro-batches, step the engine.
        Returns the step's log row and the engine's outcome."""
        started = time.perf_counter()
        if isinstance(run.sampler, HardExampleSampler) and run.sampler.needs_scores():
            self._score_examples(run)
        served = run.sampler.next_step()
        # Every rank draws the whole step and runs its share of the micro-batches; the terms are
        # normalised by the tokens (and micro-batches) of the whole step.
        # With stageN.tokens_per_step the step's size varies; so does its number of micro-batches (of
        # batch_size examples, or of data.max_length x batch_size tokens when packed). train.pack_step
        # cuts a packed step by tokens too: short examples then fill fewer micro-batches.
        batches = length_grouped_batches(served.examples, run.stage.batch_size, self.pair.pad_token_id, "cpu",
                                         pack_length=self.config.data.max_length if self.config.train.packing else None,
                                         by_tokens=run.stage.tokens_per_step is not None or self.config.train.pack_step,
                                         layout=self.config.train.pack_layout)
        # The labelled positions, found on the host before the copy (finding or counting them on the
        # device would wait for it); the loss terms gather them (training.module.loss_terms).
        for batch in batches:
            batch["response_positions"] = response_positions(batch["labels"])
        tokens = sum(int(batch["response_positions"].numel()) for batch in batches)
        pairs = pair_batches(batches)  # the contrastive term's divisor
        # The share of the micro-batches' positions that hold padding (what train.packing removes).
        positions = sum(b["input_ids"].numel() for b in batches)
        padding = 1 - sum(len(e["input_ids"]) for e in served.examples) / positions
        share = [to_device(batch, self.device) for batch in dist.rank_share(batches, self.topo)]
        sums: dict[str, torch.Tensor | float] = {}
        balance_logs: list[dict[str, float]] = []  # one per micro-batch, folded into the step's by step_logs
        for batch in share:
            with run.engine.gathered():
                with self._autocast():
                    terms, info = run.engine.forward(batch, self.teacher(batch, run.plan))
                means = per_step_mean(terms, tokens, pairs)
                if run.stage.loss.balancing.method == "gradnorm" and not holds_pair(batch):
                    # Its exactly-0 term would read to GradNorm as a loss of 0 (as the first, its initial loss).
                    means.pop("contrastive", None)
                logs = run.engine.backward(means)
            if logs is None:
                break
            balance_logs.append(logs)
            for name, value in info.items():
                # Summed in float64 on the device: the same sums as of the values read one by one as
                # Python floats, read back once for the step.
                sums[name] = sums.get(name, 0.0) + (value.double() if isinstance(value, torch.Tensor) else value)
        sums = host_floats(sums)
        minutes = self.config.train.save_every_minutes
        clock = float(bool(minutes) and self.topo.is_main and time.monotonic() - run.last_save >= 60 * minutes)
        if self.topo.world_size > 1:
            # Rank 0's clock rides along in the step's one reduction (the other ranks add 0), so the
            # ranks agree on a time-based save without a collective of its own.
            names = sorted(sums)
            *values, clock = dist.all_reduce_sum(self.topo, [float(sums[n]) for n in names] + [clock])
            sums = dict(zip(names, values))
        run.clock_due = clock > 0
        outcome = run.engine.step()
        run.step += 1
        self.global_step += 1
        row = {"stage": run.index, "stage_name": run.stage.name, "step": run.step, "global_step": self.global_step}
        if not outcome.skipped:  # a skipped step has no loss value: it is logged with skipped=true only
            # A name with its own group (module.STUDENT_TAIL) is a per-token measure, not a loss term.
            per_token = {name if "/" in name else f"loss/{name}": value
                         for name, value in per_step_mean(sums, tokens, pairs).items()}
            total = sum(run.plan.weights.get(name[5:], 0.0) * value for name, value in per_token.items()
                        if name.startswith("loss/"))
            row.update({"loss": total, "loss/ce": float("nan"), "loss/kd": float("nan"), **per_token})
        row.update({"lr": outcome.lr, "medical_ratio": served.medical_ratio,
                    "medical_ratio_target": served.medical_ratio_target, "tokens": tokens, "padding": padding,
                    "input_tokens": sum(len(e["input_ids"]) for e in served.examples),
                    "examples": len(served.examples),
                    "positions": positions,
                    "tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9),
                    "grad_norm": outcome.grad_norm, "skipped": outcome.skipped, "bad_steps": outcome.bad_total})
        if self.device.type == "cuda":  # this rank's peak since the stage began
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if run.stage.loss.balancing.method != "none":
            row.update(step_logs(balance_logs))
        if isinstance(run.sampler, HardExampleSampler):
            row.update(run.sampler.stats())
        return row, outcome

    def _score_examples(self, run: StageRun) -> None:
        """Score (a subset of) the pool with the student's current loss, for hard-example sampling."""
        sampler, student = run.sampler, self.module.student
        indices = score_indices(len(sampler.examples), run.stage.sampling.max_scored, sampler.step, sampler.seed)
        examples = [sampler.examples[i] for i in indices]
        chunks = list(micro_batches(examples, max(run.stage.batch_size, 8)))

        def score(chunk: list[dict]) -> list[float]:
            batch = {k: v.to(self.device) for k, v in collate(chunk, self.pair.pad_token_id).items()}
            return per_example_nll(student, batch, self.pair.vocab_size).tolist()

        was_training = student.training
        student.eval()
        with self._autocast(), self._whole_heads():  # the chunks split over the ranks
            scores = [value for part in map_shared(score, chunks, self._shard()) for value in part]
        student.train(was_training)
        bad = [(i, x) for i, x in zip(indices, scores) if not math.isfinite(x)]
        if bad:  # weights blown up by the last step: diverged, as a non-finite evaluation is (it was a ValueError)
            raise self._diverged(run, f"its hard-example scoring pass gave {len(bad)} of {len(scores)} examples a "
                                      f"non-finite loss (first: {sampler.domain} example "
                                      f"{bad[0][0]}, {bad[0][1]})")
        sampler.update_scores(indices, scores)
        finite = torch.tensor([x for x in scores if math.isfinite(x)])
        if finite.numel():
            counts = torch.histc(finite, bins=10, min=float(finite.min()), max=float(finite.max()))
            edges = torch.linspace(float(finite.min()), float(finite.max()), 11)
            # Logged with the step it prepares, so a resume past it drops and redoes it.
            self.logger.log({"stage": run.index, "step": sampler.step + 1, "global_step": self.global_step,
                             "sampler/scored": len(scores),
                             "sampler/score_histogram": {"edges": [round(float(e), 4) for e in edges],
                                                         "counts": [int(c) for c in counts]}}, mirror=False)

    def _evaluate(self, run: StageRun) -> None:
        """Evaluate the student, log the metrics, and export ``stageN/best`` when its
        ``best_metric`` improves. A non-finite held-out NLL or ``best_metric`` fails the stage."""
        metrics = self._metrics(self.module.student)
        self.logger.log({"stage": run.index, "step": run.step, "global_step": self.global_step, **metrics})
        value = metrics.get(run.stage.best_metric)
        if value is None:
            raise ConfigError(f"{run.key}.best_metric={run.stage.best_metric} is not among the evaluation metrics "
                              f"{sorted(metrics)}; choose one of them")
        bad = {name: v for name, v in metrics.items() if (name.endswith("_nll") or name == run.stage.best_metric)
               and isinstance(v, float) and not math.isfinite(v)}
        if bad:
            raise self._diverged(run, "its evaluation is non-finite (" + ", ".join(f"{k}={v}" for k, v in bad.items())
                                 + ")")
        if improves(value, run.best, best_direction(run.stage.best_metric, run.stage.best_mode)):
            run.best, run.best_step = value, run.step
            self._export(run, "best")
        self.last_eval = metrics

    def _metrics(self, model) -> dict:
        """The evaluator's metrics of ``model``, split over the ranks and the same on each of them
        (so all ranks take the same decisions)."""
        with self._whole_heads():
            return self.evaluator.metrics(model)

    def _export(self, run: StageRun, name: str) -> None:
        run.engine.save_pretrained(run.directory / name, self.pair.tokenizer, base_model_dir=self.pair.base_model_dir,
                                   merge=self.config.lora.merge_on_export)

    def _finish_stage(self, run: StageRun, state: dict) -> None:
        """Export ``stageN/final`` and the heads, write the samples, mark the stage complete
        in the run state, and drop its mid-stage checkpoints. When ``best`` was exported at the
        last step (its metric improved there), ``final`` holds the same weights: it is made from
        ``best``'s files (:func:`checkpoint.link_export`: the weight files hard-linked) instead of written again."""
        if run.best_step == run.step:
            if self.topo.is_main:
                ckpt.link_export(run.directory / "best", run.directory / "final")
            dist.barrier(self.topo)
        else:
            self._export(run, "final")
        run.engine.save_heads(run.directory / "heads.pt")
        if self.evaluator.prompts:
            self._write_samples(run.index, run.stage, state)
        state["completed_stages"] = sorted(set(state["completed_stages"]) | {run.index})
        state.setdefault("stage_eval", {})[str(run.index)] = self.last_eval
        state["global_step"] = self.global_step
        self._write_state(state)
        if self.topo.is_main:
            ckpt.remove_stage_checkpoints(run.directory)
        dist.barrier(self.topo)

    def _write_state(self, state: dict) -> None:
        if self.topo.is_main:
            ckpt.write_json_atomic(self.output_dir / ckpt.RUN_STATE, state)

    def _write_samples(self, index: int, stage: StageConfig, state: dict) -> None:
        """The teacher's and the student's greedy answers to the prompts, side by side, with the
        BLEU-4 / ROUGE of both against each prompt's reference where it has one, in
        ``stageN/samples.jsonl`` and ``stageN/samples.md`` (and a wandb table). The teacher's
        answers are generated once per run and kept in the run state."""
        teacher_rows = state.get("teacher_samples")
        with self._whole_heads():  # generation runs the models outside the engine
            if self.pair.teacher is None:  # a run from the teacher's cache: the student's answers alone
                teacher_rows = None
            elif not self.evaluator.prompts_match(teacher_rows):
                teacher_rows = self.evaluator.teacher_samples()
                state["teacher_samples"] = teacher_rows
            rows = self.evaluator.student_samples(self.pair.student, teacher_rows)
        if not self.topo.is_main:
            return
        stage_dir = self.output_dir / f"stage{index}"
        ckpt.write_text_atomic(stage_dir / "samples.jsonl",
                               "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        header = (f"# Quality samples after stage {index} ({stage.name})\n\n"
                  f"Greedy answers (chat template, at most {self.config.eval.max_new_tokens} new tokens) of the "
                  f"teacher and of the student at the end of stage {index} (global step {self.global_step})"
                  + (", beside the prompts' reference answers" if any(REFERENCE in row for row in rows) else "")
                  + ".\n\n")
        ckpt.write_text_atomic(stage_dir / "samples.md", header + samples_markdown(rows))
        columns = sample_columns(rows)
        self.logger.log_table(f"samples/stage{index}", columns, [[row.get(c, "") for c in columns] for row in rows],
                              step=self.global_step)

    def _progress(self, key: str, total: int, initial: int):
        if not self.config.logging.progress_bar or not self.topo.is_main:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=key, unit="step", dynamic_ncols=True)

    def _check_best_metrics(self, metrics: set[str], indices: list[int]) -> None:
        """Fail before the output directory is touched, not at a stage's first evaluation, on a
        best_metric that no evaluation produces (``metrics``: the evaluator's metric names)."""
        for index in indices:
            key = STAGE_KEYS[index]
            metric = getattr(self.config, key).best_metric
            if metric not in metrics and not metrics:
                # Without a held-out set (data.eval_fraction=0, no data.eval) only MCQ sets give metrics.
                raise ConfigError(f"{key}.best_metric={metric}: this run has no evaluation metric, since no held-out "
                                  f"set is scored (data.eval_fraction={self.config.data.eval_fraction}, no data.eval, "
                                  f"no eval.mcq); set data.eval_fraction above 0, give data.eval=[FILE], or give "
                                  f"eval.mcq and {key}.best_metric=eval/mcq/NAME_accuracy")
            if (metric not in metrics and metric.endswith(AGREEMENT_METRICS) and self.config.eval.agreement
                    and not self.evaluator.agreement):
                # eval.agreement=true, but no teacher is loaded to agree with (build_evaluator logs why).
                raise ConfigError(f"{key}.best_metric={metric}: this run computes no agreement with the teacher, "
                                  f"since every stage reads the teacher's cache and the teacher is not loaded; "
                                  f"choose one of {sorted(metrics)}, or run a stage with the teacher online "
                                  f"(stageN.teacher.source=online)")
            if metric not in metrics:
                raise ConfigError(f"{key}.best_metric={metric} is not among the evaluation metrics {sorted(metrics)}; "
                                  "choose one of them (agreement, MCQ and BLEU/ROUGE metrics need "
                                  "eval.agreement=true / eval.mcq / eval.text_metrics=true)")

    # -------------------------------------------------------------------- run
    def finished_summary(self) -> dict | None:
        """The summary of this very run (the same config) when ``output_dir`` holds it finished and
        ``overwrite_output_dir`` is off, else None: a rerun sweep skips the jobs it has done."""
        if self.config.overwrite_output_dir or not finished_run(self.output_dir, self.run_id):
            return None
        path = self.output_dir / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

    def run(self) -> dict:
        cfg = self.config
        # Before anything is allocated on the GPU (the process group, the models).
        self.cuda_alloc_conf = set_cuda_allocator(cfg.train.cuda_alloc_conf) if self.device.type == "cuda" else None
        self.topo = dist.setup(cfg.distributed, self.device.type)
        self.saves = ckpt.StageSaves(background=cfg.train.async_checkpoint, topology=self.topo)
        if self.topo.active and self.device.type == "cuda":
            self.device = torch.device("cuda", self.topo.local_rank)
        # Every stage's DeepSpeed config (the user's JSON against stageN.*), before models load and an old run is
        # cleared: a conflict with a later stage used to stop the run only after the earlier stages had trained.
        if cfg.distributed.engine == "deepspeed":
            for index in self.stages:
                self._deepspeed_config(index)
        state = check_output_dir(self.output_dir, run_id=self.run_id, resume=cfg.resume,
                                 overwrite=cfg.overwrite_output_dir, run_config=self.run_config,
                                 checkpoint_path=cfg.checkpoint_path, inputs=self._input_paths())
        self.data_sha256 = self._data_sha256()
        # The model the student starts from, when it is loaded from checkpoint_path (no stage complete yet).
        loads_checkpoint = cfg.checkpoint_path and not (state or {}).get("completed_stages")
        checkpoint_fingerprint = model_fingerprint(cfg.checkpoint_path) if loads_checkpoint else None
        if state is not None:
            check_same_data(state, self.data_sha256)
            check_same_checkpoint(state, cfg.checkpoint_path, checkpoint_fingerprint)
            self._check_launch(state)
        check_records(self.sources)  # a malformed record before the models load, not after
        if self.topo.is_main:
            check_wandb_login(cfg.logging.wandb)  # before models load and anything is written
        if cfg.train.num_threads > 0:
            torch.set_num_threads(cfg.train.num_threads)
        seed_everything(cfg.seed)
        started = time.perf_counter()
        self.timings = {}
        resume_from = max(state["completed_stages"], default=0) if state else 0
        try:
            with self._timed("build_s"):
                self._build(resume_from)
            split_sha256 = examples_digest(self.data)
            if state is not None:  # before an old run is cleared and anything is written
                check_same_split(state, split_sha256)
            # Before an old run is cleared (overwrite_output_dir=true) and before an earlier stage trains: a
            # best_metric no evaluation gives, a layer map or relation-head count the models do not fit, a
            # teacher cache that misses examples, a student with nothing to train. (A stage's domain without data
            # was refused in __init__: a configured source always yields training examples, or build_examples
            # refuses it.)
            to_run = [i for i in self.stages if i not in (state or {}).get("completed_stages", [])]
            for index in to_run:
                self._check_step_size(index)
                self._check_contrastive_pairs(index)
            self._check_best_metrics(self.evaluator.metric_names(), to_run)
            self._build_plans(to_run)
            self._check_trainable()
            caches = {STAGE_KEYS[i]: cache_record(teacher.reader.identity)
                      for i, teacher in self.cached_teachers.items()}
            if state is not None:  # a stage resumed from its checkpoints goes on against the cache it started with
                check_same_caches(state, caches, [STAGE_KEYS[i] for i in self.cached_teachers
                                                  if ckpt.stage_checkpoints(self.output_dir / f"stage{i}")],
                                  {key: getattr(cfg, key).teacher.cache for key in caches})
            dist.barrier(self.topo)  # every rank has read the old outputs before rank 0 rewrites them
            if self.topo.is_main:
                state = prepare_output_dir(self.output_dir, state, run_id=self.run_id, run_config=self.run_config,
                                           data_sha256=self.data_sha256, split_sha256=split_sha256,
                                           checkpoint_fingerprint=checkpoint_fingerprint,
                                           teacher_caches=caches, overwrite=cfg.overwrite_output_dir,
                                           wrote_student_base=self._own_student_base(),
                                           staged_student_base=self.pair.staged_base)
        except BaseException:
            if self.topo.is_main:  # the student_base written beside an earlier run's, never swapped in
                shutil.rmtree(self.output_dir / STAGED_STUDENT_BASE, ignore_errors=True)
            raise
        state = dist.broadcast_object(self.topo, state)
        if self.topo.is_main and self.pair.pruned is not None:
            save_pruning(self.output_dir, self.pair.pruned)
        with self._timed("build_s"):
            self._build_module(resume_from)
        self.logger = (MetricsLogger(self.output_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
                                     wandb_cfg=cfg.logging.wandb, run_config=self.run_config)
                       if self.topo.is_main else NullLogger())
        self.global_step = state.get("global_step", 0)
        self.last_eval = {}
        try:
            if state.get("initial_eval") is None:
                with self._timed("initial_eval_s"):
                    state["initial_eval"] = {"student": self._metrics(self.pair.student),
                                             "teacher": self._metrics(self.pair.teacher) if self.pair.teacher else {}}
                self._write_state(state)
            for index in self.stages:
                if index not in state["completed_stages"]:
                    seed_everything(cfg.seed + index)
                    self._run_stage(index, state)
        finally:
            self._wait_for_saves()
            self.logger.close()
        summary = self._summary(state)
        if not self.topo.is_main:
            dist.shutdown(self.topo)
            return summary
        ckpt.write_json_atomic(self.output_dir / "summary.json", summary)
        try:
            from qwen_distillation.evaluation.report import write_report

            with self._timed("report_s"):
                summary["report"] = str(write_report(self.output_dir, summary))
        except Exception as err:  # noqa: BLE001 - a finished run must not fail on its report
            log.warning("could not write the run report: %s", err)
        summary["timings"] = self._timing_summary(time.perf_counter() - started)
        ckpt.write_json_atomic(self.output_dir / "summary.json", summary)
        # Finished only once its summary and report are written: a run killed before then is resumed by the
        # same command, which writes them (a finished run is never run again).
        state["finished"] = True
        self._write_state(state)
        print(summary_text(summary))
        dist.shutdown(self.topo)
        return summary

    def _engine_kind(self, index: int) -> str:
        """The ``kind`` the engine of stage ``index`` records in its checkpoints (``Engine.kind``)."""
        engine = self.config.distributed.engine
        if engine == "deepspeed":
            return f"deepspeed-zero{self._deepspeed_config(index)['zero_optimization']['stage']}"
        return "fsdp2" if engine == "fsdp2" else "single-device"

    def _check_launch(self, state: dict) -> None:
        """A resume whose stage in progress has only training checkpoints of another engine or launch size
        (as their meta.json records them) is refused here, before the models load and the run's config.yaml
        is rewritten with this launch's options; loading them would refuse each in turn, too late for both."""
        for index in self.stages:
            if index in (state.get("completed_stages") or []):
                continue
            found = ckpt.stage_checkpoints(self.output_dir / f"stage{index}")
            kind, reasons = self._engine_kind(index), []
            for target in found:
                meta = ckpt.checkpoint_meta(target)
                if meta.get("kind") not in (None, kind):
                    reasons.append(f"{target / 'state.pt'}: {other_engine(meta['kind'], kind)}")
                elif meta.get("world_size", self.topo.world_size) != self.topo.world_size:
                    reasons.append(ckpt.other_launch(target, meta["world_size"], self.topo.world_size))
            if found and len(reasons) == len(found):
                raise CheckpointError(reasons[0] if len(reasons) == 1 else
                                      f"no checkpoint of {found[0].parent} can be restored:\n  " + "\n  ".join(reasons))

    def _wait_for_saves(self) -> None:
        """On the way out of the stages (an error included): let a background save finish writing, and
        report, without raising over the error in flight, a save that failed."""
        try:
            self.saves.wait()
        except CheckpointError as err:
            log.error("%s", err)

    def _timing_summary(self, total: float) -> dict:
        """Wall seconds of this invocation by phase: ``build_s`` (models, data, evaluator, heads),
        ``initial_eval_s``, per stage ``train_s`` (the optimizer steps), ``eval_s``, ``checkpoints_s``
        and ``finish_s`` (exports, samples), ``report_s``, ``total_s``, and ``fixed_s``: everything
        but the training steps, the cost of a run besides its tokens. A resumed run counts only
        what it ran itself."""
        out = {key: round(value, 3) if isinstance(value, float) else
               {stage: {k: round(v, 3) for k, v in times.items()} for stage, times in value.items()}
               for key, value in self.timings.items()}
        train = sum(times.get("train_s", 0.0) for times in self.timings.get("stages", {}).values())
        out["total_s"], out["fixed_s"] = round(total, 3), round(total - train, 3)
        return out

    def _summary(self, state: dict) -> dict:
        return {"output_dir": str(self.output_dir), "stages": state["completed_stages"],
                "device": str(self.device), "precision": self.precision,
                "distributed": {"engine": self.config.distributed.name, "world_size": self.topo.world_size},
                "final_models": {s: str(self.output_dir / f"stage{s}" / "final") for s in state["completed_stages"]},
                # None where the run wrote none (logging.jsonl=false, logging.tensorboard=false)
                **{key: str(self.output_dir / name) if (self.output_dir / name).exists() else None
                   for key, name in (("metrics", METRICS_FILE), ("tensorboard", TENSORBOARD_DIR))},
                "teacher": state["initial_eval"]["teacher"], "student_before": state["initial_eval"]["student"],
                "student_after_stage": state.get("stage_eval", {}),
                "loss_kernels": {str(i): plan.kd.kernel for i, plan in self.plans.items()},
                "speedups": self.speedups,
                "teacher_stream": self.teacher_stream,
                "cuda_alloc_conf": self.cuda_alloc_conf,
                "teacher_fp8": self.config.model.teacher.fp8,
                "resumed_with_changes": state.get("resumed_with_changes", []),
                "pruning": str(self.output_dir / "pruning.json") if (self.output_dir / "pruning.json").exists()
                else None,
                "samples": {s: str(self.output_dir / f"stage{s}" / "samples.md") for s in state["completed_stages"]
                            if (self.output_dir / f"stage{s}" / "samples.md").exists()}}
