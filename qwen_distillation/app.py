"""The Hydra application: compose, validate, run the Distiller, report user errors.

Every error a user can fix ends the same way, with one ``error: ...`` line on stderr and exit
status 2: the project's own (:class:`~qwen_distillation.errors.DistillationError`) and the config
errors Hydra itself finds while composing (an override it cannot parse, a value of the wrong
type, an unknown option of a config group), which Hydra alone would print with exit status 1.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

import hydra
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from qwen_distillation.config.presets import CONF_DIR, preset_names, preset_only_keys
from qwen_distillation.config.schema import register_configs
from qwen_distillation.config.validate import (faint_settings, ignored_settings, unknown_override_key,
                                              validate_config)
from qwen_distillation.errors import DistillationError

register_configs()
log = logging.getLogger(__name__)

KEYS_HINT = "`python run_distillation.py --cfg job` prints every key with its value"


def warn_ignored_settings(config, overrides: list[str] | None = None) -> None:
    """Log :func:`ignored_settings` and :func:`faint_settings` of the validated ``config`` (under a launcher
    from rank 0 alone: :func:`~qwen_distillation.training.distributed.log_from_main_rank`). Given the command
    line's ``overrides``, a line whose every value is the project preset's own (:func:`preset_only_keys`: the
    demo preset's ``stage3.sampling.max_scored=32`` under a swapped ``stage3=general_kd``) is an info line
    saying so: the user set nothing it names."""
    quiet = preset_only_keys(config.experiment, overrides) if overrides is not None else set()
    for line in ignored_settings(config) + faint_settings(config):
        keys = {setting.partition("=")[0] for setting in line.partition(": ")[0].split(", ")}
        if keys <= quiet:
            log.info("%s (experiment=%s's own value%s; nothing on the command line sets %s)", line,
                     config.experiment, "s" * (len(keys) > 1), "them" if len(keys) > 1 else "it")
        else:
            log.warning(line)


def _hydra_config():
    """Hydra's runtime config, or None when called outside Hydra (tests, notebooks)."""
    try:
        return HydraConfig.get()
    except ValueError:
        return None


def run(cfg: DictConfig, overrides: list[str] | None = None) -> dict:
    """Validate ``cfg`` and run the stages it asks for; returns the run summary. ``overrides``: the
    command line's, where Hydra does not hold them (a run from Python)."""
    from qwen_distillation.training.distributed import log_from_main_rank

    log_from_main_rank()  # every rank of a launch loads the same config and data: one copy of their lines
    config = validate_config(cfg)
    hydra_cfg = _hydra_config()
    warn_ignored_settings(config, list(hydra_cfg.overrides.task) if hydra_cfg is not None else overrides)
    # One progress bar per stage is ours; the per-file bars of saves and loads are noise.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    preset = hydra_cfg.runtime.choices.get("experiment") if hydra_cfg is not None else None
    if config.experiment is None and preset not in (None, "none"):
        # A preset of the user's that does not name itself (no `experiment: NAME` line): its config.yaml
        # records the preset chosen, not null ("none").
        config.experiment = preset
    sweep_job = hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN
    if sweep_job:  # each sweep job writes into its own output_dir/jobN
        config.output_dir = hydra_cfg.runtime.output_dir
    from qwen_distillation.training.distiller import Distiller
    from qwen_distillation.training.outputs import hold_output_dir

    # One process writes an output_dir at a time (under a launcher, rank 0 for all of them).
    with hold_output_dir(Path(config.output_dir), hold=int(os.environ.get("RANK", "0")) == 0):
        distiller = Distiller(config)
        done = distiller.finished_summary() if sweep_job else None
        if done is not None:  # a sweep run again after a failed or interrupted job
            print(f"{config.output_dir}: this sweep job's run is finished; skipped (overwrite_output_dir=true "
                  f"runs it again)")
            return done
        return distiller.run()


def _task(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except DistillationError as err:
        hydra_cfg = _hydra_config()
        if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:  # which job, and that the sweep stops
            print(f"error: sweep job {hydra_cfg.job.num} ({hydra_cfg.runtime.output_dir}): {err}; the sweep stops "
                  f"here, and no later job runs (rerun the sweep once fixed: its finished jobs are skipped)",
                  file=sys.stderr)
        else:
            print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


hydra_entry = hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")(_task)


def _raised_in_task(err: BaseException) -> bool:
    """Whether ``err`` came out of a run (a bug: its traceback is wanted), not out of Hydra's
    composition of the config before or between runs."""
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code is _task.__code__:
            return True
        tb = tb.tb_next
    return False


def _override_key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0].partition("@")[0]


def _culprit(text: str, overrides: list[str]) -> str | None:
    """The override the error ``text`` is about: the one quoted whole, else the one whose key
    (or config group) it names, the last of a key set twice (Hydra applies it); None when the
    error lies in a config file, not an override."""
    overrides = overrides[::-1]
    for override in overrides:
        if override in text:
            return override
    named = [o for o in overrides if "=" in o and re.search(rf"(?<![\w.]){re.escape(_override_key(o))}(?![\w.])", text)]
    return max(named, key=lambda o: len(_override_key(o)), default=None)


# Hydra refuses a config group set to null (`model=null`) with a ValueError, not a HydraException.
_NULL_GROUP = "Config group override must be a string or a list"


# Hydra's own exceptions for a value it cannot parse or merge are HydraException; an override whose key leads
# into a null value (`model.teacher.random_init.hidden_size=64`, random_init null) or that sets a null mapping
# of the schema (`model.teacher.random_init={model_type: qwen2}`) fails inside OmegaConf instead, with an
# AssertionError or an AttributeError (a traceback, exit status 1).
_OVERRIDE_FAULTS = (AssertionError, AttributeError)

# What composing a config may raise for a fault of the user's (see is_config_error).
COMPOSE_ERRORS = (HydraException, OmegaConfBaseException, ValueError, yaml.YAMLError) + _OVERRIDE_FAULTS


def is_config_error(err: BaseException) -> bool:
    """Whether ``err``, raised while Hydra composed the config, is a config error of the user's:
    Hydra's and OmegaConf's errors, a config file that is not valid YAML, Hydra's ValueError
    for a config group set to null, and OmegaConf's failure to apply an override into a null value."""
    return isinstance(err, (HydraException, OmegaConfBaseException, yaml.YAMLError)) or (
        isinstance(err, ValueError) and str(err).startswith(_NULL_GROUP)) or _is_null_value_override(err)


def _is_null_value_override(err: BaseException) -> bool:
    """Whether ``err`` is OmegaConf's failure (an AssertionError or AttributeError) to apply one of the
    command line's overrides, raised while Hydra applied them (not by the code of a run)."""
    if not isinstance(err, _OVERRIDE_FAULTS):
        return False
    tb = err.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "_apply_overrides_to_config":
            return True
        tb = tb.tb_next
    return False


def _null_value_message(overrides: list[str]) -> str:
    """One line for an override into a null value: the override and the null key, found by applying the
    overrides one at a time to the config that the others (config groups, top-level keys) compose."""
    from hydra import compose
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from qwen_distillation.compose import config_dir, config_name, hydra_search_path

    fix = ("choose a config option that sets it, or set it in a preset of your own (`--config-dir DIR "
           "experiment=NAME`, docs/configuration.md); " + KEYS_HINT)
    culprit = null = None
    try:
        directory, rest = config_dir([o for o in overrides if o not in ("-m", "--multirun")])
        name, rest = config_name(rest)
        values = [o for o in rest if not o.startswith("-") and "=" in o]
        with hydra_search_path(directory):
            cfg = compose(config_name=name, overrides=[o for o in values if "." not in _override_key(o)])
        parser = OverridesParser.create()
        for override in (o for o in values if "." in _override_key(o)):
            try:
                ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides([override]), cfg)
            except _OVERRIDE_FAULTS:
                parts = _override_key(override).split(".")
                culprit, null = override, next((".".join(parts[:depth]) for depth in range(1, len(parts) + 1)
                                                if OmegaConf.select(cfg, ".".join(parts[:depth])) is None), None)
                break
            except Exception:  # noqa: BLE001 - another fault of this override: Hydra names it once this one is fixed
                continue
    except Exception:  # noqa: BLE001 - naming the override is a courtesy; never hide the error behind another
        pass
    if culprit is None or null is None:
        return f"an override sets a value inside a config value that is null, which it cannot ({fix})"
    return f"{culprit}: {null} is null, and an override cannot set a mapping or keys into a null value ({fix})"


def _yaml_message(err: yaml.YAMLError) -> str:
    """``FILE line L: not valid YAML (problem)`` for a config file (a user's preset) that does not parse."""
    mark = getattr(err, "problem_mark", None)
    where = f"{mark.name} line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "a config file"
    context, start = getattr(err, "context", None), getattr(err, "context_mark", None)
    if context and start is not None:
        context += f" at line {start.line + 1}, column {start.column + 1},"
    problem = " ".join(part for part in (context, getattr(err, "problem", None)) if part)
    return f"{where}: not valid YAML ({problem or _one_line(str(err))}); fix the file"


def _null_group_message(overrides: list[str]) -> str | None:
    """What to write instead of the (last) override that sets a config group to null, with the
    group's options from conf/; None when no override does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for override in reversed(overrides):
        try:
            parsed = parser.parse_override(override)
        except HydraException:
            continue
        group = parsed.key_or_group
        options = preset_names(group)
        if parsed.is_delete() or parsed.value() is not None or not (options or "/" in group):
            continue
        fix = (f"use {group}=none" if "none" in options else f"choose one, e.g. {group}={options[0]}" if options
               else "choose one of its options (`python run_distillation.py --hydra-help` lists them)")
        return f"{override}: a config group takes an option name; {fix}" + (
            f" (options: {', '.join(options)})" if options else "")
    return None


def _one_line(text: str) -> str:
    """Hydra's message on one line: its lines joined by '; ' (by a space after a full stop), a
    tab-indented list of options as 'a, b, c'; the config search path left out."""
    out = ""
    for line in text.split("\nConfig search path:")[0].splitlines():
        if line.startswith("\t") and out:
            out += (" " if out.endswith(":") else ", ") + line.strip()
        elif line.strip():
            out += ("" if not out else " " if out.endswith(".") else "; ") + line.strip()
    return out


def hydra_error_message(err: Exception, overrides: list[str]) -> str:
    """One line for a config error Hydra raised while composing: the override at fault,
    Hydra's own text (with its list of options) and how to fix it."""
    if isinstance(err, yaml.YAMLError):
        return _yaml_message(err)
    if isinstance(err, _OVERRIDE_FAULTS):
        return _null_value_message(overrides)
    if not isinstance(err, (HydraException, OmegaConfBaseException)):  # a config group set to null
        message = _null_group_message(overrides)
        if message is not None:
            return message
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    text = whole = _one_line(str(err))
    if cause is not None or isinstance(err, OmegaConfBaseException):
        detail = str(cause if cause is not None else err).splitlines()[0]  # without OmegaConf's full_key lines
        # 'Error merging override X' says no more than the override named in front of the detail.
        text = detail if cause is None or text.startswith("Error merging override") else f"{text}: {detail}"
    key = getattr(cause or err, "full_key", None)
    override = getattr(err, "override", None) if isinstance(err, OverrideParseException) else None
    override = override or _culprit(text, overrides) or _culprit(whole, overrides) or next(
        (o for o in reversed(overrides) if key and _override_key(o) == key), None)
    if override and str(key).isdigit():  # an item of a list inside the override (`layer_map=[0,1]`): key 0
        key = f"{_override_key(override)}[{key}]"
    if isinstance(err, OverrideParseException):
        fix = "write KEY=VALUE, e.g. stage2.temperature=3, and quote a value with special characters: key='a b'"
    elif (unknown := re.search(r"Key '[^']*' not in '\w+'; full_key: ([\w.]+)", text)) and \
            (named := unknown_override_key(unknown.group(1))):  # in a preset file: name the key, suggest one
        text = text.split(" raised while composing config")[0].rsplit(":", 1)[0] + f": no such config key: {named}"
        fix = KEYS_HINT
    elif isinstance(cause, ConfigKeyError) and override and str(key).startswith(_override_key(override) + ".") \
            and not str(key).startswith("hydra.") and (named := unknown_override_key(str(key))):
        # A mapping value with an unknown key inside (`stage2.loss.weights={kdd:0.3}`): Hydra's advice, to append
        # with `+`, fails the same way.
        text, fix = f"no such config key: {named}", KEYS_HINT
    elif re.search(r"In 'experiment/[^']*': ValidationError.*Cannot convert 'DictConfig'", text):
        # A preset without its package line is read as the value of the `experiment` key.
        text = text.split(": ValidationError")[0] + ": this preset lacks its package line"
        fix = ("a preset sets keys of the whole config: make `# @package _global_` its first line, as "
               "conf/experiment/demo.yaml does")
    elif isinstance(err, MissingConfigException) and err.options:
        group = (err.missing_cfg_file or "").rpartition("/")[0] or "the group"
        fix = f"choose one of the options, e.g. {group}={err.options[0]}"
    elif text.startswith("Multiple values for") and override:
        # Hydra's advice ('override model: ...') is for a defaults list, not the command line.
        text = text.split(". To override")[0]
        fix = f"the default config already chooses one; write {override.lstrip('+')} to choose another"
    elif isinstance(cause or err, ValidationError) and key:
        fix = f"give {key} a value of its type; {KEYS_HINT}"
    elif text.startswith("Ambiguous value"):
        fix = None  # Hydra's text lists the three ways to write it
    else:
        fix = f"{KEYS_HINT}; `python run_distillation.py --help` lists the config groups and their options"
    prefix = f"{override}: " if override and override not in text else ""
    return f"{prefix}{text}" + (f" ({fix})" if fix else "")


def main() -> None:
    """Run the Hydra app on ``sys.argv``.

    A config error that Hydra finds while composing leaves with ``error: ...`` and exit status 2,
    as the project's own errors do; any other exception keeps its traceback (exit status 1).
    With ``HYDRA_FULL_ERROR=1`` set, Hydra's errors keep their full traceback too.
    """
    full_error = os.environ.get("HYDRA_FULL_ERROR")
    # Hydra prints a config error and exits 1 itself unless HYDRA_FULL_ERROR=1 makes it raise.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_entry()
    except COMPOSE_ERRORS as err:
        if full_error == "1" or _raised_in_task(err) or not is_config_error(err):
            raise
        print(f"error: {hydra_error_message(err, sys.argv[1:])}", file=sys.stderr)
        sys.exit(2)
    finally:
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error
