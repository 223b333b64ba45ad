"""The Hydra application: compose, validate, run the Distiller, report user errors."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qwen_distillation.config.schema import register_configs
from qwen_distillation.config.validate import validate_config
from qwen_distillation.errors import DistillationError

register_configs()

# An absolute path: Hydra resolves a relative one against the package, not the repository.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def run(cfg: DictConfig) -> dict:
    """Validate ``cfg`` and run the stages it asks for; returns the run summary."""
    config = validate_config(cfg)
    # One progress bar per stage is ours; the per-file bars of saves and loads are noise.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        hydra_cfg = HydraConfig.get()
    except ValueError:  # called outside Hydra (tests, notebooks)
        hydra_cfg = None
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        # Each sweep job writes into its own output_dir/jobN.
        config.output_dir = hydra_cfg.runtime.output_dir
    from qwen_distillation.training.distiller import Distiller

    return Distiller(config).run()


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def hydra_entry(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except DistillationError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
