"""The command line: classic ``--flag value`` arguments mixed with Hydra overrides.

The classic flags are translated into Hydra overrides before Hydra parses the command
line, so ``--start_stage 2 --checkpoint_path out/stage1/best stage2.temperature=3``
and ``start_stage=2 checkpoint_path=out/stage1/best stage2.temperature=3`` are the
same run, and multirun sweeps (``-m stage2.loss.weights.kd=0.3,0.7``) work with both.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

from qwen_distillation.compose import compose_flags, config_dir, config_name, hydra_search_path
from qwen_distillation.config.validate import renamed_key, unknown_override_key
from qwen_distillation.errors import UsageError


def _value(key: str):
    return lambda v: [f"{key}={_quote(v)}"]


# What Hydra's grammar reads unquoted as the same string (or number); a value with any other character (a
# space, `,=[]{}()'":$*?~#&!;<>^|`, a letter outside ASCII such as a Chinese file name) is quoted.
UNQUOTED = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./+@")


def _quote(value: str) -> str:
    """Quote a value for Hydra's override grammar unless every character of it reads the same unquoted."""
    if not set(value) <= UNQUOTED or value.lower() in ("null", "true", "false"):
        escaped = value.replace("\\", "\\\\").replace("'", "\\'")
        return f"'{escaped}'"
    return value


def _sources(key: str):
    def convert(value: str) -> list[str]:
        paths = [p for p in value.split(",") if p.strip()]
        if not paths:
            raise UsageError(f"{value!r} names no file or dataset; give them comma-separated (for none: {key}=[])")
        return [f"{key}=[{','.join(_quote(p) for p in paths)}]"]

    return convert


# flag -> (takes a value, function from the value to Hydra overrides, help text)
CLASSIC_FLAGS = {
    "--teacher_model": (True, lambda v: [f"model.teacher.path={_quote(v)}", "model.teacher.random_init=null",
                                         "model.teacher.gguf_file=null", "model.teacher.tokenizer=null"],
                        "teacher: hub id, local directory or .gguf file"),
    "--student_model": (True, lambda v: [f"model.student.path={_quote(v)}", "model.student.keep_layers=null",
                                         "model.student.random_init=null", "model.student.gguf_file=null",
                                         "model.student.tokenizer=null",
                                         "model.student.prune.width.intermediate_size=null",
                                         "model.student.prune.width.num_key_value_heads=null",
                                         "model.student.prune.width.hidden_size=null"],
                        "student: hub id, local directory or .gguf file (default: slimmed copy of the teacher)"),
    "--output_dir": (True, _value("output_dir"), "where models, checkpoints and logs go"),
    "--general_dataset": (True, _sources("data.general"), "general data: files or HF dataset names, comma-separated"),
    "--medical_dataset": (True, _sources("data.medical"), "medical data: files or HF dataset names, comma-separated"),
    "--eval_dataset": (True, _sources("data.eval"), "extra held-out evaluation data, comma-separated"),
    "--fp16": (False, lambda _: ["train.precision=fp16"], "fp16 mixed precision (GPU)"),
    "--bf16": (False, lambda _: ["train.precision=bf16"], "bf16 mixed precision"),
    "--use_lora": (False, lambda _: ["lora.enabled=true"], "train LoRA adapters instead of all weights"),
    "--use_qlora": (False, lambda _: ["lora.enabled=true", "lora.quantize_4bit=true"],
                    "QLoRA: 4-bit base + LoRA (CUDA + bitsandbytes)"),
    "--use_wandb": (False, lambda _: ["logging.wandb.enabled=true"], "log to Weights & Biases (offline without a key)"),
    "--start_stage": (True, _value("start_stage"), "first stage to run (1-3)"),
    "--end_stage": (True, _value("end_stage"), "last stage to run (1-3)"),
    "--checkpoint_path": (True, _value("checkpoint_path"), "student to start from, e.g. out/stage1/best"),
    "--seed": (True, _value("seed"), "random seed"),
    "--deepspeed": (True, lambda v: ["distributed.engine=deepspeed", f"distributed.deepspeed_config={_quote(v)}"],
                    "a DeepSpeed JSON of your own (ZeRO stage, buckets, offload); the stage config fills the rest"),
    "--local_rank": (True, lambda v: [], "set by the deepspeed launcher; the LOCAL_RANK variable is used"),
}
# A Hydra override as a word on the command line (`key=...`, `+key=...`, `~key`): never a flag's value.
OVERRIDE = re.compile(r"^([+~]{0,2}[A-Za-z_][\w.]*=|~[A-Za-z_][\w.]*$)")
# The classic flags of one number, with the config key a sweep writes instead.
SINGLE_VALUE_FLAGS = {"--start_stage": "start_stage", "--end_stage": "end_stage", "--seed": "seed"}
# The deepspeed launcher's spelling of --local_rank in recent versions.
FLAG_ALIASES = {"--local-rank": "--local_rank"}

HELP = """usage: python run_distillation.py [CLASSIC FLAGS] [HYDRA OVERRIDES] [-m]

Multi-stage teacher->student distillation (1: general KD, 2: domain-adaptive KD,
3: medical fine-tune). Both styles mix freely on one command line.

Classic flags:
{flags}

Hydra overrides (any config key; see conf/ for the groups):
  model=qwen2.5_7b_to_1.5b          choose a config group option
  stage2.temperature=3              set a value
  stage2.loss.weights.kd=0.5        re-weight a loss term
  experiment=smoke                  use another preset from conf/experiment/ (default: demo)
  -m stage2.loss.weights.kd=0.3,0.7 multirun sweep (one output_dir/jobN per run)

Examples:
  python run_distillation.py
  python run_distillation.py --start_stage 2 --checkpoint_path out/stage1/best stage2.temperature=3
  python run_distillation.py experiment=smoke output_dir=/tmp/smoke
  torchrun --nproc_per_node 2 run_distillation.py distributed=zero3 model=qwen2.5_7b_to_1.5b
  deepspeed --num_gpus 8 run_distillation.py --deepspeed ds_config.json model=qwen2.5_72b_to_7b
"""


def classic_help() -> str:
    lines = []
    for flag, (takes_value, _, text) in CLASSIC_FLAGS.items():
        name = f"{flag} {flag[2:].upper()}" if takes_value else flag
        lines.append(f"  {name:<34} {text}")
    return HELP.format(flags="\n".join(lines))


HYDRA_FLAGS = ("--multirun", "--help", "--hydra-help", "--cfg", "--resolve", "--package", "--info",
               "--config-path", "--config-name", "--config-dir", "--run", "--shell-completion", "--version",
               "--experimental-rerun")


# Hydra's flags that take a value (with their short forms); --info's value is optional (INFO_TOPICS).
HYDRA_VALUE_FLAGS = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun")
INFO_TOPICS = ("all", "config", "defaults", "defaults-tree", "plugins", "searchpath")


def config_dir_override(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's ``--config-dir DIR`` (``-cd DIR``, ``--config-dir=DIR``) among ``args`` as a ``hydra.searchpath``
    override, and the other args: for Hydra's own calls that take overrides (a group's options, which a sweep's
    ``glob(*)`` lists). :func:`compose_run_config` reads the flag itself (:func:`config_dir`), for the sweep's
    checks, ``--cfg job``'s refusal and the prune and cache_teacher commands: without it they ignored the
    user's own presets (a sweep trained its first jobs before a bad one)."""
    directory, rest = config_dir(args)
    return ([f"hydra.searchpath=[{_quote('file://' + directory)}]"] if directory else []), rest


def _check_key(override: str) -> None:
    """Refuse an override of a key the config does not have, however it is written (``key=``,
    ``+key=``, ``++key=``): a renamed key with the override to write, any other with the
    closest valid key. Hydra's own keys (``hydra.*``, ``group/option`` paths) are Hydra's to check."""
    key, eq, value = override.lstrip("+~").partition("=")
    renamed = renamed_key(key)
    if renamed is not None:
        raise UsageError(f"{key} was renamed to {renamed}; write {renamed}{eq}{value}")
    hydras_own = key.split(".")[0] == "hydra" or "/" in key  # Hydra's keys, config-group paths
    unknown = None if hydras_own else unknown_override_key(key)
    if unknown is not None:
        raise UsageError(f"{override}: no such config key: {unknown}; `python run_distillation.py --cfg job` "
                         f"prints every valid key")


_DELETED = None  # the value set_by records for a ``~key`` override


def _check_once(override: str, written: str, set_by: dict[str, tuple[str, str | None, bool]], *,
                flag: bool) -> None:
    """Refuse a key that a classic flag sets and the command line sets again to another value
    (``--seed 1 --seed 2``, ``--fp16 --bf16``, ``--start_stage 2 start_stage=3``): Hydra would keep one
    of them without a word. Likewise a key a classic flag sets that a ``~key`` override deletes (or a
    section above it), in either order: ``--seed 1 ~seed`` ran with the default seed, ``~seed --seed 1``
    failed in Hydra. Overrides among themselves are Hydra's (a sweep, a group then its keys)."""
    deleted = override.startswith("~")
    key, _, value = override.lstrip("+~").partition("=")
    for other, (by, was, flagged) in set_by.items():
        if deleted == (was is _DELETED) or not (flag or flagged):
            continue
        set_key, gone = (other, key) if deleted else (key, other)
        if set_key == gone or set_key.startswith(gone + "."):
            setter, deleter = (by, written) if deleted else (written, by)
            raise UsageError(f"{set_key} is set by {setter} and deleted by {deleter}; keep one")
    if deleted:
        set_by[key] = (written, _DELETED, False)
        return
    earlier = set_by.get(key)
    if earlier is not None and earlier[1] is _DELETED:
        earlier = None  # deleted by an override, then set again: Hydra's (a flag was refused above)
    if earlier is not None and (flag or earlier[2]) and earlier[1] != value:
        raise UsageError(f"{key} is set twice, by {earlier[0]} and by {written}; keep one")
    set_by[key] = (written, value, flag or bool(earlier and earlier[2]))


def translate(argv: list[str]) -> list[str]:
    """Translate classic flags in ``argv`` (without the program name) into Hydra overrides.

    ``--flag value`` and ``--flag=value`` are both accepted. Anything else is passed through
    to Hydra unchanged, in order, but for ``-m`` and Hydra's own flags (``--cfg job``,
    ``--config-dir DIR``, ``--resolve``, ...), which go first wherever they stood: Hydra's parser
    reads them only before the overrides.
    """
    out: list[str] = []
    hydra_flags: list[str] = []  # Hydra's parser takes its flags only before the overrides
    # The keys a flag clears (--teacher_model: the teacher's tokenizer and random_init, which belong to the
    # config's model) go before every override, so one that sets such a key wins wherever it stands.
    resets: list[str] = []
    set_by: dict[str, tuple[str, str, bool]] = {}  # key -> (as written, value, whether a classic flag set it)
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        name = FLAG_ALIASES.get(name, name)
        if name in HYDRA_VALUE_FLAGS or (name in HYDRA_FLAGS and name != "--multirun"):
            takes = not eq and i + 1 < len(argv) and (
                name in HYDRA_VALUE_FLAGS or (name == "--info" and argv[i + 1] in INFO_TOPICS))
            hydra_flags += argv[i:i + 2] if takes else [arg]
            i += 2 if takes else 1
            continue
        if name in CLASSIC_FLAGS:
            takes_value, convert, _ = CLASSIC_FLAGS[name]
            if takes_value:
                if eq:
                    value = inline
                elif i + 1 < len(argv) and not argv[i + 1].startswith("--") and not OVERRIDE.match(argv[i + 1]):
                    value = argv[i + 1]
                    i += 1
                elif i + 1 < len(argv) and OVERRIDE.match(argv[i + 1]):
                    # `--output_dir $UNSET stage1.lr=1e-3` wrote into ./stage1.lr=1e-3/ and dropped the override.
                    raise UsageError(f"{name} needs a value: the word after it, {argv[i + 1]}, is a config override "
                                     f"(a value written like an override goes as `{name}=VALUE`)")
                else:
                    raise UsageError(f"{name} needs a value, e.g. `{name} {name[2:].upper()}`")
                if value == "":
                    raise UsageError(f"{name} got an empty value")
                if "," in value and name in SINGLE_VALUE_FLAGS:  # `-m --seed 1,2`: a sweep a flag cannot hold
                    raise UsageError(f"{name} takes one value, not {value!r}; to sweep it, write the config key "
                                     f"with -m: {SINGLE_VALUE_FLAGS[name]}={value}")
            else:
                if eq:
                    raise UsageError(f"{name} takes no value")
                value = ""
            try:
                translated = convert(value)
            except UsageError as err:
                raise UsageError(f"{name} {err}") from None
            written = f"{name} {value}".strip()
            # What the flag sets (--deepspeed: the engine and the JSON; --use_qlora: LoRA and 4-bit), not the
            # keys it resets to null (--teacher_model clears the tokenizer an override may then set).
            sets = translated[:1] + [o for o in translated[1:] if not o.endswith("=null")]
            for override in sets:
                _check_once(override, written, set_by, flag=True)
            out.extend(sets)
            resets += [o for o in translated if o not in sets]
        elif arg.startswith("--") and name not in HYDRA_FLAGS:
            raise UsageError(f"unknown flag {name}; classic flags are: {', '.join(CLASSIC_FLAGS)}; any config key "
                             f"can be set as a Hydra override such as stage2.temperature=3")
        else:
            if "=" in arg and not arg.startswith("-"):
                _check_key(arg)
            if ("=" in arg or arg.startswith("~")) and not arg.startswith("-"):  # ~key: a deletion
                _check_once(arg, arg, set_by, flag=False)
            # The default config already selects a preset (experiment: demo), so Hydra's "append"
            # (+experiment=NAME) cannot add one; what the writer means is to use this one instead.
            out.append(arg[1:] if arg.startswith("+experiment=") else arg)
        i += 1
    # Hydra's parser takes its flags only before the overrides; -m and the others may stand anywhere here.
    multirun = [a for a in out if a in ("-m", "--multirun")]
    return multirun[:1] + hydra_flags + resets + [a for a in out if a not in ("-m", "--multirun")]


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``run_distillation.py``."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(classic_help())
        print("Config groups and the composed default config (Hydra):\n")
        argv = ["--help" if a == "-h" else a for a in argv]
    try:
        overrides = translate(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    printing = [a for a in overrides if a.partition("=")[0] in ("--cfg", "-c", "--info", "--shell-completion")]
    if overrides[:1] in (["-m"], ["--multirun"]) and printing:  # Hydra's own ValueError was a traceback
        print(f"error: {overrides[0]} and {printing[0]} cannot go together: {printing[0]} prints the one config "
              f"the overrides compose; drop {overrides[0]} (each job of a sweep writes its own config to "
              f"output_dir/jobN/config.yaml)", file=sys.stderr)
        sys.exit(2)
    if overrides[:1] in (["-m"], ["--multirun"]):
        try:
            if not any(a.partition("=")[0] in HYDRA_FLAGS for a in config_name(config_dir(overrides[1:])[1])[1]):
                check_sweep(overrides[1:])
        except UsageError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)
    import qwen_distillation.app as app

    sys.argv = [sys.argv[0] if sys.argv else "run_distillation.py"] + overrides
    overwrite = any(o.partition("=")[0].lstrip("+") == "overwrite_output_dir" and o.partition("=")[2].lower() in
                    ("true", "yes", "1", "on") for o in overrides)
    with interrupt_as_one_line(
            "the checkpoints written so far are kept; rerun the same command without overwrite_output_dir=true to "
            "continue from the last one (with it, the run starts over and removes them)" if overwrite else
            "the checkpoints written so far are kept; rerun the same command to continue from the last one"):
        app.main()
    if any(a.partition("=")[0] in ("--cfg", "-c") for a in overrides):  # a dry run: say what a run would refuse
        try:
            directory, rest = config_dir(overrides)
        except UsageError:
            return  # Hydra reported the missing folder
        name, rest = config_name(rest)
        _refusal_of_printed_config(compose_flags(directory, name) + [
            a for a in rest if not a.startswith("-") and ("=" in a or a[:1] == "~")])


def _refusal_of_printed_config(overrides: list[str]) -> None:
    """After ``--cfg job`` printed the composed config, the error a run of the same overrides stops with, if
    any (exit status 2): `--cfg job end_stage=5` printed `end_stage: 5` as if a run would take it."""
    from qwen_distillation.app import COMPOSE_ERRORS
    from qwen_distillation.data.sources import data_sources
    from qwen_distillation.errors import DistillationError

    try:
        # A missing data file too. (The other checks of check_run_inputs import torch: seconds for a dry run.)
        data_sources(compose_run_config(overrides).data)
    except DistillationError as err:
        print(f"error: {err} (the config above is what these overrides compose; a run refuses it)", file=sys.stderr)
        sys.exit(2)
    except COMPOSE_ERRORS:  # Hydra refused the overrides while printing: already reported
        pass


@contextlib.contextmanager
def interrupt_as_one_line(what_now: str):
    """Ctrl-C ends with one line saying what is on disk and exit status 130, not a KeyboardInterrupt
    traceback; ``HYDRA_FULL_ERROR=1`` (the switch for full tracebacks) keeps the traceback, which
    shows where a run that seemed to hang was. SIGTERM (a scheduler's stop, ``kill``) ends the same
    way with status 143: it killed the process at once, without the line, and without waiting for a
    checkpoint being written in the background or closing the metrics. Under a launcher the line
    comes from rank 0 alone (every rank gets the signal)."""
    import signal
    import threading

    def terminated(signum, frame):
        raise Terminated

    main_thread = threading.current_thread() is threading.main_thread()  # signals go to the main thread only
    previous = signal.signal(signal.SIGTERM, terminated) if main_thread else None
    try:
        yield
    except KeyboardInterrupt as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        stopped = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        if os.environ.get("RANK", "0") == "0":  # a launch stops every rank: one line, from rank 0
            print(f"\n{stopped}: {what_now}", file=sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, as Ctrl-C is: the run's cleanup (background saves, the
    metrics' files) runs on the way out."""


def group_options(group: str, searchpath: list[str]) -> list[str]:
    """The options of the config group ``group`` (conf/ and a ``--config-dir``'s, as ``searchpath`` gives it),
    as Hydra's sweeper lists them for a ``GROUP=glob(...)`` sweep."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from qwen_distillation.app import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return GlobalHydra.instance().config_loader().get_group_options(group, config_name="config",
                                                                        overrides=searchpath)


def sweep_jobs(overrides: list[str], searchpath: list[str] | None = None) -> list[tuple[list[str], list[str]]] | None:
    """Each job of a multirun sweep, in Hydra's BasicSweeper order (the cartesian product of the
    comma-separated choices, ranges and group globs such as ``stage2=glob(*)``, which crashed here with
    Hydra's `ConfigLoader is not set`): its overrides and, of them, the swept ones. None when Hydra's parser
    refuses an override, or a sweep is not a plain list of choices (Hydra reports those itself).
    A swept key that a later override sets again is a UsageError (Hydra keeps the last: fewer jobs).
    ``searchpath``: a ``--config-dir``'s override (:func:`config_dir_override`), whose groups a glob lists."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Glob
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(
            [o for o in overrides if not o.lstrip("+~").startswith("hydra")])
    except HydraException:
        return None
    keys = [override.get_key_element() for override in parsed]
    for index, (override, key) in enumerate(zip(parsed, keys)):
        later = [o.input_line for o, k in zip(parsed[index + 1:], keys[index + 1:]) if k == key]
        if override.is_sweep_override() and later:
            raise UsageError(f"{override.input_line} sweeps {key}, which {', '.join(later)} sets again after it "
                             f"(Hydra would keep the last and run fewer jobs); keep one")
    choices, swept = [], []
    for override in parsed:
        swept.append(override.is_sweep_override())
        if not override.is_sweep_override():
            choices.append([override.input_line])  # as written
        elif override.is_discrete_sweep():
            key = override.get_key_element()
            values = (override.value().filter(group_options(override.key_or_group, searchpath or []))
                      if isinstance(override.value(), Glob) else override.sweep_string_iterator())
            choices.append([f"{key}={value}" for value in values])
        else:
            return None
    return [(list(job), [o for o, sweep in zip(job, swept) if sweep]) for job in itertools.product(*choices)]


def sweep_job_label(number: int, swept: list[str]) -> str:
    """How an error names a sweep's job: ``sweep job 1 (stage1.lr=0.002)``; a ``-m`` command that
    sweeps no key has one job, named without an empty ``()``."""
    return f"sweep job {number} ({' '.join(swept)})" if swept else f"sweep job {number}"


def check_run_inputs(cfg) -> list[int]:
    """What a run of the validated ``cfg`` refuses next from its config alone, before any model loads: its data and
    ``eval.mcq`` entries (a missing local file, an unknown key) and the stages it would train (none, or one
    whose domain has no data source), and the device and loss kernel each of them needs (``loss.kernel=triton``
    or ``train.precision=fp16`` without a GPU); returns those stages."""
    from qwen_distillation.data.sources import data_sources
    from qwen_distillation.evaluation.mcq import normalise_mcq_sources
    from qwen_distillation.training.distiller import select_device, stage_kernels, stages_to_run

    stages = stages_to_run(cfg, data_sources(cfg.data))
    normalise_mcq_sources("eval.mcq", cfg.eval.mcq)
    stage_kernels(cfg, stages, select_device(cfg.train)[0])
    return stages


def check_sweep(overrides: list[str]) -> None:
    """Compose and validate every job of a multirun sweep, its data entries and local data paths
    included, before the first one starts (and before Hydra writes the sweep's ``multirun.yaml``):
    a bad value in the last job would otherwise stop the sweep after the jobs before it had trained."""
    from qwen_distillation.app import COMPOSE_ERRORS, hydra_error_message, is_config_error
    from qwen_distillation.errors import DistillationError

    directory, overrides = config_dir(overrides)  # --config-dir DIR: the user's own presets
    name, overrides = config_name(overrides)  # -cn NAME: a primary config of the user's own
    searchpath = config_dir_override(["--config-dir", directory])[0] if directory else []
    sweep_dirs: list[str] = []
    jobs = []
    for number, (job, swept) in enumerate(sweep_jobs(overrides, searchpath) or []):
        try:
            cfg = compose_run_config(compose_flags(directory, name) + job)
            stages = check_run_inputs(cfg)  # a mistyped data path too, before any job trains
        except DistillationError as err:
            message = str(err)
        except COMPOSE_ERRORS as err:
            if not is_config_error(err):
                raise
            message = hydra_error_message(err, job)
        else:
            sweep_dirs.append(str(cfg.output_dir))
            jobs.append((swept, cfg, stages))
            continue
        raise UsageError(f"{sweep_job_label(number, swept)}: {message}; no job was started")
    refuse_sweep_over_process_group_settings(jobs)
    distinct = list(dict.fromkeys(sweep_dirs))
    if len(distinct) > 1:  # output_dir swept (or set from a swept key)
        raise UsageError(f"the sweep's jobs have {len(distinct)} output_dirs ({', '.join(distinct)}): a sweep has "
                         f"one, and writes its jobs into output_dir/job0, job1, ... (Hydra writes its "
                         f"multirun.yaml into the output_dir the command has without the sweep, outputs/run by "
                         f"default); give one output_dir and sweep other keys, or run one command per output_dir; no "
                         f"job was started")
    directories = [refuse_sweep_over_a_run(output_dir, overrides) for output_dir in distinct]
    if len(directories) != 1 or directories[0] is None:
        return  # where the jobs write is not known here: each job checks its own folder
    from qwen_distillation.training.distiller import check_input_files, completed_stages
    from qwen_distillation.training.outputs import recorded_config, refuse_sweep_job_over_another_run, run_hash

    own_subdir = any(o.lstrip("+~").startswith("hydra.sweep.subdir=") for o in overrides)
    if own_subdir and directories[0].exists():
        return  # an earlier sweep's jobs, in folders of the user's naming: each job checks its own folder
    for number, (swept, cfg, stages) in enumerate(jobs):  # as conf/config.yaml names them: hydra.sweep.subdir=job${...}
        job_dir = directories[0] / f"job{number}"
        try:
            if own_subdir:  # a new sweep: no job has completed a stage, wherever it writes
                check_input_files(cfg, stages, set())
                continue
            refuse_sweep_job_over_another_run(job_dir, cfg)
            # The other files its stages read (a teacher cache, the sample prompts), but for the stages an earlier
            # run of this job completed (a rerun sweep does not train them again).
            check_input_files(cfg, stages, completed_stages(cfg, job_dir, run_hash(recorded_config(cfg))))
        except DistillationError as err:
            raise UsageError(f"{sweep_job_label(number, swept)}: {err}; no job was started") from None


def refuse_sweep_over_process_group_settings(jobs: list) -> None:
    """Refuse a sweep whose jobs under an engine start their process group differently
    (``distributed.backend``, ``distributed.timeout_minutes``): the jobs run one after another in the
    same processes, and the group the first one starts lasts until the launch exits (a group started
    again within one launch hangs on torchrun's store; see ``training.distributed.shutdown``), so the
    later jobs would run on the first job's group without a word. ``jobs``: ``(swept, cfg, stages)``."""
    from qwen_distillation.training.distiller import select_device
    from qwen_distillation.training.distributed import group_backend

    settings = {}
    for number, (swept, cfg, _) in enumerate(jobs):
        if cfg.distributed.engine != "none":
            backend = group_backend(cfg.distributed.backend, select_device(cfg.train)[0].type)
            settings.setdefault((backend, float(cfg.distributed.timeout_minutes)), (number, swept))
    if len(settings) > 1:
        ((backend0, timeout0), (number0, _)), ((backend, timeout), (number, swept)) = list(settings.items())[:2]
        raise UsageError(f"{sweep_job_label(number, swept)}: its process group (backend {backend}, timeout "
                         f"{timeout:g} min) is not the one job {number0} starts (backend {backend0}, timeout "
                         f"{timeout0:g} min): a sweep's jobs share the group the first one starts (it lasts the "
                         f"launch), so distributed.backend and distributed.timeout_minutes cannot change between "
                         f"them; run one command per backend or timeout; no job was started")


def refuse_sweep_over_a_run(output_dir: str, overrides: list[str]):
    """Refuse a sweep whose directory (``hydra.sweep.dir``: ``${output_dir}`` unless an override sets it)
    holds a single run, finished or not (its ``run_state.json`` at the top): the sweep's ``jobN/`` folders
    would land among that run's files. A directory of an earlier sweep (``jobN/`` folders, no run state of
    its own) is left to the sweep's jobs, which skip, resume or refuse each ``jobN`` as a run does.
    A ``hydra.sweep.dir`` override starting with ``~`` is refused: Hydra creates that folder itself, as
    a folder named ``~`` (``output_dir``'s ``~`` is expanded by ``${expanduser:...}`` in conf/config.yaml).
    Returns the sweep's directory, None where an interpolation of another key names it."""
    import json
    from pathlib import Path

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from qwen_distillation.training.checkpoint import RUN_STATE

    sweep_dir, written = "${output_dir}", None  # conf/config.yaml: ${expanduser:${output_dir}}
    for override in overrides:  # Hydra applies the last one
        try:
            parsed = OverridesParser.create().parse_override(override)
        except HydraException:
            continue
        if parsed.get_key_element().lstrip("+~") == "hydra.sweep.dir" and isinstance(parsed.value(), str):
            sweep_dir, written = parsed.value(), override
    if written is not None and sweep_dir.startswith("~"):
        # Hydra makes this folder itself, before any of our code sees the path.
        raise UsageError(f"{written}: Hydra would create a folder named `{sweep_dir.split('/')[0]}` in the working "
                         f"directory, not use the home directory; write the path out "
                         f"(hydra.sweep.dir={os.path.expanduser(sweep_dir)}) or leave hydra.sweep.dir out (the sweep "
                         f"then goes to output_dir, where `~` is the home directory); no job was started")
    directory = Path(sweep_dir.replace("${output_dir}", output_dir))
    if "${" in str(directory):
        return None  # an interpolation of another key: not known here
    if not (directory / RUN_STATE).is_file():
        return directory
    try:
        finished = json.loads((directory / RUN_STATE).read_text(encoding="utf-8")).get("finished") is True
    except (OSError, ValueError, AttributeError):
        finished = False
    key = "output_dir" if sweep_dir == "${output_dir}" else "hydra.sweep.dir"
    raise UsageError(f"{key}={directory} holds {'a finished' if finished else 'an unfinished'} single run, not a "
                     f"sweep: the sweep would write its job0/, job1/, ... folders among that run's files; choose a "
                     f"new {key} for the sweep (e.g. {key}={directory}_sweep); no job was started")


def compose_run_config(overrides: list[str], *, one_device: str | None = None):
    """The validated run config of Hydra ``overrides`` (classic flags already translated).

    ``one_device`` (a command that runs without a training engine): why; a ``distributed`` option
    or ``--deepspeed`` is then refused with that reason, before the training-only checks of
    ``validate_config`` could refuse it for an option the command never uses."""
    from hydra import compose

    from qwen_distillation.config.validate import engine_label, validate_config
    from qwen_distillation.errors import ConfigError

    directory, overrides = config_dir(overrides)  # a --config-dir DIR among them (prune, cache_teacher)
    name, overrides = config_name(overrides)  # -cn NAME: a primary config of the user's own
    with hydra_search_path(directory):
        cfg = compose(config_name=name, overrides=overrides)
    if one_device and (cfg.distributed.engine != "none" or cfg.distributed.deepspeed_config):
        raise ConfigError(f"{engine_label(cfg.distributed)}: {one_device}; leave the training engine unset "
                         f"(distributed=none, no --deepspeed)")
    return validate_config(cfg)


def refuse_hydra_flags(overrides: list[str], prog: str) -> None:
    """A command that composes one run config (the cache command, pruning) runs once: Hydra's own flags
    (``-m``/``--multirun``, ``--cfg``, ...) reached Hydra's override parser as overrides and failed with
    'LexerNoViableAltException: -m', though Hydra's own hint for ``key=1,2`` is to add ``--multirun``.
    ``--config-dir DIR`` (the user's own presets) is taken (:func:`config_dir_override`)."""
    flag = next((a.partition("=")[0] for a in config_dir_override(overrides)[1]
                 if a == "-m" or a.partition("=")[0] in HYDRA_FLAGS + HYDRA_VALUE_FLAGS), None)
    if flag is None:
        return
    raise UsageError(f"{flag}: {prog} takes classic flags, Hydra overrides and --config-dir, not Hydra's other "
                     f"flags: it runs one configuration (run it once per value to sweep; `python run_distillation.py "
                     f"--cfg job OVERRIDES` prints the config)")


def config_command(parser, argv: list[str] | None, body, *, one_device: str | None = None) -> None:
    """The entry point of a command that takes a run's config besides its own flags: ``parser``
    reads its flags, the rest are classic flags and Hydra overrides, and ``body(args, cfg)`` runs.
    A user error (bad flag, override or config, or a DistillationError) ends with one ``error:``
    line and exit status 2, as ``run_distillation.py`` does. ``one_device``: see
    ``compose_run_config``."""
    from qwen_distillation.errors import ConfigError, DistillationError

    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        try:
            overrides = translate(rest)
        except UsageError as err:
            if not str(err).startswith("unknown flag"):
                raise
            own = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
            raise UsageError(f"{err}; {parser.prog}'s own flags are: {', '.join(own)}") from None
        refuse_hydra_flags(overrides, parser.prog)
        from qwen_distillation.app import COMPOSE_ERRORS, hydra_error_message, is_config_error

        try:
            cfg = compose_run_config(overrides, one_device=one_device)
        except COMPOSE_ERRORS as err:
            if isinstance(err, DistillationError) or not is_config_error(err):
                raise
            raise ConfigError(hydra_error_message(err, overrides)) from err
        with interrupt_as_one_line("rerun the same command (cache_teacher continues from the shards it had "
                                   "written)"):
            body(args, cfg)
    except (UsageError, DistillationError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
