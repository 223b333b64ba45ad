"""The DeepSpeed engine: ZeRO-1/2/3 over the ranks of a launch, behind the engine interface of
``training/engine.py`` (``forward``, ``backward``, ``step``, state, exports).

What it keeps from the single-device engine, so a stage computes the same thing on one process or
many: the client ``torch.optim.AdamW`` and LambdaLR schedule (``training.optim``), fp32 master
weights with the forward under ``torch.autocast`` (DeepSpeed's own fp16/bf16 modes are not used),
the per-token normalisation over the whole step, clipping at ``stageN.max_grad_norm`` and the
non-finite policy (a step with a non-finite loss or gradient norm on any rank is skipped by every
rank, and counted).

Gradient scaling: each rank's loss terms are its share of the step's per-token means
(:func:`training.module.per_step_mean` over the tokens of the *whole* step, all ranks); DeepSpeed
averages gradients over the ranks, so the loss is multiplied by the world size, and ``backward``
runs with ``scale_wrt_gas=False`` (the terms are already shares of the step).

Under ZeRO-3 every parameter is partitioned and gathered only while its module runs. The losses
that read an lm_head weight outside its module (the fused loss, held-out NLL) run inside
:meth:`gathered`, which holds the student's and teacher's head weights whole for the block.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
import math
import weakref
from pathlib import Path

import torch
from torch import nn

from qwen_distillation.errors import CheckpointError, ConfigError, first_line
from qwen_distillation.modeling.parts import whole_parameters
from qwen_distillation.training.distributed import Topology, all_reduce_sum
from qwen_distillation.training.engine import ConsolidatedExports, StepOutcome, other_engine, weighted_loss

log = logging.getLogger(__name__)

DS_DIR = "deepspeed"  # the DeepSpeed checkpoint inside stageN/checkpoint-STEP
# Values of a user's DeepSpeed JSON that the stage config fills; "auto" (the Hugging Face
# convention) always defers to the stage config.
AUTO = "auto"
# Warnings about the user's JSON already logged, per run: keyed by the id of the run's ``distributed`` config, which
# deepspeed_config reads for every stage (several times a run), so each is logged once a run. A later job of a Hydra
# multirun, in the same process, has a config of its own and is warned again; an entry goes with its config.
_WARNED: dict[int, set[str]] = {}


def _warn_once(run, line: str) -> None:
    """Log ``line`` unless it was logged for the run whose ``distributed`` config is ``run``."""
    key = id(run)
    if key not in _WARNED:  # forgotten with the config, whose id a later one may take
        weakref.finalize(run, _WARNED.pop, key, None).atexit = False
        _WARNED[key] = set()
    if line not in _WARNED[key]:
        _WARNED[key].add(line)
        log.warning(line)


def unused_blocks(user: dict, source: str) -> list[str]:
    """Warnings for the ``optimizer`` and ``scheduler`` blocks of the user's JSON, which are not used
    (the stage's torch AdamW and schedule are): each names the entries that would have changed the run.
    ``optimizer.params.lr`` and ``weight_decay`` are compared with the stage config instead."""
    def entries(block: str, kept_types: tuple, checked: tuple) -> list[str]:
        section = user.get(block)
        if not isinstance(section, dict):
            return []
        found = [f"{block}.type={json.dumps(section['type'])}"] if section.get("type", AUTO) not in kept_types else []
        params = section.get("params") if isinstance(section.get("params"), dict) else {}
        return found + [f"{block}.params.{name}={json.dumps(value)}" for name, value in params.items()
                        if name not in checked and value != AUTO]

    lines = []
    ignored = entries("optimizer", ("Adam", "AdamW", AUTO), ("lr", "weight_decay"))
    if ignored:
        lines.append(f"{source}: {', '.join(ignored)}: ignored, the stage runs torch AdamW (betas=(0.9, 0.999), "
                     f"eps=1e-08) with stageN.lr and stageN.weight_decay; remove them from the JSON or write \"auto\"")
    ignored = entries("scheduler", (AUTO,), ())
    if ignored:
        lines.append(f"{source}: {', '.join(ignored)}: ignored, the stage's schedule is set by stageN.lr_scheduler, "
                     f"stageN.warmup_ratio and stageN.min_lr_ratio; set those, and remove the scheduler block from "
                     f"the JSON")
    return lines


def read_deepspeed_json(path: str) -> dict:
    """The user's DeepSpeed JSON (``--deepspeed``), or a ConfigError naming it."""
    key = f"distributed.deepspeed_config={path} (--deepspeed)"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}: no such file; pass the path of a DeepSpeed JSON, or choose distributed=zero2 "
                          f"(or zero3, zero3_offload) instead") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{key}: cannot read it ({err}); pass the path of a DeepSpeed JSON file") from err
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{key}: not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{key}: a DeepSpeed config is a JSON object, not a {type(data).__name__}")
    return data


def _conflict(source: str, field: str, theirs, ours, key: str, *, fix: str | None = None) -> ConfigError:
    """The error for a JSON entry ``field`` whose value ``theirs`` differs from the stage config's ``key=ours``.
    ``fix``: the change of the run's config that would agree with the JSON, for an entry that is not a plain
    number of the stage config (default: ``set key=theirs``, and a value that is no number is named as such)."""
    if fix is None and isinstance(theirs, str):  # "2": DeepSpeed does not read a quoted number
        return ConfigError(f"{source}: {field}={json.dumps(theirs)} is a string; write the number without quotes "
                           f"(the stage config has {key}={ours}), or \"auto\"")
    if fix is None and (isinstance(theirs, bool) or not isinstance(theirs, (int, float))):
        return ConfigError(f"{source}: {field}={json.dumps(theirs)} is not a number; write a number (the stage "
                           f"config has {key}={ours}) or \"auto\", or remove {field} from the JSON")
    auto = "" if field == "torch_autocast" else " (or write \"auto\")"
    return ConfigError(f"{source}: {field}={theirs} differs from {key}={ours}; the stage config sets it: remove "
                       f"{field} from the JSON{auto}, or {fix or f'set {key}={theirs}'}")


def _entry_path(config: dict, loc: tuple) -> str:
    """The dotted path in ``config`` of the entry pydantic reports at ``loc`` (relative to the section
    it validated, e.g. ``zero_optimization``); ``loc`` itself when no entry ends with it."""
    loc = tuple(str(part) for part in loc)

    def walk(node, prefix):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            path = (*prefix, str(key))
            found = path if path[-len(loc):] == loc else walk(value, path)
            if found:
                return found
        return None

    return ".".join(walk(config, ()) or loc)


class _ReadKeys(dict):
    """A config whose top-level keys record when they are looked up (``read``), to tell the keys
    DeepSpeed reads from the ones it passes over without a word (a misspelt ``zero_optimisation``)."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def check_with_deepspeed(config: dict, source: str) -> list[str]:
    """DeepSpeed's own reading of ``config`` (a misspelt or ill-typed entry of its sections), so a
    mistake in the user's JSON stops the run before any model loads or output is written, naming
    the entry. ``train_batch_size`` is left to DeepSpeed to derive (it knows the launch's size).
    Returns the top-level keys DeepSpeed never looked up, each with the closest one it did (none
    when DeepSpeed is not installed, or reads the config in a way this cannot follow)."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfig
    except ImportError:  # the engine says so when it starts
        return []
    tracked = _ReadKeys({key: value for key, value in config.items() if key != "train_batch_size"})
    try:
        DeepSpeedConfig(tracked)
    except Exception as err:  # noqa: BLE001 - pydantic's ValidationError, assertions, DeepSpeedConfigError
        errors = err.errors() if callable(getattr(err, "errors", None)) else None
        if errors:
            what = "; ".join(f"{_entry_path(config, e['loc'])}"
                             + (f"={json.dumps(e['input'], default=str)}" if e.get("type") != "missing" else "")
                             + f": {e['msg']}" for e in errors)
        else:
            what = first_line(err)
        raise ConfigError(f"{source}: DeepSpeed refuses it ({what}); correct or remove that entry in the JSON "
                          f"(https://www.deepspeed.ai/docs/config-json/ lists DeepSpeed's settings)") from err
    known = {key for key in tracked.read if isinstance(key, str)}
    if "train_micro_batch_size_per_gpu" not in known:  # read some other way: nothing to tell
        return []
    unread = []
    for key in (key for key in tracked if key not in known):
        close = difflib.get_close_matches(key, sorted(known), n=1)
        unread.append(f"{key} (did you mean {close[0]}?)" if close else key)
    return unread


def deepspeed_config(distributed, *, stage, stage_key: str, world_size: int, precision: str) -> dict:
    """The DeepSpeed config of one stage: the user's JSON (if any) with the values the stage
    config holds filled in from it, and the engine's own settings.

    Raises:
        ConfigError: the JSON sets a value the stage config holds to something else (micro-batch,
            accumulation, global batch, clipping, lr, precision, ZeRO stage), naming both.
    """
    user = read_deepspeed_json(distributed.deepspeed_config) if distributed.deepspeed_config else {}
    source = f"distributed.deepspeed_config={distributed.deepspeed_config} (--deepspeed)"
    for block in ("zero_optimization", "torch_autocast", "optimizer", "scheduler", "fp16", "bf16"):
        value = user.get(block)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{source}: {block} must be a JSON object ({{...}}), not {json.dumps(value)} (e.g. "
                              f"\"zero_optimization\": {{\"stage\": 2}}, \"bf16\": {{\"enabled\": true}})")
    params = (user.get("optimizer") or {}).get("params")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: optimizer.params must be a JSON object ({{...}}), not {json.dumps(params)}")
    config = json.loads(json.dumps(user))  # a copy
    fills = {"train_micro_batch_size_per_gpu": (stage.batch_size, f"{stage_key}.batch_size"),
             "gradient_accumulation_steps": (stage.grad_accum, f"{stage_key}.grad_accum"),
             "gradient_clipping": (stage.max_grad_norm, f"{stage_key}.max_grad_norm")}
    for field, (ours, key) in fills.items():
        if field in user and user[field] != AUTO and (isinstance(user[field], bool) or user[field] != ours):
            raise _conflict(source, field, user[field], ours, key)
        config[field] = ours
    total = stage.batch_size * stage.grad_accum * world_size
    theirs = user.get("train_batch_size", AUTO)
    if theirs != AUTO and (isinstance(theirs, bool) or theirs != total):
        raise _conflict(source, "train_batch_size", theirs, total,
                        f"{stage_key}.batch_size x {stage_key}.grad_accum x {world_size} ranks",
                        fix=None if isinstance(theirs, (str, bool)) or not isinstance(theirs, (int, float)) else
                        f"choose {stage_key}.batch_size and {stage_key}.grad_accum whose product x {world_size} ranks "
                        f"is {theirs}")
    config["train_batch_size"] = total
    optimizer = user.get("optimizer") or {}
    for name, ours in (("lr", stage.lr), ("weight_decay", stage.weight_decay)):
        theirs = (optimizer.get("params") or {}).get(name, AUTO)
        if theirs != AUTO and (isinstance(theirs, bool) or theirs != ours):
            raise _conflict(source, f"optimizer.params.{name}", theirs, ours, f"{stage_key}.{name}")
    for block in ("optimizer", "scheduler"):
        config.pop(block, None)  # the stage's AdamW and schedule are used (see unused_settings)
    for name in ("fp16", "bf16"):
        enabled = user.get(name, {}).get("enabled", False) if isinstance(user.get(name), dict) else False
        if enabled not in (False, AUTO) and precision != name:
            fix = ("set train.precision=bf16 (--bf16)" if name == "bf16" else
                   "use bf16 (train.precision=bf16, --bf16): fp16 is not supported under DeepSpeed here")
            raise _conflict(source, f"{name}.enabled", enabled, precision, "train.precision", fix=fix)
        config.pop(name, None)  # mixed precision is torch.autocast over fp32 master weights, as on one device
    autocast = dict(user.get("torch_autocast") or {})
    wanted = {"bf16": "bfloat16"}.get(precision)
    if autocast.get("enabled") and autocast.get("dtype", "bfloat16") != wanted:
        fix = ("set train.precision=bf16 (--bf16)" if autocast.get("dtype", "bfloat16") == "bfloat16" else
               "let train.precision choose it (bf16 or fp32; torch.autocast runs only for bf16)")
        raise _conflict(source, "torch_autocast", json.dumps(autocast), precision, "train.precision", fix=fix)
    if wanted:
        # DeepSpeed's forward turns an outer autocast off unless its own section asks for it. No
        # module is named lower-precision-safe (by default Linear is), so gradients are reduced in
        # fp32, as on one device.
        autocast.update(enabled=True, dtype=wanted)
        autocast.setdefault("lower_precision_safe_modules", [])
        config["torch_autocast"] = autocast
    else:
        config.pop("torch_autocast", None)
    zero = dict(config.get("zero_optimization") or {})
    stage_from_json = zero.get("stage")
    if distributed.zero_stage is not None:
        if stage_from_json not in (None, distributed.zero_stage) or isinstance(stage_from_json, (str, bool)):
            raise ConfigError(f"{source}: zero_optimization.stage={json.dumps(stage_from_json)} differs from "
                              f"distributed.zero_stage={distributed.zero_stage} (distributed={distributed.name}); "
                              f"drop one of them")
        zero["stage"] = distributed.zero_stage
    elif type(stage_from_json) is not int or stage_from_json not in (1, 2, 3):
        shown = json.dumps(stage_from_json) if "stage" in zero else "missing"
        misspelt = [] if "zero_optimization" in user else [
            key for key in user if difflib.get_close_matches(key, ["zero_optimization"], n=1)]
        hint = f" (the JSON has {misspelt[0]}: did you mean zero_optimization?)" if misspelt else ""
        raise ConfigError(f"{source}: zero_optimization.stage is {shown}{hint}; set it to the number 1, 2 or 3 in "
                          f"the JSON, or choose distributed=zero2 / zero3")
    if distributed.offload:
        if zero["stage"] != 3:
            raise ConfigError(f"distributed.offload=true needs ZeRO stage 3 (this run: {zero['stage']}); choose "
                              f"distributed=zero3_offload")
        zero.setdefault("offload_optimizer", {"device": "cpu"})
        zero.setdefault("offload_param", {"device": "cpu"})
    config["zero_optimization"] = zero
    # A client torch optimizer: nothing is compiled at run time (DeepSpeed's own Adam ops are).
    config["zero_allow_untested_optimizer"] = True
    config["zero_force_ds_cpu_optimizer"] = False
    config.setdefault("steps_per_print", 2**62)
    config.setdefault("wall_clock_breakdown", False)
    unread = check_with_deepspeed(config, source)
    if unread:
        _warn_once(distributed, f"{source}: {', '.join(unread)}: not a DeepSpeed setting, DeepSpeed ignores it; "
                   f"correct or remove it (https://www.deepspeed.ai/docs/config-json/ lists DeepSpeed's settings)")
    for line in unused_blocks(user, source):
        _warn_once(distributed, line)
    return config


def teacher_config(config: dict) -> dict:
    """The DeepSpeed config of the frozen teacher under ZeRO-3: an inference-only engine whose
    weights are partitioned over the ranks (bf16 when the run's precision is). The student's
    ``stage3_*`` settings apply to it, not its ``offload_param``: the teacher's partitions stay on
    the GPUs under ``zero3_offload`` too (docs/distributed.md), rather than crossing from CPU memory
    for every layer of every forward."""
    return {"train_micro_batch_size_per_gpu": config["train_micro_batch_size_per_gpu"],
            "gradient_accumulation_steps": config["gradient_accumulation_steps"],
            "zero_optimization": {"stage": 3, **{k: v for k, v in config["zero_optimization"].items()
                                                 if k.startswith("stage3_")}},
            "steps_per_print": 2**62, "wall_clock_breakdown": False}


def shard_teacher(teacher: nn.Module, config: dict) -> nn.Module:
    """Partition the frozen ``teacher`` over the ranks as an inference-only ZeRO-3 engine (the
    recipe of TRL's ``prepare_deepspeed``); returns the module to call, whose parameters are
    gathered layer by layer as it runs."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=teacher, config=teacher_config(config), dist_init_required=False)
    engine.module.eval()
    return engine.module


class DeepSpeedEngine(ConsolidatedExports):
    """Optimises ``module`` (``training.module.DistillationModule``) with DeepSpeed ZeRO.

    Args:
        module: the trainable module; DeepSpeed wraps it (and, under ZeRO-3, partitions it).
        optimizer, scheduler: the stage's client AdamW and schedule (``training.optim``).
        weights: the weight of each loss term (``training.plan.loss_weights``): the loss is
            their weighted sum (balancing is refused under DeepSpeed, see ``config.validate``).
        config: the stage's DeepSpeed config (:func:`deepspeed_config`).
        topology: this process's place in the launch.
        whole: parameters held whole inside :meth:`gathered` under ZeRO-3 (the heads' weights).
    """

    kind = "deepspeed"

    def __init__(self, module: nn.Module, *, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, weights: dict[str, float], config: dict,
                 topology: Topology, whole: list[torch.Tensor] = ()):
        import deepspeed

        self.module, self.scheduler, self.weights, self.topo = module, scheduler, weights, topology
        self.zero_stage = config["zero_optimization"]["stage"]
        self.kind = f"deepspeed-zero{self.zero_stage}"
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                                             dist_init_required=False)
        self.whole = list(whole)
        self._updates = self.ds.global_steps
        self.bad_in_row = 0
        self.bad_total = 0
        self._nonfinite = ""

    def forward(self, *args):
        return self.ds(*args)

    def gathered(self):
        """Hold the heads' weights whole for the block (ZeRO-3); nothing otherwise."""
        return whole_parameters(self.whole) if self.zero_stage == 3 else contextlib.nullcontext()

    def backward(self, terms: dict[str, torch.Tensor]) -> dict[str, float]:
        """Backpropagate this rank's share of one micro-batch's terms (see the module docstring).
        A non-finite term poisons the step's gradient, so every rank skips it at :meth:`step`;
        every rank runs all its micro-batches either way (DeepSpeed's reductions are collective)."""
        loss, nonfinite = weighted_loss(terms, self.weights, self.topo.world_size)
        self._nonfinite = self._nonfinite or nonfinite
        self.ds.backward(loss, scale_wrt_gas=False)
        # DeepSpeed's pattern: step after every micro-batch; it updates at the accumulation
        # boundary (each rank runs exactly gradient_accumulation_steps micro-batches a step).
        self.ds.step()
        return {}

    def step(self) -> StepOutcome:
        """The outcome of the step DeepSpeed took at the last micro-batch (clip, update, zero the
        gradients); a non-finite global gradient norm (any rank's non-finite loss makes it one)
        skipped the update on every rank."""
        lr = self.scheduler.get_last_lr()[0]
        if self.ds.global_steps != self._updates + 1:
            raise RuntimeError(f"DeepSpeed took {self.ds.global_steps - self._updates} optimizer steps for one step of "
                               f"the stage; each rank must run gradient_accumulation_steps micro-batches a step")
        self._updates = self.ds.global_steps
        norm = self.ds.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        (bad_here,) = all_reduce_sum(self.topo, [1.0 if self._nonfinite else 0.0])
        skipped = not math.isfinite(grad_norm) or bad_here > 0
        nonfinite = self._nonfinite or (f"grad_norm={grad_norm}" if skipped else "")
        if skipped and not nonfinite:
            nonfinite = "a non-finite loss on another rank"
        if skipped:
            self.bad_in_row += 1
            self.bad_total += 1
            grad_norm = float("nan") if self._nonfinite or bad_here else grad_norm
        else:
            self.scheduler.step()
            self.bad_in_row = 0
        self._nonfinite = ""
        return StepOutcome(lr=lr, grad_norm=grad_norm, skipped=skipped, bad_in_row=self.bad_in_row,
                           bad_total=self.bad_total, nonfinite=nonfinite)

    def zero_grad(self) -> None:
        self.ds.zero_grad()
        self._nonfinite = ""

    def destroy(self) -> None:
        """Remove DeepSpeed's hooks from the module (before the next stage wraps it anew)."""
        self.ds.destroy()

    # ------------------------------------------------------------------ state
    def save_state(self, directory: Path) -> dict:
        """Write every rank's engine state (DeepSpeed's partitioned weights and optimizer states)
        under ``directory/deepspeed``; returns the replicated rest (schedule, skip count)."""
        self.ds.save_checkpoint(str(directory / DS_DIR), tag="state", save_latest=False)
        return {"kind": self.kind, "scheduler": self.scheduler.state_dict(), "bad_total": self.bad_total}

    def load_state(self, directory: Path, state: dict) -> None:
        if state.get("kind", "single-device") != self.kind:
            raise other_engine(state.get("kind", "single-device"), self.kind)
        path, _ = self.ds.load_checkpoint(str(directory / DS_DIR), tag="state", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
        if path is None:
            raise CheckpointError(f"{directory / DS_DIR}: no DeepSpeed state can be loaded from it")
        self.scheduler.load_state_dict(state["scheduler"])
        self.bad_total = state["bad_total"]
        self._updates = self.ds.global_steps

    # ---------------------------------------------------------------- exports
    def _full_state(self, prefix: str) -> dict[str, torch.Tensor] | None:
        """The whole weights under ``prefix`` (``student.``, ``heads.``) on rank 0, None on the
        others; under ZeRO-3 gathered one layer at a time (a collective: every rank calls it)."""
        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict() if self.topo.is_main else None
        if state is None:
            return None
        return {name[len(prefix):]: value for name, value in state.items() if name.startswith(prefix)}
