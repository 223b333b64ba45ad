"""The slim-down step: a student pruned from the teacher by measured importance.

Depth first (:mod:`qwen_distillation.modeling.depth`: which ``keep_layers`` layers stay), then width
(:mod:`qwen_distillation.modeling.width`: MLP channels, whole KV groups of attention heads, hidden
channels, ranked by their activations on the pruned-in-depth model). Both rank by a calibration set:
by default training examples (never held-out ones) of the run's general and medical data. The result
is a standard Hugging Face model of the teacher's architecture with a smaller config, and a record
of what was chosen and why (:class:`Pruned`), which the run and ``python -m qwen_distillation.prune``
save beside the student.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel

from qwen_distillation.data.manager import length_grouped_batches
from qwen_distillation.data.sources import DataSource, build_domain_data, checked_sources, data_sources
from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.depth import choose_layers, decoder_layers
from qwen_distillation.modeling.loading import slim_down
from qwen_distillation.modeling.width import WidthScores, check_width_targets, prune_width, width_importance

log = logging.getLogger(__name__)

WIDTH_DIMENSIONS = ("intermediate_size", "num_key_value_heads", "hidden_size")


@dataclass
class Pruned:
    """What the slim-down step chose: ``record`` is JSON-ready (method, kept layers and each
    layer's score, width targets, calibration set); ``width_scores`` the channel importances."""

    student: PreTrainedModel
    record: dict
    width_scores: WidthScores | None = None
    kept_layers: list[int] = field(default_factory=list)


def width_targets(prune_cfg) -> dict[str, int]:
    """The width dimensions ``prune_cfg.width`` sets (``null`` ones left out)."""
    return {k: getattr(prune_cfg.width, k) for k in WIDTH_DIMENSIONS if getattr(prune_cfg.width, k) is not None}


def ignored_prune_options(student_spec) -> list[str]:
    """The ``model.student.prune`` options the chosen pruning ignores, one warning line each: a
    ``perplexity_search`` without ``method=perplexity``, and calibration ``sources`` (never opened) when
    nothing is calibrated (``method=even`` and no width target). Warnings, not errors: a sweep over
    ``model.student.prune.method`` keeps them while one of its methods does not read them."""
    from qwen_distillation.config.schema import CalibrationConfig
    from qwen_distillation.config.validate import pruned_from_teacher

    prune, lines = student_spec.prune, []
    calibration = [f"model.student.prune.calibration.{name}={getattr(prune.calibration, name)}"
                   for name in ("num_examples", "max_length", "batch_size", "seed")
                   if getattr(prune.calibration, name) != getattr(CalibrationConfig, name)]
    if not pruned_from_teacher(student_spec):  # a student loaded as it is (--student_model, random_init)
        changed = ([f"model.student.prune.perplexity_search={prune.perplexity_search}"]
                   if prune.perplexity_search != "single" else []) + \
            (["model.student.prune.calibration.sources"] if prune.calibration.sources else []) + calibration
        if changed:
            lines.append(f"{', '.join(changed)}: ignored, the student is loaded as it is (model.student.path or "
                         f"random_init), not pruned from the teacher; prune it with model.student.keep_layers=N "
                         f"and/or model.student.prune.width.* (model.student.path=null random_init=null)")
        return lines
    if prune.method != "perplexity" and prune.perplexity_search != "single":
        lines.append(f"model.student.prune.perplexity_search={prune.perplexity_search}: ignored, it applies to "
                     f"model.student.prune.method=perplexity only and the method is {prune.method}; set "
                     f"model.student.prune.method=perplexity to search that way")
    if prune.calibration.sources and not needs_calibration(student_spec):
        lines.append("model.student.prune.calibration.sources: ignored (not even opened), nothing is calibrated "
                     "(model.student.prune.method=even keeps evenly spaced layers and no model.student.prune.width.* "
                     "target is set); choose the layers by measured importance with "
                     "model.student.prune.method=block_influence (or perplexity) to use them")
    if calibration and not needs_calibration(student_spec):
        lines.append(f"{', '.join(calibration)}: ignored, nothing is calibrated (model.student.prune.method=even "
                     f"keeps evenly spaced layers and no model.student.prune.width.* target is set); choose the "
                     f"layers by measured importance with model.student.prune.method=block_influence (or "
                     f"perplexity) to use {'it' if len(calibration) == 1 else 'them'}")
    return lines


def check_targets_early(student_spec, teacher_config) -> None:
    """The width targets of ``student_spec.prune`` against the teacher's config (None: not read
    cheaply, e.g. a GGUF or hub teacher; the targets are checked again as the student is pruned),
    and a warning for each pruning option set that the pruning ignores (:func:`ignored_prune_options`)."""
    for line in ignored_prune_options(student_spec):
        log.warning("%s", line)
    targets = width_targets(student_spec.prune)
    if targets and teacher_config is not None:
        check_width_targets(teacher_config, targets)


def needs_calibration(student_spec) -> bool:
    return student_spec.prune.method != "even" or bool(width_targets(student_spec.prune))


def calibration_source_set(calibration, data_cfg) -> tuple[dict[str, list[DataSource]], float]:
    """Where a calibration set is drawn from: ``(sources, eval_fraction)`` for ``build_domain_data``.

    ``calibration.sources`` when given (all of it), else the run's ``data.general`` and ``data.medical``
    less the held-out split (``data.eval_fraction``), as the run splits them. Each path is checked here,
    so a mistyped one fails before any model loads, naming its config entry.
    """
    if calibration.sources:
        sources = checked_sources("model.student.prune.calibration.sources", calibration.sources)
        return {"general": sources, "medical": [], "eval": []}, 0.0
    return {**data_sources(data_cfg), "eval": []}, data_cfg.eval_fraction


def calibration_examples(calibration, data_cfg, tokenizer, seed: int) -> list[dict]:
    """``calibration.num_examples`` encoded examples drawn by ``calibration.seed`` (else ``seed``),
    from :func:`calibration_source_set`, half from each of its general and medical pools; what a pool
    lacks of its half is drawn from the other, and a set smaller than asked for is warned of."""
    max_length = calibration.max_length or data_cfg.max_length
    sources, eval_fraction = calibration_source_set(calibration, data_cfg)
    key = "model.student.prune.calibration.max_length" if calibration.max_length else "data.max_length"
    data = build_domain_data(sources, tokenizer, max_length=max_length, eval_fraction=eval_fraction,
                             max_eval_examples=data_cfg.max_eval_examples, seed=data_cfg.split_seed,
                             max_length_key=key, warn_held_out=False)  # the run warns of its held-out sets
    pools = [pool for pool in (data.general, data.medical) if pool]
    if not pools:
        raise ConfigError("model.student.prune.calibration: no examples to calibrate on; set data.general / "
                          "data.medical or model.student.prune.calibration.sources=[my_data.jsonl]")
    rng = random.Random(calibration.seed if calibration.seed is not None else seed)
    wanted = calibration.num_examples
    share = [min(wanted // len(pools) + (i < wanted % len(pools)), len(pool)) for i, pool in enumerate(pools)]
    for i, pool in enumerate(pools):  # a small pool's shortfall from the others, in order
        share[i] += min(len(pool) - share[i], wanted - sum(share))
    chosen = []
    for pool, n in zip(pools, share):
        chosen.extend(pool[i] for i in sorted(rng.sample(range(len(pool)), n)))
    if len(chosen) < wanted:
        log.warning("model.student.prune.calibration.num_examples=%d: the calibration set holds %d examples, all "
                    "there are (%s training examples); the scores rank on these, or add data with "
                    "model.student.prune.calibration.sources", wanted, len(chosen),
                    " and ".join(f"{len(pool)} {name}" for name, pool in (("general", data.general),
                                                                          ("medical", data.medical)) if pool))
    return chosen


def _agree(value):
    """Rank 0's ``value`` on every rank of a launch (ranks may differ in the last bits of a GPU sum)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _placeholder_scores(config) -> WidthScores:
    """All-zero scores of the right shapes: a structure-only student keeps any channels."""
    layers = config.num_hidden_layers
    return WidthScores(mlp=torch.zeros(layers, config.intermediate_size),
                       heads=torch.zeros(layers, config.num_attention_heads),
                       kv_groups=torch.zeros(layers, config.num_key_value_heads),
                       hidden=torch.zeros(config.hidden_size))


def prune_from_teacher(teacher: PreTrainedModel, student_spec, *, batches: list[dict] | None,
                       dtype: torch.dtype = torch.float32, structure_only: bool = False, agree: bool = True) -> Pruned:
    """Build the student from ``teacher`` as ``student_spec`` (a ModelSpec: ``keep_layers`` and
    ``prune``) asks. ``batches``: collated calibration micro-batches on the teacher's device (input_ids,
    attention_mask, labels (B, S)); needed unless the method is ``even`` and no width is pruned.
    The student is a copy in ``dtype`` on the teacher's device; the teacher is left unchanged.

    ``structure_only``: the student's shapes alone (a meta teacher on an FSDP2 rank that receives
    rank 0's weights): no calibration, evenly spaced layers, any channels. ``agree``: every rank of
    a launch computes the choice and takes rank 0's (a collective; off where rank 0 alone chooses)."""
    prune = student_spec.prune
    num_layers = len(decoder_layers(teacher))
    keep = student_spec.keep_layers or num_layers
    if needs_calibration(student_spec) and not batches and not structure_only:
        raise ConfigError("model.student.prune.calibration: no calibration batches")
    agreed = _agree if agree else (lambda value: value)
    method = "even" if structure_only else prune.method
    kept, scores = agreed(choose_layers(teacher, keep, method, batches, prune.perplexity_search))
    student, kept = slim_down(teacher, keep, dtype, layers=kept)
    record = {"method": prune.method, "teacher_layers": num_layers, "kept_layers": kept, "layer_scores": scores}
    if prune.method == "perplexity":
        record["perplexity_search"] = prune.perplexity_search
    targets = width_targets(prune)
    width_scores = None
    if targets:
        before = {k: int(getattr(student.config, k)) for k in targets}
        width_scores = (_placeholder_scores(student.config) if structure_only
                        else agreed(width_importance(student, batches)))
        student = prune_width(student, width_scores, **targets)
        record["width"] = {k: {"teacher": before[k], "student": v} for k, v in targets.items()}
    if batches:
        record["calibration"] = {"examples": sum(len(b["input_ids"]) for b in batches),
                                 "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches))}
    record["parameters"] = {"teacher": _count(teacher), "student": _count(student)}
    log.info("student: teacher layers %s (%s)%s; %d -> %d parameters", kept, prune.method,
             "".join(f", {k} {v['teacher']} -> {v['student']}" for k, v in record.get("width", {}).items()),
             record["parameters"]["teacher"], record["parameters"]["student"])
    return Pruned(student, record, width_scores, kept)


def calibration_batches(student_spec, data_cfg, tokenizer, *, seed: int, pad_token_id: int,
                        device: torch.device) -> list[dict] | None:
    """The collated calibration micro-batches ``student_spec.prune`` needs, or None when it needs none."""
    if not needs_calibration(student_spec):
        return None
    calibration = student_spec.prune.calibration
    examples = calibration_examples(calibration, data_cfg, tokenizer, seed)
    return length_grouped_batches(examples, calibration.batch_size, pad_token_id, device)


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())



PRUNING_FILES = ("pruning.json", "pruning_scores.safetensors")  # what save_pruning writes


def save_pruning(directory: Path, pruned: Pruned) -> None:
    """Write ``pruning.json`` (the record) and, with width pruning, ``pruning_scores.safetensors``
    (each channel's importance) into ``directory``, each under a temporary name first; without width
    pruning an earlier scores file there is removed, so that none describes another pruning."""
    directory = Path(directory)
    files = {"pruning.json": json.dumps(pruned.record, indent=2).encode()}
    if pruned.width_scores is None:
        (directory / "pruning_scores.safetensors").unlink(missing_ok=True)
    else:
        from safetensors.torch import save

        scores = pruned.width_scores
        files["pruning_scores.safetensors"] = save({k: getattr(scores, k).float().contiguous().cpu()
                                                    for k in ("mlp", "heads", "kv_groups", "hidden")})
    for name, data in files.items():
        tmp = directory / f".{name}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, directory / name)
