"""Errors a user can fix. The entry point prints their message and exits with status 2.

Each message names the file, line, field or override at fault and says how to fix it.
"""


class DistillationError(ValueError):
    """Base class for every error caused by user input (config, data, checkpoints)."""


class ConfigError(DistillationError):
    """A configuration value or override is unknown or out of range."""


class DataError(DistillationError):
    """A data file or dataset cannot be read or yields no usable examples."""


class CheckpointError(DistillationError):
    """A checkpoint path is missing, incomplete or does not match the run."""
