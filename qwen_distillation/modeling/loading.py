"""Loading teacher and student models: hub ids, local directories, GGUF files, random
tiny models from a config, and students slimmed down from the teacher."""

from __future__ import annotations

import copy
import glob
import logging
import os
import re
from typing import Sequence

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qwen_distillation.data.generated import fingerprint_files, model_fingerprint
from qwen_distillation.errors import CheckpointError, ConfigError, first_line
from qwen_distillation.modeling.depth import evenly_spaced_layers
from qwen_distillation.modeling.files import StrictDataclassError, check_model_dir, read_json
from qwen_distillation.modeling.parts import head_dim
from qwen_distillation.modeling.varlen import VARLEN
from qwen_distillation.modeling.varlen import register as register_varlen
from qwen_distillation.paths import resolve_path, sweep_job_folders

log = logging.getLogger(__name__)


def split_gguf(path: str, gguf_file: str | None) -> tuple[str, str | None]:
    """``dir/model.gguf`` -> (``dir``, ``model.gguf``); other paths unchanged."""
    if gguf_file is None and path.endswith(".gguf"):
        return os.path.dirname(path) or ".", os.path.basename(path)
    return path, gguf_file


def _is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") > 1


def require_existing(path: str, key: str) -> None:
    """A path that can only be local (``./x``, ``/x``, ``~/x``, ``a/b/c``) must exist; a hub id
    such as ``Qwen/Qwen2.5-7B`` is left to the hub. Raises ConfigError naming ``key``."""
    if _is_local(path) and not os.path.exists(path):
        raise ConfigError(f"{key}={path}: no such file or directory; give an existing local model directory or "
                          f"file, or a hub id such as Qwen/Qwen2.5-7B-Instruct")


def existing_model_path(source: str, gguf_file: str | None, key: str) -> tuple[str, str | None]:
    """``source`` (``package:``/project-relative paths resolved) as (directory or hub id, GGUF file
    name or None), refused naming ``key`` when it can only be local and is not there: the directory,
    or the ``.gguf`` file in it (a hub repository's GGUF file is left to the hub)."""
    path, gguf_file = split_gguf(resolve_path(source), gguf_file)
    require_existing(path, key)
    if gguf_file and os.path.isdir(path):
        require_existing(os.path.join(path, gguf_file), key)
    return path, gguf_file


def _plain_copy(model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """A model loaded from GGUF is flagged as quantized (``.to(dtype)`` raises); rebuild it
    as a plain model with the same, already dequantized, weights."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    plain.tie_weights()
    return plain


def empty_model(config, dtype: torch.dtype, *, trust_remote_code: bool = False) -> PreTrainedModel:
    """The model of ``config`` on the meta device: its structure, parameter shapes and dtypes, tied
    weights tied, and no storage (nothing read, nothing initialised). A rank of an FSDP2 launch
    builds the models this way and receives rank 0's weights into its shards
    (``training.fsdp_engine.shard_model``)."""
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):  # as _plain_copy: the weights arrive dequantized
        del config.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)


def _sizes_error(spec, role: str, model_type: str, why: str) -> ConfigError:
    return ConfigError(f"model.{role}.random_init={dict(spec.random_init)}: cannot build a {model_type} model from "
                       f"these sizes: {why}; check each size is a positive integer that the others divide (e.g. "
                       f"hidden_size by num_attention_heads) and the head size is even")


def _attention_error(spec, role: str, err: Exception) -> ConfigError | None:
    """``err`` as a ConfigError naming ``model.ROLE.attn_implementation`` when it is transformers refusing
    that implementation (unknown, or flash attention not installed), else None."""
    if not spec.attn_implementation or not (isinstance(err, ImportError) or "attn_implementation" in str(err)):
        return None
    return ConfigError(f"model.{role}.attn_implementation={spec.attn_implementation}: transformers cannot use it "
                       f"here: {first_line(err)}; use sdpa, eager or null (the model's default)")


def _random_init_config(spec, role: str):
    """The config ``model.ROLE.random_init`` describes; a ConfigError naming it when it has no
    ``model_type`` or one transformers does not know, or attention sizes that build a model whose
    first forward pass fails (heads that do not divide, an odd head size for the rotary embeddings)."""
    kwargs = dict(spec.random_init)
    model_type = kwargs.pop("model_type", None)
    where = f"model.{role}.random_init"
    if model_type is None:
        raise ConfigError(f"{where} needs a model_type (e.g. {where}.model_type=qwen2)")
    try:
        config = AutoConfig.for_model(model_type, **kwargs)
    except ValueError:
        raise ConfigError(f"{where}.model_type={model_type}: not a model type transformers knows; use e.g. "
                          f"{where}.model_type=qwen2 (or llama, mistral, qwen3)") from None
    except StrictDataclassError as err:
        raise _sizes_error(spec, role, model_type, first_line(err.__cause__ or err).rstrip(".")) from None
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None)
    kv_heads = heads if kv_heads is None else kv_heads
    if not all(isinstance(n, int) and n > 0 for n in (hidden, heads, kv_heads)):
        return config  # no such fields, or a size that builds no model: the build reports it
    explicit = getattr(config, "head_dim", None)
    if not explicit and hidden % heads:
        why = f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
    elif heads % kv_heads:
        why = f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
    elif head_dim(config) % 2 and (hasattr(config, "rope_parameters") or hasattr(config, "rope_theta")):
        size = "head_dim" if "head_dim" in kwargs else f"hidden_size // num_attention_heads = {hidden} // {heads}"
        why = f"the head size ({size}) is {head_dim(config)}, odd; rotary position embeddings need an even one"
    else:
        return config
    raise _sizes_error(spec, role, config.model_type, why)


def config_without_weights(spec, role: str):
    """The model config of ``spec`` where it can be read without weights or the network (a
    ``random_init``, or a local directory's config.json), else None."""
    if spec.random_init:
        return _random_init_config(spec, role)
    path = resolve_path(spec.path) if spec.path and not spec.gguf_file else None
    if path and not path.endswith(".gguf") and os.path.isfile(os.path.join(path, "config.json")):
        try:
            return AutoConfig.from_pretrained(path, trust_remote_code=spec.trust_remote_code)
        except (OSError, ValueError):
            return None
    return None


def check_weights_fit(info: dict, where: str, fix: str) -> None:
    """Refuse a model loaded with ``output_loading_info=True, ignore_mismatched_sizes=True`` whose weights
    files lack tensors of the model its config.json describes, or hold them in another shape (a config.json
    of another model copied beside them): transformers initialises those at random with a warning only.

    Raises:
        CheckpointError: naming ``where`` (the option and path), the first tensors at fault and ``fix``.
    """
    wrong = [f"{name} missing" for name in sorted(info["missing_keys"])]
    wrong += [f"{name} has shape {tuple(saved)} in the weights, {tuple(wanted)} by config.json"
              for name, saved, wanted in sorted(info["mismatched_keys"], key=lambda entry: entry[0])]
    if wrong:
        more = f", and {len(wrong) - 2} more" if len(wrong) > 2 else ""
        raise CheckpointError(f"{where}: its weights do not fit the model its config.json describes "
                              f"({'; '.join(wrong[:2])}{more}): config.json and the weights files were not saved "
                              f"together; {fix}")


def load_causal_lm(spec, *, dtype: torch.dtype, role: str, key: str | None = None,
                   meta: bool = False) -> PreTrainedModel:
    """Load one model as described by a :class:`~qwen_distillation.config.schema.ModelSpec`.

    ``role`` (teacher/student) and ``key``, the option that gave the path (default
    ``model.ROLE.path``), only appear in error messages. ``meta``: read only the model's config
    and build it on the meta device (:func:`empty_model`); the same checks run and the same errors
    are raised as for a real load, so every rank of a launch stops alike on a bad path.

    Raises:
        ConfigError: no path, a local path that does not exist, or a model transformers cannot load.
        CheckpointError: a local model directory with a truncated or damaged file, named.
    """
    key = key or f"model.{role}.path"
    if spec.attn_implementation == VARLEN:  # ours: known to transformers once registered
        register_varlen()
    if spec.random_init:
        config = _random_init_config(spec, role)
        if spec.attn_implementation:
            config._attn_implementation = spec.attn_implementation
        try:
            return empty_model(config, dtype) if meta else AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ImportError as err:  # flash attention asked for but not installed
            raise _attention_error(spec, role, err) or err
        except (ValueError, RuntimeError, TypeError) as err:
            raise _attention_error(spec, role, err) or _sizes_error(spec, role, config.model_type,
                                                                    str(err).splitlines()[0]) from None
    if not spec.path:
        raise ConfigError(f"model.{role}.path is not set: pass --{role}_model PATH_OR_HUB_ID")
    path, gguf_file = existing_model_path(spec.path, spec.gguf_file, key)
    kwargs = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    fix = f"download, copy or export {path} again, or point {key} to an intact copy"
    # A local directory's weights are checked against its config.json (check_weights_fit), not left to transformers.
    checked = {}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    elif os.path.isdir(path):
        check_model_dir(path, fix)
        checked = dict(output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        if meta:
            config = AutoConfig.from_pretrained(path, **kwargs)
            if spec.attn_implementation:
                config._attn_implementation = spec.attn_implementation
            return empty_model(config, dtype, trust_remote_code=spec.trust_remote_code)
        if spec.attn_implementation:
            kwargs["attn_implementation"] = spec.attn_implementation
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs, **checked)
    except ImportError as err:  # flash attention asked for but not installed
        raise _attention_error(spec, role, err) or err
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as err:
        if (attention := _attention_error(spec, role, err)) is not None:
            raise attention from err
        # A config.json whose sizes contradict each other: transformers' check, with the reason in its cause.
        reason = first_line(err.__cause__ or err) if isinstance(err, StrictDataclassError) else err
        raise ConfigError(f"{key}={spec.path}: cannot load a causal LM from it: {reason}") from err
    if checked:
        model, info = model
        check_weights_fit(info, f"{key}={spec.path}", fix)
    if gguf_file:
        model = _plain_copy(model, dtype)
    return model


def slim_down(teacher: PreTrainedModel, keep_layers: int, dtype: torch.dtype,
              layers: Sequence[int] | None = None) -> tuple[PreTrainedModel, list[int]]:
    """A student initialised from the teacher with ``keep_layers`` of its decoder layers: ``layers``
    (indices, e.g. chosen by :func:`qwen_distillation.modeling.depth.choose_layers`), else evenly
    spaced ones. Returns (the student, the kept indices in order).

    Embeddings, final norm, lm_head and the generation config are copied; decoder layer ``kept[j]``
    of the teacher becomes layer ``j`` of the student. Works for decoder-only models whose layers live in a
    ``layers.<i>.`` module list (Llama, Qwen2, Mistral, Gemma, ...).
    """
    num_layers = teacher.config.num_hidden_layers
    kept = sorted(layers) if layers is not None else evenly_spaced_layers(num_layers, keep_layers)
    if len(set(kept)) != keep_layers or not all(0 <= i < num_layers for i in kept):
        raise ConfigError(f"model.student.keep_layers={keep_layers}: cannot keep layers {kept} of a teacher "
                          f"with {num_layers} layers")
    config = copy.deepcopy(teacher.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    if teacher.device.type == "meta":  # a rank that receives the weights (FSDP2): the student's structure only
        student = empty_model(config, dtype)
    else:
        student = AutoModelForCausalLM.from_config(config, dtype=dtype)
    new_index = {old: new for new, old in enumerate(kept)}
    pattern = re.compile(r"(^|\.)layers\.(\d+)\.")
    state = {}
    for key, value in teacher.state_dict().items():
        match = pattern.search(key)
        if match:
            old = int(match.group(2))
            if old not in new_index:
                continue
            key = key[: match.start(2)] + str(new_index[old]) + key[match.end(2):]
        state[key] = value.detach().to(dtype).clone()
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise ConfigError(f"model.student.keep_layers: cannot slim down {type(teacher).__name__}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    student.tie_weights()
    # How the teacher generates (its eos list, a released model's sampling defaults): from_config gave the
    # student a default one, and its exports stopped at one eos token and sampled otherwise.
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student, kept


def shares_weights(path: str, other: str) -> bool:
    """Whether the exports ``path`` and ``other`` share their weight files (``stageN/final`` linked
    to a ``stageN/best`` exported at the stage's last step): a damaged one is damaged in both."""
    try:
        files = [name for name in os.listdir(path) if name.endswith(".safetensors")]
        return bool(files) and all(os.path.samefile(os.path.join(path, name), os.path.join(other, name))
                                   for name in files)
    except OSError:
        return False


def other_checkpoint(path: str) -> str:
    """The checkpoint to suggest instead of a damaged ``path``: ``stageN/best`` for ``stageN/final``
    and the other way round unless the two share their weight files, else the final model of a stage."""
    name = os.path.basename(os.path.normpath(path))
    if name in ("best", "final"):
        other = os.path.join(os.path.dirname(os.path.normpath(path)), "final" if name == "best" else "best")
        if not shares_weights(path, other):
            return other
    return "OUTPUT_DIR/stage1/final"


def _not_a_stage_hint(path: str, start_stage: int | None = None) -> str:
    """What to pass instead of a directory that holds no saved model, by what it holds; of a run's output_dir, the
    export of the stage before ``start_stage`` (the first stage of the run that starts from it) where it has one."""
    name = os.path.basename(os.path.normpath(path))
    if name.startswith("checkpoint-"):
        return ("it is a mid-stage checkpoint (engine state, not an export): to continue that run, rerun its own "
                "command with the same output_dir; to start from that stage, pass its best or final export, e.g. "
                f"{os.path.join(os.path.dirname(os.path.normpath(path)), 'best')}")
    for export in ("best", "final"):
        if os.path.isdir(os.path.join(path, export)):
            return f"it is a stage folder: pass one of its exports, e.g. {os.path.join(path, export)}"
    stages = sorted(d for d in os.listdir(path) if d.startswith("stage") and os.path.isdir(os.path.join(path, d)))
    if stages:
        before = f"stage{start_stage - 1}" if start_stage else None
        stage = before if before in stages else stages[-1]
        return f"it is a run's output_dir: pass a stage's export, e.g. {os.path.join(path, stage, 'best')}"
    jobs = sweep_job_folders(path)
    if jobs:  # a multirun's output_dir: a run in each jobN
        return (f"it is a sweep's folder: pass a stage's export of one of its jobs, e.g. "
                f"{os.path.join(path, jobs[0].name, f'stage{max((start_stage or 2) - 1, 1)}', 'best')}")
    return "is it a stage directory such as OUTPUT_DIR/stage1/final?"


def _damaged_fix(path: str, key: str | None) -> str:
    """The default fix for a saved student whose files are truncated or damaged."""
    return f"export or copy {path} again, or pass another saved stage, e.g. {key}={other_checkpoint(path)}"


def check_student_checkpoint(path: str, *, key: str | None = "checkpoint_path", fix: str | None = None,
                             start_stage: int | None = None) -> None:
    """The checks of :func:`load_student_checkpoint` that read only small files (the directory,
    its JSON files and safetensors headers): a run makes them before any model loads. ``start_stage``: the
    first stage of the run that starts from ``path``, whose previous stage a hint names."""
    where = f"{key}={path}" if key else path
    if os.path.isfile(path):  # a saved stage's model.safetensors or config.json, say
        folder = os.path.dirname(os.path.abspath(path))
        hint = f"pass the folder that holds it, e.g. {key}={folder}" if key else "pass the folder that holds it"
        if not any(os.path.exists(os.path.join(folder, f)) for f in ("config.json", "adapter_config.json")):
            # stageN/heads.pt: its folder is a stage folder, which holds no model either
            hint = f"its folder {folder} holds no saved model either: {_not_a_stage_hint(folder, start_stage)}"
        raise CheckpointError(f"{where}: is a file, not the directory of a saved stage (its config.json and weights); "
                              f"{fix or hint}")
    if not os.path.isdir(path):
        raise CheckpointError(f"{where}: no such directory; "
                              f"{fix or f'pass the directory of a saved stage, e.g. {key}=OUTPUT_DIR/stage1/best'}")
    if not any(os.path.exists(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
        raise CheckpointError(f"{where}: holds no config.json or adapter_config.json; "
                              f"{_not_a_stage_hint(path, start_stage)}")
    check_model_dir(path, fix or _damaged_fix(path, key))
    weights = ("*.safetensors", "*.bin") if os.path.exists(os.path.join(path, "config.json")) else (
        "adapter_model.*",)
    if not any(glob.glob(os.path.join(glob.escape(path), pattern)) for pattern in weights):
        raise CheckpointError(f"{where}: holds no weights file ({' or '.join(weights)}); "
                              f"{fix or _damaged_fix(path, key)}")
    adapter_config = os.path.join(path, "adapter_config.json")
    record = read_json(adapter_config, fix or _damaged_fix(path, key)) if weights == ("adapter_model.*",) else None
    if isinstance(record, dict) and not record.get("base_model_name_or_path"):
        # peft looked for a hub model named "None" (minutes of retries offline), then blamed the network
        raise CheckpointError(f"{where}: a LoRA adapter whose {adapter_config} names no base model "
                              f"(base_model_name_or_path is empty); set it to the directory or hub id of the model "
                              f"the adapter was trained on (a run's OUTPUT_DIR/student_base), or pass a merged export")


ADAPTER_BASE = "adapter_base.json"  # beside a LoRA adapter: its base's path and sampled weight fingerprint


_BASE_FINGERPRINTS: dict[str, tuple[tuple, str | None]] = {}  # resolved base dir -> (its files' stats, fingerprint)


def adapter_base_record(base_model_dir: str) -> dict | None:
    """What an adapter export records of its base (:data:`ADAPTER_BASE`); None for a hub id or a
    directory without weights. The fingerprint is memoised per resolved directory while the name, size and
    mtime_ns of each file it reads stay the same, so a run's exports sample an unchanged ``student_base``
    once and a base rewritten in place again."""
    local, files = fingerprint_files(base_model_dir)
    if not files:
        return None
    stats = tuple((file.name, (stat := file.stat()).st_size, stat.st_mtime_ns) for file in files)
    key = str(local.resolve())
    cached = _BASE_FINGERPRINTS.get(key)
    if cached is None or cached[0] != stats:
        cached = _BASE_FINGERPRINTS[key] = stats, model_fingerprint(base_model_dir)
    fingerprint = cached[1]
    return {"base_model_name_or_path": base_model_dir, "fingerprint": fingerprint} if fingerprint else None


def check_adapter_base(path: str, base: str, where: str, fix: str) -> None:
    """Refuse a LoRA adapter whose local base now holds other weights than the ones it was trained on
    (another run wrote its ``student_base`` there, e.g. with ``overwrite_output_dir=true``): peft would
    apply it to them without a word. Adapters exported before the record existed are not checked."""
    record = os.path.join(path, ADAPTER_BASE)
    if not os.path.exists(record):
        return
    before, now = read_json(record, fix).get("fingerprint"), model_fingerprint(base)
    if before and now and before != now:
        raise CheckpointError(f"{where}: the LoRA adapter's base model {base} now holds other weights than the ones "
                              f"it was trained on (sampled fingerprint {before[:12]} -> {now[:12]}, recorded in "
                              f"{record}; another run wrote there, e.g. with overwrite_output_dir=true); put its own "
                              f"base back there, or use a merged export of that run (lora.merge_on_export=true)")


def load_student_checkpoint(path: str, *, dtype: torch.dtype, quantization=None, key: str | None = "checkpoint_path",
                            fix: str | None = None, meta: bool = False) -> PreTrainedModel:
    """Load a student saved by a previous stage (full model or LoRA adapter directory).

    ``quantization`` (a BitsAndBytesConfig) loads the base of an adapter in 4-bit (QLoRA).
    ``key`` is the option that gave ``path`` (None: none did) and ``fix`` what to do when the
    checkpoint is missing or damaged (by default: export it again or pass another saved stage
    as ``key``); both appear in error messages. ``meta``: the same files are checked, but only
    the configs are read and the student (with its trainable adapter) is built on the meta device
    (:func:`empty_model`).

    Raises:
        CheckpointError: ``path`` is not a saved model, or one of its files (or of the base model
            of an adapter) is truncated or damaged, named with the fix.
    """
    where = f"{key}={path}" if key else path
    check_student_checkpoint(path, key=key, fix=fix)
    fix = fix or _damaged_fix(path, key)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import AutoPeftModelForCausalLM

        base = read_json(os.path.join(path, "adapter_config.json"), fix).get("base_model_name_or_path")
        if base and _is_local(base) and not os.path.exists(base):
            moved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "student_base")
            hint = (f"set it to {moved}, the student_base beside this stage (a run moved after training)"
                    if os.path.isdir(moved) else "copy the base model back there or set it to where it is now")
            raise CheckpointError(f"{where}: the LoRA adapter's base model {base} (base_model_name_or_path in "
                                  f"{os.path.join(path, 'adapter_config.json')}) does not exist; {hint}")
        if base and os.path.isdir(base):
            check_model_dir(base, f"{base} is the base model of the LoRA adapter in {path} (adapter_config.json "
                                  f"base_model_name_or_path): copy or export it again")
            check_adapter_base(path, base, where, fix)
        kwargs = {"quantization_config": quantization, "dtype": torch.bfloat16} if quantization else {"dtype": dtype}
        try:
            if meta:
                return _empty_adapter_model(path, base, dtype)
            return AutoPeftModelForCausalLM.from_pretrained(path, is_trainable=True, **kwargs)
        except (OSError, ValueError, SafetensorError) as err:
            raise CheckpointError(f"{where}: cannot load the LoRA adapter: {err}") from err
    try:
        if meta:
            return empty_model(AutoConfig.from_pretrained(path), dtype)
        # Mismatched shapes are reported below with the tensors, not raised by transformers as a bare RuntimeError.
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True,
                                                           ignore_mismatched_sizes=True)
    except (OSError, ValueError, SafetensorError, StrictDataclassError) as err:
        # A config.json whose sizes contradict each other: transformers' check, with the reason in its cause.
        reason = first_line(err.__cause__ or err) if isinstance(err, StrictDataclassError) else err
        raise CheckpointError(f"{where}: cannot load the student: {reason}") from err
    check_weights_fit(info, where, fix)
    return model


def _empty_adapter_model(path: str, base: str, dtype: torch.dtype):
    """The trainable peft model of the LoRA adapter in ``path`` over its base model ``base``, on the
    meta device: what ``AutoPeftModelForCausalLM.from_pretrained(path, is_trainable=True)`` builds,
    with no weights read."""
    from peft import PeftConfig, get_peft_model

    if not base:
        raise ValueError("its adapter_config.json names no base_model_name_or_path")
    config = PeftConfig.from_pretrained(path)
    config.inference_mode = False  # saved adapters say true; the loaded one is trained
    return get_peft_model(empty_model(AutoConfig.from_pretrained(base), dtype), config)
