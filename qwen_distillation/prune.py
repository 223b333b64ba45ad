"""Prune the teacher into a student and save it, without training (the slim-down step alone).

    python -m qwen_distillation.prune --out out/student_bi model.student.keep_layers=15 \\
        model.student.prune.method=block_influence
    python -m qwen_distillation.prune --out out/student_width model.student.keep_layers=null \\
        model.student.prune.width.intermediate_size=576
    python run_distillation.py --student_model out/student_bi        # start stage 1 from it

The same config as a run (``conf/``, Hydra overrides and the classic flags such as
``--teacher_model`` and ``--general_dataset``): the teacher, ``model.student.keep_layers`` and
``model.student.prune.*`` (docs/pruning.md), the calibration data (``data.*`` or
``model.student.prune.calibration.sources``) and ``train.device``. ``--out`` receives a Hugging Face
model directory (``from_pretrained`` loads it; the teacher's tokenizer beside it), ``pruning.json``
(the kept layers with every layer's score, the width targets, the calibration set) and, with width
pruning, ``pruning_scores.safetensors`` (each channel's importance). It is written under a temporary
name and renamed into place; an existing ``--out`` is refused unless ``--overwrite``, which replaces
only an earlier prune output (the files its ``pruning.json`` lists): an ``--out`` holding anything
else, holding an input of the command (the teacher) or lying inside a directory read as data is refused.
``--dtype`` (``auto``: bfloat16 when the run's precision is bf16, else float32) is the saved weights'.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from qwen_distillation.errors import ConfigError
from qwen_distillation.modeling.prune import PRUNING_FILES
from qwen_distillation.paths import refuse_file_in_the_way, some_names

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# A saved model's and tokenizer's files: what an --out written before pruning.json listed its files holds.
SAVED_MODEL_FILE = re.compile(r"(config|generation_config|tokenizer|tokenizer_config|special_tokens_map|added_tokens"
                              r"|vocab)\.json|model(-\d+-of-\d+)?\.safetensors(\.index\.json)?|(merges|vocab)\.txt"
                              r"|chat_template\.jinja|[\w.-]+\.(model|tiktoken)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_distillation.prune", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments: classic flags and Hydra overrides, as for "
                                            "run_distillation.py.", allow_abbrev=False)
    parser.add_argument("--out", required=True, type=os.path.expanduser, help="directory for the pruned student")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="dtype of the saved weights")
    return parser


def foreign_entries(out: Path) -> list[str]:
    """The entries of the directory ``out`` that the prune command did not write there: all of them
    unless it holds ``pruning.json``, else those its ``files`` list (the model's and tokenizer's files;
    from before they were listed: names like theirs) and PRUNING_FILES do not name."""
    try:
        record = json.loads((out / "pruning.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        return sorted(entry.name for entry in out.iterdir())
    listed = record.get("files")

    def own(name: str) -> bool:
        return name in PRUNING_FILES or (name in listed if isinstance(listed, list) else
                                         bool(SAVED_MODEL_FILE.fullmatch(name)))

    return sorted(entry.name for entry in out.iterdir() if not (entry.is_file() and own(entry.name)))


def prune_and_save(cfg, out: Path, *, overwrite: bool = False, dtype: str = "auto") -> Path:
    """Build the student ``cfg.model.student`` prunes from the teacher and save it into ``out``."""
    from qwen_distillation.config.validate import pruned_from_teacher
    from qwen_distillation.data.sources import DOMAINS, normalise_sources
    from qwen_distillation.modeling.pair import build_pair
    from qwen_distillation.modeling.prune import calibration_source_set, needs_calibration, save_pruning
    from qwen_distillation.training.checkpoint import atomic_dir
    from qwen_distillation.training.distiller import data_entries, model_inputs, select_device
    from qwen_distillation.training.outputs import refuse_output_among_inputs

    if not pruned_from_teacher(cfg.model.student):
        raise ConfigError("model.student: nothing to prune; set model.student.keep_layers=N and/or "
                          "model.student.prune.width.* (e.g. model.student.keep_layers=15 "
                          "model.student.prune.method=block_influence)")
    out = Path(out)
    refuse_file_in_the_way(out, f"--out {out}", "give a directory for the pruned student")
    if cfg.checkpoint_path:
        raise ConfigError(f"checkpoint_path={cfg.checkpoint_path}: the prune command builds the student from the "
                          f"teacher; leave checkpoint_path unset")
    if needs_calibration(cfg.model.student):  # a mistyped data path fails before the teacher loads
        calibration_source_set(cfg.model.student.prune.calibration, cfg.data)
    data = {key: normalise_sources(f"data.{key}", getattr(cfg.data, key)) for key in (*DOMAINS, "eval")}
    refuse_output_among_inputs(out, f"--out {out}", model_inputs(cfg) + data_entries(data), holding=True,
                               why="a run over that data would read the student's files as records",
                               fix="write the pruned student elsewhere (e.g. --out out/student)")
    foreign = foreign_entries(out) if out.is_dir() else []
    if foreign:  # --overwrite replaces the whole directory: only a previous prune output may be replaced
        raise ConfigError(f"--out {out}: holds {some_names(foreign)}, which the prune command did not "
                          f"write (--overwrite replaces only an earlier prune output); choose a new or empty "
                          f"directory, or move {'it' if len(foreign) == 1 else 'them'} out first")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: holds an earlier prune output; choose another directory or pass "
                          f"--overwrite to replace it")
    device, precision = select_device(cfg.train)
    teacher_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    save_dtype = DTYPES.get(dtype) or (torch.bfloat16 if precision == "bf16" else torch.float32)
    torch.manual_seed(cfg.seed)
    cfg.lora.enabled = False  # the student itself, never an adapter
    pair = build_pair(cfg, device=device, teacher_dtype=teacher_dtype, output_dir=out)
    student = pair.student.to(save_dtype)
    with atomic_dir(out) as tmp:
        student.save_pretrained(tmp, safe_serialization=True)
        pair.tokenizer.save_pretrained(tmp)
        files = sorted(entry.name for entry in tmp.iterdir())  # what --overwrite may replace next time
        save_pruning(tmp, replace(pair.pruned, record={**pair.pruned.record, "files": files}))
    return out


def main(argv: list[str] | None = None) -> None:
    from qwen_distillation.cli import config_command

    def body(args, cfg):
        import logging

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        out = prune_and_save(cfg, Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
        print(f"pruned student: {out} (pruning.json: what was kept and why)")

    config_command(_parser(), argv, body,
                   one_device="the prune command scores and slims the whole teacher in one process")

if __name__ == "__main__":
    main()
