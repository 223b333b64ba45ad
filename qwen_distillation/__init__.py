"""qwen_distillation: multi-stage teacher -> student knowledge distillation of causal language models.

The command line, ``python run_distillation.py ...``, is the main entry point; :func:`distill` runs the
same from Python (a notebook, a script of one's own). Importing the package loads nothing heavy: torch,
transformers and Hydra load when a run starts.
"""

from __future__ import annotations


def distill(*args: str) -> dict:
    """Run ``python run_distillation.py ARGS`` in this process; returns the run's summary (what it writes
    to ``output_dir/summary.json``).

    ``args`` are the command line's, one string each: Hydra overrides (``"stage2.temperature=3"``),
    classic flags (``"--start_stage", "2"`` or ``"--start_stage=2"``), ``"--config-dir", DIR`` and
    ``"-cn", NAME``. A sweep (``-m``) and Hydra's printing flags (``--cfg``, ``--info``) belong to the
    command line alone: loop over ``distill`` calls to sweep. The run's progress goes to the
    ``qwen_distillation`` loggers (``logging.basicConfig(level=logging.INFO)`` shows it).

    Raises:
        DistillationError: (ConfigError, DataError, CheckpointError; a ValueError) where the command line
            exits with status 2, with the message it prints (an unknown flag or key, a value out of range,
            a missing file, ``-m``); the output_dir is left as the command line leaves it.
    """
    import qwen_distillation.app as app
    from qwen_distillation.cli import compose_run_config, refuse_hydra_flags, translate
    from qwen_distillation.compose import config_name
    from qwen_distillation.errors import ConfigError, UsageError

    try:
        overrides = translate(list(args))
        refuse_hydra_flags(config_name(overrides)[1], "qwen_distillation.distill")
        config = compose_run_config(overrides)
    except UsageError as err:
        raise ConfigError(str(err)) from None
    except app.COMPOSE_ERRORS as err:  # Hydra's, as the command line words them
        if not app.is_config_error(err):
            raise
        raise ConfigError(app.hydra_error_message(err, overrides)) from None
    return app.run(config, overrides)
