"""Errors a user can fix. The entry point prints their message and exits with status 2.

Each message names the file, line, field or override at fault and says how to fix it.
"""


class DistillationError(ValueError):
    """Base class for every error caused by user input (config, data, checkpoints)."""


class UsageError(ValueError):
    """A command line that cannot run as given (an unknown flag, a flag without its value, a sweep whose jobs
    cannot run together): printed as ``error: ...`` with exit status 2, before anything runs."""


class ConfigError(DistillationError):
    """A configuration value or override is unknown or out of range."""


class DataError(DistillationError):
    """A data file or dataset cannot be read or yields no usable examples."""


class CheckpointError(DistillationError):
    """A checkpoint path is missing, incomplete or does not match the run."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty), for
    quoting another library's error inside one of ours."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def require(ok: bool, key: str, value, why: str, example: str) -> None:
    """Raise a :class:`ConfigError` naming the override ``key`` unless ``ok``: ``key=value:
    why (override it, e.g. `example`)``."""
    if not ok:
        raise ConfigError(f"{key}={value}: {why} (override it, e.g. `{example}`)")


def require_strings(where: str, entry: dict, examples: dict[str, str]) -> None:
    """Each key of ``examples`` that the mapping ``entry`` (the override ``where``, e.g.
    ``data.general[0]``) sets to a value other than None must hold one string: else a
    :class:`ConfigError` naming ``where.key``, suggesting ``examples[key]``."""
    for key, example in examples.items():
        value = entry.get(key)
        require(value is None or isinstance(value, str), f"{where}.{key}", value,
                "must be one string (quote a name that reads as a number)", example)


def require_one_of(key: str, value, allowed) -> None:
    """``value`` must be one of ``allowed``; the error lists them and suggests the first."""
    allowed = tuple(allowed)
    require(value in allowed, key, value, f"must be one of {', '.join(allowed)}", f"{key}={allowed[0]}")
