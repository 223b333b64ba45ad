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
name and renamed into place; an existing ``--out`` is refused unless ``--overwrite``.
``--dtype`` (``auto``: bfloat16 when the run's precision is bf16, else float32) is the saved weights'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from qwen_distillation.errors import ConfigError
from qwen_distillation.paths import refuse_file_in_the_way

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen_distillation.prune", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments: classic flags and Hydra overrides, as for "
                                            "run_distillation.py.")
    parser.add_argument("--out", required=True, help="directory for the pruned student")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="dtype of the saved weights")
    return parser


def prune_and_save(cfg, out: Path, *, overwrite: bool = False, dtype: str = "auto") -> Path:
    """Build the student ``cfg.model.student`` prunes from the teacher and save it into ``out``."""
    from qwen_distillation.config.validate import pruned_from_teacher
    from qwen_distillation.modeling.pair import build_pair
    from qwen_distillation.modeling.prune import calibration_source_set, needs_calibration, save_pruning
    from qwen_distillation.training.checkpoint import atomic_dir
    from qwen_distillation.training.distiller import select_device

    if not pruned_from_teacher(cfg.model.student):
        raise ConfigError("model.student: nothing to prune; set model.student.keep_layers=N and/or "
                          "model.student.prune.width.* (e.g. model.student.keep_layers=15 "
                          "model.student.prune.method=block_influence)")
    out = Path(out)
    refuse_file_in_the_way(out, f"--out {out}", "give a directory for the pruned student")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"--out {out}: exists and is not empty; choose another directory or pass --overwrite")
    if cfg.checkpoint_path:
        raise ConfigError(f"checkpoint_path={cfg.checkpoint_path}: the prune command builds the student from the "
                          f"teacher; leave checkpoint_path unset")
    if needs_calibration(cfg.model.student):  # a mistyped data path fails before the teacher loads
        calibration_source_set(cfg.model.student.prune.calibration, cfg.data)
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
        save_pruning(tmp, pair.pruned)
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
