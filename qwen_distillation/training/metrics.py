"""Metric sinks: JSON Lines (always the source of truth), TensorBoard and wandb."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from qwen_distillation.errors import CheckpointError, ConfigError, first_line
from qwen_distillation.evaluation.report import METRICS_FILE, json_safe, metrics_lines

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"

# Whole key names or their last part after "_": hf_token, wandb_api_key, password; not "tokenizer".
SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|credentials?)$", re.IGNORECASE)


def scrub_secrets(tree):
    """Replace the values of keys that look like credentials, recursively."""
    if isinstance(tree, dict):
        return {k: "***" if SECRET_KEY.search(str(k)) else scrub_secrets(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [scrub_secrets(v) for v in tree]
    return tree


WANDB_FIX = ("set WANDB_API_KEY to a valid key (https://wandb.ai/authorize) or run `wandb login`, or log offline with "
             "logging.wandb.mode=offline (`wandb sync` uploads it later), or turn wandb off with "
             "logging.wandb.enabled=false")


def _import_wandb():
    try:
        import wandb
    except ImportError as err:
        raise ConfigError("logging.wandb.enabled=true but wandb is not installed; `pip install wandb` "
                          "or set logging.wandb.enabled=false") from err
    return wandb


def wandb_mode(cfg) -> str:
    """The mode of ``logging.wandb`` with ``auto`` resolved: online when WANDB_API_KEY is set."""
    if cfg.mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return cfg.mode


def check_wandb_login(cfg) -> None:
    """An online wandb run (``logging.wandb``) must be able to log in. Called before the models
    load and before the output directory is written, so a key that cannot authenticate costs
    nothing: a ConfigError naming WANDB_API_KEY, ``logging.wandb.mode=offline`` and
    ``logging.wandb.enabled=false`` as the fixes (exit status 2), not a wandb traceback out of
    a half-made output directory. Offline and disabled modes need no login."""
    if not cfg.enabled or wandb_mode(cfg) != "online":
        return
    wandb = _import_wandb()
    try:
        wandb.login(verify=True)
    except wandb.errors.Error as err:  # AuthenticationError, CommError (no server), UsageError (no key, no tty)
        why = " logs online as WANDB_API_KEY is set" if cfg.mode == "auto" else ""
        raise ConfigError(f"logging.wandb.mode={cfg.mode}{why}, but wandb cannot log in: {first_line(err)}; "
                          f"{WANDB_FIX}") from err


class MetricsLogger:
    """Writes one row per call to ``metrics.jsonl`` and mirrors scalars to TensorBoard/wandb.

    Each row carries ``stage``, ``step`` (optimizer step within the stage) and
    ``global_step``. On resume, rows of the resumed stage after the resumed step
    are dropped so the file reads as one uninterrupted run.
    """

    def __init__(self, output_dir: Path, *, jsonl: bool, tensorboard: bool, wandb_cfg, run_config: dict):
        self.path = Path(output_dir) / METRICS_FILE
        self.jsonl = jsonl
        self._tb = None
        self._tb_dir = str(Path(output_dir) / TENSORBOARD_DIR)
        self._wandb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=self._tb_dir)
            except ImportError:
                log.warning("tensorboard is not installed; TensorBoard logging is off (pip install tensorboard)")
        if wandb_cfg.enabled:
            self._wandb = self._start_wandb(wandb_cfg, output_dir, run_config)

    @staticmethod
    def _start_wandb(cfg, output_dir: Path, run_config: dict):
        wandb = _import_wandb()
        mode = wandb_mode(cfg)
        try:
            return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.run_name, mode=mode,
                              dir=str(output_dir), config=scrub_secrets(run_config))
        except wandb.errors.Error as err:
            raise ConfigError(f"logging.wandb: wandb cannot start a run in {mode} mode "
                              f"(project={cfg.project}, entity={cfg.entity}): {first_line(err)}; {WANDB_FIX}") from err

    def truncate(self, stage: int, after_step: int, global_step: int = 0) -> None:
        """Drop rows of ``stage`` logged after ``after_step`` and rows of later stages: what a
        killed run wrote past its last checkpoint, which the resumed run writes again. On
        TensorBoard the same: events after ``global_step`` (the global step of ``after_step``;
        0 for a first stage restarted from its start) are purged when TensorBoard reads the
        directory (``SummaryWriter(purge_step=...)``)."""
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(log_dir=self._tb_dir, purge_step=global_step + 1)
        if not self.path.exists():
            return
        kept = []
        for row, line in self._rows():
            if row.get("stage", 0) > stage or (row.get("stage") == stage and row.get("step", -1) > after_step):
                continue
            kept.append(line)
        tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def _rows(self):
        """(row, line) of each row of ``metrics.jsonl``.

        A last line cut short (no newline: the run was killed while writing it) is dropped with a
        warning; it lies past the last checkpoint, so the resumed run writes it again.

        Raises:
            CheckpointError: any other line is not a JSON object, naming the file, the line and the fix.
        """
        for line in metrics_lines(self.path):
            if line.row is not None:
                yield line.row, line.text
            elif line.cut:
                log.warning("%s line %d: a row cut short by the interrupted run; dropped", self.path, line.number)
            else:
                raise CheckpointError(f"{self.path} line {line.number}: not a metrics row ({line.problem}); delete or "
                                      f"repair that line, or start over with overwrite_output_dir=true")

    def log(self, row: dict, *, mirror: bool = True) -> None:
        """Append ``row`` to ``metrics.jsonl``; with ``mirror``, send its numbers to TensorBoard
        and wandb at ``row["global_step"]``. A row logged at the global step of the step *before*
        the one it prepares (a hard-example scoring pass) is not mirrored: a resume that purges
        TensorBoard after that step would otherwise see it twice."""
        row = {k: json_safe(v) for k, v in row.items()}
        if self.jsonl:
            with self.path.open("a") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        if not mirror:
            return
        step = row.get("global_step", 0)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k not in ("stage", "step",
                                                                                            "global_step")}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log({**scalars, "stage": row.get("stage")}, step=step)

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table of text (e.g. quality samples) to wandb as a ``wandb.Table`` under ``name``;
        a no-op when wandb is off (the caller writes the table to files itself)."""
        if self._wandb is None:
            return
        import wandb

        self._wandb.log({name: wandb.Table(columns=list(columns), data=[list(row) for row in rows])}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullLogger:
    """The logger of every rank but rank 0 in a launch of several: rank 0 logs for the launch."""

    def truncate(self, stage: int, after_step: int, global_step: int = 0) -> None:
        pass

    def log(self, row: dict, *, mirror: bool = True) -> None:
        pass

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        pass

    def close(self) -> None:
        pass
